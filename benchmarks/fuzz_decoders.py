"""Long fuzz runs of the decoders (not part of the test suite; the bounded run is
``tests/test_compress_fuzz.py``, the examples and the contract ``tests/decoder_fuzz.py``).

    python benchmarks/fuzz_decoders.py --minutes-per-decoder 10 --jobs 2 --out fuzz-out
    python benchmarks/fuzz_decoders.py --minutes-per-decoder 2 --asan --out fuzz-asan
    python benchmarks/fuzz_decoders.py --replay fuzz-out/corpus

Each decoder (``none fp16 bf16 onebit kbit sign qsgd terngrad topk randk header``) runs in a
process of its own, ``--jobs`` at a time, for ``--minutes-per-decoder`` minutes, on the pure-torch
path and on the compiled C kernels in turn (``--paths``). A process that dies (a crash, a
sanitizer report) or stops making progress (``--hang-seconds`` on one example: faulthandler
dumps its stack and ends it) is recorded with the example it was running. Under ``--out``:

- ``corpus/<decoder>/``: one payload per distinct outcome (each error message with its numbers
  blanked, and "decoded"), ``.bin`` with the bytes and ``.json`` with the configuration, ``n``,
  the mutation recipe and the outcome; ``--replay`` runs every stored payload again;
- ``failures/<decoder>/``: every example that broke the contract, the same two files;
- ``inflight/<decoder>.json``: the example being run (what a crash or a hang leaves behind);
- ``<decoder>.log``: the process's output; ``summary.json``: per decoder the seconds it ran,
  the examples tried, the failures, the exit status.

``--asan`` builds the C kernels with ``-fsanitize=address,undefined`` into a private cache and
runs every process with the compiler's libasan preloaded (``halt_on_error``: a report ends the
process, which is then recorded as a failure).
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import decoder_fuzz  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dist_quant.compress import fast, get_compressor  # noqa: E402

SANITIZE = ("-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
            "-fno-omit-frame-pointer", "-g")
CHUNK = 50  # examples per hypothesis run (a fresh seed each)


def _outcome_key(err: BaseException | None) -> str:
    if err is None:
        return "decoded"
    text = re.sub(r"0x[0-9a-f]+", "0x#", str(err))
    text = re.sub(r"\d+(\.\d+)?(e[+-]?\d+)?", "#", text)
    text = re.sub(r"'[^']*'", "'*'", text)
    return f"{type(err).__name__}: {text[:120]}"


def _save(folder: Path, ex, path: str, outcome: str) -> None:
    stem = hashlib.sha256(ex.mutated + outcome.encode()).hexdigest()[:16]
    decoder_fuzz.save_entry(folder, stem, ex, path, outcome)


def _use_sanitized_kernels() -> None:
    """Load kernels built with the sanitizers in place of the cached ones."""
    level = fast.isa()
    fast._loaded[("lib", level)] = fast._bind(fast.build(level=level, extra_flags=SANITIZE))


def canary() -> int:
    """Read past the end of a 3-byte tensor with the sanitized decode kernel: under --asan the
    sanitizer must report it (the proof that the run would see such a read)."""
    _use_sanitized_kernels()
    lib = fast.library()
    bits = torch.zeros(3, dtype=torch.uint8)  # 24 coordinates of 1 bit; 64 are decoded
    a, b, out = torch.ones(1), torch.zeros(1), torch.empty(64)
    lib.dq_decode(bits.data_ptr(), 64, 1, a.data_ptr(), b.data_ptr(), out.data_ptr(), 0, 64, 0)
    print("canary: no sanitizer report", flush=True)
    return 0


def child(args) -> int:
    torch.set_num_threads(args.threads)
    if args.asan:
        _use_sanitized_kernels()
    decoder = args.child
    out = Path(args.out)
    corpus, failures = out / "corpus" / decoder, out / "failures" / decoder
    inflight = out / "inflight" / f"{decoder}.json"
    inflight.parent.mkdir(parents=True, exist_ok=True)
    seen = {p.name[:-len("-outcome.json")] for p in corpus.glob("*-outcome.json")}
    configs = decoder_fuzz.DECODERS[decoder] or None
    paths = args.paths.split(",")
    stats = {"examples": 0, "failures": 0, "outcomes": {}, "path_examples": {}}
    deadline = time.monotonic() + 60 * args.minutes_per_decoder
    start = time.monotonic()

    @settings(max_examples=CHUNK, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(ex=decoder_fuzz.examples(configs=configs, big=True), path=st.sampled_from(paths))
    def one(ex, path):
        if time.monotonic() > deadline:
            return
        inflight.write_text(json.dumps({"config": ex.config, "n": ex.n, "path": path,
                                        "recipe": ex.recipe, "mutated": ex.mutated.hex()},
                                       default=str))
        faulthandler.dump_traceback_later(args.hang_seconds, exit=True)
        err = None
        try:
            decoder_fuzz.run(decoder, ex, path)
            with fast.use(path):
                kind, value = decoder_fuzz.outcome(lambda: _decode_for_key(decoder, ex))
            err = value if kind == "error" else None
        except Exception as exc:  # a broken contract: recorded, the run goes on
            stats["failures"] += 1
            _save(failures, ex, path, f"FAIL {type(exc).__name__}: {exc}")
            print(f"FAIL {decoder} {path} {ex.config} n={ex.n} {ex.recipe}: "
                  f"{type(exc).__name__}: {exc}", flush=True)
        finally:
            faulthandler.cancel_dump_traceback_later()
        stats["examples"] += 1
        stats["path_examples"][path] = stats["path_examples"].get(path, 0) + 1
        key = _outcome_key(err)
        stats["outcomes"][key] = stats["outcomes"].get(key, 0) + 1
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        if digest not in seen:
            seen.add(digest)
            _save(corpus, ex, path, key)
            (corpus / f"{digest}-outcome.json").write_text(json.dumps(key))

    chunk = 0
    while time.monotonic() < deadline:
        seed(args.seed * 1_000_003 + chunk)(one)()
        chunk += 1
    stats["seconds"] = round(time.monotonic() - start, 1)
    stats["chunks"] = chunk
    (out / f"{decoder}.stats.json").write_text(json.dumps(stats, indent=1))
    inflight.unlink(missing_ok=True)
    print(json.dumps({k: stats[k] for k in ("examples", "failures", "seconds")}), flush=True)
    return 1 if stats["failures"] else 0


def _decode_for_key(decoder: str, ex):
    """The outcome that names the example's corpus entry: its own decoder's decode."""
    if decoder == "header":  # the parser, then the decoder the header names
        header = decoder_fuzz.wire.read_header(decoder_fuzz.as_tensor(ex.mutated))
        named = [c for c in decoder_fuzz.CONFIGS
                 if get_compressor(c[0], **c[1]).wire_id == header.compressor_id]
        if not named:
            return header
        comp = get_compressor(named[0][0], **named[0][1])
    else:
        comp = get_compressor(ex.config[0], **ex.config[1])
    return comp.decode(decoder_fuzz.as_tensor(ex.mutated))


def replay(folder: Path) -> int:
    """Run every stored payload of a corpus or failures folder again; count the broken ones."""
    broken = total = 0
    for meta in decoder_fuzz.entries(folder):
        total += 1
        try:
            decoder_fuzz.replay_entry(meta)
        except Exception as exc:
            broken += 1
            print(f"BROKEN {meta}: {type(exc).__name__}: {exc}")
    print(f"replayed {total}, broken {broken}")
    return 1 if broken else 0


def _asan_env() -> dict:
    env = dict(os.environ)
    lib = subprocess.run([os.environ.get("CC", "cc"), "-print-file-name=libasan.so"],
                         capture_output=True, text=True, check=True).stdout.strip()
    if not os.path.isabs(lib):
        raise SystemExit("--asan: the C compiler has no libasan.so")
    env["LD_PRELOAD"] = lib
    # python and torch are not instrumented: their allocations are tracked, leaks are not
    env["ASAN_OPTIONS"] = ("detect_leaks=0:halt_on_error=1:allocator_may_return_null=1:"
                           "detect_odr_violation=0")
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    return env


def parent(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    decoders = args.decoders.split(",") if args.decoders else sorted(decoder_fuzz.DECODERS)
    env = _asan_env() if args.asan else dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.asan:  # built here, without the preload, into a private cache
        env["DIST_QUANT_CACHE"] = os.environ["DIST_QUANT_CACHE"] = str(out / "kernels-cache")
        print(f"sanitized kernels: {fast.build(level=fast.isa(), extra_flags=SANITIZE)}",
              flush=True)
    summary = {}
    if args.asan:
        proc = subprocess.run([sys.executable, __file__, "--canary"], env=env, text=True,
                              capture_output=True)
        seen = "ERROR: AddressSanitizer: heap-buffer-overflow" in proc.stderr
        print(f"sanitizer canary (a read past a tensor's end) reported: {seen}", flush=True)
        if not seen:
            raise SystemExit("--asan: the sanitizer did not see the canary's read; stopping")
        summary["asan_canary_reported"] = seen
    base = [sys.executable, __file__, "--minutes-per-decoder", str(args.minutes_per_decoder),
            "--out", str(out), "--paths", args.paths, "--seed", str(args.seed),
            "--hang-seconds", str(args.hang_seconds), "--threads", str(args.threads)]
    if args.asan:
        base.append("--asan")
    pending, running = list(decoders), {}
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            log = open(out / f"{name}.log", "w")  # noqa: SIM115 (closed when it ends)
            proc = subprocess.Popen([*base, "--child", name], stdout=log,
                                    stderr=subprocess.STDOUT, env=env)
            running[name] = (proc, log, time.monotonic())
            print(f"started {name} (pid {proc.pid})", flush=True)
        time.sleep(1)
        for name, (proc, log, began) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            stats_file = out / f"{name}.stats.json"
            stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
            text = (out / f"{name}.log").read_text(errors="replace")
            summary[name] = {
                "returncode": proc.returncode, "wall_seconds": round(time.monotonic() - began),
                "seconds": stats.get("seconds"), "examples": stats.get("examples"),
                "path_examples": stats.get("path_examples"),
                "failures": stats.get("failures"), "outcomes": len(stats.get("outcomes", {})),
                "sanitizer_report": bool(re.search(r"ERROR: AddressSanitizer|runtime error:",
                                                   text)),
                "hang": "Timeout (" in text}
            print(f"ended {name}: {json.dumps(summary[name])}", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    runs = {n: s for n, s in summary.items() if isinstance(s, dict)}
    bad = [n for n, s in runs.items() if s["returncode"] or s["sanitizer_report"]]
    print(f"decoders: {len(runs)}, examples: {sum(s['examples'] or 0 for s in runs.values())}, "
          f"bad: {bad or 'none'}")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes-per-decoder", type=float, default=10.0)
    ap.add_argument("--decoders", default="", help="comma-separated (default: all)")
    ap.add_argument("--paths", default="torch,c", help="decode paths, comma-separated")
    ap.add_argument("--jobs", type=int, default=2, help="decoders fuzzed at a time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hang-seconds", type=float, default=120.0)
    ap.add_argument("--asan", action="store_true", help="sanitized C kernels, libasan preloaded")
    ap.add_argument("--out", default="fuzz-out")
    ap.add_argument("--replay", help="a corpus or failures folder to run again")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--canary", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.replay:
        return replay(Path(args.replay))
    if args.canary:
        return canary()
    return child(args) if args.child else parent(args)


if __name__ == "__main__":
    sys.exit(main())
