"""The PNG figures, drawn with matplotlib's object API on the Agg canvas (no display, no pyplot
state). Each figure has one panel (or one row of panels) per link cap; a method keeps its
colour in every figure.

- ``accuracy_vs_bytes.png``: test accuracy against cumulative MB, uplink and up + down (log x).
- ``accuracy_vs_time.png``: test accuracy against wall seconds (log x), target dashed.
- ``time_per_phase.png``: mean milliseconds per step in each phase (compute, encode,
  communicate, decode, update), stacked, one bar per method.
- ``to_target.png``: MB (up + down) and wall seconds to the target accuracy, one bar per
  method (log x); a method that never reaches it is marked "not reached".
- ``scaling.png`` (only where a capped link has runs at several worker counts): communication
  milliseconds per step against W, measured (solid) beside the link model's prediction
  (dashed), one line pair per method (:mod:`dist_quant.plot.scaling`).
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib import ticker
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from dist_quant.metrics import PHASES
from dist_quant.plot.report import first_at_target
from dist_quant.plot.runs import Run
from dist_quant.plot.scaling import ScalingRow

Groups = dict[str, list[Run]]
DPI = 110


def colours(groups: Groups) -> dict[str, tuple[float, ...]]:
    import matplotlib

    labels = sorted({r.label for members in groups.values() for r in members})
    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def new_figure(rows: int, cols: int, width: float, height: float):
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def short(value: float) -> str:
    """A number for a label: 12,300 / 456 / 7.89 / 0.0123."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


