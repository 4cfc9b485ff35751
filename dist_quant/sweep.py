"""``dist-quant sweep``: a grid of real training runs, one directory per point, resumable.

A point is one method (a named preset plus overrides), one value of every ``--set`` axis and one
link (rate, latency, loss)::

    dist-quant sweep sweeps/bw -m ps-onebit -m ddp-fp32 -m ddp-powersgd \\
        --rate 10,100,none --set workers=4 --set stop_accuracy=0.65 --set steps=1500

Methods. Presets (``PRESETS``) map onto :class:`~dist_quant.config.TrainConfig` fields:

====================  =========================================================
``ps-fp32``           parameter server, fp32 uplink (compressor ``none``)
``ps-onebit-whole``   1-bit, one (a, b) for the whole gradient (the per-tensor rule)
``ps-onebit``         1-bit in buckets of the default ``--bucket-size``
``ps-sign-ef``        scaled sign with error feedback
``ps-onebit-updown``  1-bit uplink and a 1-bit ``sign`` downlink (scaled sign of the replica
                      change: the downlink carries its error, which needs a contractive
                      compressor; a stochastic 1-bit downlink is refused by validation)
``ps-sharded``        the best 1-bit setting of the bandwidth record (1-bit uplink in buckets,
                      fp16 headers, ``sign`` downlink in buckets of 512) on S = 2 dedicated
                      servers
``ps-colocated``      the same setting with no dedicated server: every worker serves 1/W
                      of the parameters (``--colocate``)
``ps-fast``           colocated, scaled sign in buckets of 32 with fp16 scales and error
                      feedback on each worker's own momentum (``--worker-momentum``; about
                      1.5 bits per coordinate up), 4-bit downlink in buckets of 512 (chosen in
                      benchmarks/convergence-2026-12-06)
``ps-tolerant``       the same setting on the star, asynchronous (``--consistency async``),
                      momentum 0.5 and lr 1.0 (chosen in benchmarks/stragglers-2026-12-06).
                      Async keeps every fast worker busy whatever the slowest does; its
                      staleness acts as extra momentum (Mitliagkas et al. 2016), so the
                      explicit momentum is lowered and the lr raised to keep the effective
                      step lr / (1 - momentum) = 2.0 of the default (sync at 0.2 and 0.9)
``ps-qsgd``           QSGD, ``--qsgd-levels`` levels, L2 norm per bucket (Alistarh et al. 2017)
``ps-terngrad``       TernGrad, ternary with max scaling per bucket (Wen et al. 2017)
``ps-topk-ef``        top-k (``--sparsity-ratio``) with error feedback
``ps-randk``          random-k rescaled by n / k (unbiased), ``--sparsity-ratio``; its variance
                      is (n / k - 1) ||g||^2, so a small ratio needs a small lr (at the
                      defaults it diverges: benchmarks/baselines-2026-12-01)
``ddp-fp32``          torch DDP, fp32 gloo allreduce
``ddp-fp16``          torch DDP, ``fp16_compress_hook``
``ddp-powersgd``      torch DDP, PowerSGD hook (``--powersgd-rank``)
``ddp-onebit``        torch DDP, this project's 1-bit hook (``dist_quant.hooks``) in buckets
                      of the default ``--bucket-size``
====================  =========================================================

``-m LABEL:field=value,field=value`` starts from the preset ``LABEL`` (or, for a label that is
no preset, from the defaults) and sets the fields: ``-m ps-kbit2:compressor=kbit,bits=2``.
Precedence, lowest first: defaults, the ``--task``'s, the preset, ``--set``, the method's own.

Axes. ``--set FIELD=V1,V2`` sweeps any TrainConfig field (one value = fixed for all points;
``hidden``'s values contain commas, so separate them with ``;``); the same field given twice
(``--set seed=0 --set seed=1``) sweeps the values of both, in order, without repeats.
``--seeds 0,1,2`` is ``--set seed=0,1,2`` (repeated runs of every point, one per seed).
``--rate`` (Mbit/s; ``none`` = uncapped), ``--latency`` (ms, one way) and ``--loss`` (percent)
are the link axes. Uneven clusters: ``--worker-rate I=MBIT`` (repeatable) gives worker I its
own link cap in every point (on the namespace cluster), ``--slow-worker I=FACTOR`` makes it
compute FACTOR times slower (``--set slow_worker=I=FACTOR`` is the same); both appear in the
point's name (``w1at1mbit``, ``slow1x4``). A grid file
(``--grid FILE.json``) holds the same: ``{"methods": [...], "set": {"field": [values]},
"rate_mbit": [10, null], "latency_ms": [0], "loss_pct": [0]}``; options given on the command
line replace the file's values for that axis (``--set`` per field).

Runs. A point with a rate cap, latency or loss runs on a cluster engine
(:class:`dist_quant.cluster.engine.Engine`, named by ``--engine`` from
:mod:`dist_quant.cluster.registry`: real TCP over shaped links); an uncapped point runs locally
through torchrun (:func:`dist_quant.train.launch`) unless ``--cluster`` sends it through the
engine too. The default engine, ``netns``, runs network namespaces (needs root;
:func:`dist_quant.cluster.run_cluster`); ``--engine compose`` runs containers
(:func:`dist_quant.cluster.run_compose`). A point run on another engine than the default, or
forced onto the default one, carries the engine's mark in its name (``dc``, ``ns``). Each
point's directory (``OUT/<name>``) holds the run (``config.json``, ``metrics.jsonl``,
``summary.json``, and ``link.json``/``wire.json`` from the cluster), ``point.json`` (label,
preset, link, runner, engine) and ``log.txt`` (the job's output). The name is stable: method
label, workers, link and seed, then 8 hex digits of a hash of everything that defines the
point (the full config, the link, the runner).

Dilation. ``--dilate F`` (or ``auto``) runs every cluster point in dilated time
(:mod:`dist_quant.cluster.dilation`: links at rate / F, latency and timeout x F, every time
reported / F); ``auto`` is resolved per point (its training processes / the cores this job
has, at least 1). The factor is part of the point's identity and of its name (``dilate2.5``;
an undilated point's name stays as before). Local points refuse it (add ``--cluster``).

Resume. A point is done when its ``summary.json`` exists and its ``config.json`` holds the
point's config: running the same command again skips it; adding a point runs only that one;
a failed or interrupted point runs again (its directory is cleared first). A failing point is
recorded (``status: failed``, exit status, error, log tail) and the sweep goes on; the exit
status is 1 if any point failed. ``OUT/sweep.json`` indexes every point ever run there (name
-> record), rewritten after each point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import click

from dist_quant.cluster.dilation import AUTO, Dilation, check_engine, parse_dilate, run_dilated
from dist_quant.cluster.engine import parse_worker_rates
from dist_quant.cluster.records import log_tail
from dist_quant.cluster.registry import DEFAULT_ENGINE, EngineChoice, engines, get_engine
from dist_quant.config import (
    LINKS,
    MLP_TASK_FIELDS,
    MODEL_FIELDS,
    OUTPUT,
    RUNTIME,
    SetFieldsCommand,
    TrainConfig,
)
from dist_quant.errors import ConfigError
from dist_quant.presets import PRESETS
from dist_quant.runner.launcher import output_to, stopped_by
from dist_quant.runtime.metrics import write_json_atomic
from dist_quant.train import launch

_DEFAULTS = TrainConfig()
# fields that say nothing about the run's result (left out of a point's identity)
NOT_IDENTITY = ("run_dir", "progress")
INDEX = "sweep.json"
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


# ---- parsing ---------------------------------------------------------------------------------
def parse_value(field_name: str, text: str) -> Any:
    """``text`` as the type of TrainConfig field ``field_name`` (ConfigError naming it)."""
    if field_name not in FIELDS:
        raise ConfigError("--set", f"unknown field {field_name!r}; fields are the options of "
                          "dist-quant train with underscores (e.g. bucket_size)")
    kind = type(FIELDS[field_name].default)
    text = text.strip()
    try:
        if kind is bool:
            low = text.lower()
            if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(text)
            return low in ("true", "1", "yes", "on")
        return kind(text)
    except ValueError:
        raise ConfigError("--set", f"{field_name}={text!r} is not a valid "
                          f"{kind.__name__}") from None


def parse_axis(spec: str) -> tuple[str, list[Any]]:
    """``FIELD=V1,V2`` -> (field, [values]); ``;`` separates values when ``,`` is in them."""
    if "=" not in spec:
        raise ConfigError("--set", f"expected FIELD=VALUE[,VALUE...]; got {spec!r}")
    name, _, values = spec.partition("=")
    name = name.strip().replace("-", "_")
    sep = ";" if (";" in values or name == "hidden") else ","
    parsed = [parse_value(name, v) for v in values.split(sep) if v.strip()]
    if not parsed:
        raise ConfigError("--set", f"no value given for {name}")
    return name, parsed


def parse_method(spec: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``LABEL`` or ``LABEL:field=value,field=value`` -> (label, preset fields, own fields)."""
    label, _, rest = spec.partition(":")
    label = label.strip()
    if not label:
        raise ConfigError("--method", f"empty method label in {spec!r}")
    if not rest and label not in PRESETS:
        raise ConfigError("--method", f"unknown preset {label!r}; presets: "
                          f"{', '.join(PRESETS)} (or LABEL:field=value,... for your own)")
    own: dict[str, Any] = {}
    for item in filter(None, re.split(r",(?=\s*[A-Za-z_][\w-]*\s*=)", rest)):
        if "=" not in item:
            raise ConfigError("--method", f"expected field=value in {spec!r}; got {item!r}")
        name, _, value = item.partition("=")
        name = name.strip().replace("-", "_")
        own[name] = parse_value(name, value)
    return label, dict(PRESETS.get(label, {})), own


