"""Encode/decode throughput of the compressors against memory-bound reference operations.

Run from the repository root (not part of the test suite); one command writes the record::

    python benchmarks/bench_compress.py                      # full run, writes the dated record
    python benchmarks/bench_compress.py --sizes 1e4,1e6 --isa avx2 --no-record   # quick look
    python benchmarks/bench_compress.py --device cuda        # on a GPU: Triton against the cast

Measured in one process, on fp32 input of n elements, as GB/s of input (4 n bytes / time):

- references: ``x.to(torch.bfloat16)`` (fp32 -> bf16 cast, new output), the same cast into a
  reused bf16 buffer, ``x.clone()`` and a copy into a reused fp32 buffer;
- ``encode`` and ``decode`` of onebit (whole tensor and buckets of 512), kbit 2/4/8 (buckets of
  512) and sign (buckets of 512); decode both into a new tensor (``decode(p)``) and into a reused
  buffer (``decode(p, out=buf)``, what the server does every step); and the server's
  ``decode_mean`` of W = 4 payloads into a reused buffer, per worker (time / W).

On the CPU, once per ISA level of the compiled kernels (``--isa``, as ``DIST_QUANT_ISA``), each
level's table with its own reference timings. Ratios are throughput ratios against the cast:
encode against ``x.to(bf16)``, decode into a new tensor against the same, decode into a reused
buffer and decode_mean per worker against the cast into a reused buffer (both then exclude the
operating system's cost of mapping fresh pages). A new decode output is fp32, twice the bytes
of the cast's bf16 output, and large allocations come from the operating system freshly mapped
and zeroed, a cost per byte; so the headline also gives decode against ``clone`` (a new output
of the same size). Every figure is the minimum over ``--repeat`` rounds; within a round the
operations run back to back, so a busy machine slows the reference and the compressor alike.
One thread (``torch.set_num_threads(1)``, as in training) unless ``--threads`` says more. With
``--device cuda``, the same on the GPU (Triton kernels where installed, and the pure-torch path)
against the GPU's own cast.

Also: the server's ``decode_mean`` of W payloads (16M coordinates, onebit, buckets of 512) into
a reused buffer, time per step against W; and (``--phase-share``, on by default) the share of
encode + decode in the step of the default job (``dist-quant train``) with the kernels forced
to ``--phase-isa`` (``benchmarks/phase_share.py``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dist_quant.compress import fast, get_compressor, kernels_c  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from phase_share import phase_means  # noqa: E402

COMPRESSORS = [
    ("onebit", dict(), "onebit"),
    ("onebit/512", dict(bucket_size=512), "onebit"),
    ("kbit2/512", dict(bits=2, bucket_size=512), "kbit"),
    ("kbit4/512", dict(bits=4, bucket_size=512), "kbit"),
    ("kbit8/512", dict(bits=8, bucket_size=512), "kbit"),
    ("sign/512", dict(bucket_size=512), "sign"),
]
TORCH_PATH_MAX = 16 * 2**20  # the pure-torch comparison row is skipped above this size
MEAN_WORKERS = 4  # rows of the per-compressor decode_mean column


def parse_sizes(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s]


def timed(fn, sync, min_time: float) -> float:
    """Seconds per call: enough calls back to back to last ``min_time``."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    once = time.perf_counter() - start
    calls = max(1, int(min_time / max(once, 1e-7)))
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls


def measure(ops: dict, repeat: int, sync, min_time: float) -> dict[str, float]:
    best = {name: float("inf") for name in ops}
    for _ in range(repeat):
        for name, fn in ops.items():
            best[name] = min(best[name], timed(fn, sync, min_time))
    return best


