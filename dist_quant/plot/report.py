"""The figures of merit of each run, and ``report.md``: one table per link cap.

For a run under a given link:

- bits per coordinate (uplink) = ``bytes_up * 8 / (params * steps * workers)`` from
  ``summary.json``: 32 for fp32 payloads, ``1 + 64 / bucket`` for 1-bit with fp32 headers, plus
  the payload's fixed header.
- final accuracy: ``summary.json``'s ``test_accuracy``.
- MB to target (10^6 bytes, up and up + down) and time to target: ``cum_bytes_*`` and ``wall``
  of the first evaluation line with ``test_accuracy >= target``; "not reached" when none is.
  A lagged evaluation (``--eval-lag``) is written when it ran, steps later, but its line
  carries the wall time and bytes of its own step: the time to target counts to that step.
- speed-up: time to target of DDP fp32 (config ``method=ddp``, ``ddp_hook=none``) under the same
  link, divided by the run's. The baseline is the DDP fp32 run with the same seed and worker
  count when there is one, else the first with the same worker count ("no DDP fp32 run" when
  the link has none at that W).
- wire / payload (uplink), where the cluster recorded ``wire.json``.
- time to target excluding evaluation (several seeds): the sum of the phase times
  (``time``) of the step lines up to the evaluation at target, i.e. the steps' wall time
  without the evaluations and checkpoints between them. Evaluation is the observer's cost, and
  not the same for every method: the colocated leader first gathers the parameters over its
  link. Its speed-up is paired by seed like the other.

Several seeds. When some point (a method at a worker count W under a link) was run with
several seeds, each table has one row per point: the seeds' mean of each figure with its
spread ``[min–max]`` over the seeds; time and MB to target over the seeds that reached the
target (``reached k/n`` says how many). Speed-up of the point: the mean over seeds of DDP
fp32's time to target over the mean of the method's, both over the seeds where both reached
it (each seed paired with DDP fp32 of the same seed and W); its spread is the min–max of the
per-seed ratios.

Default target: 90% of the best final test accuracy over all the runs given, rounded down to
0.1 percentage point, the same for every link (synchronous training reaches the same accuracy
whatever the link, so one target makes the tables comparable). 90% keeps the target within
reach of the compressed methods, which end a little lower, so that the time to target measures
speed, not only whether a method gets there. ``--target`` overrides it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_quant.plot.labels import method_label
from dist_quant.plot.points import Spread, has_several_seeds, points
from dist_quant.plot.recipe import commits, machines, sweep_commands, versions, wrapped
from dist_quant.plot.runs import Run
from dist_quant.plot.scaling import scaling_table
from dist_quant.plot.series import few_evaluations, first_runs, method_order

TARGET_FRACTION = 0.9
NOT_REACHED = "not reached"


def final_accuracy(run: Run) -> float:
    return float(run.summary["test_accuracy"])


def default_target(runs: list[Run]) -> float:
    best = max(final_accuracy(r) for r in runs)
    return math.floor(round(TARGET_FRACTION * best * 1000, 6)) / 1000


def bits_per_coordinate(run: Run) -> float:
    s = run.summary
    return s["bytes_up"] * 8 / (s["params"] * s["steps"] * s["workers"])


def first_at_target(run: Run, target: float) -> dict[str, Any] | None:
    return next((e for e in run.evals if e["test_accuracy"] >= target), None)


def step_seconds(run: Run, step: int) -> float:
    """Seconds spent in steps 1..``step``: the sum of their phase times (evaluations and
    checkpoints excluded)."""
    return sum(sum(line["time"].values()) for line in run.steps if line["step"] <= step)


def wire_ratio_up(run: Run) -> float | None:
    if run.wire is None or not run.wire.get("payload_bytes_up"):
        return None
    return run.wire["wire_bytes_up"] / run.wire["payload_bytes_up"]


def baseline(run: Run, members: list[Run]) -> Run | None:
    candidates = [r for r in members if r.is_ddp_fp32]
    workers = [r for r in candidates if r.summary["workers"] == run.summary["workers"]]
    same = [r for r in workers if r.config.get("seed") == run.config.get("seed")]
    return (same or workers or [None])[0]


@dataclass(frozen=True)
class Row:
    label: str
    bits: float
    accuracy: float
    mb_up: float | None       # None: target not reached
    mb_total: float | None
    seconds: float | None
    speedup: float | None     # None: the run or its baseline did not reach the target
    speedup_note: str         # why speedup is None ("" when it is a number)
    wire_ratio: float | None


def rows(members: list[Run], target: float) -> list[Row]:
    out = []
    for run in members:
        hit = first_at_target(run, target)
        base = baseline(run, members)
        base_hit = first_at_target(base, target) if base else None
        speedup, note = None, ""
        if base is None:
            note = "no DDP fp32 run"
        elif hit is None:
            note = NOT_REACHED
        elif base_hit is None:
            note = "DDP fp32 " + NOT_REACHED
        else:
            speedup = base_hit["wall"] / hit["wall"]
        up, total, seconds = (None, None, None) if hit is None else (
            hit["cum_bytes_up"] / 1e6, (hit["cum_bytes_up"] + hit["cum_bytes_down"]) / 1e6,
            hit["wall"])
        out.append(Row(run.label, bits_per_coordinate(run), final_accuracy(run), up, total,
                       seconds, speedup, note, wire_ratio_up(run)))
    return out


def fmt(value: float | None, spec: str, missing: str = NOT_REACHED) -> str:
    return missing if value is None else format(value, spec)


def table(members: list[Run], target: float) -> str:
    data = rows(members, target)
    wire = any(r.wire_ratio is not None for r in data)
    head = ["method", "bits/coord (up)", "final acc", "MB up to target", "MB total to target",
            "time to target (s)", "speed-up vs DDP fp32"] + (["wire/payload (up)"] if wire else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for r in data:
        speedup = f"{r.speedup:.2f}x" if r.speedup is not None else r.speedup_note
        cells = [r.label, f"{r.bits:.3f}", f"{100 * r.accuracy:.1f}%", fmt(r.mb_up, ".4g"),
                 fmt(r.mb_total, ".4g"), fmt(r.seconds, ".2f"), speedup]
        if wire:
            cells.append(fmt(r.wire_ratio, ".4f", "—"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- several seeds per point ----------------------------------------------------------------
@dataclass(frozen=True)
class PointRow:
    label: str
    workers: int
    seeds: int
    reached: int
    bits: float
    accuracy: Spread
    mb_total: Spread | None
    seconds: Spread | None
    speedup: float | None         # ratio of mean times over the paired seeds
    speedup_spread: Spread | None  # the per-seed ratios
    speedup_note: str
    step_seconds: Spread | None   # time to target without evaluations
    step_speedup: float | None
    step_speedup_spread: Spread | None


def point_rows(members: list[Run], target: float) -> list[PointRow]:
    out = []
    for pt in points(members):
        hits = [(run, first_at_target(run, target)) for run in pt.runs]
        reached = [(run, h) for run, h in hits if h is not None]
        pairs, step_pairs = [], []
        for run, hit in reached:
            base = baseline(run, members)
            base_hit = first_at_target(base, target) if base else None
            if base_hit is not None:
                pairs.append((base_hit["wall"], hit["wall"]))
                step_pairs.append((step_seconds(base, base_hit["step"]),
                                   step_seconds(run, hit["step"])))
        speedup = step_speedup = None
        note = ("no DDP fp32 run" if all(baseline(r, members) is None for r in pt.runs) else
                NOT_REACHED if not reached else "DDP fp32 " + NOT_REACHED)
        if pairs:
            speedup, note = sum(b for b, _ in pairs) / sum(t for _, t in pairs), ""
            step_speedup = sum(b for b, _ in step_pairs) / sum(t for _, t in step_pairs)
        out.append(PointRow(
            pt.label, pt.workers, len(pt.runs), len(reached),
            sum(bits_per_coordinate(r) for r in pt.runs) / len(pt.runs),
            Spread.of([final_accuracy(r) for r in pt.runs]),
            Spread.of([(h["cum_bytes_up"] + h["cum_bytes_down"]) / 1e6 for _, h in reached]),
            Spread.of([h["wall"] for _, h in reached]),
            speedup, Spread.of([b / t for b, t in pairs]), note,
            Spread.of([step_seconds(run, h["step"]) for run, h in reached]), step_speedup,
            Spread.of([b / t for b, t in step_pairs])))
    return out


def _speedup_text(value: float | None, spread: Spread | None, note: str) -> str:
    if value is None:
        return note
    return f"{value:.2f}x" + ("" if spread.n == 1 else f" [{spread.low:.2f}–{spread.high:.2f}]")


def seeds_table(members: list[Run], target: float) -> str:
    head = ["method", "W", "seeds", "bits/coord (up)", "final acc", "reached",
            "MB total to target", "time to target (s)", "speed-up vs DDP fp32",
            "excl. evaluation (s)", "speed-up excl. evaluation"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in point_rows(members, target):
        acc = Spread(*(100 * v for v in (r.accuracy.mean, r.accuracy.low, r.accuracy.high)),
                     r.accuracy.n)
        cells = [r.label, str(r.workers), str(r.seeds), f"{r.bits:.3f}", acc.text(".1f", "%"),
                 f"{r.reached}/{r.seeds}",
                 NOT_REACHED if r.mb_total is None else r.mb_total.text(".4g"),
                 NOT_REACHED if r.seconds is None else r.seconds.text(".2f"),
                 _speedup_text(r.speedup, r.speedup_spread, r.speedup_note),
                 NOT_REACHED if r.step_seconds is None else r.step_seconds.text(".2f"),
                 _speedup_text(r.step_speedup, r.step_speedup_spread, r.speedup_note)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def methods_table(runs: list[Run]) -> list[str]:
    """One row per method: its name in the figures and tables, and what it trains."""

    first = first_runs(runs)
    lines = ["| method | what it is | runs |", "|---|---|---:|"]
    for m in method_order(runs):
        count = sum(r.method == m for r in runs)
        lines.append(f"| {m} | {method_label(first[m].config)} | {count} |")
    return lines


def provenance(runs: list[Run], command: str | None) -> list[str]:

    parts = ["## Machine and commit", ""]
    parts += [f"- Machine: {m}" for m in machines(runs)]
    parts += [f"- Commit: {c}" for c in commits(runs)]
    parts += [f"- Versions: {v}" for v in versions(runs)] + [""]
    sweeps = sweep_commands(runs, method_order(runs))
    if command or sweeps:
        parts += ["## Commands", ""]
        if sweeps:
            parts += ["The runs (rebuilt from their point.json and config.json):", "", "```",
                      *map(wrapped, sweeps), "```", ""]
        if command:
            parts += ["This report:", "", "```", wrapped(command), "```", ""]
    return parts


def write_report(groups: dict[str, list[Run]], target: float, target_note: str,
                 figures: list[Path], out: Path, scaling: dict | None = None,
                 command: str | None = None) -> Path:
    runs = [r for members in groups.values() for r in members]
    warnings = few_evaluations(groups)   # a series of fewer than three evaluations
    parts = [
        "# Bandwidth versus convergence", "",
        f"Target test accuracy: **{100 * target:.1f}%** ({target_note}).", "",
        *[f"- {line}" for line in warnings], *([""] if warnings else []),
        f"{len(runs)} run(s) under {len(groups)} link setting(s). Bits per coordinate: uplink "
        "bytes x 8 / (params x steps x workers). MB = 10^6 bytes, counted at the first "
        "evaluation at or above the target, as is the time to target (wall seconds). Speed-up: "
        "DDP fp32's time to target under the same link over the method's.", ""]
    if all(r.method for r in runs):
        parts += ["## Methods", "", *methods_table(runs), ""]
    seeds = has_several_seeds(groups)
    if seeds:
        parts += ["Several seeds per point: mean [min–max] over the seeds; time and MB to "
                  "target over the seeds that reached it; speed-up = mean DDP fp32 time over "
                  "mean time of the method (seeds where both reached the target), "
                  "[min–max] of the per-seed ratios. Excl. evaluation: the same, counting only "
                  "the steps' own time (the sum of their phase times), without the "
                  "evaluations and checkpoints between them.", ""]
    for cap, members in groups.items():
        parts += [f"## {cap}", "", seeds_table(members, target) if seeds else
                  table(members, target), ""]
    if scaling:

        parts += scaling_table(scaling)
    parts += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures] + [""]
    parts += provenance(runs, command)
    parts += ["## Runs", ""] + [f"- `{r.path}`: {r.label} ({r.cap})" for r in runs] + [""]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path
