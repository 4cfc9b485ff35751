"""Time dilation of the real clusters (``--dilate F``, ``--dilate auto``), after DieCast.

The cluster engines run every host on this machine. When the training processes outnumber its
cores, their compute queues for the CPU and the wall time measures the machine, not the
cluster asked about. Dilation by a factor ``F`` slows everything the machine does not share
by ``F`` as well, and reads every time divided by ``F`` (Gupta, Vishwanath, Vahdat, "DieCast",
NSDI 2008):

- every link rate is divided by ``F`` (``--rate``, ``--worker-rate``), every latency and the
  process-group ``--timeout`` multiplied by ``F``; the rate limiter's burst stays the bytes it
  is at the undilated rate (``launch/node.sh``, ``DQ_DILATE``: 4 ms at ``R`` is ``4 F`` ms at
  ``R / F``) and its queue the same bytes, so that in dilated time each link is the asked one;
- every reported time is the raw wall time divided by ``F``: in ``metrics.jsonl`` each step's
  ``wall``, phase times (``time``), ``time_overlap``, ``time_overlap_down`` and
  ``time_wait``, each evaluation's ``wall`` (so the time to a target), ``summary.json``'s
  ``wall_seconds`` and ``wait_seconds_per_worker``, ``wire.json``'s ``seconds`` (and those of
  its ``steady`` window), and the progress bar's elapsed time and ETA. The raw figure stays
  beside each as ``NAME_raw`` (``wall_raw``, ``time_raw``, ``wall_seconds_raw``, ...).
  CPU times and the modelled clock (``model_wall``, ``model_time``) are not divided: a
  process's CPU time is what a dedicated core would have taken, and the modelled clock is
  not this machine's;
- ``F`` is recorded as ``dilate`` in ``summary.json``, ``link.json`` and ``wire.json``, and as
  ``dilation`` (:meth:`Dilation.info`: the factor, how it was asked, the training processes,
  the cores, the timeout asked and ``timeout_raw``, the one the job ran with as it recorded
  it) in ``config.json`` and
  ``summary.json``; ``link.json`` keeps the asked link (``rate_mbit``, ``latency_ms``,
  ``worker_rates``) and what ``tc`` was given under ``applied``; ``config.json``'s ``timeout``
  is the asked one.

Why this holds. With ``P`` training processes busy on ``C < P`` cores each gets ``C / P`` of a
core, so a computation of ``c`` CPU seconds takes about ``c P / C`` wall seconds. At
``F = P / C`` (``--dilate auto``: processes over the cores the job has, at least 1) it takes
``c`` in dilated time, as on a dedicated core; a transfer of ``m`` bytes at ``R / F`` takes
``F m / R`` wall seconds, ``m / R`` dilated. ``F`` above ``P / C`` makes the hosts compute
``F C / P`` times faster than this CPU in dilated time (nothing throttles a process's CPU
share), while the links stay the asked ones; below ``P / C`` the compute is still queued.
The processes' own idle time (waiting for the network) leaves its core to the others, so
``P / C`` is an upper bound of the queueing: what ``--dilate auto`` against ``--dilate 2F``
measures is how far the figures still move with ``F``.

:func:`run_dilated` is the one place both engines go through (``dist-quant cluster`` and
``dist-quant sweep``): it scales the link and the timeout, runs the engine with ``dilate=F``
(the engine sizes the bursts and draws the progress bar in dilated time), and rewrites the
records. :func:`parse_dilate` refuses a bad value in one line before anything starts.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_quant.analysis.linkmodel import Link
from dist_quant.cluster.engine import Engine
from dist_quant.config import TrainConfig
from dist_quant.errors import ConfigError
from dist_quant.runtime.metrics import write_json_atomic

AUTO = "auto"
OPTION = "--dilate"
MAX_FACTOR = 1000.0
RAW = "_raw"
# the wall-time fields of step and evaluation lines (``time``, the phases, is a dict)
LINE_TIMES = ("wall", "time_overlap", "time_overlap_down", "time_wait")
SUMMARY_TIMES = ("wall_seconds", "wait_seconds_per_worker")
CGROUP = Path("/sys/fs/cgroup")


def parse_dilate(text: str | float | None) -> float | None:
    """``--dilate``'s value: a factor ``F >= 1`` (1 = none), or None for ``auto``;
    ConfigError naming ``--dilate`` otherwise (0, negative, below 1, not a number)."""
    if text is None:
        return 1.0
    if isinstance(text, str) and text.strip().lower() == AUTO:
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(OPTION, f"must be a factor F >= 1 or auto; got {text!r}") from None
    if not (math.isfinite(value) and 1.0 <= value <= MAX_FACTOR):
        raise ConfigError(OPTION, f"must be a factor F in [1, {MAX_FACTOR:g}] (1 = no "
                          f"dilation) or auto; got {text}")
    return value


def cgroup_quota(root: Path = CGROUP, proc_cgroup: Path = Path("/proc/self/cgroup")
                 ) -> float | None:
    """The CPU quota of this process's cgroup in cores (the smallest on its path to the
    root: cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``); None where
    there is none."""
    quotas: list[float] = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        rel = path.strip().lstrip("/")
        if hier == "0" and not controllers:           # v2: walk up from the process's group
            here = root / rel if rel else root
            while True:
                quotas += _v2_quota(here / "cpu.max")
                if here == root or root not in here.parents:
                    break
                here = here.parent
        elif "cpu" in controllers.split(","):         # v1: the cpu controller's mount
            for mount in (root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"):
                for base in (mount / rel, mount):
                    quotas += _v1_quota(base)
    if not lines:
        quotas += _v2_quota(root / "cpu.max") + _v1_quota(root / "cpu")
    return min(quotas) if quotas else None


def _v2_quota(path: Path) -> list[float]:
    try:
        quota, period = path.read_text().split()[:2]
        return [] if quota == "max" else [int(quota) / int(period)]
    except (OSError, ValueError):
        return []


def _v1_quota(base: Path) -> list[float]:
    try:
        quota = int((base / "cpu.cfs_quota_us").read_text())
        period = int((base / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return []
    return [quota / period] if quota > 0 and period > 0 else []


def job_cores() -> float:
    """The cores this job has: the CPUs it may run on (``os.sched_getaffinity``), at most its
    cgroup's CPU quota."""
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cpus = float(os.cpu_count() or 1)
    quota = cgroup_quota()
    return min(cpus, quota) if quota else cpus


