"""``dist-quant retime RUN_OR_SWEEP_DIRS --rate R ... --host-speed X ...``: recorded synchronous
runs on modelled clusters.

In a synchronous mode the trajectory of a run (its parameters, evaluations and bytes per step)
does not depend on the link it ran on, so one recorded run answers for every link: this
command re-times each step record with the modelled clock (:mod:`dist_quant.runtime.clock`:
every rank on a dedicated host ``--host-speed`` times faster than the calibration's CPU, on
links of ``--rate`` Mbit/s) and reports, per run, link and host speed, the modelled time to
the target accuracy (the first evaluation at or above it, timed at its own step), the modelled
time of the whole run and of a step, and where the directory holds a DDP fp32 run of the same
W and seed, its time to target over the run's (``x_ddp_fp32``: above 1, the run gets there
sooner).

Calibration, in order: ``--calibration FILE``; the run's own ``calibration.json`` (a run of
``--clock dedicated``); else measured here from the run's configuration (once per model,
compressors and W); ``--shared-compute`` then takes the phases that do not depend on the
method (forward, backward, update, evaluate) as their median over the runs of one model and
batch size (:func:`pool_compute`); ``--own-cpu`` instead takes each run's compute from its own
step records, the thread CPU time its ranks spent in each phase (:func:`own_cpu`). The
asynchronous modes are skipped (their arrival order is not modelled yet).

    dist-quant retime sweeps/w4 --rate 1 --rate 10 --rate 100 --host-speed 1 --host-speed 50
    dist-quant retime runs/a runs/b --rate 10 --target 0.68 --json
    dist-quant retime sweeps/w4 --rate 10 --out benchmarks/retime      # retime.md, .json
    dist-quant retime sweeps --rate 1 --rate 10 --rate 1000 --heatmap pays.png

Where compression pays (:mod:`dist_quant.analysis.heatmap`): the break-even link of each method
and W (the rate below which it reaches the target sooner than DDP fp32) is printed after the
table and written into retime.md and retime.json; ``--heatmap OUT.png`` draws ``x_ddp_fp32``
as one row of heat maps per host speed, W against the link, one panel per method.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import click

from dist_quant.analysis.heatmap import break_even, break_even_text, save_heatmap
from dist_quant.errors import ConfigError
from dist_quant.runtime.calibrate import FILE as CALIBRATION_FILE
from dist_quant.runtime.calibrate import load as load_calibration
from dist_quant.runtime.clock import Clock, Links, parse_rates
from dist_quant.runtime.metrics import read_metrics, read_summary

TARGET_FRACTION = 0.9   # default target: 90% of the best final accuracy, as dist-quant plot
# the fields a calibration depends on: runs that agree on them share one measurement
CALIBRATION_KEY = ("method", "ddp_hook", "dataset", "train_size", "test_size", "hidden",
                   "batchnorm", "keep_prob", "batch_size", "compressor", "bucket_size", "bits",
                   "header_dtype", "qsgd_levels", "sparsity_ratio", "downlink",
                   "downlink_bucket_size", "workers")
# the phases that do not depend on the method: the same computation for every run of one model
# and batch size (--shared-compute pools them)
SHARED_PHASES = ("forward", "backward", "update", "evaluate")
COMPUTE_KEY = ("dataset", "train_size", "test_size", "hidden", "batchnorm", "keep_prob",
               "batch_size")


def find_run_dirs(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        below = [p] if (p / "summary.json").is_file() else sorted(
            s.parent for s in p.rglob("summary.json"))
        if not below:
            raise ConfigError("RUN_OR_SWEEP_DIRS", f"{p}: no run directory (summary.json) here "
                              "or below")
        found += [d for d in below if d not in found]
    return found


def read(run_dir: Path) -> dict[str, Any]:
    try:
        meta = json.loads((run_dir / "config.json").read_text())
        lines = read_metrics(run_dir)
        summary = read_summary(run_dir)
    except (OSError, ValueError) as err:
        raise ConfigError("RUN_OR_SWEEP_DIRS", f"{run_dir}: not a finished run ({err})") \
            from None
    point = run_dir / "point.json"
    label = json.loads(point.read_text()).get("label") if point.is_file() else None
    config = meta["config"]
    return {"dir": run_dir, "config": config, "summary": summary,
            "steps": [r for r in lines if r["kind"] == "step"],
            "evals": [r for r in lines if r["kind"] == "eval"],
            "label": label or method_name(config)}


def method_name(config: dict[str, Any]) -> str:
    if config.get("method") == "ddp":
        return f"ddp-{ {'none': 'fp32'}.get(config.get('ddp_hook', 'none'), config['ddp_hook'])}"
    where = "colocated" if config.get("colocate") else (
        f"S={config['servers']}" if int(config.get("servers", 1)) > 1 else "star")
    return f"ps-{config.get('compressor')} ({where})"


def synchronous(config: dict[str, Any]) -> bool:
    return config.get("consistency", "sync") == "sync" and not config.get("backup_workers", 0)


def calibration_for(run: dict[str, Any], given: dict[str, Any] | None,
                    cache: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if given is not None:
        return given
    if (run["dir"] / CALIBRATION_FILE).is_file():
        return load_calibration(run["dir"] / CALIBRATION_FILE)
    key = json.dumps({k: run["config"].get(k) for k in CALIBRATION_KEY}, sort_keys=True)
    if key not in cache:
        # measuring runs the model: torch is imported only when no calibration is at hand
        from dist_quant.runtime.calibrate import measure

        cache[key] = measure(run["config"])
    return cache[key]


def pool_compute(runs: list[dict[str, Any]], cals: list[dict[str, Any]]
                 ) -> list[dict[str, Any]]:
    """The calibrations ``cals`` of ``runs`` with each phase of ``SHARED_PHASES`` replaced by
    its median over the runs of the same model and batch size (``COMPUTE_KEY``): those phases
    are the same computation whatever the method, so that the runs' separate measurements
    (each at its own run's start, on a machine whose load moves) do not enter a comparison of
    methods as a difference of compute. The coding phases stay each run's own."""
    groups: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        key = json.dumps({k: run["config"].get(k) for k in COMPUTE_KEY}, sort_keys=True)
        groups.setdefault(key, []).append(i)
    out = [dict(c, seconds=dict(c["seconds"])) for c in cals]
    for members in groups.values():
        for phase in SHARED_PHASES:
            value = statistics.median(float(cals[i]["seconds"][phase]) for i in members)
            for i in members:
                out[i]["seconds"][phase] = value
        for i in members:
            out[i]["source"] = f"{cals[i].get('source', 'given')}; {', '.join(SHARED_PHASES)}: " \
                f"median of {len(members)} runs"
    return out


def own_cpu(run: dict[str, Any], base: dict[str, Any], first: int = 2) -> dict[str, Any]:
    """``base`` with its phases replaced by what the run's own ranks spent, in thread CPU time:
    the median over the step records from step ``first`` of each role's phase (``cpu_roles``:
    the largest worker's and server's on a cluster, the sum over the workers or the servers
    with ``--simulate``), as whole-model costs. With ``W`` workers, ``S`` shards and the
    per-role medians ``w_p``, ``s_p`` (one worker, one server)::

        forward + backward = w_compute   (split as in ``base``)
        encode = w_encode,  down_decode = w_decode
        decode = s_decode S / W          (a server decodes W rows of its n / S coordinates)
        update = s_update S,  down_encode = s_encode S
        evaluate = the median CPU time of the run's evaluations (``base``'s if none)

    On a cluster whose ranks share cores this is the compute the run really paid, cache and
    scheduling contention included; a calibration measures one process alone, as on a host of
    its own. A run without per-role CPU records (the DDP baselines) keeps ``base``."""
    steps = [r for r in run["steps"] if r["step"] >= first and "cpu_roles" in r]
    if not steps:
        return base
    w = int(run["config"]["workers"])
    shards = len(steps[-1].get("servers") or []) or int(run["config"].get("servers", 1))
    simulated = bool(run["config"].get("simulate"))

    def med(role: str, phase: str) -> float:
        value = statistics.median(float(r["cpu_roles"][role][phase]) for r in steps)
        return value / ((w if role == "worker" else shards) if simulated else 1)

    sec = dict(base["seconds"])
    fb = float(sec["forward"]) + float(sec["backward"])
    share = float(sec["forward"]) / fb if fb > 0 else 0.5
    compute = med("worker", "compute")
    sec.update(forward=compute * share, backward=compute * (1 - share),
               encode=med("worker", "encode"), down_decode=med("worker", "decode"),
               decode=med("server", "decode") * shards / w,
               update=med("server", "update") * shards,
               down_encode=med("server", "encode") * shards)
    evals = [float(e["cpu"]["evaluate"]) for e in run["evals"] if "evaluate" in e.get("cpu", {})]
    if evals:
        sec["evaluate"] = statistics.median(evals)
    return {**base, "seconds": sec,
            "source": f"the run's own CPU time per phase (median of {len(steps)} steps)"}


def default_target(runs: list[dict[str, Any]]) -> float:
    best = max((r["summary"].get("test_accuracy", 0.0) for r in runs
                if isinstance(r["summary"].get("test_accuracy"), float)
                and math.isfinite(r["summary"]["test_accuracy"])), default=0.0)
    return math.floor(TARGET_FRACTION * best * 1000) / 1000


def retime_run(run: dict[str, Any], calibration: dict[str, Any], links: Links,
               host_speed: float, target: float) -> dict[str, Any]:
    """The modelled times of one recorded run on ``links`` and hosts ``host_speed`` times the
    calibration's CPU."""
    clock = Clock(run["config"], calibration, links, host_speed)
    last = len(run["steps"]) - 1
    for i, rec in enumerate(run["steps"]):
        clock.step(rec, last=i == last)
    hit = next((e for e in run["evals"] if e["test_accuracy"] >= target), None)
    steps = max(len(run["steps"]), 1)
    return {"run": str(run["dir"]), "method": run["label"],
            "workers": int(run["config"]["workers"]), "seed": run["config"].get("seed"),
            "rate_mbit": links.rate_mbit, "latency_ms": links.latency_ms,
            "worker_rates": dict(links.worker_rates), "host_speed": host_speed,
            "target": target, "steps": len(run["steps"]),
            "target_step": None if hit is None else hit["step"],
            "model_time_to_target_s": None if hit is None else clock.record_time(hit["step"]),
            "model_seconds": clock.time, "model_step_ms": 1e3 * clock.time / steps,
            "measured_wall_s": run["summary"].get("wall_seconds"),
            "calibration": calibration.get("source", "given"),
            "ddp_fp32": is_ddp_fp32(run["config"])}


def is_ddp_fp32(config: dict[str, Any]) -> bool:
    return config.get("method") == "ddp" and config.get("ddp_hook", "none") == "none"


def retime(paths: list[Path], rates: list[float | None], host_speeds: list[float],
           latency: float = 0.0, mtu: int = 1500, worker_rate: str = "",
           target: float | None = None, calibration: str | None = None,
           shared_compute: bool = False, own: bool = False
           ) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of :func:`retime_run` for every synchronous run under ``paths``, link and host
    speed, and the runs skipped (why). ``shared_compute``: :func:`pool_compute` first;
    ``own``: each run's compute from its own records (:func:`own_cpu`)."""
    if shared_compute and own:
        raise ConfigError("--own-cpu", "takes each run's compute from its own records; "
                          "--shared-compute pools the calibrations: give one of them")
    for r in rates:
        if r is not None and not r > 0:
            raise ConfigError("--rate", f"must be > 0 Mbit/s (none = uncapped); got {r:g}")
    for x in host_speeds:
        if not (x > 0 and math.isfinite(x)):
            raise ConfigError("--host-speed", f"must be > 0 (X times the calibration's CPU); "
                              f"got {x:g}")
    if latency < 0:
        raise ConfigError("--latency", f"must be >= 0 ms; got {latency:g}")
    try:
        own = tuple(sorted(parse_rates(worker_rate).items()))
    except ValueError:
        raise ConfigError("--worker-rate", f"must be I=MBIT; got {worker_rate!r}") from None
    given = load_calibration(calibration) if calibration else None
    runs = [read(d) for d in find_run_dirs(paths)]
    skipped = [f"{r['dir']}: asynchronous (its arrival order depends on the links: run it "
               "with --simulate --clock dedicated on each)" for r in runs
               if not synchronous(r["config"])]
    runs = [r for r in runs if synchronous(r["config"])]
    target = default_target(runs) if target is None else target
    cache: dict[str, dict[str, Any]] = {}
    cals = [calibration_for(run, given, cache) for run in runs]
    if shared_compute:
        cals = pool_compute(runs, cals)
    if own:
        cals = [own_cpu(run, cal) for run, cal in zip(runs, cals, strict=True)]
    rows = []
    for run, cal in zip(runs, cals, strict=True):
        for rate in rates:
            for speed in host_speeds:
                links = Links(rate, latency, mtu, own)
                rows.append(retime_run(run, cal, links, speed, target))
    for row in rows:   # against DDP fp32 of the same W, seed, link and hosts
        base = next((b for b in rows
                     if b["ddp_fp32"] and b["workers"] == row["workers"]
                     and b["seed"] == row["seed"] and b["rate_mbit"] == row["rate_mbit"]
                     and b["host_speed"] == row["host_speed"]), None)
        ok = base is not None and base["model_time_to_target_s"] and \
            row["model_time_to_target_s"]
        row["x_ddp_fp32"] = base["model_time_to_target_s"] / row["model_time_to_target_s"] \
            if ok else None
    return rows, skipped


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| run | method | W | link (Mbit/s) | host speed | steps to target | modelled time "
            "to target (s) | modelled run (s) | ms/step | x ddp fp32 |")
    out = [head, "|" + "---|" * 10]
    for r in rows:
        rate = "uncapped" if r["rate_mbit"] is None else f"{r['rate_mbit']:g}"
        ttt = "not reached" if r["model_time_to_target_s"] is None else \
            f"{r['model_time_to_target_s']:.2f}"
        x = "" if r["x_ddp_fp32"] is None else f"{r['x_ddp_fp32']:.2f}x"
        out.append(f"| {Path(r['run']).name} | {r['method']} | {r['workers']} | {rate} | "
                   f"{r['host_speed']:g}x | {r['target_step'] or ''} | {ttt} | "
                   f"{r['model_seconds']:.2f} | {r['model_step_ms']:.2f} | {x} |")
    return "\n".join(out)


