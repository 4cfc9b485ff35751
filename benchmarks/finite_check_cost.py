"""What the float decoders' non-finite check costs on the server's hot path (fp32, fp16, bf16).

    python benchmarks/finite_check_cost.py                       # every size, both torch ISAs
    python benchmarks/finite_check_cost.py --sizes 1e6 --isa native --repeat 3

A finite encoder never sends NaN or Inf (it sends a payload flagged non-finite), so the float
decoders check what they converted (``dist_quant.compress.floats``: ``decode(out=...)`` checks
the payload's values, ``decode_mean`` checks the mean, finite only if every row is; one
``count_nonfinite`` each, a sum and a comparison). Measured in one process, back to back: each
operation with the check as shipped (A) and with ``count_nonfinite`` replaced by a function that
returns 0 (B, the decode without the check), for W = ``--workers`` rows of ``n`` coordinates
into a reused buffer, and a plain ``copy_`` of ``n`` fp32 values into a reused buffer as the
memory-bound reference. Every figure is the minimum over ``--repeat`` rounds
(``bench_compress.measure``); the ratio A / B is the check's cost. One torch thread, as in
training.

Also, for the 16-bit compressors, ``decode_mean`` as it was before its rows were widened a
chunk at a time (``out.add_`` of each fp16/bf16 row into the fp32 mean, torch's mixed add:
the "mixed-add mean" column), against the shipped one, which gives the same bits.

torch's own kernels pick their vector width at start-up, so each ``--isa`` level runs in a
child process: ``native`` leaves ``ATEN_CPU_CAPABILITY`` unset (the widest the CPU has),
``avx2`` is what an AVX2 laptop runs, ``default`` is torch's build without vector
instructions (the floor every CPU has); a level the CPU lacks is refused and reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import torch
from bench_compress import measure, parse_sizes

from dist_quant.compress import floats, get_compressor, wire


def _no_check(x: torch.Tensor) -> int:
    return 0


def _mixed_mean(comp, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The 16-bit decode_mean before chunked widening: each row added to the fp32 mean by
    torch's mixed add (the finite check as shipped)."""
    out.zero_()
    for row in rows:
        out.add_(row[wire.FIXED_NBYTES:].view(comp.dtype))
    out.div_(rows.shape[0])
    if floats.count_nonfinite(out):
        raise ValueError("non-finite mean")
    return out


def run_level(sizes: list[int], workers: int, repeat: int, min_time: float) -> dict:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    rows_out = []
    for n in sizes:
        x = torch.randn(n, generator=gen)
        buf = torch.empty(n)
        buf.zero_()
        ref = measure({"copy_into": lambda x=x, buf=buf: buf.copy_(x)}, repeat, lambda: None,
                      min_time)["copy_into"]
        for name in ("none", "fp16", "bf16"):
            comp = get_compressor(name)
            payload = comp.encode(x)
            rows = torch.stack([comp.encode(x * (1 + w / 8)).to_tensor() for w in range(workers)])
            ops = {"decode_into": lambda c=comp, p=payload, b=buf: c.decode(p, out=b),
                   "decode_mean": lambda c=comp, r=rows, b=buf: c.decode_mean(r, out=b)}
            checked = measure(ops, repeat, lambda: None, min_time)
            mixed = None
            if comp.dtype != torch.float32:
                mixed = measure({"mixed": lambda c=comp, r=rows, b=buf: _mixed_mean(c, r, b)},
                                repeat, lambda: None, min_time)["mixed"]
            real, floats.count_nonfinite = floats.count_nonfinite, _no_check
            try:
                unchecked = measure(ops, repeat, lambda: None, min_time)
            finally:
                floats.count_nonfinite = real
            for op in ops:
                rows_out.append({"n": n, "compressor": name, "op": op,
                                 "checked_s": checked[op], "unchecked_s": unchecked[op],
                                 "copy_s": ref,
                                 "mixed_s": mixed if op == "decode_mean" else None})
    return {"capability": torch.backends.cpu.get_cpu_capability(), "rows": rows_out}


def table(level: str, result: dict, workers: int) -> list[str]:
    lines = [f"### ATEN_CPU_CAPABILITY={level} (torch reports {result['capability']})", "",
             "| n | compressor | operation | with check ms | without ms | ratio | check ms | "
             "fp32 copy ms | mixed-add mean ms |", "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        op = r["op"] if r["op"] != "decode_mean" else f"decode_mean (W = {workers})"
        a, b = r["checked_s"] * 1e3, r["unchecked_s"] * 1e3
        lines.append(f"| {r['n']:,} | {r['compressor']} | {op} | {a:.3f} | {b:.3f} | "
                     f"{a / b:.2f} | {a - b:.3f} | {r['copy_s'] * 1e3:.3f} | "
                     f"{'' if r['mixed_s'] is None else format(r['mixed_s'] * 1e3, '.3f')} |")
    return lines + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="47242,1e6,16e6", help="coordinates, comma-separated")
    ap.add_argument("--workers", type=int, default=4, help="rows of decode_mean")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per timing")
    ap.add_argument("--isa", default="native,avx2,default",
                    help="ATEN_CPU_CAPABILITY levels (native: unset)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = parse_sizes(args.sizes)
    if args.child:
        print(json.dumps(run_level(sizes, args.workers, args.repeat, args.min_time)))
        return 0
    print(f"# cpu: {platform.processor() or platform.machine()}; torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.2f} at start\n")
    for level in args.isa.split(","):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("ATEN_CPU_CAPABILITY", None)
        if level != "native":
            env["ATEN_CPU_CAPABILITY"] = level
        argv = [sys.executable, __file__, "--child", "--sizes", args.sizes, "--workers",
                str(args.workers), "--repeat", str(args.repeat), "--min-time",
                str(args.min_time)]
        res = subprocess.run(argv, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"### ATEN_CPU_CAPABILITY={level}: failed\n\n```\n{res.stderr[-2000:]}```\n")
            continue
        print("\n".join(table(level, json.loads(res.stdout.splitlines()[-1]), args.workers)))
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
