"""Finding and reading run directories, and grouping them by link.

Reads only the run-directory format of :mod:`dist_quant.runtime.metrics` (``config.json``,
``metrics.jsonl``, ``summary.json``) and, where the cluster wrote them, ``link.json``
(``rate_mbit``, ``latency_ms``, ``loss_pct``, ``hosts``) and ``wire.json``, and where a sweep
wrote it ``point.json`` (the method's label). A run without
``link.json`` ran on loopback with no cap. A run directory is any directory holding
``summary.json``; a sweep directory is searched recursively.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_quant.errors import ConfigError
from dist_quant.runtime.metrics import read_metrics, read_summary

LOOPBACK = "loopback (uncapped)"


@dataclass(frozen=True)
class Link:
    """The link a run crossed; ``None`` (no link.json) is loopback."""

    rate_mbit: float | None
    latency_ms: float
    loss_pct: float

    @property
    def name(self) -> str:
        rate = "uncapped" if self.rate_mbit is None else f"{self.rate_mbit:g} Mbit/s"
        loss = f", {self.loss_pct:g}% loss" if self.loss_pct else ""
        return f"{rate}, {self.latency_ms:g} ms{loss}"

    def sort_key(self) -> tuple[float, float, float]:
        rate = float("inf") if self.rate_mbit is None else self.rate_mbit
        return (rate, self.latency_ms, self.loss_pct)


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    steps: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    link: Link | None
    wire: dict[str, Any] | None
    label: str = field(default="")    # unique within its link (seed, W where they differ)
    method: str = field(default="")   # the same for every seed and W of one method
    point: dict[str, Any] | None = None   # point.json of a sweep's run
    meta: dict[str, Any] = field(default_factory=dict)  # config.json less "config"

    @property
    def cap(self) -> str:
        return LOOPBACK if self.link is None else self.link.name

    @property
    def is_ddp_fp32(self) -> bool:
        return self.config.get("method") == "ddp" and self.config.get("ddp_hook") == "none"


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError("RUN_OR_SWEEP_DIRS", f"{path}: cannot read JSON ({e})") from e


def load_run(path: Path) -> Run:
    path = Path(path)
    config = read_json(path / "config.json")
    if "config" not in config:
        raise ConfigError("RUN_OR_SWEEP_DIRS", f"{path / 'config.json'}: no \"config\" object")
    try:
        lines = read_metrics(path)
    except (OSError, ValueError) as e:
        raise ConfigError("RUN_OR_SWEEP_DIRS", f"{path / 'metrics.jsonl'}: {e}") from e
    link = None
    if (path / "link.json").is_file():
        raw = read_json(path / "link.json")
        link = Link(raw["rate_mbit"], float(raw.get("latency_ms", 0.0)),
                    float(raw.get("loss_pct", 0.0)))
    wire = read_json(path / "wire.json") if (path / "wire.json").is_file() else None
    point = read_json(path / "point.json") if (path / "point.json").is_file() else None
    return Run(path, config["config"], read_summary(path),
               [r for r in lines if r["kind"] == "step"],
               [r for r in lines if r["kind"] == "eval"], link, wire, point=point,
               meta={k: v for k, v in config.items() if k != "config"})


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run directory at or below ``paths``, in path order, each read once."""
    found: list[Path] = []
    for p in map(Path, paths):
        below = [p] if (p / "summary.json").is_file() else sorted(
            s.parent for s in p.rglob("summary.json"))
        if not below:
            raise ConfigError("RUN_OR_SWEEP_DIRS", f"{p}: no run directory (summary.json) here "
                              "or below")
        found += [d for d in below if d.resolve() not in {f.resolve() for f in found}]
    return [load_run(d) for d in found]