def training_processes(cfg: TrainConfig) -> int:
    """The training processes of the job: W + S with dedicated servers, W colocated or DDP
    (one per host; torchrun's agents mostly sleep)."""
    return cfg.world_size


def _round(x: float) -> float:
    return float(f"{x:.3g}")


@dataclass(frozen=True)
class Dilation:
    """The factor of one run and how it came about (``asked``: ``auto`` or the number)."""

    factor: float = 1.0
    asked: str = "1"
    processes: int = 0
    cores: float = 0.0

    @classmethod
    def resolve(cls, spec: float | None, cfg: TrainConfig, cores: float | None = None
                ) -> Dilation:
        """``spec`` of :func:`parse_dilate` (None = auto: processes / cores, at least 1)."""
        have = job_cores() if cores is None else float(cores)
        procs = training_processes(cfg)
        if spec is None:
            return cls(max(1.0, _round(procs / have)), AUTO, procs, have)
        return cls(float(spec), f"{spec:g}", procs, have)

    @property
    def active(self) -> bool:
        return self.factor != 1.0

    @property
    def title(self) -> str:
        """How plots and reports name it: ``dilated x2.5``."""
        return f"dilated x{self.factor:g}"

    def link(self, rate_mbit: float | None, latency_ms: float,
             worker_rates: Mapping[int, float] | None = None
             ) -> tuple[float | None, float, dict[int, float]]:
        """The link ``tc`` is given: rates / F, latency x F."""
        f = self.factor
        return (None if not rate_mbit else rate_mbit / f, latency_ms * f,
                {i: r / f for i, r in (worker_rates or {}).items()})

    def config(self, cfg: TrainConfig) -> TrainConfig:
        """The job's config: ``--timeout`` x F."""
        return cfg.replace(timeout=cfg.timeout * self.factor) if self.active else cfg

    def info(self, cfg: TrainConfig | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"factor": self.factor, "asked": self.asked,
                               "processes": self.processes, "cores": self.cores}
        if cfg is not None:
            out.update(timeout=cfg.timeout, timeout_raw=cfg.timeout * self.factor)
        return out

    def line(self, cfg: TrainConfig, rate_mbit: float | None, latency_ms: float) -> str:
        """One line saying what the dilation does to this run."""
        rate, latency, _ = self.link(rate_mbit, latency_ms)
        how = (f"{self.processes} training processes on {self.cores:g} cores"
               if self.asked == AUTO else "as asked")
        links = "uncapped links" if rate is None else f"links at {rate:g} Mbit/s"
        return (f"{self.title} ({how}): {links}"
                + (f", latency {latency:g} ms" if latency else "")
                + f", timeout {cfg.timeout * self.factor:g} s; every time reported is the "
                  f"wall time / {self.factor:g} (the raw one kept as *_raw)")


