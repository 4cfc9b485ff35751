"""Finding and reading run directories, and grouping them by link.

Reads only the run-directory format of :mod:`dist_quant.runtime.metrics` (``config.json``,
``metrics.jsonl``, ``summary.json``) and, where the cluster wrote them, ``link.json``
(``rate_mbit``, ``latency_ms``, ``loss_pct``, ``hosts``, ``dilate``) and ``wire.json``, and
where a sweep wrote it ``point.json`` (the method's label). A run without
``link.json`` ran on loopback with no cap. A dilated run (``dilate`` F in ``link.json``:
:mod:`dist_quant.cluster.dilation`) is grouped apart, its link named "dilated xF", and its
times are the dilated ones its records hold. A run directory is any directory holding
``summary.json``; a sweep directory is searched recursively.

A record's manifest. A directory given to ``plot`` may hold ``record.json``: what the
committed record was plotted with that its run directories do not keep themselves::

    {"target": 0.68, "clock": "wall",
     "link": {"rate_mbit": 10, "latency_ms": 0, "loss_pct": 0},
     "runner": "cluster",
     "labels": {"ps-fast_w4_10mbit_s0_8cc99a2c": "ps-fast", ...}}

``target`` (a fraction) is the default of ``--target``; ``clock`` the clock of the record's
times (``wall``: the wall seconds of the machine its ``config.json`` names); ``link`` stands in
for ``link.json`` in every run below it that has none; ``labels`` (run directory name: sweep
label) for ``point.json``, with ``runner`` and the link as the sweep would have written them.
A run's own ``link.json`` and ``point.json`` win over the manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_quant.errors import ConfigError
from dist_quant.presets import PRESETS
from dist_quant.runtime.metrics import read_metrics, read_summary

LOOPBACK = "loopback (uncapped)"
MANIFEST = "record.json"
CLOCKS = ("wall",)   # the clocks a manifest may name


@dataclass(frozen=True)
class Link:
    """The link a run crossed; ``None`` (no link.json) is loopback."""

    rate_mbit: float | None
    latency_ms: float
    loss_pct: float
    dilate: float = 1.0   # the time dilation of the run (its times are wall / dilate)

    @property
    def name(self) -> str:
        rate = "uncapped" if self.rate_mbit is None else f"{self.rate_mbit:g} Mbit/s"
        loss = f", {self.loss_pct:g}% loss" if self.loss_pct else ""
        dilated = f", dilated x{self.dilate:g}" if self.dilate != 1.0 else ""
        return f"{rate}, {self.latency_ms:g} ms{loss}{dilated}"

    def sort_key(self) -> tuple[float, float, float, float]:
        rate = float("inf") if self.rate_mbit is None else self.rate_mbit
        return (rate, self.latency_ms, self.loss_pct, self.dilate)


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


@dataclass(frozen=True)
class Manifest:
    """A record's ``record.json`` (module docstring); empty where there is none."""

    target: float | None = None
    clock: str = "wall"
    link: dict[str, Any] | None = None
    runner: str | None = None
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            return cls()
        raw = read_json(path)
        where = f"{path}: "
        if not isinstance(raw, dict):
            raise ConfigError("RUN_OR_SWEEP_DIRS", where + "not a JSON object")
        target = raw.get("target")
        if target is not None and not (isinstance(target, (int, float)) and 0 < target <= 1):
            raise ConfigError("RUN_OR_SWEEP_DIRS", where + f"target {target!r} is not a "
                              "fraction in (0, 1]")
        clock = raw.get("clock", "wall")
        if clock not in CLOCKS:
            raise ConfigError("RUN_OR_SWEEP_DIRS", where + f"clock {clock!r} is not one of "
                              + ", ".join(CLOCKS))
        link = raw.get("link")
        if link is not None and "rate_mbit" not in link:
            raise ConfigError("RUN_OR_SWEEP_DIRS", where + 'link has no "rate_mbit"')
        return cls(None if target is None else float(target), clock, link, raw.get("runner"),
                   dict(raw.get("labels") or {}))

    def point(self, run_dir: Path) -> dict[str, Any] | None:
        """The ``point.json`` a sweep would have written for ``run_dir``, or None."""
        label = self.labels.get(Path(run_dir).name)
        if label is None:
            return None
        link = self.link or {}
        return {"label": label, "preset": label if label in PRESETS else None,
                "rate_mbit": link.get("rate_mbit"),
                "latency_ms": float(link.get("latency_ms", 0.0)),
                "loss_pct": float(link.get("loss_pct", 0.0)), "runner": self.runner}


def link_of(raw: dict[str, Any]) -> Link:
    return Link(raw["rate_mbit"], float(raw.get("latency_ms", 0.0)),
                float(raw.get("loss_pct", 0.0)), float(raw.get("dilate", 1.0)))


def load_run(path: Path, manifest: Manifest | None = None) -> Run:
    path = Path(path)
    manifest = manifest or Manifest()
    config = read_json(path / "config.json")
    if "config" not in config:
        raise ConfigError("RUN_OR_SWEEP_DIRS", f"{path / 'config.json'}: no \"config\" object")
    try:
        lines = read_metrics(path)
    except (OSError, ValueError) as e:
        raise ConfigError("RUN_OR_SWEEP_DIRS", f"{path / 'metrics.jsonl'}: {e}") from e
    link = None
    if (path / "link.json").is_file():
        link = link_of(read_json(path / "link.json"))
    elif manifest.link is not None:
        link = link_of(manifest.link)
    wire = read_json(path / "wire.json") if (path / "wire.json").is_file() else None
    point = (read_json(path / "point.json") if (path / "point.json").is_file()
             else manifest.point(path))
    return Run(path, config["config"], read_summary(path),
               [r for r in lines if r["kind"] == "step"],
               [r for r in lines if r["kind"] == "eval"], link, wire, point=point,
               meta={k: v for k, v in config.items() if k != "config"})


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run directory at or below ``paths``, in path order, each read once (with the
    manifest of the path it was found under)."""
    found: dict[Path, tuple[Path, Manifest]] = {}
    for p in map(Path, paths):
        manifest = Manifest.read(p)
        below = [p] if (p / "summary.json").is_file() else sorted(
            s.parent for s in p.rglob("summary.json"))
        if not below:
            raise ConfigError("RUN_OR_SWEEP_DIRS", f"{p}: no run directory (summary.json) here "
                              "or below")
        for d in below:
            found.setdefault(d.resolve(), (d, manifest))
    return [load_run(d, manifest) for d, manifest in found.values()]


def record_target(paths: list[Path]) -> float | None:
    """The target the manifests of ``paths`` name (the first that names one)."""
    return next((m.target for m in map(Manifest.read, paths) if m.target is not None), None)