def _rate(text: str) -> float | None:
    if text.strip().lower() in ("none", "uncapped", "0"):
        return None
    try:
        return float(text)
    except ValueError:
        raise click.BadParameter(f"a rate in Mbit/s or none; got {text!r}",
                                 param_hint="--rate") from None


@click.command("retime", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--rate", "rates", multiple=True, required=True, metavar="MBIT",
              help="A modelled link rate in Mbit/s (repeatable; none = uncapped).")
@click.option("--host-speed", "host_speeds", type=float, multiple=True, metavar="X",
              help="Modelled hosts X times faster than the calibration's CPU (repeatable; "
                   "default 1).")
@click.option("--latency", type=float, default=0.0, show_default=True,
              help="One-way host-to-host latency in ms.")
@click.option("--mtu", type=int, default=1500, show_default=True, help="Link MTU in bytes.")
@click.option("--worker-rate", "worker_rate", multiple=True, metavar="I=MBIT",
              help="Worker I's own link in Mbit/s (repeatable); the others keep --rate.")
@click.option("--target", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Target test accuracy (default: 90% of the best final accuracy over the "
                   "runs, rounded down to 0.1 point).")
@click.option("--calibration", type=click.Path(exists=True, path_type=Path), default=None,
              help="A calibration.json (or a run directory holding one) for every run.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write retime.md and retime.json into this directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@click.option("--shared-compute", is_flag=True,
              help="Take the phases that do not depend on the method (forward, backward, "
                   "update, evaluate) as their median over the runs of one model and batch "
                   "size, each run keeping its own coding phases.")
@click.option("--own-cpu", "own", is_flag=True,
              help="Take each run's compute from its own step records (the thread CPU time "
                   "its ranks spent per phase, contention included) instead of a calibration "
                   "of one process alone.")
@click.option("--heatmap", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="OUT.png", help="Also draw the time to target relative to DDP fp32 as "
              "heat maps (W against the link; a row per host speed, a panel per method) with "
              "each W's break-even link (needs matplotlib).")
def retime_command(paths: tuple[Path, ...], rates: tuple[str, ...],
                   host_speeds: tuple[float, ...], latency: float, mtu: int,
                   worker_rate: tuple[str, ...], target: float | None,
                   calibration: Path | None, out: Path | None, as_json: bool,
                   shared_compute: bool, own: bool, heatmap: Path | None) -> None:
    """Re-time recorded synchronous runs (RUN_OR_SWEEP_DIRS) on modelled clusters: every
    rank on a host of its own, --host-speed times the calibration's CPU, on links of --rate
    Mbit/s; print the modelled time to the target accuracy per run, link and host speed."""
    try:
        rows, skipped = retime(list(paths), [_rate(r) for r in rates],
                               list(host_speeds) or [1.0], latency, mtu, ",".join(worker_rate),
                               target, str(calibration) if calibration else None,
                               shared_compute, own)
    except ConfigError as err:
        raise click.BadParameter(str(err).split(": ", 1)[-1], param_hint=err.option) from None
    text = table(rows)
    even = break_even(rows)
    if even:
        text += "\n\nBreak-even link per method and W (modelled clock):\n\n" + \
            break_even_text(even)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "retime.json").write_text(json.dumps(
            {"rows": rows, "break_even": even, "skipped": skipped}, indent=2) + "\n")
        (out / "retime.md").write_text(
            "# Modelled time to target (dedicated hosts, modelled links)\n\n" + text + "\n")
    if heatmap is not None:
        try:
            save_heatmap(rows, heatmap, f"Modelled time to {100 * rows[0]['target']:.0f}% "
                         "relative to DDP fp32 (dedicated hosts, modelled links; black bar: "
                         "break-even link)" if rows else "")
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--heatmap") from None
        except ImportError:
            raise click.UsageError("--heatmap needs matplotlib (pip install "
                                   "'dist-quant[plot]')") from None
    if as_json:
        click.echo(json.dumps({"rows": rows, "break_even": even, "skipped": skipped},
                              indent=2))
        return
    click.echo(f"target accuracy {100 * rows[0]['target']:.1f}%; modelled clock" if rows
               else "no synchronous run")
    click.echo(text)
    for line in skipped:
        click.echo(f"skipped {line}")