def parse_link_list(option: str, text: str | None, allow_none: bool) -> list[float | None]:
    if text is None:
        return [None] if allow_none else [0.0]
    out: list[float | None] = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        if allow_none and item.lower() in ("none", "uncapped", "0"):
            out.append(None)
            continue
        try:
            value = float(item)
        except ValueError:
            raise ConfigError(option, f"{item!r} is not a number") from None
        if value < 0 or (allow_none and value == 0):
            raise ConfigError(option, f"must be > 0 (or none); got {item}")
        out.append(value)
    if not out:
        raise ConfigError(option, "no value given")
    return out


# ---- points ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    """One run of a sweep: a method label, a validated config and a link."""

    label: str
    cfg: TrainConfig
    rate_mbit: float | None = None
    latency_ms: float = 0.0
    loss_pct: float = 0.0
    force_cluster: bool = False
    engine: str = DEFAULT_ENGINE   # how a cluster point runs: a registered engine's name
    worker_rates: tuple[tuple[int, float], ...] = ()   # (worker, Mbit/s): its own link cap
    dilation: Dilation = Dilation()   # time dilation of a cluster point (--dilate)

    @property
    def capped(self) -> bool:
        return (self.rate_mbit is not None or self.latency_ms > 0 or self.loss_pct > 0
                or bool(self.worker_rates))

    @property
    def runner(self) -> str:
        return "cluster" if self.capped or self.force_cluster else "local"

    def identity(self) -> dict[str, Any]:
        ident = {"config": config_identity(self.cfg.to_dict()), "rate_mbit": self.rate_mbit,
                 "latency_ms": self.latency_ms, "loss_pct": self.loss_pct,
                 "runner": self.runner}
        if self.runner == "cluster" and self.engine != DEFAULT_ENGINE:
            ident["engine"] = self.engine
        if self.worker_rates:
            ident["worker_rates"] = [list(w) for w in self.worker_rates]
        if self.dilation.active:
            ident["dilate"] = self.dilation.factor
        return ident

    @property
    def name(self) -> str:
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode())
        rate = "uncapped" if self.rate_mbit is None else f"{self.rate_mbit:g}mbit"
        parts = [re.sub(r"[^A-Za-z0-9.+-]", "-", self.label), f"w{self.cfg.workers}", rate]
        if self.latency_ms:
            parts.append(f"{self.latency_ms:g}ms")
        if self.loss_pct:
            parts.append(f"loss{self.loss_pct:g}")
        parts += [f"w{i}at{r:g}mbit" for i, r in self.worker_rates]
        parts += [f"slow{i}x{f:g}" for i, f in sorted(self.cfg.slow_factors.items())]
        if self.cfg.clock == "dedicated":   # the modelled cluster (dist_quant.runtime.clock)
            c = self.cfg
            parts.append("model" + (f"{c.rate:g}mbit" if c.rate else "uncapped")
                         + (f"{c.latency:g}ms" if c.latency else "")
                         + "".join(f"w{i}at{r:g}" for i, r in sorted(c.link_rates.items()))
                         + (f"x{c.host_speed:g}" if c.host_speed != 1 else ""))
        if self.runner == "cluster" and (self.engine != DEFAULT_ENGINE or not self.capped):
            parts.append(get_engine(self.engine).mark)   # the default's: forced onto it
        if self.dilation.active:
            parts.append(f"dilate{self.dilation.factor:g}")
        parts += [f"s{self.cfg.seed}", digest.hexdigest()[:8]]
        return "_".join(parts)