def size_ops(n: int, device: str, gen, level: str | None) -> dict:
    x = torch.randn(n, device=device, generator=gen)
    bf = torch.empty(n, dtype=torch.bfloat16, device=device)
    buf = torch.empty(n, device=device)
    buf.zero_()
    bf.zero_()
    ops = {
        "cast": lambda: x.to(torch.bfloat16),
        "cast_into": lambda: bf.copy_(x),
        "clone": lambda: x.clone(),
        "copy_into": lambda: buf.copy_(x),
    }
    paths = [("", "auto")]
    if n <= TORCH_PATH_MAX:
        paths.append((" (torch path)", "torch"))
    for label, options, name in COMPRESSORS:
        comp = get_compressor(name, **options)
        for suffix, path in paths:
            if suffix and label != "onebit/512":
                continue
            with fast.use(path, level):
                payload = comp.encode(x, generator=gen)
                rows = torch.stack([comp.encode(x, generator=gen).to_tensor()
                                    for _ in range(MEAN_WORKERS)])

            def enc(comp=comp, path=path):
                with fast.use(path, level):
                    comp.encode(x, generator=gen)

            def dec(comp=comp, path=path, payload=payload):
                with fast.use(path, level):
                    comp.decode(payload)

            def dec_into(comp=comp, path=path, payload=payload):
                with fast.use(path, level):
                    comp.decode(payload, out=buf)

            def mean(comp=comp, path=path, rows=rows):
                with fast.use(path, level):
                    comp.decode_mean(rows, out=buf)

            key = label + suffix
            ops[f"{key}|encode"] = enc
            ops[f"{key}|decode"] = dec
            ops[f"{key}|decode_into"] = dec_into
            ops[f"{key}|decode_mean"] = mean
            ops[f"{key}|bytes"] = payload.nbytes
    return ops


def run_size(n, device, repeat, min_time, level=None):
    gen = torch.Generator(device=device).manual_seed(0)
    ops = size_ops(n, device, gen, level)
    nbytes = {k.split("|")[0]: v for k, v in ops.items() if k.endswith("|bytes")}
    timings = measure({k: v for k, v in ops.items() if not k.endswith("|bytes")}, repeat,
                      (torch.cuda.synchronize if device == "cuda" else (lambda: None)), min_time)
    return timings, nbytes


def gbps(n: int, seconds: float) -> float:
    return 4 * n / seconds / 1e9


def table(n: int, timings: dict, nbytes: dict) -> list[str]:
    cast, cast_into = timings["cast"], timings["cast_into"]
    lines = [
        f"| n = {n:,} | payload B | encode GB/s | x cast | decode GB/s | x cast | "
        f"decode into GB/s | x cast into | decode_mean GB/s per worker (W={MEAN_WORKERS}) | "
        f"x cast into |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| fp32 -> bf16 cast | {2 * n:,} | {gbps(n, cast):.2f} | 1.00 | | | "
        f"{gbps(n, cast_into):.2f} | 1.00 | | |",
        f"| clone / copy | {4 * n:,} | {gbps(n, timings['clone']):.2f} | "
        f"{cast / timings['clone']:.2f} | | | {gbps(n, timings['copy_into']):.2f} | "
        f"{cast_into / timings['copy_into']:.2f} | | |",
    ]
    for key, size in nbytes.items():
        enc, dec, into = (timings[f"{key}|{op}"] for op in ("encode", "decode", "decode_into"))
        mean = timings[f"{key}|decode_mean"] / MEAN_WORKERS
        lines.append(f"| {key} | {size:,} | {gbps(n, enc):.2f} | {cast / enc:.2f} | "
                     f"{gbps(n, dec):.2f} | {cast / dec:.2f} | {gbps(n, into):.2f} | "
                     f"{cast_into / into:.2f} | {gbps(n, mean):.2f} | {cast_into / mean:.2f} |")
    return lines


