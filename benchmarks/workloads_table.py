"""The tables of benchmarks/workloads-2026-12-07 from the runs of workloads_record.sh.

    python benchmarks/workloads_table.py OUT [--json FILE] [--also TASK=TARGET ...]

Per task (OUT/<task>/<point>/) and method, over the seeds: steps to the task's target (the
first evaluation at or above the accuracy target, or at or below the loss target; targets
fixed before the runs, ``TARGETS``), those steps over fp32's of the same seed, the final
quality at the end of the budget, uplink bits per coordinate (32 x bytes_up / fp32_bytes_up),
and the modelled time to target at 10 Mbit/s: each run's step records re-timed with the
modelled clock (``dist_quant.runtime.clock``) on its own calibration, the phases that do not
depend on the method pooled over the task's runs (``dist-quant retime --shared-compute``).
``--also TASK=TARGET`` adds a table for another target of that task (named as chosen after
the runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from dist_quant.analysis.retime import pool_compute, read
from dist_quant.runtime.calibrate import load
from dist_quant.runtime.clock import Clock, Links

# (metric, target, better): fixed before the runs from one fp32 run of seed 99 (the record)
TARGETS = {"mnist1d-mlp": ("test_accuracy", 0.68, "above"),
           "shapes-cnn": ("test_accuracy", 0.95, "above"),
           "text-transformer": ("test_loss", 2.5, "below")}
ORDER = ("ps-fp32", "ps-onebit", "ps-fast-up", "ps-sign-ef", "ps-onebit-adam", "ps-sign-adam",
         "ps-fast", "ddp-powersgd")


def hit(evals: list[dict], metric: str, target: float, better: str) -> dict | None:
    ok = (lambda v: v >= target) if better == "above" else (lambda v: v <= target)
    return next((e for e in evals if ok(e[metric])), None)


def task_rows(task_dir: Path, task: str, target: float | None = None) -> list[dict]:
    metric, fixed, better = TARGETS[task]
    target = fixed if target is None else target
    runs = [read(d.parent) for d in sorted(task_dir.glob("*/summary.json"))]
    cals = pool_compute(runs, [load(r["dir"]) for r in runs])
    rows = []
    for run, cal in zip(runs, cals, strict=True):
        clock = Clock(run["config"], cal, Links(10.0, 0.0, int(run["config"].get("mtu", 1500))))
        for i, rec in enumerate(run["steps"]):
            clock.step(rec, last=i == len(run["steps"]) - 1)
        h = hit(run["evals"], metric, target, better)
        s = run["summary"]
        rows.append({"task": task, "method": run["label"].split(":")[0],
                     "seed": run["config"]["seed"], "target_step": h and h["step"],
                     "model_ttt_s": h and clock.record_time(h["step"]),
                     "model_step_ms": 1e3 * clock.time / max(len(run["steps"]), 1),
                     "final_accuracy": s["test_accuracy"], "final_loss": s["test_loss"],
                     "bits_up": 32 * s["bytes_up"] / s["fp32_bytes_up"],
                     "steps": s["steps"]})
    return rows


def fmt(xs: list, spec: str) -> str:
    vals = [x for x in xs if x is not None]
    if not vals:
        return "not reached"
    miss = len(xs) - len(vals)
    return f"{statistics.mean(vals):{spec}}" + (f" ({miss} of {len(xs)} not reached)"
                                                 if miss else "")


def table(rows: list[dict], task: str, target: float | None = None) -> str:
    metric, fixed, better = TARGETS[task]
    target = fixed if target is None else target
    fp32 = {r["seed"]: r["target_step"] for r in rows if r["method"] == "ps-fp32"}
    quality = "final accuracy (%)" if metric == "test_accuracy" else "final loss (nats/byte)"
    when = "fixed before the runs" if target == fixed else "chosen after the runs"
    out = [f"Target: {metric} {'>=' if better == 'above' else '<='} {target} ({when}).", "",
           f"| method | steps to target (seeds) | x fp32's steps (mean) | {quality} | "
           "uplink bits / coordinate | modelled time to target at 10 Mbit/s (s) | "
           "modelled ms / step |", "|" + "---|" * 7]
    methods = sorted({r["method"] for r in rows},
                     key=lambda m: ORDER.index(m) if m in ORDER else len(ORDER))
    for m in methods:
        mine = sorted((r for r in rows if r["method"] == m), key=lambda r: r["seed"])
        steps = [r["target_step"] for r in mine]
        ratio = [r["target_step"] / fp32[r["seed"]] if r["target_step"] and fp32.get(r["seed"])
                 else None for r in mine]
        final = [100 * r["final_accuracy"] if metric == "test_accuracy" else r["final_loss"]
                 for r in mine]
        out.append(f"| {m} | {', '.join(str(s) if s else '-' for s in steps)} | "
                   f"{fmt(ratio, '.2f')} | {statistics.mean(final):.3g} "
                   f"[{min(final):.3g}-{max(final):.3g}] | "
                   f"{statistics.mean(r['bits_up'] for r in mine):.2f} | "
                   f"{fmt([r['model_ttt_s'] for r in mine], '.1f')} | "
                   f"{statistics.mean(r['model_step_ms'] for r in mine):.1f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--also", action="append", default=[], metavar="TASK=TARGET")
    args = ap.parse_args()
    also = [(t, float(v)) for t, v in (a.split("=") for a in args.also)]
    every = []
    for task in TARGETS:
        if not (args.out / task).is_dir():
            continue
        rows = task_rows(args.out / task, task)
        every += rows
        print(f"## {task}\n\n{table(rows, task)}\n")
        for t, value in also:
            if t == task:
                print(f"{table(task_rows(args.out / task, task, value), task, value)}\n")
    if args.json:
        args.json.write_text(json.dumps(every, indent=2) + "\n")


if __name__ == "__main__":
    main()
