"""Methods, panels and series: how the runs of a sweep become the lines of a figure.

- **Method**: the sweep's label of the run (``point.json``: ``ps-colocated``, ``ddp-fp32`` or
  the user's own ``-m LABEL:...``); a run without ``point.json`` is named by
  :func:`dist_quant.plot.labels.method_label`. Runs sharing a label whose configs differ in
  fields other than the seed, W and the batch size are different methods, named by those
  fields (``ps-colocated overlap=True``).
- **Panel**: one link, one worker count W and one batch size per worker, the fields that are
  neither method nor seed; each panel is titled with what it fixes.
- **Series**: the runs of one method in one panel (one per seed). On the common grid of
  evaluation steps G (the steps every seed evaluated), at each g in G:

      x(g) = mean_s x_s(g),   mean(g) = mean_s a_s(g),   band(g) = [min_s a_s(g), max_s a_s(g)]

  with x the wall seconds or cumulative MB and a the test accuracy. Each x_s is
  non-decreasing in the step, so their mean is: a series never runs backwards. A run that
  stops early (``stop_accuracy``) ends the grid for its method; each seed's own curve keeps
  its whole length.

Evaluation lines are read restart-safe: a line whose step is not above the one before starts
a new attempt and replaces the lines from that step on.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from dist_quant.plot.labels import method_label, run_labels
from dist_quant.plot.runs import LOOPBACK, Run
from dist_quant.presets import PRESETS

SETTING = ("workers", "batch_size")          # panel fields besides the link
NOT_METHOD = frozenset({"seed", *SETTING})


def base_name(run: Run) -> str:
    label = (run.point or {}).get("label")
    return str(label) if label else method_label(run.config)


def method_names(runs: list[Run]) -> list[str]:
    """The method of each run: its base name, with the fields that tell apart configs sharing
    that name (seed, W and batch size aside)."""
    return run_labels([r.config for r in runs], ignore=NOT_METHOD, number=False,
                      names=[base_name(r) for r in runs])


def is_ddp(run: Run) -> bool:
    return run.config.get("method") == "ddp"


def method_order(runs: list[Run]) -> list[str]:
    """The runs' methods (``Run.method``) in reading order: DDP fp32 first, then the other DDP
    baselines, then the parameter server; presets in the sweep's preset order, other labels
    by name."""
    preset_rank = {name: i for i, name in enumerate(PRESETS)}
    first = first_runs(runs)

    def key(name: str) -> tuple[Any, ...]:
        run = first[name]
        return (not run.is_ddp_fp32, not is_ddp(run),
                preset_rank.get(base_name(run), len(preset_rank)), name.lower())

    return sorted(first, key=key)


def first_runs(runs: list[Run]) -> dict[str, Run]:
    """``{method: its first run}``."""
    first: dict[str, Run] = {}
    for run in runs:
        first.setdefault(run.method, run)
    return first


@dataclass
class Panel:
    """Runs under one link at one W and batch size."""

    cap: str
    workers: int
    batch_size: int | None
    runs: list[Run]

    @property
    def setting(self) -> str:
        batch = "" if self.batch_size is None else f", batch {self.batch_size} per worker"
        return f"W = {self.workers}{batch}"

    @property
    def title(self) -> str:
        return f"{self.cap}; {self.setting}"


def panels(groups: dict[str, list[Run]]) -> list[Panel]:
    """One panel per link (the order of ``groups``), W and batch size (ascending W)."""
    out = []
    for cap, members in groups.items():
        found: dict[tuple[int, Any], Panel] = {}
        for run in members:
            w, batch = int(run.summary["workers"]), run.config.get("batch_size")
            found.setdefault((w, batch), Panel(cap, w, batch, [])).runs.append(run)
        out += [found[k] for k in sorted(found, key=lambda k: (k[0], -(k[1] or 0)))]
    return out


def cap_order(panel_list: list[Panel]) -> list[str]:
    caps = list(dict.fromkeys(p.cap for p in panel_list))
    return [c for c in caps if c != LOOPBACK] + [c for c in caps if c == LOOPBACK]


def clean_evals(run: Run) -> list[dict[str, Any]]:
    """The run's evaluation lines in step order; a line whose step is not above the one
    before (a restarted attempt appended to the file) replaces the lines from its step on."""
    kept: list[dict[str, Any]] = []
    for line in run.evals:
        while kept and kept[-1]["step"] >= line["step"]:
            kept.pop()
        kept.append(line)
    return kept


XS = {
    "wall": lambda e: float(e["wall"]),
    "mb_up": lambda e: e["cum_bytes_up"] / 1e6,
    "mb_total": lambda e: (e["cum_bytes_up"] + e["cum_bytes_down"]) / 1e6,
}


@dataclass(frozen=True)
class Curve:
    x: tuple[float, ...]
    y: tuple[float, ...]   # accuracy, fraction


@dataclass(frozen=True)
class Series:
    method: str
    runs: tuple[Run, ...]
    steps: tuple[int, ...]    # the common grid
    x: tuple[float, ...]      # mean x over the seeds at each grid step
    mean: tuple[float, ...]   # mean accuracy
    low: tuple[float, ...]    # min over the seeds
    high: tuple[float, ...]   # max over the seeds
    seeds: tuple[Curve, ...]  # each run's whole curve

    @property
    def n(self) -> int:
        return len(self.runs)


def series_of(method: str, runs: list[Run], x: str) -> Series:
    fx = XS[x]
    evals = [clean_evals(r) for r in runs]
    by_step = [{e["step"]: e for e in ev} for ev in evals]
    grid = sorted(set.intersection(*(set(d) for d in by_step))) if by_step else []
    xs, mean, low, high = [], [], [], []
    for g in grid:
        acc = [d[g]["test_accuracy"] for d in by_step]
        xs.append(sum(fx(d[g]) for d in by_step) / len(by_step))
        mean.append(sum(acc) / len(acc))
        low.append(min(acc))
        high.append(max(acc))
    curves = tuple(Curve(tuple(fx(e) for e in ev), tuple(e["test_accuracy"] for e in ev))
                   for ev in evals)
    return Series(method, tuple(runs), tuple(grid), tuple(xs), tuple(mean), tuple(low),
                  tuple(high), curves)


def panel_series(panel: Panel, x: str, order: list[str]) -> list[Series]:
    """The series of a panel, one per method, in method ``order``."""
    runs: dict[str, list[Run]] = defaultdict(list)
    for run in panel.runs:
        runs[run.method].append(run)
    return [series_of(m, runs[m], x) for m in order if m in runs]


FEW_EVALUATIONS = 3


def few_evaluations(groups: dict[str, list[Run]]) -> list[str]:
    """One warning line per series (a method in one panel) whose runs hold fewer than
    ``FEW_EVALUATIONS`` evaluations: its curves are a point or a segment, and its time to
    target can only be one of those evaluations."""
    out = []
    for panel in panels(groups):
        runs: dict[str, list[Run]] = defaultdict(list)
        for run in panel.runs:
            runs[run.method].append(run)
        for method, members in runs.items():
            n = min(len(clean_evals(r)) for r in members)
            if n < FEW_EVALUATIONS:
                out.append(f"warning: {method} ({panel.title}): {n} evaluation"
                           f"{'' if n == 1 else 's'} per run, fewer than {FEW_EVALUATIONS}; "
                           "evaluate more often (--set eval_every=N) or train longer")
    return out


def group_by_cap(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by link, slowest cap first, loopback last; labels unique within a group;
    runs in method order (:func:`method_order`: DDP fp32 first, then
    the other DDP baselines, then the parameter server). A run is named by its method
    (:func:`base_name`), with its seed or W where they differ."""
    def key(run: Run) -> tuple[int, tuple[float, float, float]]:
        return (1, (0.0, 0.0, 0.0)) if run.link is None else (0, run.link.sort_key())

    for run, method in zip(runs, method_names(runs), strict=True):
        run.method = method
    rank = {m: i for i, m in enumerate(method_order(runs))}
    groups: dict[str, list[Run]] = {}
    for run in sorted(runs, key=key):
        groups.setdefault(run.cap, []).append(run)
    for members in groups.values():
        labels = run_labels([r.config for r in members], names=[base_name(r) for r in members])
        for run, label in zip(members, labels, strict=True):
            run.label = label
        members.sort(key=lambda r: (rank[r.method], r.label.lower()))
    return groups
