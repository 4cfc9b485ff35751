"""Communication seconds per step against the worker count W, measured and as the link model
predicts it: the numbers behind ``scaling.png`` and the report's scaling table.

For every capped link (a rate in ``link.json``) under which runs at two or more worker counts
exist, and every method there (runs grouped as in :func:`dist_quant.plot.report.points`: one
point per method and W, its seeds averaged):

- measured: the mean over the steps of the ``communicate`` phase (``metrics.jsonl``), averaged
  over the point's runs;
- model: :func:`dist_quant.analysis.linkmodel.predict_comm_seconds` over the same step records on
the
  run's own link (``link.json``), divided by the steps, with the run's topology
  (:func:`dist_quant.analysis.linkmodel.topology_of`: star, sharded, colocated, ring, onebit hook);
- growth: measured time at W over measured time at the smallest W of that method;
- step: the run's wall seconds per step (``summary.json``), for scale: the communicate phase
  is the rest of the step once the slowest rank's computing is taken out, so it also holds
  the waits for a straggler and the small control messages the model leaves out;
- uncapped: where the same method at the same W also ran on uncapped links, its measured
  communicate phase there: the waits and messages that are not the cap's. The cap's own share
  is then measured minus uncapped (``link``), with its growth over W (``link growth``, where
  both shares are positive: a share within the noise of the waits has no growth): on a
  machine with fewer cores than ranks, the uncapped figure holds the wait for the slowest
  rank's CPU, which grows with W whatever the link.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_quant.analysis.linkmodel import link_of, predict_comm_seconds, topology_of
from dist_quant.plot.points import points
from dist_quant.plot.runs import Run


@dataclass(frozen=True)
class ScalingRow:
    label: str
    workers: int
    runs: int
    measured_s: float    # seconds per step, mean over the runs
    predicted_s: float   # the link model's seconds per step, mean over the runs
    growth: float | None  # measured_s over the method's measured_s at its smallest W
    step_s: float        # wall seconds per step, mean over the runs
    uncapped_s: float | None = None     # the same point's communicate on uncapped links
    link_growth: float | None = None    # (measured - uncapped) over the same at the smallest W

    @property
    def link_s(self) -> float | None:
        """The cap's share of the communicate phase: measured less uncapped."""
        return None if self.uncapped_s is None else self.measured_s - self.uncapped_s


def measured_comm(run: Run) -> float:
    return sum(s["time"].get("communicate", 0.0) for s in run.steps) / max(len(run.steps), 1)


def step_wall(run: Run) -> float:
    return float(run.summary["wall_seconds"]) / max(int(run.summary["steps"]), 1)


def predicted_comm(run: Run) -> float:
    workers = int(run.summary.get("workers", run.config["workers"]))
    comm = predict_comm_seconds(run.steps, run.config["method"], workers, link_of(run.path),
                                topology=topology_of(run.config, run.summary))
    return comm / max(len(run.steps), 1)


def scaling(groups: dict[str, list[Run]]) -> dict[str, list[ScalingRow]]:
    """``{link name: rows}`` for every capped link with runs at several worker counts; rows
    by method (in the order of the link's group), then W."""

    out: dict[str, list[ScalingRow]] = {}
    free = [r for members in groups.values() for r in members
            if r.link is not None and r.link.rate_mbit is None]
    floor = {(p.label, p.workers): sum(map(measured_comm, p.runs)) / len(p.runs)
             for p in (points(free) if free else [])}
    for cap, members in groups.items():
        capped = [r for r in members if r.link is not None and r.link.rate_mbit is not None]
        if len({int(r.summary["workers"]) for r in capped}) < 2:
            continue
        pts = points(capped)
        order = list(dict.fromkeys(p.label for p in points(capped)))
        rows = []
        for label in order:
            series = sorted((p for p in pts if p.label == label), key=lambda p: p.workers)
            first = first_link = None
            for p in series:
                measured = sum(map(measured_comm, p.runs)) / len(p.runs)
                first = measured if first is None else first
                uncapped = floor.get((label, p.workers))
                link = None if uncapped is None else measured - uncapped
                if first_link is None and link is not None:
                    first_link = link
                rows.append(ScalingRow(label, p.workers, len(p.runs), measured,
                                       sum(map(predicted_comm, p.runs)) / len(p.runs),
                                       measured / first if first > 0 else None,
                                       sum(map(step_wall, p.runs)) / len(p.runs), uncapped,
                                       link / first_link if link is not None and link > 0
                                       and first_link and first_link > 0 else None))
        out[cap] = rows
    return out


def scaling_table(data: dict[str, list[ScalingRow]]) -> list[str]:
    """Report lines: one table per link."""
    parts: list[str] = []
    for cap, rows in data.items():
        free = any(r.uncapped_s is not None for r in rows)
        parts += [f"## Communication per step against W ({cap})", "",
                  "Measured: mean communicate phase per step (mean over seeds); model: "
                  "dist_quant.analysis.linkmodel on the same step records; growth: measured "
                  "over the method's measured at its smallest W; step: wall time per step."
                  + (" Uncapped: the same point's communicate phase on uncapped links; link: "
                     "measured less uncapped, the cap's own share; link growth: its growth "
                     "over W." if free else ""), "",
                  "| method | W | runs | measured (ms/step) | model (ms/step) | "
                  "measured / model | growth | step (ms) |"
                  + (" uncapped (ms/step) | link (ms/step) | link growth |" if free else ""),
                  "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" * 3 if free else "")]
        for r in rows:
            ratio = f"{r.measured_s / r.predicted_s:.2f}" if r.predicted_s > 0 else "—"
            growth = "—" if r.growth is None else f"{r.growth:.2f}x"
            line = (f"| {r.label} | {r.workers} | {r.runs} | {1e3 * r.measured_s:.2f} | "
                    f"{1e3 * r.predicted_s:.2f} | {ratio} | {growth} | {1e3 * r.step_s:.2f} |")
            if free:
                line += (" — | — | — |" if r.uncapped_s is None else
                         f" {1e3 * r.uncapped_s:.2f} | {1e3 * r.link_s:.2f} | "
                         + ("—" if r.link_growth is None else f"{r.link_growth:.2f}x") + " |")
            parts.append(line)
        parts.append("")
    return parts