# ---- the records -----------------------------------------------------------------------------
def _raw(rec: dict[str, Any], key: str) -> Any:
    return rec.get(key + RAW, rec.get(key))


def _div(value: Any, f: float) -> Any:
    if isinstance(value, dict):
        return {k: _div(v, f) for k, v in value.items()}
    if isinstance(value, list):
        return [_div(v, f) for v in value]
    return value / f if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else value


def dilate_line(rec: dict[str, Any], factor: float) -> dict[str, Any]:
    """A step or evaluation line in dilated time, its raw times beside (``NAME_raw``); from
    the raw ones where the line was dilated before, so it is the same however often it is
    done. Other lines, and a factor of 1, leave it as it was (less any ``_raw`` fields)."""
    out = restore_line(rec)
    if factor == 1.0 or out.get("kind") not in ("step", "eval"):
        return out
    for key in (*LINE_TIMES, "time"):
        if key in out:
            out[key + RAW] = out[key]
            out[key] = _div(out[key], factor)
    return out


def restore_line(rec: dict[str, Any]) -> dict[str, Any]:
    """The line as the job wrote it: raw times back in place, ``_raw`` fields gone."""
    out = dict(rec)
    for key in (*LINE_TIMES, "time"):
        if key + RAW in out:
            out[key] = out.pop(key + RAW)
    return out


def _rewrite_metrics(path: Path, fn) -> None:
    if not path.is_file():
        return
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(fn(rec)) + "\n" for rec in lines))
    os.replace(tmp, path)


def restore(run_dir: str | Path) -> None:
    """Put a dilated run directory's ``metrics.jsonl`` back in raw time (before a resume in
    it: the job continues its wall clock from the last line's ``wall``)."""
    _rewrite_metrics(Path(run_dir) / "metrics.jsonl", restore_line)


def _update_json(path: Path, fn) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    obj = fn(json.loads(path.read_text()))
    write_json_atomic(path, obj)
    return obj


def dilate_records(run_dir: str | Path, dilation: Dilation, cfg: TrainConfig,
                   done: bool = True) -> dict[str, Any]:
    """Rewrite a run directory's records in dilated time (module docstring); ``cfg`` is the
    config asked for (its timeout undilated). ``done=False`` (a job that failed): the lines
    and ``config.json`` only. Returns the rewritten ``{"summary", "wire"}`` (None
    for a file that is not there)."""
    d, f = Path(run_dir), dilation.factor
    _rewrite_metrics(d / "metrics.jsonl", lambda rec: dilate_line(rec, f))
    info = dilation.info(cfg)

    def config(obj: dict[str, Any]) -> dict[str, Any]:
        job = obj.setdefault("config", {})
        # the timeout the job ran with, as it recorded it (a rewrite keeps the first reading)
        ran = obj.get("dilation", {}).get("timeout_raw", job.get("timeout", info["timeout_raw"]))
        job["timeout"] = cfg.timeout
        info["timeout_raw"] = ran
        return {**obj, "dilation": info}

    _update_json(d / "config.json", config)
    if not done:
        return {"summary": None, "wire": None}

    def summary(obj: dict[str, Any]) -> dict[str, Any]:
        for key in SUMMARY_TIMES:
            if key in obj:
                raw = _raw(obj, key)
                obj[key + RAW], obj[key] = raw, _div(raw, f)
        return {**obj, "dilate": f, "dilation": info}

    def wire(obj: dict[str, Any]) -> dict[str, Any]:
        for part in (obj, obj.get("steady")):
            if isinstance(part, dict) and "seconds" in part:
                raw = _raw(part, "seconds")
                part["seconds_raw"], part["seconds"] = raw, _div(raw, f)
        return {**obj, "dilate": f}

    return {"summary": _update_json(d / "summary.json", summary),
            "wire": _update_json(d / "wire.json", wire)}