def headline(level: str, timings: dict) -> list[str]:
    """The targets at 16M, 1 thread: onebit/512 encode and decode into >= 1.0x, sign >= 0.5x,
    kbit 2 >= 0.8x."""
    def ratio(key, op, ref):
        return timings[ref] / timings[f"{key}|{op}"]

    out = []
    for key in ("onebit/512", "onebit", "kbit2/512", "sign/512"):
        out.append(f"- {level}, {key}: encode {ratio(key, 'encode', 'cast'):.2f}x cast, "
                   f"decode into {ratio(key, 'decode_into', 'cast_into'):.2f}x cast into, "
                   f"decode {ratio(key, 'decode', 'cast'):.2f}x cast "
                   f"({ratio(key, 'decode', 'clone'):.2f}x clone)")
    return out


def server_table(workers: list[int], n: int, repeat: int, min_time: float,
                 level: str | None = None) -> list[str]:
    comp = get_compressor("onebit", bucket_size=512)
    gen = torch.Generator().manual_seed(0)
    with fast.use("auto", level):
        rows = torch.stack([comp.encode(torch.randn(n, generator=gen), generator=gen)
                            .to_tensor() for _ in range(max(workers))])
    out = torch.zeros(n)
    lines = [f"| W (n = {n:,}, onebit/512) | decode_mean ms | ms per worker | GB/s of fp32 out "
             f"per worker |", "|---:|---:|---:|---:|"]

    def mean(b):
        with fast.use("auto", level):
            comp.decode_mean(b, out=out)

    for w in workers:
        batch = rows[:w].contiguous()
        t = measure({"m": lambda b=batch: mean(b)}, repeat, lambda: None, min_time)["m"]
        lines.append(f"| {w} | {1e3 * t:.2f} | {1e3 * t / w:.2f} | {gbps(n * w, t):.2f} |")
    return lines


