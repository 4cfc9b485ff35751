"""Points: the runs of one method at one worker count under one link, one per seed, and the
spread of a figure over those seeds (mean [min-max])."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dist_quant.plot.runs import Run
from dist_quant.plot.series import method_names


@dataclass(frozen=True)
class Spread:
    """Mean and range of one figure over the seeds of a point."""

    mean: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Spread | None:
        if not values:
            return None
        return cls(sum(values) / len(values), min(values), max(values), len(values))

    def text(self, spec: str, unit: str = "") -> str:
        if self.n == 1:
            return f"{self.mean:{spec}}{unit}"
        return f"{self.mean:{spec}}{unit} [{self.low:{spec}}–{self.high:{spec}}]"


@dataclass
class Point:
    """The runs of one method at one worker count under one link (one per seed)."""

    label: str
    workers: int
    runs: list[Run]


def points(members: list[Run]) -> list[Point]:
    """``members`` grouped by method (:func:`dist_quant.plot.series.method_names`) and W,
    in the order of ``members``, then by W. The batch size usually follows W (a fixed global
    batch); where one method has runs of several batch sizes at one W, they are separate
    points named ``batch_size=B``."""
    labels = ([r.method for r in members] if all(r.method for r in members)
              else method_names(members))
    batches: dict[tuple[str, int], set] = {}
    for run, label in zip(members, labels, strict=True):
        batches.setdefault((label, int(run.summary["workers"])), set()).add(
            run.config.get("batch_size"))
    found: dict[tuple[str, int, Any], Point] = {}
    for run, label in zip(members, labels, strict=True):
        w, batch = int(run.summary["workers"]), run.config.get("batch_size")
        name = label if len(batches[(label, w)]) == 1 else f"{label} batch_size={batch}"
        found.setdefault((name, w, batch), Point(name, w, [])).runs.append(run)
    return sorted(found.values(), key=lambda p: p.workers)


def has_several_seeds(groups: dict[str, list[Run]]) -> bool:
    return any(len(p.runs) > 1 for members in groups.values() for p in points(members))
