"""``dist-quant plot RUN_OR_SWEEP_DIRS...``: figures, ``report.md`` and ``report.html`` from
recorded runs.

Example::

    dist-quant plot runs/sweep-2024-06-01 --out benchmarks/2024-06-01
    dist-quant plot runs/a runs/b --target 0.65
"""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from dist_quant.errors import ConfigError
from dist_quant.plot.html import write_html
from dist_quant.plot.modeltime import use_model_time
from dist_quant.plot.report import TARGET_FRACTION, default_target, write_report
from dist_quant.plot.runs import find_runs, record_target
from dist_quant.plot.scaling import scaling
from dist_quant.plot.series import few_evaluations, group_by_cap
from dist_quant.plot.staleness import staleness_figure


@click.command()
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for the PNGs, report.md and report.html (default: <first "
                   "path>/plots).")
@click.option("--target", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Target test accuracy as a fraction (default: the target of the record's "
                   "record.json, else 90% of the best final accuracy over the runs given, "
                   "rounded down to 0.1 point).")
@click.option("--time", "clock", type=click.Choice(["wall", "model"]), default="wall",
              show_default=True,
              help="The time axis: wall (measured) or model (the modelled clock of runs of "
                   "--clock dedicated: dedicated hosts on modelled links).")
def plot(paths: tuple[Path, ...], out: Path | None, target: float | None, clock: str) -> None:
    """Plot time to a target accuracy, accuracy against wall time and bytes, and phase times,
    one series per method (mean and min-max over seeds) in one panel per link and W; write
    report.md with one table per link cap (mean and spread over seeds where a point has
    several) and report.html, the same as one page with the figures inline that a browser
    opens from disk; with runs at several worker counts under a capped link, also
    communication per step against W beside the link model (scaling.png); with asynchronous
    runs (--consistency ssp|async, --backup-workers), the staleness of their gradients
    (staleness.png).

    Each path is a run directory (holding summary.json) or a sweep directory searched for
    them recursively. A committed record's record.json gives what its runs do not keep
    (their link, their sweep labels, the target it was plotted with).
    """
    given = ["dist-quant", "plot", *map(str, paths)]
    given += ["--out", str(out)] if out is not None else []
    given += ["--target", f"{target:g}"] if target is not None else []
    given += ["--time", clock] if clock != "wall" else []
    try:
        # matplotlib is optional (the plot extra): its absence is reported, not raised
        from dist_quant.plot.figures import draw_all, plan
    except ImportError as err:
        raise click.ClickException(f"dist-quant plot needs matplotlib ({err}); install it with "
                                   "pip install 'dist-quant[plot]' (or pip install "
                                   "matplotlib)") from None

    try:
        runs = find_runs(list(paths))
        runs = use_model_time(runs) if clock == "model" else runs
        factors = [1.0 if r.link is None else r.link.dilate for r in runs]
        dilated = any(f != 1.0 for f in factors)   # --dilate: times are the wall's / F
        time_axis = ("modelled time" if clock == "model" else
                     "dilated time" if all(f != 1.0 for f in factors) else "wall time")
    except ConfigError as e:
        raise click.BadParameter(str(e), param_hint="RUN_OR_SWEEP_DIRS") from e
    out = out or paths[0] / "plots"
    out.mkdir(parents=True, exist_ok=True)
    groups = group_by_cap(runs)
    recorded = record_target(list(paths))
    if target is None and recorded is not None:
        target, note = recorded, "the record's target, from its record.json"
    elif target is None:
        target = default_target(runs)
        note = (f"{100 * TARGET_FRACTION:g}% of the best final accuracy over the "
                f"{len(runs)} runs, rounded down to 0.1 point; set with --target")
    else:
        note = "given with --target"
    for line in few_evaluations(groups):
        click.echo(line, err=True)
    if dilated and clock != "model":
        note += ("; the runs marked dilated xF ran on a dilated cluster (--dilate F): their "
                 "times are the wall times / F")
    if clock == "model":
        note += ("; every time is modelled (--clock dedicated: dedicated hosts on the modelled "
                 "links), not measured")
    per_w = scaling(groups)
    figures = draw_all(groups, target, out, per_w, time_axis)
    stale = staleness_figure(groups, out)   # asynchronous runs only
    figures = [*figures, stale] if stale is not None else figures
    report = write_report(groups, target, note, figures, out, per_w, shlex.join(given))
    page = write_html(report, {m: s.colour for m, s in plan(groups, target).style.items()})
    for path in [*figures, report, page]:
        click.echo(str(path))