# fields of the modelled clock, left out at their defaults: a point of the measured clock keeps
# the identity (and the name) it had before they existed
CLOCK_FIELDS = ("clock", *MODEL_FIELDS)


def config_identity(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in NOT_IDENTITY
            and not (k in CLOCK_FIELDS and v == FIELDS[k].default)}


def expand_grid(methods: Sequence[str], sets: Mapping[str, Sequence[Any]] | None = None,
                rates: Sequence[float | None] = (None,), latencies: Sequence[float] = (0.0,),
                losses: Sequence[float] = (0.0,), force_cluster: bool = False,
                base: TrainConfig | None = None,
                worker_rates: Mapping[int, float] | None = None,
                engine: str = DEFAULT_ENGINE, dilate: float | None = 1.0,
                cores: float | None = None) -> list[Point]:
    """Every combination of link, ``sets`` values and method, as validated points (in that
    nesting order, methods innermost). ``dilate``: the factor of
    :func:`~dist_quant.cluster.dilation.parse_dilate` (None = auto, resolved per point for
    ``cores``, by default the cores this job has). Raises ConfigError for a bad combination
    (or an ``engine`` that is not registered, or a dilated point that would run locally)."""
    if not methods:
        raise ConfigError("--method", "give at least one method (e.g. -m ps-onebit)")
    check_engine(get_engine(engine), Dilation(2.0) if dilate != 1.0 else Dilation())
    parsed = [parse_method(m) for m in methods]
    sets = dict(sets or {})
    names = list(sets)
    base = base or TrainConfig()
    base_given = {k for k, f in FIELDS.items() if getattr(base, k) != f.default}
    points, seen = [], set()
    for rate, latency, loss in product(rates, latencies, losses):
        for values in product(*(sets[n] for n in names)):
            chosen = dict(zip(names, values, strict=True))
            for label, preset, own in parsed:
                cfg = base.replace(**{**preset, **chosen, **own}).with_task_defaults(
                    {*preset, *chosen, *own, *base_given})   # the task's, for the rest
                try:
                    cfg = cfg.validate()
                except ConfigError as err:
                    raise ConfigError(err.option, f"{str(err).split(': ', 1)[-1]} (method "
                                      f"{label}, {chosen or 'no --set'})") from None
                point = Point(label, cfg, rate, float(latency or 0.0), float(loss or 0.0),
                              force_cluster, engine,
                              tuple(sorted((worker_rates or {}).items())))
                if dilate != 1.0:
                    if point.runner != "cluster":
                        raise ConfigError("--dilate", "dilates the cluster's time; uncapped "
                                          "points run locally (add --cluster)")
                    point = dataclasses.replace(
                        point, dilation=Dilation.resolve(dilate, cfg, cores))
                if point.name not in seen:
                    seen.add(point.name)
                    points.append(point)
    return points