def link_record(applied: dict[str, Any], dilation: Dilation, rate_mbit: float | None,
                latency_ms: float, worker_rates: Mapping[int, float]) -> dict[str, Any]:
    """``link.json`` of a dilated run: the asked link, ``dilate``, and under ``applied`` what
    the engine gave ``tc`` (rates / F, latency x F)."""
    keys = ("rate_mbit", "latency_ms", "worker_rates")
    asked = {"rate_mbit": rate_mbit or None, "latency_ms": latency_ms,
             "worker_rates": {str(i): r for i, r in sorted(worker_rates.items())}}
    return {**applied, **asked, "dilate": dilation.factor,
            "applied": {k: applied[k] for k in keys if k in applied}}


# ---- running ---------------------------------------------------------------------------------
def check_engine(engine: Engine, dilation: Dilation) -> None:
    """ConfigError naming ``--dilate`` unless ``engine.run`` takes ``dilate`` (an engine
    written before dilation runs undilated only)."""
    if dilation.active and "dilate" not in inspect.signature(engine.run).parameters:
        raise ConfigError(OPTION, f"--engine {engine.name} does not dilate time (its run "
                          "takes no dilate=); leave --dilate at 1")


def run_dilated(engine: Engine, cfg: TrainConfig, rate_mbit: float | None, latency_ms: float,
                loss_pct: float = 0.0, *, mtu: int = 1500,
                worker_rates: Mapping[int, float] | None = None,
                dilation: Dilation | None = None) -> dict[str, Any]:
    """Run ``cfg`` on ``engine`` dilated by ``dilation`` (undilated without one): what
    ``dist-quant cluster`` and ``dist-quant sweep`` call. Returns the engine's
    ``{"run_dir", "link", "wire", "seconds"}`` with the records rewritten, ``seconds`` in
    dilated time, ``seconds_raw`` and ``dilation`` (:meth:`Dilation.info`) added."""
    dilation = dilation or Dilation()
    rates = dict(worker_rates or {})
    if not dilation.active:
        return engine.run(cfg, rate_mbit, latency_ms, loss_pct, mtu=mtu, worker_rates=rates)
    check_engine(engine, dilation)
    Link(rate_mbit or None, latency_ms, loss_pct, mtu).validate()   # the asked link
    rate, latency, own = dilation.link(rate_mbit, latency_ms, rates)
    for run_dir in {cfg.run_dir, cfg.resume} - {""}:
        restore(run_dir)   # a resume continues the raw clock of the lines kept
    job = dilation.config(cfg)
    try:
        out = engine.run(job, rate, latency, loss_pct, mtu=mtu, worker_rates=own,
                         dilate=dilation.factor)
    except BaseException:
        if cfg.run_dir:
            dilate_records(cfg.run_dir, dilation, cfg, done=False)
        raise
    written = dilate_records(out["run_dir"], dilation, cfg)
    link = link_record(out["link"], dilation, rate_mbit, latency_ms, rates)
    write_json_atomic(Path(out["run_dir"]) / "link.json", link)
    return {**out, "link": link, "wire": written["wire"] or out["wire"],
            "seconds": out["seconds"] / dilation.factor, "seconds_raw": out["seconds"],
            "dilation": dilation.info(cfg)}
