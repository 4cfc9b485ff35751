"""The figures of merit of each run, and ``report.md``: one table per link cap.

For a run under a given link:

- bits per coordinate (uplink) = ``bytes_up * 8 / (params * steps * workers)`` from
  ``summary.json``: 32 for fp32 payloads, ``1 + 64 / bucket`` for 1-bit with fp32 headers, plus
  the payload's fixed header.
- final accuracy: ``summary.json``'s ``test_accuracy``.
- MB to target (10^6 bytes, up and up + down) and time to target: ``cum_bytes_*`` and ``wall``
  of the first evaluation line with ``test_accuracy >= target``; "not reached" when none is.
- speed-up: time to target of DDP fp32 (config ``method=ddp``, ``ddp_hook=none``) under the same
  link, divided by the run's. The baseline is the DDP fp32 run with the same seed and worker
  count when there is one, else the first DDP fp32 run of that link.
- wire / payload (uplink), where the cluster recorded ``wire.json``.

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

from dist_quant.plot.runs import Run

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


def wire_ratio_up(run: Run) -> float | None:
    if run.wire is None or not run.wire.get("payload_bytes_up"):
        return None
    return run.wire["wire_bytes_up"] / run.wire["payload_bytes_up"]


def baseline(run: Run, members: list[Run]) -> Run | None:
    candidates = [r for r in members if r.is_ddp_fp32]
    same = [r for r in candidates if r.config.get("seed") == run.config.get("seed")
            and r.summary["workers"] == run.summary["workers"]]
    return (same or candidates or [None])[0]


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


def write_report(groups: dict[str, list[Run]], target: float, target_note: str,
                 figures: list[Path], out: Path) -> Path:
    runs = [r for members in groups.values() for r in members]
    parts = [
        "# Bandwidth versus convergence", "",
        f"Target test accuracy: **{100 * target:.1f}%** ({target_note}).", "",
        f"{len(runs)} run(s) under {len(groups)} link setting(s). Bits per coordinate: uplink "
        "bytes x 8 / (params x steps x workers). MB = 10^6 bytes, counted at the first "
        "evaluation at or above the target, as is the time to target (wall seconds). Speed-up: "
        "DDP fp32's time to target under the same link over the method's.", ""]
    for cap, members in groups.items():
        parts += [f"## {cap}", "", table(members, target), ""]
    parts += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures] + [""]
    parts += ["## Runs", ""] + [f"- `{r.path}`: {r.label} ({r.cap})" for r in runs] + [""]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path