class MinorLogLabels(ticker.Formatter):
    """Labels the minor ticks 2 and 5 (x a power of ten) when the axis spans under 1.5
    decades, where major ticks alone would leave it almost unlabelled; else none."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        low, high = self.axis.get_view_interval()
        if x <= 0 or low <= 0 or high / low > 30:
            return ""
        mantissa = x / 10 ** math.floor(math.log10(x))
        return short(x) if round(mantissa, 6) in (2.0, 5.0) else ""


def log_x(ax) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, pos: f"{x:g}"))
    ax.xaxis.set_minor_formatter(MinorLogLabels())


def legend_room(groups: Groups) -> float:
    """Inches a legend of the run labels takes beside the panels."""
    return 0.5 + 0.065 * max(len(r.label) for members in groups.values() for r in members)


def method_legend(fig: Figure, colour: dict[str, tuple[float, ...]], extra=()) -> None:
    handles = [Line2D([], [], color=c, marker=".", label=label) for label, c in colour.items()]
    fig.legend(handles=[*handles, *extra], loc="outside right upper", fontsize="small")


def target_line(ax, target: float) -> Line2D:
    return ax.axhline(100 * target, color="grey", linestyle="--", linewidth=0.8,
                      label=f"target {100 * target:.1f}%")


def save(fig: Figure, out: Path, name: str) -> Path:
    path = out / name
    fig.savefig(path, dpi=DPI)
    return path


def accuracy_vs_bytes(groups: Groups, target: float, out: Path) -> Path:
    colour = colours(groups)
    fig, axes = new_figure(len(groups), 2, 4.6 + legend_room(groups) / 2, 3.2)
    for row, (cap, members) in zip(axes, groups.items(), strict=True):
        for ax, total, what in ((row[0], False, "uplink"), (row[1], True, "uplink + downlink")):
            for run in members:
                pts = [((e["cum_bytes_up"] + total * e["cum_bytes_down"]) / 1e6,
                        100 * e["test_accuracy"]) for e in run.evals]
                pts = [(x, y) for x, y in pts if x > 0]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker=".", color=colour[run.label])
            line = target_line(ax, target)
            log_x(ax)
            ax.set_xlabel(f"cumulative MB sent, {what}")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(cap, fontsize="medium")
            ax.grid(True, which="both", alpha=0.3)
    method_legend(fig, colour, [line])
    return save(fig, out, "accuracy_vs_bytes.png")


def accuracy_vs_time(groups: Groups, target: float, out: Path) -> Path:
    colour = colours(groups)
    fig, axes = new_figure(1, len(groups), 4.6 + legend_room(groups) / len(groups), 3.4)
    for ax, (cap, members) in zip(axes[0], groups.items(), strict=True):
        for run in members:
            pts = [(e["wall"], 100 * e["test_accuracy"]) for e in run.evals if e["wall"] > 0]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=".", color=colour[run.label])
        line = target_line(ax, target)
        log_x(ax)
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(cap, fontsize="medium")
        ax.grid(True, which="both", alpha=0.3)
    method_legend(fig, colour, [line])
    return save(fig, out, "accuracy_vs_time.png")


def bar_width(groups: Groups) -> float:
    """Inches per panel of a bar chart: room for its longest label (seed=, workers=)."""
    longest = max(len(r.label) for members in groups.values() for r in members)
    return max(4.6, 2.6 + 0.075 * longest)


def mean_phase_ms(run: Run) -> dict[str, float]:
    n = max(len(run.steps), 1)
    return {p: 1000 * sum(s["time"].get(p, 0.0) for s in run.steps) / n for p in PHASES}


def time_per_phase(groups: Groups, out: Path) -> Path:
    import matplotlib

    cmap = matplotlib.colormaps["Set2"]
    most = max(len(m) for m in groups.values())
    fig, axes = new_figure(1, len(groups), bar_width(groups), 1.1 + 0.4 * most)
    for ax, (cap, members) in zip(axes[0], groups.items(), strict=True):
        labels = [r.label for r in members]
        left = [0.0] * len(members)
        for i, phase in enumerate(PHASES):
            widths = [mean_phase_ms(r)[phase] for r in members]
            ax.barh(labels, widths, left=left, color=cmap(i), label=phase)
            left = [a + b for a, b in zip(left, widths, strict=True)]
        for i, total in enumerate(left):
            ax.text(total, i, " " + short(total), va="center", fontsize="small")
        ax.set_xlim(0, 1.25 * max(max(left), 1e-9))
        ax.invert_yaxis()
        ax.set_xlabel("mean time per step (ms)")
        ax.set_title(cap, fontsize="medium")
        ax.grid(True, axis="x", alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right upper", fontsize="small")
    return save(fig, out, "time_per_phase.png")


def to_target(groups: Groups, target: float, out: Path) -> Path:
    colour = colours(groups)
    most = max(len(m) for m in groups.values())
    fig, axes = new_figure(len(groups), 2, bar_width(groups), 1.0 + 0.4 * most)
    for row, (cap, members) in zip(axes, groups.items(), strict=True):
        hits = [first_at_target(r, target) for r in members]
        values = {
            "MB sent (up + down) to target": [
                None if h is None else (h["cum_bytes_up"] + h["cum_bytes_down"]) / 1e6
                for h in hits],
            "wall time to target (s)": [None if h is None else h["wall"] for h in hits],
        }
        labels = [r.label for r in members]
        for ax, (xlabel, vals) in zip(row, values.items(), strict=True):
            reached = [v for v in vals if v is not None and v > 0]
            low = min(reached) / 3 if reached else 0.1
            high = max(reached) * 6 if reached else 10.0
            ax.barh(labels, [v or 0.0 for v in vals], left=0,
                    color=[colour[label] for label in labels])
            for i, v in enumerate(vals):
                text = " not reached" if v is None else " " + short(v)
                ax.text(low if v is None else v, i, text, va="center", fontsize="small",
                        color="dimgrey" if v is None else "black")
            log_x(ax)
            ax.set_xlim(low, high)
            ax.invert_yaxis()
            ax.set_xlabel(xlabel)
            ax.set_title(f"{cap}: target {100 * target:.1f}%", fontsize="medium")
            ax.grid(True, axis="x", which="both", alpha=0.3)
            ax.set_axisbelow(True)
    return save(fig, out, "to_target.png")


def scaling_figure(data: dict[str, list[ScalingRow]], out: Path) -> Path:
    import matplotlib

    labels = list(dict.fromkeys(r.label for rows in data.values() for r in rows))
    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    colour = {label: cmap(i % cmap.N) for i, label in enumerate(labels)}
    fig, axes = new_figure(1, len(data), 5.2, 3.6 + 0.22 * (len(labels) + 2))
    for ax, (cap, rows) in zip(axes[0], data.items(), strict=True):
        for label in dict.fromkeys(r.label for r in rows):
            mine = [r for r in rows if r.label == label]
            ws = [r.workers for r in mine]
            ax.plot(ws, [1e3 * r.measured_s for r in mine], marker="o", color=colour[label])
            ax.plot(ws, [1e3 * r.predicted_s for r in mine], marker="x", linestyle="--",
                    color=colour[label])
        ax.set_xticks(sorted({r.workers for r in rows}))
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, pos: f"{y:g}"))
        ax.yaxis.set_minor_formatter(MinorLogLabels())
        ax.set_xlabel("workers W")
        ax.set_ylabel("communication per step (ms)")
        ax.set_title(cap, fontsize="medium")
        ax.grid(True, which="both", alpha=0.3)
    styles = [Line2D([], [], color="black", marker="o", label="measured"),
              Line2D([], [], color="black", marker="x", linestyle="--", label="link model")]
    handles = [Line2D([], [], color=c, marker=".", label=label) for label, c in colour.items()]
    fig.legend(handles=[*handles, *styles], loc="outside lower center", fontsize="small")
    return save(fig, out, "scaling.png")


def draw_all(groups: Groups, target: float, out: Path,
             scaling: dict[str, list[ScalingRow]] | None = None) -> list[Path]:
    figures = [accuracy_vs_bytes(groups, target, out), accuracy_vs_time(groups, target, out),
               time_per_phase(groups, out), to_target(groups, target, out)]
    if scaling:
        figures.append(scaling_figure(scaling, out))
    return figures
