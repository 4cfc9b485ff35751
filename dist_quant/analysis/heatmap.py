"""Where compression pays: the rows of ``dist-quant retime`` as heat maps and break-even links.

For every method other than DDP fp32, worker count W, link rate R and host speed X, the rows
of :func:`dist_quant.analysis.retime.retime` hold ``x_ddp_fp32 = T_ddp / T_method``: DDP fp32's
modelled time to the target over the method's, on the same W, seed, link and hosts (above 1 the
method gets there sooner: compression pays). Over several seeds a cell is their geometric mean.

Break-even bandwidth. With the rates ascending, ``R_1 < R_2 < ...`` (uncapped last), the
break-even bandwidth of a method at W is where its ``x`` first falls from >= 1 to < 1, taken
log-linearly between the two rates that bracket the fall::

    R* = R_j (R_{j+1} / R_j) ^ (log x_j / (log x_j - log x_{j+1}))

Below ``R*`` the method reaches the target sooner than DDP fp32, above it later. A method
that pays at every rate has ``R* > R_max`` (reported as ``above``), one that pays at none
``R* < R_1`` (``below``); a fall onto the uncapped column has no finite rate to interpolate
to (``R* > R_j``, ``above``).

:func:`heatmap_figure` draws one row of panels per host speed, one panel per method: W down,
the links across, the cell coloured by ``x`` on a logarithmic scale centred on 1 (blue: the
method is sooner; red: DDP fp32 is sooner), its value written in it, the break-even bandwidth
marked in each W's row.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def _rate_key(rate: float | None) -> float:
    return math.inf if rate is None else float(rate)


def rate_label(rate: float | None) -> str:
    if rate is None:
        return "uncapped"
    if rate >= 1000:
        return f"{rate / 1000:.3g} Gbit/s"
    return f"{rate:.3g} Mbit/s"


def cells(rows: list[Row]) -> dict[tuple[float, str, int, float | None], float | None]:
    """``{(host speed, method, W, rate): x}``: the geometric mean of ``x_ddp_fp32`` over the
    seeds that have one (None where no seed has: the target not reached, no DDP fp32 run)."""
    acc: dict[tuple[float, str, int, float | None], list[float]] = {}
    for r in rows:
        if r.get("ddp_fp32"):
            continue
        key = (float(r["host_speed"]), r["method"], int(r["workers"]), r["rate_mbit"])
        acc.setdefault(key, [])
        if r.get("x_ddp_fp32"):
            acc[key].append(float(r["x_ddp_fp32"]))
    return {k: (math.exp(sum(map(math.log, v)) / len(v)) if v else None)
            for k, v in acc.items()}


def break_even(rows: list[Row]) -> list[Row]:
    """Per host speed, method and W: the break-even bandwidth (module docstring) as
    ``{"host_speed", "method", "workers", "break_even_mbit", "where"}``; ``where`` is
    ``between`` (``break_even_mbit`` interpolated), ``above`` (pays up to the highest rate:
    ``break_even_mbit`` is that rate), ``below`` (pays at none: the lowest rate) or ``unknown``
    (a cell without a value)."""
    grid = cells(rows)
    out = []
    for speed, method, w in sorted({k[:3] for k in grid}, key=lambda k: (k[0], k[1], k[2])):
        rates = sorted((k[3] for k in grid if k[:3] == (speed, method, w)), key=_rate_key)
        xs = [grid[speed, method, w, r] for r in rates]
        row: Row = {"host_speed": speed, "method": method, "workers": w}
        if any(x is None for x in xs):
            out.append({**row, "break_even_mbit": None, "where": "unknown"})
            continue
        if xs[0] < 1:
            out.append({**row, "break_even_mbit": rates[0], "where": "below"})
            continue
        fall = next((j for j in range(len(xs) - 1) if xs[j] >= 1 > xs[j + 1]), None)
        if fall is None:
            finite = [r for r in rates if r is not None]
            out.append({**row, "break_even_mbit": finite[-1] if finite else None,
                        "where": "above"})
        elif rates[fall + 1] is None:
            out.append({**row, "break_even_mbit": rates[fall], "where": "above"})
        else:
            lo, hi = float(rates[fall]), float(rates[fall + 1])
            a, b = math.log(xs[fall]), math.log(xs[fall + 1])
            out.append({**row, "break_even_mbit": lo * (hi / lo) ** (a / (a - b)),
                        "where": "between"})
    return out


def break_even_text(rows: list[Row]) -> str:
    """:func:`break_even` as a markdown table."""
    out = ["| host speed | method | W | break-even link (the method is sooner below it) |",
           "|---|---|---|---|"]
    for r in rows:
        where, label = r["where"], rate_label(r["break_even_mbit"])
        text = label if where == "between" else \
            f"above {label} (pays at every link modelled)" if where == "above" else \
            f"below {label} (pays at no link modelled)" if where == "below" else \
            "unknown (a cell without a time to target)"
        out.append(f"| {r['host_speed']:g}x | {r['method']} | {r['workers']} | {text} |")
    return "\n".join(out)


def _position(rate: float, rates: list[float | None]) -> float:
    """The column coordinate of ``rate`` among the columns ``rates`` (log-linear between
    neighbouring finite columns)."""
    finite = [(j, float(r)) for j, r in enumerate(rates) if r is not None]
    for (j, lo), (k, hi) in zip(finite[:-1], finite[1:], strict=True):
        if lo <= rate <= hi:
            return j + (k - j) * math.log(rate / lo) / math.log(hi / lo)
    return float(finite[-1][0] if rate >= finite[-1][1] else finite[0][0])


def heatmap_figure(rows: list[Row], title: str = "") -> Any:
    """The heat maps of ``rows`` (module docstring) as a matplotlib Figure (Agg canvas)."""
    # matplotlib is optional (the plot extra): retime's table and JSON do without it
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    grid = cells(rows)
    if not grid:
        raise ValueError("no method other than DDP fp32 to compare")
    speeds = sorted({k[0] for k in grid})
    methods = list(dict.fromkeys(k[1] for k in grid))
    ws = sorted({k[2] for k in grid})
    rates = sorted({k[3] for k in grid}, key=_rate_key)
    logs = [abs(math.log(x)) for x in grid.values() if x]
    span = math.exp(max(logs + [math.log(2.0)]))
    norm = LogNorm(vmin=1 / span, vmax=span)
    marks = {(r["host_speed"], r["method"], r["workers"]): r for r in break_even(rows)}
    fig = Figure(figsize=(1.0 + 0.85 * len(rates) * len(methods),
                          1.2 + (0.45 * len(ws) + 1.1) * len(speeds)),
                 dpi=110, layout="constrained")
    axes = fig.subplots(len(speeds), len(methods), squeeze=False)
    image = None
    for a, speed in enumerate(speeds):
        for b, method in enumerate(methods):
            ax = axes[a][b]
            values = [[grid.get((speed, method, w, r)) for r in rates] for w in ws]
            shown = [[math.nan if v is None else v for v in line] for line in values]
            image = ax.imshow(shown, cmap="RdBu", norm=norm, aspect="auto", origin="lower")
            for i, line in enumerate(values):
                for j, v in enumerate(line):
                    text = "n/a" if v is None else f"{v:.2g}x" if v < 10 else f"{v:.0f}x"
                    dark = v is not None and abs(math.log(v)) > 0.6 * math.log(span)
                    ax.text(j, i, text, ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
                mark = marks.get((speed, method, ws[i]))
                if mark and mark["where"] == "between":
                    x = _position(mark["break_even_mbit"], rates)
                    ax.plot([x, x], [i - 0.45, i + 0.45], color="black", linewidth=2.2)
            ax.set_xticks(range(len(rates)), [rate_label(r) for r in rates], rotation=45,
                          ha="right", fontsize=7)
            ax.set_yticks(range(len(ws)), [str(w) for w in ws], fontsize=8)
            ax.set_title(f"{method}, hosts {speed:g}x", fontsize=9)
            if b == 0:
                ax.set_ylabel("workers W")
    bar = fig.colorbar(image, ax=axes, shrink=0.8)
    bar.set_label("x DDP fp32 (modelled; > 1: sooner)")
    fig.suptitle(title or "Modelled time to target relative to DDP fp32 (black bar: "
                 "break-even link)", fontsize=10)
    return fig


def save_heatmap(rows: list[Row], path: Path, title: str = "") -> Path:
    """Draw :func:`heatmap_figure` into ``path`` (PNG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    heatmap_figure(rows, title).savefig(path)
    return path
