"""What each evaluation costs a parameter-server run, read from its ``metrics.jsonl``.

    python benchmarks/eval_overhead.py RUN_DIR [RUN_DIR ...] [--target 0.68]

For each run: the time to the target (``wall`` of the first evaluation line at or above it),
the base step (median wall time between consecutive step lines, over the steps before the
target outside the evaluation windows) and the overhead per evaluation: for each evaluation
step s before the target (s + window below it), the wall time of steps s .. s + window above
the base step, summed, then the mean over the evaluations. The window is ``max(8, eval_lag)``
steps after s, so that it holds the pieces of a lagged gather (``--eval-lag``), the step
whose control waits for it, and the evaluation itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def overhead(run: Path, target: float) -> dict:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((run / "config.json").read_text())["config"]
    lag, every = int(config.get("eval_lag", 0)), int(config["eval_every"])
    walls, prev = {}, 0.0
    for r in lines:
        if r["kind"] == "step":
            walls[r["step"]], prev = r["wall"] - prev, r["wall"]
    hit = next(r for r in lines if r["kind"] == "eval" and r["test_accuracy"] >= target)
    window = max(8, lag)
    inside = lambda t: t >= every and t % every <= window  # noqa: E731
    base = statistics.median(d for t, d in walls.items() if every < t <= hit["step"]
                             and not inside(t))
    per = [sum(walls[t] - base for t in range(s, s + window + 1))
           for s in range(every, hit["step"] - window, every)]
    return {"run": run.name, "eval_lag": lag, "seed": config["seed"],
            "time_to_target": hit["wall"], "step_at_target": hit["step"],
            "base_step_ms": 1000 * base, "overhead_per_eval_ms": 1000 * statistics.mean(per),
            "evaluations": len(per)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--target", type=float, default=0.68)
    args = parser.parse_args()
    print("| run | eval lag | seed | steps to target | time to target (s) | base step (ms) "
          "| overhead per evaluation (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for run in args.runs:
        o = overhead(run, args.target)
        print(f"| {o['run']} | {o['eval_lag']} | {o['seed']} | {o['step_at_target']} | "
              f"{o['time_to_target']:.2f} | {o['base_step_ms']:.1f} | "
              f"{o['overhead_per_eval_ms']:.0f} |")


if __name__ == "__main__":
    main()
