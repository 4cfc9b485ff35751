"""How long ``dist-quant train`` takes to refuse a bad option, beside ``dist-quant --version``.

    python benchmarks/cli_refusal.py              # five of each, medians
    python benchmarks/cli_refusal.py --runs 9 -- --steps 0

Each measurement is the wall clock of one ``dist-quant`` subprocess, from its start to its exit
(the interpreter's start-up included, as a user waits for it). ``--version`` imports the
command group only: the floor of any answer. A bad option should be refused in under a second
(the options are checked before torch is imported). Prints both medians, the CPU model and the
load average, since a loaded machine stretches both.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command() -> list[str]:
    """The installed ``dist-quant`` script, else the same group through this interpreter."""
    script = shutil.which("dist-quant")
    return [script] if script else [sys.executable, "-m", "dist_quant"]


def timed(argv: list[str], expect: int) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if out.returncode != expect:
        sys.exit(f"{' '.join(argv)}: exit status {out.returncode}, expected {expect}\n"
                 f"{out.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="measurements of each (default 5)")
    parser.add_argument("bad", nargs="*", default=["--workers", "0"],
                        help="the bad option to refuse (default: --workers 0)")
    args = parser.parse_args()
    base = command()
    refusal = [timed([*base, "train", *args.bad], 2) for _ in range(args.runs)]
    version = [timed([*base, "--version"], 0) for _ in range(args.runs)]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"dist-quant train {' '.join(args.bad)}: refused in {statistics.median(refusal):.2f} s "
          f"(median of {args.runs}; min {min(refusal):.2f}, max {max(refusal):.2f})")
    print(f"dist-quant --version: {statistics.median(version):.2f} s "
          f"(median of {args.runs}; min {min(version):.2f}, max {max(version):.2f})")
    print(f"CPU {cpu_model()}, {os.cpu_count()} logical CPUs, load average {load} "
          f"(1, 5, 15 min)")


if __name__ == "__main__":
    main()
