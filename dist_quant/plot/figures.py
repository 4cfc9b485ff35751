"""The PNG figures, drawn with matplotlib's object API on the Agg canvas (no display, no pyplot
state). A figure has one panel per link, W and batch size (:mod:`dist_quant.plot.series`):
links down the rows, W across the columns. A method is one series with the same colour and
line style in every figure of one call (:mod:`dist_quant.plot.palette`); the legend, outside
the panels, has one entry per method.

- ``accuracy_vs_time.png``: test accuracy against wall seconds (log x): per method the mean
  over seeds (bold) on their common evaluation steps, placed at the mean wall time, its
  min-max band (shaded) and each seed's own curve (thin); the target dashed.
- ``accuracy_vs_bytes.png``: the same against cumulative MB, uplink and up + down.
- ``to_target.png`` (the headline): wall seconds to the target, one mark per method at the
  mean over the seeds that reached it, the bar its min-max, sorted fastest first, with the
  speed-up over DDP fp32 of the same link and W beside it (:func:`dist_quant.plot.report.
  point_rows`); log x where the times span more than a factor of 8.
- ``time_per_phase.png``: mean milliseconds per step in each phase (compute, encode,
  communicate, decode, update; mean over the seeds), one stacked bar per method.
- ``scaling.png`` (only where a capped link has runs at several worker counts): communication
  milliseconds per step against W, measured (solid) beside the link model's prediction
  (dashed), one line pair per method (:mod:`dist_quant.plot.scaling`).

Each ``*_figure`` function returns the :class:`~matplotlib.figure.Figure`; :func:`draw_all`
saves them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from matplotlib import ticker
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from dist_quant.plot.labels import metric_label
from dist_quant.plot.palette import PHASE_COLOURS, PHASE_HATCH, Style, styles
from dist_quant.plot.report import point_rows
from dist_quant.plot.runs import Run
from dist_quant.plot.scaling import ScalingRow
from dist_quant.plot.series import (
    Panel,
    Series,
    cap_order,
    first_runs,
    method_order,
    panel_series,
    panels,
)
from dist_quant.runtime.metrics import PHASES

Groups = dict[str, list[Run]]
DPI = 110
PANEL_W, PANEL_H = 5.4, 3.8


@dataclass
class Plan:
    """What every figure of one call shares: the panels, the methods and their styles, the
    target, and the name of the time axis (wall, dilated or modelled time)."""

    panels: list[Panel]
    order: list[str]
    style: dict[str, Style]
    target: float
    time_axis: str = "wall time"

    @property
    def caps(self) -> list[str]:
        return cap_order(self.panels)

    @property
    def settings(self) -> list[tuple[int, int | None]]:
        found = {(p.workers, p.batch_size) for p in self.panels}
        return sorted(found, key=lambda k: (k[0], -(k[1] or 0)))

    def cell(self, panel: Panel) -> tuple[int, int]:
        return (self.caps.index(panel.cap),
                self.settings.index((panel.workers, panel.batch_size)))

    def legend_width(self) -> float:
        """Inches the method legend takes beside the panels."""
        return 1.0 + 0.075 * max(len(m) for m in self.order)


def plan(groups: Groups, target: float, time_axis: str = "wall time") -> Plan:
    runs = [r for members in groups.values() for r in members]
    order = method_order(runs)
    return Plan(panels(groups), order, styles(order, first_runs(runs)), target, time_axis)


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


def log_labels(low: float, high: float) -> int:
    """How many ticks :func:`log_x` labels between ``low`` and ``high``: the powers of ten,
    and 2 and 5 times them where the span is under 1.5 decades."""
    if low <= 0 or high <= low:
        return 0
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    subs = (1, 2, 5) if high / low <= 30 else (1,)
    return sum(low <= m * 10 ** k <= high for k in decades for m in subs)


def labelled_x(ax) -> None:
    """At least two labelled ticks on a log x axis: where its view holds fewer (a narrow span,
    a series of one point), round values spaced evenly instead."""
    if ax.get_xscale() != "log" or log_labels(*ax.get_xlim()) >= 2:
        return
    ax.xaxis.set_major_locator(ticker.MaxNLocator(4, min_n_ticks=2))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, pos: short(x)))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def grid_figure(p: Plan, cols_per_panel: int = 1, height: float = PANEL_H,
                width: float = PANEL_W):
    """A figure with one axes (or ``cols_per_panel``) per panel cell; unused cells hidden.
    Returns the figure and ``{id(panel): [axes...]}``."""
    rows, cols = len(p.caps), len(p.settings) * cols_per_panel
    fig = Figure(figsize=(width * cols + p.legend_width(), height * rows + 0.5),
                 layout="constrained")
    grid = fig.subplots(rows, cols, squeeze=False)
    used, where = set(), {}
    for panel in p.panels:
        r, c = p.cell(panel)
        axes = [grid[r][c * cols_per_panel + k] for k in range(cols_per_panel)]
        used.update(id(a) for a in axes)
        where[id(panel)] = axes
    for row in grid:
        for ax in row:
            if id(ax) not in used:
                ax.set_axis_off()
    return fig, where


def method_legend(fig: Figure, p: Plan, bands: bool = False, title: str | None = None) -> None:
    """One entry per method, outside the panels on the right."""
    handles = []
    for m in p.order:
        s = p.style[m]
        line = Line2D([], [], linewidth=2.2, marker=s.marker, markersize=5, **s.line())
        handles.append((Patch(color=s.colour, alpha=0.2, linewidth=0), line) if bands else line)
    fig.legend(handles, p.order, loc="outside right upper", fontsize="small", title=title,
               title_fontsize="small", frameon=False)


def target_line(ax, target: float) -> None:
    """The target, dashed, labelled inside the axes: above the line, or below it where the
    line runs near the top (call after the y limits are set)."""
    y = 100 * target
    ax.axhline(y, color="dimgrey", linestyle=(0, (4, 3)), linewidth=0.9, zorder=1)
    low, high = ax.get_ylim()
    above = (high - y) > 0.08 * (high - low)
    ax.annotate(f"target {y:.1f}%", (0.01, y), xycoords=("axes fraction", "data"),
                xytext=(0, 2 if above else -2), textcoords="offset points", fontsize="x-small",
                color="dimgrey", va="bottom" if above else "top", annotation_clip=True)


def draw_series(ax, s: Series, style: Style) -> bool:
    """Each seed thin, the mean bold over the min-max band; a series of one point (a single
    evaluation) is a mark with its min-max bar. Returns whether it was one point."""
    for curve in s.seeds:
        pts = [(x, 100 * y) for x, y in zip(curve.x, curve.y, strict=True) if x > 0]
        if pts:
            ax.plot(*zip(*pts, strict=True), linewidth=0.6, alpha=0.45, zorder=2,
                    marker=style.marker if len(pts) == 1 else None, markersize=3,
                    gid=f"seed:{s.method}", **style.line())
    keep = [i for i, x in enumerate(s.x) if x > 0]
    if not keep:
        return False
    x = [s.x[i] for i in keep]
    if len(keep) == 1:
        i = keep[0]
        ax.errorbar(x, [100 * s.mean[i]], yerr=[[100 * (s.mean[i] - s.low[i])],
                    [100 * (s.high[i] - s.mean[i])]], fmt=style.marker, markersize=7,
                    color=style.colour, capsize=3, zorder=4, label=s.method,
                    gid=f"single:{s.method}")
        return True
    ax.fill_between(x, [100 * s.low[i] for i in keep], [100 * s.high[i] for i in keep],
                    color=style.colour, alpha=0.2, linewidth=0, zorder=3)
    ax.plot(x, [100 * s.mean[i] for i in keep], linewidth=2.0, marker=style.marker,
            markersize=4, zorder=4, label=s.method, **style.line())
    return False


def single_note(ax, methods: list[str]) -> None:
    """Says, inside the axes, which series are one evaluation each (a mark, no curve)."""
    if methods:
        ax.text(0.99, 0.02, "one evaluation, a mark (no curve): " + ", ".join(methods),
                transform=ax.transAxes, ha="right", va="bottom", fontsize="x-small",
                color="dimgrey", gid="single-note")


def accuracy_ylim(ax, p: Plan, panel_list: list[list[Series]]) -> None:
    """From a little under the lowest mean at the second evaluation (the first is near
    chance) to a little over the best accuracy: the approach to the target fills the panel."""
    highs = [100 * max(max(c.y) for c in s.seeds if c.y) for ss in panel_list for s in ss
             if any(c.y for c in s.seeds)]
    lows = [100 * s.mean[min(1, len(s.mean) - 1)] for ss in panel_list for s in ss if s.mean]
    if highs and lows:   # the target always in view, its label inside the axes
        ax.set_ylim(max(0.0, min(min(lows) - 5, 100 * p.target - 3)),
                    min(100.0, max(max(highs), 100 * p.target) + 2))


def accuracy_figure(p: Plan, x: str) -> Figure:
    """Accuracy against wall time (``x="wall"``) or MB (``"mb"``: uplink and up + down)."""
    kinds = [("wall", f"{p.time_axis} (s)")] if x == "wall" else [
        ("mb_up", "cumulative MB sent, uplink"), ("mb_total", "cumulative MB sent, up + down")]
    fig, where = grid_figure(p, len(kinds))
    for panel in p.panels:
        for ax, (kind, xlabel) in zip(where[id(panel)], kinds, strict=True):
            ss = panel_series(panel, kind, p.order)
            single = [s.method for s in ss if draw_series(ax, s, p.style[s.method])]
            log_x(ax)
            accuracy_ylim(ax, p, [ss])
            target_line(ax, p.target)
            single_note(ax, single)
            labelled_x(ax)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(metric_label([r.config for q in p.panels for r in q.runs]))
            ax.set_title(panel.title, fontsize="medium")
            ax.grid(True, which="both", alpha=0.3)
    several = any(len({r.config.get("seed") for r in panel.runs if r.method == m}) > 1
                  for panel in p.panels for m in p.order)
    method_legend(fig, p, bands=several, title="mean (bold), min-max band,\neach seed (thin)"
                  if several else "one seed per method")
    return fig


# ---- time to target ------------------------------------------------------------------------
def speedup_text(row) -> str:
    if row.speedup is None:
        return row.speedup_note
    text = f"{row.speedup:.2f}x"
    if row.speedup_spread is not None and row.speedup_spread.n > 1:
        text += f" [{row.speedup_spread.low:.2f}-{row.speedup_spread.high:.2f}]"
    return text


def to_target_figure(p: Plan) -> Figure:

    most = max(len({r.method for r in panel.runs}) for panel in p.panels)
    fig, where = grid_figure(p, 1, height=1.2 + 0.42 * most, width=PANEL_W + 1.6)
    for panel in p.panels:
        ax = where[id(panel)][0]
        rows = point_rows(panel.runs, p.target)
        rows.sort(key=lambda r: (r.seconds is None, r.seconds.mean if r.seconds else 0.0))
        reached = [r.seconds for r in rows if r.seconds is not None]
        low = min(s.low for s in reached) if reached else 1.0
        high = max(s.high for s in reached) if reached else 10.0
        log = high / low > 8
        no_base = all(r.speedup is None and r.speedup_note == "no DDP fp32 run" for r in rows)
        left = low / 1.6 if log else 0.0
        right = high * 3.5 if log else high * 1.6
        for i, r in enumerate(rows):
            style = p.style.get(r.label)
            colour = style.colour if style else "black"
            if r.seconds is None:
                ax.text(left if log else 0.0, i, f"  not reached (0/{r.seeds})", va="center",
                        fontsize="small", color="dimgrey")
                continue
            s = r.seconds
            ax.errorbar([s.mean], [i], xerr=[[s.mean - s.low], [s.high - s.mean]],
                        fmt=style.marker if style else "o", color=colour, markersize=7,
                        capsize=4, elinewidth=1.6, zorder=3)
            note = "" if r.reached == r.seeds else f", {r.reached}/{r.seeds} reached"
            speedup = "" if no_base else "  " + speedup_text(r)
            ax.annotate(f"{short(s.mean)} s{speedup}{note}", (s.high, i),
                        xytext=(8, 0), textcoords="offset points", va="center",
                        fontsize="small")
        ax.set_yticks(range(len(rows)), [r.label for r in rows])
        for tick, r in zip(ax.get_yticklabels(), rows, strict=True):
            if r.label in p.style:
                tick.set_color(p.style[r.label].colour)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        if log:
            log_x(ax)
        ax.set_xlim(left, right)
        labelled_x(ax)
        seeds = max(r.seeds for r in rows)
        ax.set_xlabel(f"{p.time_axis} to {100 * p.target:.1f}% (s)"
                      + (": mean, min-max over seeds" if seeds > 1 else ", one seed")
                      + ("; no DDP fp32 run for a speed-up" if no_base else
                         "; speed-up vs DDP fp32"), fontsize="small")
        ax.set_title(panel.title, fontsize="medium")
        ax.grid(True, axis="x", which="both", alpha=0.3)
        ax.set_axisbelow(True)
    return fig


# ---- time per phase ------------------------------------------------------------------------
def mean_phase_ms(run: Run) -> dict[str, float]:
    n = max(len(run.steps), 1)
    return {p: 1000 * sum(s["time"].get(p, 0.0) for s in run.steps) / n for p in PHASES}


def time_per_phase_figure(p: Plan) -> Figure:
    most = max(len({r.method for r in panel.runs}) for panel in p.panels)
    fig, where = grid_figure(p, 1, height=1.2 + 0.42 * most, width=PANEL_W + 0.6)
    for panel in p.panels:
        ax = where[id(panel)][0]
        methods = [m for m in p.order if any(r.method == m for r in panel.runs)]
        ms = []
        for m in methods:
            per_run = [mean_phase_ms(r) for r in panel.runs if r.method == m]
            ms.append({ph: sum(d[ph] for d in per_run) / len(per_run) for ph in PHASES})
        left = [0.0] * len(methods)
        for phase in PHASES:
            widths = [d[phase] for d in ms]
            ax.barh(range(len(methods)), widths, left=left, color=PHASE_COLOURS[phase],
                    hatch=PHASE_HATCH.get(phase), edgecolor="white", linewidth=0.5,
                    label=phase)
            left = [a + b for a, b in zip(left, widths, strict=True)]
        for i, total in enumerate(left):
            ax.text(total, i, f" {short(total)} ms", va="center", fontsize="small")
        ax.set_yticks(range(len(methods)), methods)
        for tick, m in zip(ax.get_yticklabels(), methods, strict=True):
            tick.set_color(p.style[m].colour)
        ax.set_ylim(len(methods) - 0.5, -0.5)
        ax.set_xlim(0, 1.3 * max(max(left), 1e-9))
        ax.set_xlabel("mean time per step (ms), mean over seeds")
        ax.set_title(panel.title, fontsize="medium")
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    handles = [Patch(facecolor=PHASE_COLOURS[ph], hatch=PHASE_HATCH.get(ph), edgecolor="white",
                     label=ph) for ph in PHASES]
    fig.legend(handles=handles, loc="outside right upper", fontsize="small", frameon=False,
               title="phase", title_fontsize="small")
    return fig


# ---- scaling -------------------------------------------------------------------------------
def scaling_figure(data: dict[str, list[ScalingRow]], p: Plan) -> Figure:
    labels = list(dict.fromkeys(r.label for rows in data.values() for r in rows))
    fig = Figure(figsize=(5.2 * len(data) + p.legend_width(), 4.2), layout="constrained")
    axes = fig.subplots(1, len(data), squeeze=False)[0]
    for ax, (cap, rows) in zip(axes, data.items(), strict=True):
        for label in dict.fromkeys(r.label for r in rows):
            mine = [r for r in rows if r.label == label]
            colour = p.style[label].colour if label in p.style else "black"
            ws = [r.workers for r in mine]
            ax.plot(ws, [1e3 * r.measured_s for r in mine], marker="o", color=colour,
                    linewidth=2)
            ax.plot(ws, [1e3 * r.predicted_s for r in mine], marker="x", linestyle=":",
                    color=colour)
        ax.set_xticks(sorted({r.workers for r in rows}))
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, pos: f"{y:g}"))
        ax.yaxis.set_minor_formatter(MinorLogLabels())
        ax.set_xlabel("workers W")
        ax.set_ylabel("communication per step (ms)")
        ax.set_title(cap, fontsize="medium")
        ax.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], color=p.style[m].colour if m in p.style else "black",
                      linewidth=2, label=m) for m in labels]
    handles += [Line2D([], [], color="black", marker="o", label="measured"),
                Line2D([], [], color="black", marker="x", linestyle=":", label="link model")]
    fig.legend(handles=handles, loc="outside right upper", fontsize="small", frameon=False)
    return fig


def save(fig: Figure, out: Path, name: str) -> Path:
    path = out / name
    fig.savefig(path, dpi=DPI)
    return path


def draw_all(groups: Groups, target: float, out: Path,
             scaling: dict[str, list[ScalingRow]] | None = None,
             time_axis: str = "wall time") -> list[Path]:
    p = plan(groups, target, time_axis)
    figures = [save(to_target_figure(p), out, "to_target.png"),
               save(accuracy_figure(p, "wall"), out, "accuracy_vs_time.png"),
               save(accuracy_figure(p, "mb"), out, "accuracy_vs_bytes.png"),
               save(time_per_phase_figure(p), out, "time_per_phase.png")]
    if scaling:
        figures.append(save(scaling_figure(scaling, p), out, "scaling.png"))
    return figures