def phase_share(level: str) -> list[str]:
    """Run the default job (dist-quant train) with the kernels forced to ``level`` and report
    the per-phase means (benchmarks/phase_share.py)."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        env = dict(os.environ, DIST_QUANT_ISA=level)
        command = [sys.executable, "-m", "dist_quant", "train", "--no-progress",
                   "--run-dir", str(run_dir)]
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return [f"`dist-quant train` failed (exit {proc.returncode}):", "",
                    "```", proc.stderr[-2000:], "```"]
        means, count = phase_means(run_dir)
    step = sum(means.values())
    share = (means["encode"] + means["decode"]) / step
    lines = [f"`DIST_QUANT_ISA={level} dist-quant train --no-progress` (the default job), "
             f"{count} steps (the first 10 and evaluation steps left out); the training "
             f"line: {proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else '-'}",
             "", "| phase | ms per step | share |", "|---|---:|---:|"]
    lines += [f"| {p} | {1e3 * t:.3f} | {100 * t / step:.1f}% |" for p, t in means.items()]
    lines += [f"| step | {1e3 * step:.3f} | 100% |",
              f"| encode + decode | {1e3 * (means['encode'] + means['decode']):.3f} | "
              f"{100 * share:.1f}% |"]
    return lines


def describe() -> list[str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        thp = "unknown"
    kernels = ("compiled C, one table per ISA level below" if fast.library() is not None
               else "pure torch (no compiler)")
    try:
        import triton
        tri = f"triton {triton.__version__}"
    except ImportError:
        tri = "triton not installed"
    return [
        f"- commit `{commit}`, torch {torch.__version__}, Python {platform.python_version()}",
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; transparent huge pages: `{thp}`; "
        f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}",
        f"- k-bit kernels: {kernels} (DIST_QUANT_KERNELS="
        f"{os.environ.get('DIST_QUANT_KERNELS', 'auto')})",
        f"- CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}; "
        f"{tri}",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1e5,1e6,16777216",
                        help="comma-separated element counts (default %(default)s)")
    parser.add_argument("--threads", default="1", help="thread counts: numbers or 'all'")
    parser.add_argument("--isa", default="native,avx2,generic",
                        help="ISA levels of the compiled kernels, one table each (default "
                        "%(default)s; levels this CPU cannot run are left out)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: the GPU tables only (Triton and torch paths)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the minimum is kept")
    parser.add_argument("--min-time", type=float, default=0.05,
                        help="seconds of back-to-back calls per timing")
    parser.add_argument("--workers", default="1,2,4,8,16", help="W for the server table")
    parser.add_argument("--server-n", type=int, default=16 * 2**20)
    parser.add_argument("--phase-share", action=argparse.BooleanOptionalAction, default=True,
                        help="run the default job and report the encode + decode share")
    parser.add_argument("--phase-isa", default="avx2", help="ISA level of that run")
    parser.add_argument("--note", default="", help="a line for the record (e.g. the machine "
                        "was shared)")
    parser.add_argument("--out", default=None, help="record path (default "
                        "benchmarks/compress-<date>.md)")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args(argv)

    sizes = parse_sizes(args.sizes)
    threads = [os.cpu_count() if t == "all" else int(t) for t in args.threads.split(",")]
    levels = [lvl for lvl in args.isa.split(",") if lvl]
    for lvl in levels:
        kernels_c.level_flags(lvl)  # validates the name
    skipped = [lvl for lvl in levels if not kernels_c.cpu_runs(lvl)]
    levels = [lvl for lvl in levels if lvl not in skipped]
    date = datetime.date.today().isoformat()
    command = "python benchmarks/bench_compress.py " + shlex.join(sys.argv[1:] if argv is None
                                                                  else argv)
    lines = [f"# Compressor throughput, {date}", "", f"Command: `{command.strip()}`", "",
             *describe(), *([f"- {args.note}"] if args.note else []),
             *([f"- levels this CPU cannot run, left out: {', '.join(skipped)}"] if skipped
               else []),
             "", "Measured " + __doc__.split("Measured", 1)[1].strip(), ""]
    print("\n".join(lines), flush=True)

    def emit(new):
        lines.extend(new)
        print("\n".join(new), flush=True)

    heads = []
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device")
        from dist_quant.compress import gpu

        path = "Triton kernels" if gpu.available() else "pure torch (triton not installed)"
        emit([f"## CUDA ({torch.cuda.get_device_name()}): {path}; the torch path row for "
              f"comparison", ""])
        for n in sizes:
            timings, nbytes = run_size(n, "cuda", args.repeat, args.min_time)
            emit(table(n, timings, nbytes) + [""])
            if n == 16 * 2**20:
                heads += headline("cuda", timings)
    for level in levels if args.device == "cpu" else []:
        flags = " ".join(kernels_c.level_flags(level))
        for t in threads:
            torch.set_num_threads(t)
            emit([f"## CPU, DIST_QUANT_ISA={level} (`{flags}`), {t} thread"
                  f"{'s' if t > 1 else ''}", ""])
            for n in sizes:
                timings, nbytes = run_size(n, "cpu", args.repeat, args.min_time, level)
                emit(table(n, timings, nbytes) + [""])
                if t == 1 and n == 16 * 2**20:
                    heads += headline(level, timings)
        torch.set_num_threads(1)
        emit([f"## Server, DIST_QUANT_ISA={level}: decode_mean of W payloads, 1 thread", ""])
        emit(server_table([int(w) for w in args.workers.split(",")], args.server_n,
                          args.repeat, args.min_time, level) + [""])
    if heads:
        emit(["## 16M elements, 1 thread (targets with avx2: onebit/512 encode and decode "
              "into >= 1.0x, kbit2 >= 0.8x, sign >= 0.5x)", "", *heads, ""])
    if args.phase_share and args.device == "cpu":
        emit([f"## Share of encode + decode in the step, DIST_QUANT_ISA={args.phase_isa}", "",
              *phase_share(args.phase_isa), ""])
    if not args.no_record:
        path = Path(args.out) if args.out else ROOT / "benchmarks" / f"compress-{date}.md"
        path.write_text("\n".join(lines) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
