"""The stragglers record's table: time and steps to the target per method and case.

    python benchmarks/stragglers_table.py runs/stragglers-DATE [--target 0.68]

Reads the sweep directories ``even``, ``slowlink`` and ``slowcompute`` below the given one
(``benchmarks/stragglers_record.sh`` writes them) and prints one markdown table per case: for
each method (the sweep's label), the seeds, the time to the target (wall seconds at the first
evaluation at or above it) and the steps to it, mean [min-max] over the seeds that reached it,
the median step time (between consecutive steps without an evaluation), the speed-up over sync
PS on the same links and over sync PS on the even links, and, for the asynchronous modes, the
mean staleness and the share of gradients applied per worker.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

CASES = {"even": "all links 10 Mbit/s", "slowlink": "worker 1 on a 1 Mbit/s link",
         "slowcompute": "worker 1 computing 4x slower"}
BASE = "ps-sync"


def first_at(run: Path, target: float) -> tuple[float, int] | None:
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "eval" and rec["test_accuracy"] >= target:
            return rec["wall"], rec["step"]
    return None


def step_ms(run: Path) -> float:
    """The median wall time between consecutive step lines (evaluation steps left out)."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"] for r in lines if r.get("kind") == "eval"}
    steps = [r for r in lines if r.get("kind") == "step"]
    gaps = sorted(b["wall"] - a["wall"] for a, b in zip(steps, steps[1:], strict=False)
                  if b["step"] not in evals)
    return 1000 * gaps[len(gaps) // 2] if gaps else float("nan")


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return fmt.format(mean)
    return f"{fmt.format(mean)} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def collect(sweep: Path, target: float) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = defaultdict(dict)
    index = json.loads((sweep / "sweep.json").read_text())
    for rec in index["points"].values():
        run = sweep / rec["dir"]
        if rec.get("status") != "done" or not (run / "summary.json").is_file():
            continue
        summary = json.loads((run / "summary.json").read_text())
        out[rec["label"]][rec["seed"]] = {"hit": first_at(run, target), "summary": summary,
                                          "step_ms": step_ms(run)}
    return out


def table(case: str, data: dict, even: dict, target: float) -> str:
    def times(label: str, source: dict) -> dict[int, float]:
        return {s: r["hit"][0] for s, r in source.get(label, {}).items() if r["hit"]}

    base, base_even = times(BASE, data), times(BASE, even)
    rows = [f"### {CASES[case]}", "",
            "| method | seeds | reached | time to target (s) | steps to target | step (ms) | "
            "vs sync here | vs sync on even links | staleness (mean) | applied per worker |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for label in sorted(data, key=lambda x: (not x.startswith("ps"), x)):
        runs = data[label]
        hits = {s: r["hit"] for s, r in runs.items() if r["hit"]}
        t = [h[0] for h in hits.values()]
        steps = [float(h[1]) for h in hits.values()]
        here = [base[s] / hits[s][0] for s in hits if s in base]
        vs_even = [base_even[s] / hits[s][0] for s in hits if s in base_even]
        stale = [r["summary"]["staleness_mean"] for r in runs.values()
                 if "staleness_mean" in r["summary"]]
        applied = [r["summary"].get("applied_per_worker") for r in runs.values()]
        share = ""
        if applied and all(applied):
            total = [sum(a) for a in applied]
            share = ", ".join(f"{100 * sum(a[i] for a in applied) / sum(total):.0f}%"
                              for i in range(len(applied[0])))
        ms = [r["step_ms"] for r in runs.values()]
        rows.append(f"| {label} | {len(runs)} | {len(hits)}/{len(runs)} | {spread(t)} | "
                    f"{spread(steps, '{:.0f}')} | {spread(ms, '{:.0f}')} | "
                    f"{spread(here, '{:.2f}x')} | "
                    f"{spread(vs_even, '{:.2f}x')} | {spread(stale)} | {share} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--target", type=float, default=0.68)
    args = parser.parse_args()
    found = {c: collect(args.runs / c, args.target) for c in CASES
             if (args.runs / c / "sweep.json").is_file()}
    even = found.get("even", {})
    print(f"Time and steps to {100 * args.target:g}% test accuracy; mean [min-max] over the "
          "seeds that reached it. Speed-ups: sync PS's time over the method's, per seed "
          "(\"here\": on the same links; \"on even links\": sync PS with every link at "
          "10 Mbit/s). Applied per worker: the share of applied gradients each worker "
          "computed (asynchronous modes; DDP and sync apply every worker's every step).\n")
    for case, data in found.items():
        print(table(case, data, even, args.target))


if __name__ == "__main__":
    main()