# ---- running ---------------------------------------------------------------------------------
def is_done(point: Point, run_dir: Path) -> bool:
    """summary.json present and config.json holding this point's config (which leaves out the
    MLP's fields for another ``--task``)."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        return False
    mine = {k: v for k, v in config_identity(point.cfg.to_dict()).items()
            if k in saved or k not in MLP_TASK_FIELDS}
    return (run_dir / "summary.json").is_file() and config_identity(saved) == mine


def run_point(point: Point, run_dir: Path) -> dict[str, Any]:
    """Run one point into ``run_dir`` (cleared first); return its index record."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    write_json_atomic(run_dir / "point.json", {
        "label": point.label, "preset": point.label if point.label in PRESETS else None,
        "rate_mbit": point.rate_mbit, "latency_ms": point.latency_ms,
        "loss_pct": point.loss_pct, "runner": point.runner,
        "worker_rates": {str(i): r for i, r in point.worker_rates},
        **({"engine": point.engine} if point.runner == "cluster" else {}),
        **({"dilation": point.dilation.info(point.cfg)} if point.dilation.active else {})})
    cfg = point.cfg.replace(run_dir=str(run_dir), progress=False)
    log = run_dir / "log.txt"
    t0 = time.perf_counter()
    code, error = 0, None
    try:
        with output_to(log):
            if point.runner == "cluster":
                run_dilated(get_engine(point.engine), cfg, point.rate_mbit,
                            point.latency_ms, point.loss_pct,
                            worker_rates=dict(point.worker_rates), dilation=point.dilation)
            else:
                code = launch(cfg)
                if (signum := stopped_by(code, run_dir)) is not None:
                    raise KeyboardInterrupt(f"signal {signum}")   # the sweep stops too
    except KeyboardInterrupt:
        raise
    except Exception as err:  # a failed point is recorded; the sweep goes on
        code, error = None, f"{type(err).__name__}: {err}"
    seconds = time.perf_counter() - t0
    record = _record(point, run_dir, seconds)
    if error is None and code != 0:
        error = f"exit status {code}"
    elif error is None and not (run_dir / "summary.json").is_file():
        error = "the run wrote no summary.json"
    if error is not None:
        record.update(status="failed", returncode=code, error=error, log_tail=log_tail(log, 12))
    return record


