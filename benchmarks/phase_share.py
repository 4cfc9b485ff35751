"""Mean per-phase time of a run's steps, and the share of encode + decode in the step.

Run from anywhere (not part of the test suite)::

    python benchmarks/phase_share.py RUN_DIR [--skip 10]

Reads ``RUN_DIR/metrics.jsonl`` (format in :mod:`dist_quant.runtime.metrics`). A step's time is the
sum
of its five phases (``compute``, ``encode``, ``communicate``, ``decode``, ``update``: the
server's step, evaluation and checkpoints excluded). Left out: the first ``--skip`` steps
(start-up: first calls, page faults, connections) and evaluation steps (the workers also send
their BatchNorm statistics then). Prints the mean of each phase in ms, the mean step time and
``(encode + decode) / step``, the ratio of the means.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PHASES = ("compute", "encode", "communicate", "decode", "update")


def phase_means(run_dir: str | Path, skip: int = 10) -> tuple[dict[str, float], int]:
    """Mean seconds per phase over the kept steps, and how many steps were kept."""
    lines = [json.loads(line) for line in
             (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    eval_steps = {r["step"] for r in lines if r.get("kind") == "eval"}
    steps = [r for r in lines if r.get("kind") == "step" and r["step"] > skip
             and r["step"] not in eval_steps]
    if not steps:
        raise SystemExit(f"{run_dir}: no step lines after step {skip} outside evaluations")
    means = {p: sum(r["time"][p] for r in steps) / len(steps) for p in PHASES}
    return means, len(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--skip", type=int, default=10, help="first steps left out")
    args = parser.parse_args()
    means, count = phase_means(args.run_dir, args.skip)
    step = sum(means.values())
    print(f"{args.run_dir}: {count} steps (first {args.skip} and evaluation steps left out)")
    for p in PHASES:
        print(f"  {p:<12} {1e3 * means[p]:8.3f} ms  {100 * means[p] / step:5.1f}%")
    print(f"  {'step':<12} {1e3 * step:8.3f} ms")
    share = (means["encode"] + means["decode"]) / step
    print(f"encode + decode: {1e3 * (means['encode'] + means['decode']):.3f} ms, "
          f"{100 * share:.1f}% of the step")


if __name__ == "__main__":
    main()
