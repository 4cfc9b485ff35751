"""Measured against modelled, run by run: mean step time (steps FROM onwards) and time to the
target, on this machine's wall clock and on the modelled clock of the same run's step records.

    python benchmarks/scale_model_truth.py RUN_DIR... [--calibration CAL | --save-calibration
        FILE] [--target 0.68] [--from 50] [--rate none] [--own-cpu]

Measured: the ``wall`` of the step records (cumulative seconds since the run's start), the
mean of its differences over steps FROM..last; time to target: the ``wall`` of the first
evaluation at or above the target. Modelled: the run's own ``model_wall`` / ``model_time``
where it ran with ``--clock dedicated``, else its step records re-timed with the modelled clock
(``dist_quant.runtime.clock``, as ``dist-quant retime`` does) on ``--rate`` (none = uncapped)
and the calibration ``--calibration``, or one measured here from the first run's configuration
(``dist_quant.runtime.calibrate.measure``; ``--save-calibration`` writes it); ``--own-cpu``
replaces the calibration's phases by the run's own CPU time per phase
(``dist_quant.analysis.retime.own_cpu``). Prints a markdown table; ``--json`` the rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dist_quant.analysis.retime import own_cpu, read
from dist_quant.runtime.calibrate import load, measure
from dist_quant.runtime.clock import Clock, Links


def compare(run_dir: Path, calibration: dict, target: float, first: int,
            rate: float | None, own: bool = False) -> dict:
    run = read(run_dir)
    steps, evals = run["steps"], run["evals"]
    if own:
        calibration = own_cpu(run, calibration)
    if all("model_wall" in s for s in steps) and not own:
        model = [s["model_wall"] for s in steps]
        clock = "run's own --clock dedicated"
        link = run["summary"].get("model_link")
    else:
        c = Clock(run["config"], calibration, Links(rate, 0.0, int(run["config"].get("mtu", 1500))))
        model = [c.step(s, last=i == len(steps) - 1) for i, s in enumerate(steps)]
        clock = "re-timed, own CPU" if own else "re-timed"
        link = c.links.name
    walls = [s["wall"] for s in steps]
    idx = [i for i, s in enumerate(steps) if s["step"] >= first and i > 0]
    measured_step = sum(walls[i] - walls[i - 1] for i in idx) / len(idx)
    model_step = sum(model[i] for i in idx) / len(idx)
    hit = next((e for e in evals if e["test_accuracy"] >= target), None)
    at = {s["step"]: i for i, s in enumerate(steps)}
    model_ttt = None if hit is None else sum(model[: at[hit["step"]] + 1])
    return {"run": run_dir.name, "link": link, "clock": clock, "steps": len(steps),
            "measured_step_ms": 1e3 * measured_step, "model_step_ms": 1e3 * model_step,
            "step_model_over_measured": model_step / measured_step,
            "target_step": None if hit is None else hit["step"],
            "measured_ttt_s": None if hit is None else hit["wall"],
            "model_ttt_s": model_ttt,
            "ttt_model_over_measured": None if hit is None else model_ttt / hit["wall"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--calibration", default="")
    ap.add_argument("--save-calibration", default="")
    ap.add_argument("--target", type=float, default=0.68)
    ap.add_argument("--from", dest="first", type=int, default=50)
    ap.add_argument("--rate", default="none")
    ap.add_argument("--own-cpu", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rate = None if args.rate in ("none", "0") else float(args.rate)
    if args.calibration:
        cal = load(args.calibration)
    else:
        cal = {**measure(read(args.runs[0])["config"]), "source": "measured by scale_model_truth"}
        if args.save_calibration:
            Path(args.save_calibration).write_text(json.dumps(cal, indent=2) + "\n")
    rows = [compare(d, cal, args.target, args.first, rate, args.own_cpu) for d in args.runs]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"| run | modelled link | modelled clock | measured ms/step (steps >= {args.first}) | "
          "modelled ms/step | model / measured | steps to target | measured time to "
          "target (s) | modelled (s) | model / measured |")
    print("|" + "---|" * 10)
    for r in rows:
        ttt = "not reached" if r["target_step"] is None else \
            f"{r['target_step']} | {r['measured_ttt_s']:.2f} | {r['model_ttt_s']:.2f} | " \
            f"{r['ttt_model_over_measured']:.2f}"
        print(f"| {r['run']} | {r['link']} | {r['clock']} | {r['measured_step_ms']:.2f} | "
              f"{r['model_step_ms']:.2f} | {r['step_model_over_measured']:.2f} | {ttt} |")


if __name__ == "__main__":
    main()