def _record(point: Point, run_dir: Path, seconds: float | None) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "name": point.name, "dir": run_dir.name, "label": point.label,
        "method": point.cfg.method, "workers": point.cfg.workers, "seed": point.cfg.seed,
        "rate_mbit": point.rate_mbit, "latency_ms": point.latency_ms,
        "loss_pct": point.loss_pct, "runner": point.runner,
        "worker_rates": {str(i): r for i, r in point.worker_rates},
        "fields": {k: v for k, v in config_identity(point.cfg.to_dict()).items()
                   if v != getattr(_DEFAULTS, k)},
        "status": "done", "run_seconds": seconds}
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
        rec.update({k: summary.get(k) for k in ("test_accuracy", "bytes_up", "bytes_down",
                                                  "wall_seconds", "steps", "compressor")})
        if "dilate" in summary:
            rec.update(dilate=summary["dilate"], wall_seconds_raw=summary["wall_seconds_raw"])
    return rec


def load_index(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / INDEX
    if path.is_file():
        return json.loads(path.read_text())
    return {"format": 1, "points": {}}


def run_sweep(points: Sequence[Point], out_dir: str | Path, progress: bool = True,
              echo=click.echo) -> dict[str, Any]:
    """Run every point not done yet in ``out_dir``; return the index (also ``sweep.json``).

    The index's ``"ran"`` lists the names run by this call, ``"failed"`` those that failed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = load_index(out)
    index["grid"] = [p.name for p in points]
    ran, failed = [], []
    bar = click.progressbar(length=len(points), label="sweep", file=sys.stderr,
                            show_pos=True, item_show_func=lambda name: name or "") \
        if progress else contextlib.nullcontext()
    with bar as b:
        for i, point in enumerate(points, 1):
            run_dir = out / point.name
            head = f"[{i}/{len(points)}] {point.name}"
            if is_done(point, run_dir):
                rec = {**index["points"].get(point.name, {}), **_record(point, run_dir, None)}
                rec["run_seconds"] = index["points"].get(point.name, {}).get("run_seconds")
                index["points"][point.name] = rec
                echo(f"{head}: done before, skipped")
            else:
                rec = run_point(point, run_dir)
                index["points"][point.name] = rec
                ran.append(point.name)
                if rec["status"] == "failed":
                    failed.append(point.name)
                    echo(f"{head}: FAILED ({rec['error']}); see {run_dir / 'log.txt'}")
                else:
                    echo(f"{head}: accuracy {100 * rec['test_accuracy']:.1f}%, "
                         f"{(rec['bytes_up'] + rec['bytes_down']) / 1e6:.2f} MB, "
                         f"{rec['wall_seconds']:.1f} s training, {rec['run_seconds']:.0f} s run")
            index["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            write_json_atomic(out / INDEX, index)
            if progress:
                b.update(1, point.name)
    index["ran"], index["failed"] = ran, failed
    return index


# ---- command line ----------------------------------------------------------------------------
def _grid_from_file(path: str) -> dict[str, Any]:
    try:
        grid = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError("--grid", f"cannot read {path}: {err}") from None
    unknown = set(grid) - {"methods", "set", "rate_mbit", "latency_ms", "loss_pct", "cluster"}
    if unknown:
        raise ConfigError("--grid", f"unknown keys {sorted(unknown)}; allowed: methods, set, "
                          "rate_mbit, latency_ms, loss_pct, cluster")
    return grid


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def points_from_options(methods: Sequence[str], sets: Sequence[str], rate: str | None,
                        latency: str | None, loss: str | None, grid: str | None,
                        cluster: bool, seeds: str | None = None,
                        worker_rate: Sequence[str] = (),
                        slow_worker: Sequence[str] = (),
                        engine: str = DEFAULT_ENGINE, dilate: str = "1") -> list[Point]:
    """The grid of the command line (and ``--grid`` file), validated; ``seeds``: the
    ``--seeds`` list, a ``seed`` axis merged with any ``--set seed=...``; ``worker_rate`` and
    ``slow_worker``: ``I=VALUE`` items for every point; ``dilate``: ``--dilate``."""
    factor = parse_dilate(dilate)
    spec = _grid_from_file(grid) if grid else {}
    axes: dict[str, list[Any]] = {}
    for name, values in (spec.get("set") or {}).items():
        name = name.replace("-", "_")
        axes[name] = [v if not isinstance(v, str) else parse_value(name, v)
                      for v in _as_list(values)]
        for v in axes[name]:
            parse_value(name, str(v))  # checks the field name
    given: dict[str, list[Any]] = {}
    parsed = [parse_axis(item) for item in sets]
    if seeds is not None:
        try:
            parsed.append(parse_axis(f"seed={seeds}"))
        except ConfigError as err:
            raise ConfigError("--seeds", str(err).split(": ", 1)[-1]) from None
    if slow_worker:
        parsed.append(("slow_worker", [",".join(slow_worker)]))
    for name, values in parsed:
        merged = given.setdefault(name, [])
        merged += [v for v in values if v not in merged]
    axes.update(given)
    rates = parse_link_list("--rate", rate, True) if rate is not None else \
        [None if r in (None, 0) else float(r) for r in _as_list(spec.get("rate_mbit", None))]
    latencies = parse_link_list("--latency", latency, False) if latency is not None else \
        [float(v) for v in _as_list(spec.get("latency_ms", 0.0))]
    losses = parse_link_list("--loss", loss, False) if loss is not None else \
        [float(v) for v in _as_list(spec.get("loss_pct", 0.0))]
    workers = {int(v) for v in axes.get("workers", [_DEFAULTS.workers])}
    uneven = parse_worker_rates(worker_rate, min(workers))
    get_engine(engine).check_links(uneven)
    return expand_grid(list(methods) or list(spec.get("methods", [])), axes, rates, latencies,
                       losses, force_cluster=cluster or bool(spec.get("cluster", False)),
                       worker_rates=uneven, engine=engine, dilate=factor)


@click.command("sweep", cls=SetFieldsCommand,
               context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--method", "-m", "methods", multiple=True, metavar="PRESET[:FIELD=V,...]",
              help=f"A method (repeatable). Presets: {', '.join(PRESETS)}.")
@click.option("--set", "-s", "sets", multiple=True, metavar="FIELD=V1[,V2...]",
              help="A TrainConfig field and its values (repeatable); one value = fixed. "
                   "Separate hidden's values with ';'.")
@click.option("--seeds", default=None, metavar="S1,S2",
              help="Seeds: every point once per seed (the same as --set seed=S1,S2).")
@click.option("--rate", default=None, metavar="R1,R2",
              help="Link rates in Mbit/s; none = uncapped (default: uncapped).")
@click.option("--latency", default=None, metavar="L1,L2",
              help="One-way latencies in ms (default 0).")
@click.option("--loss", default=None, metavar="P1,P2", help="Packet loss in percent (default 0).")
@click.option("--worker-rate", "worker_rate", multiple=True, metavar="I=MBIT",
              help="Worker I's own link cap in every point (repeatable; namespace cluster).")
@click.option("--slow-worker", "slow_worker", multiple=True, metavar="I=FACTOR",
              help="Worker I computes FACTOR times slower in every point (repeatable).")
@click.option("--grid", type=click.Path(exists=True, dir_okay=False),
              help="JSON grid file (methods, set, rate_mbit, latency_ms, loss_pct).")
@click.option("--cluster", is_flag=True,
              help="Run uncapped points through the namespace cluster too (needs root).")
@click.option("--engine", type=EngineChoice(), default=DEFAULT_ENGINE, show_default=True,
              help="How cluster points run: " + ", or ".join(e.summary for e in engines())
                   + ".")
@click.option("--dilate", default="1", show_default=True, metavar="F|auto",
              help="Run the cluster points in dilated time: link rates / F, latency and "
                   "timeout x F, every time reported / F (raw ones kept as *_raw); "
                   f"{AUTO} = each point's training processes / the cores of this job, at "
                   "least 1.")
@click.option("--dry-run", is_flag=True, help="List the points and whether they are done.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Progress bar over points on stderr.")
def sweep(out_dir: str, methods: tuple[str, ...], sets: tuple[str, ...], seeds: str | None,
          rate: str | None, latency: str | None, loss: str | None,
          worker_rate: tuple[str, ...], slow_worker: tuple[str, ...], grid: str | None,
          cluster: bool, engine: str, dilate: str, dry_run: bool, progress: bool) -> None:
    """Run a grid of training jobs into OUT_DIR, one directory per point, skipping points
    already done there (run the same command again to resume).

    \b
    Example (the bandwidth benchmark):
      dist-quant sweep sweeps/bw --cluster -m ps-fp32 -m ps-onebit -m ddp-fp32 \\
          -m ddp-powersgd --rate 10,100,none --set workers=4 --set steps=1500 \\
          --set eval_every=25 --set stop_accuracy=0.65

    \b
    Example (the compression baselines at 10 Mbit/s):
      dist-quant sweep sweeps/baselines --cluster -m ps-qsgd -m ps-terngrad \\
          -m ps-topk-ef -m ps-onebit --rate 10 --set workers=4 --set eval_every=25
    """
    try:
        points = points_from_options(methods, sets, rate, latency, loss, grid, cluster, seeds,
                                     worker_rate, slow_worker, engine, dilate)
    except ConfigError as err:
        raise click.BadParameter(str(err).split(": ", 1)[-1], param_hint=err.option) from None
    if dry_run:
        for p in points:
            state = "done" if is_done(p, Path(out_dir) / p.name) else "to run"
            click.echo(f"{p.name}  [{p.runner}, {state}]")
        return
    try:
        index = run_sweep(points, out_dir, progress=progress)
    except KeyboardInterrupt as err:   # Ctrl-C, SIGTERM, SIGHUP: during a point or between two
        signum = int(str(err).split()[-1]) if str(err).startswith("signal ") else signal.SIGINT
        click.echo(f"dist-quant sweep {out_dir}: stopped by {signal.Signals(signum).name}; the "
                   "same command resumes (points done are kept)", err=True)
        sys.exit(128 + signum)
    done = sum(1 for p in points if index["points"][p.name]["status"] == "done")
    click.echo(f"sweep {out_dir}: {done}/{len(points)} points done, {len(index['ran'])} run "
               f"now, {len(index['failed'])} failed; index {Path(out_dir) / INDEX}")
    if index["failed"]:
        sys.exit(1)


# the headings of sweep --help (dist_quant.config.GroupedCommand): the points, then the groups
# of train --help that these options share
_HEADINGS = {"methods": "Points", "sets": "Points", "seeds": "Points", "grid": "Points",
             "dry_run": "Points", "rate": LINKS, "latency": LINKS, "loss": LINKS,
             "worker_rate": LINKS, "cluster": LINKS, "engine": LINKS, "dilate": LINKS,
             "slow_worker": RUNTIME,
             "progress": OUTPUT}
for _param in sweep.params:
    if _param.name in _HEADINGS:
        _param.group = _HEADINGS[_param.name]
