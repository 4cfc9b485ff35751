"""What a run leaves in its directory, written by rank 0 only.

Layout of a run directory (the contract that ``plot``, ``sweep`` and ``cluster`` read):

- ``config.json``: the resolved :class:`~dist_quant.config.TrainConfig` under ``"config"``
  (for a :func:`dist_quant.fit` model without the fields of the built-in MLP and dataset,
  which do not apply), ``"model"`` (``"mlp"``, the ``--task``, or ``"custom"`` for a fit
  model), ``"metric"`` (the name of the evaluation metric recorded as ``test_accuracy``:
  ``"accuracy"`` unless fit was given another, ``"next_byte_accuracy"`` for ``--task
  text-transformer``), ``"data"`` (data read from elsewhere: ``--task text-transformer``'s
  source, ``sha256`` and byte counts, :mod:`dist_quant.data.text`), ``"versions"`` (python,
  torch, numpy, dist_quant), ``"git_commit"`` (or null) and ``"machine"`` (``cpu``: the CPU
  model rank 0 ran on, ``logical_cpus``, ``cores``: :func:`cores`, ``load_start`` and, once
  the summary is written, ``load_end``: :func:`load_average` at the start and at the end).
- ``metrics.jsonl``: one JSON object per line.

  * step lines: ``{"kind": "step", "step": t, "loss": float, "bytes_up": int,
    "bytes_down": int, "cum_bytes_up": int, "cum_bytes_down": int, "wall": s,
    "time": {"compute": s, "encode": s, "communicate": s, "decode": s, "update": s},
    "skipped": int}``. ``bytes_*`` are this step's bytes handed to the transport, summed over
    all ranks that send in that direction (uplink: workers -> server; downlink:
    server -> workers; for allreduce baselines, what each rank sends, summed, split evenly).
    For the parameter-server job (``dist_quant.core.transport``): ``bytes_up = W * up`` plus
    ``W * 4k`` at evaluation steps (the workers' BatchNorm running statistics, ``k`` floats,
    sent uncompressed), ``bytes_down = W * down``, where ``up``/``down`` are the uplink and
    downlink compressors' ``payload_nbytes(n)`` for ``n`` parameters; telemetry, control and
    checkpoint messages are not counted. ``time`` splits the server's step (evaluation and
    checkpoints excluded): the slowest worker's ``compute`` (downlink decode included in
    ``decode``) and ``encode`` (plus the server's downlink encode), the server's ``decode``
    and ``update``, and ``communicate`` = the rest (transfer and waiting); the simulator sums
    its virtual workers' times instead (``dist_quant.ps.server``). ``skipped`` counts the
    payloads left out at this step (non-finite or invalid). ``lr`` is the learning rate of
    step ``t`` under the run's schedule (``dist_quant.core.lr_schedule.lr_at``); the optimizer
    applies the same value at its ``t``-th update. Sharded and colocated servers
    (``dist_quant.ps.sync_step``) add ``"servers": [{"bytes_up", "bytes_down", "skipped"}]``
    (per shard: what server s's link carried, rows it left out) and ``"bytes_stats"`` (the
    BN statistics inside ``bytes_up``); a payload that stays on its rank is not counted.
    ``"time_overlap"``: seconds of uplink that ran beside backward (``--overlap``; else 0);
    ``"time_overlap_down"``: seconds of the previous step's downlink that ran beside this step's
    work (``--overlap``; else 0).
    ``"cpu"``: the phases of ``time`` in seconds of thread CPU time
    (:mod:`dist_quant.runtime.phasetime`; the jobs say which thread's figures each holds).
    ``--clock dedicated`` adds ``"model_wall"`` (the step's modelled seconds on dedicated hosts
    and the modelled links, :mod:`dist_quant.runtime.clock`) and ``"model_time"`` (their sum
    up to this step).
  * eval lines: ``{"kind": "eval", "step": t, "test_loss": float, "test_accuracy": float,
    "cum_bytes_up": int, "cum_bytes_down": int, "wall": s}``: the parameters after step t,
    with the wall time and cumulative bytes of step t. The synchronous parameter server adds
    ``"evaluated_at"``: the step at which the evaluation ran (``t + --eval-lag``, or earlier
    at the last step and at checkpoints; the line is written then, after that step's line).
    ``--clock dedicated`` adds ``"model_time"``: that of its step, as its wall time. An
    evaluation that timed itself adds ``"time": {"evaluate": s}`` and ``"cpu": {"evaluate":
    s}`` (wall and thread CPU seconds of the evaluation itself).
  * update lines (``--consistency ssp|async``, ``--backup-workers``; one per gradient that
    reached the server): ``{"kind": "update", "arrival": a, "worker": i, "worker_step": k,
    "read": v, "applied": u or null, "staleness": u - 1 - v or null, "step": t,
    "started_after": r, "dropped": null | "late" | "end"}``; the step lines of such runs add
    ``"updates"``, ``"gradients"`` (applied in that step) and ``"time_wait"`` (the mean time a
    worker waited for its release), and their ``time`` holds means per gradient
    (``dist_quant.ps.async_leader``).
- ``summary.json``: ``test_accuracy``, ``test_loss``, ``bytes_up``, ``bytes_down``,
  ``fp32_bytes_up``, ``fp32_bytes_down`` (what fp32 would have sent for the same steps),
  ``steps``, ``workers``, ``params``, ``wall_seconds``, ``compressor``, ``method``,
  ``skipped_payloads``, ``time_seconds`` and ``cpu_seconds`` (per phase, ``evaluate``
  included: the sums of the lines' ``time`` and ``cpu``), ``cores``, ``load_start``,
  ``load_end`` (as in config.json). The parameter-server job adds ``bucket_size``, ``downlink``,
  ``payload_nbytes_up``, ``payload_nbytes_down`` (one payload, bytes), ``simulate`` and
  ``stopped_early`` (``--stop-accuracy`` reached before ``--steps``); ``steps`` is the number
  of steps run; ``consistency``; synchronous runs add ``eval_lag``, ``stop_eval_step`` (the
  evaluation whose accuracy stopped the run, ``eval_lag`` steps before its end; null when it
  ran all steps) and ``test_step`` (the step whose parameters ``test_accuracy`` and
  ``test_loss`` measure). An asynchronous run adds ``staleness_bound`` (K; null for
  async), ``backup_workers``, ``updates``, ``gradients`` (received), ``applied_per_worker``,
  ``dropped_per_worker``, ``wait_seconds_per_worker``, ``staleness_mean`` and
  ``staleness_histogram`` (``{"s": count}`` of the applied gradients). ``fp32_bytes_*``
  price every payload at the ``none`` compressor's size (statistics included, as sent).
  ``--clock dedicated`` adds ``clock``, ``model_seconds``, ``model_time_to_target`` (the
  modelled time of the first evaluation at ``--stop-accuracy`` or above; null without one),
  ``model_link`` and ``host_speed``.
- ``calibration.json`` (``--clock dedicated``): the CPU seconds of each phase the modelled
  clock composes (:mod:`dist_quant.runtime.calibrate`), measured at the start or given.
- ``checkpoints/``: ``step_<t>.pt`` files written atomically, plus ``latest`` (a text file
  naming the newest); contents in ``dist_quant.runtime.checkpoint``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from dist_quant.config import stop_reached
from dist_quant.core.lr_schedule import schedule_from_config
from dist_quant.runtime.arrivalclock import ArrivalClock, clock_of
from dist_quant.runtime.clock import Clock
from dist_quant.runtime.diskfault import WholeLines, disk_write
from dist_quant.runtime.tensorboard import open_writer
from dist_quant.version import __version__

PHASES = ("compute", "encode", "communicate", "decode", "update")
EVAL_PHASE = "evaluate"   # an eval line's one phase (the evaluation itself)


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict[str, str]:
    # numpy and torch are read here only: plotting and reading runs never import torch
    import numpy
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "dist_quant": __version__}


def machine() -> dict[str, Any]:
    """The CPU model (``model name`` of /proc/cpuinfo, else the platform's processor name)
    and the logical CPUs: results move with the CPU (torch's kernels sum in its order)."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu or platform.processor() or platform.machine(),
            "logical_cpus": os.cpu_count(), "cores": cores(), "load_start": load_average()}


def load_average() -> list[float] | None:
    """The machine's load average over 1, 5 and 15 minutes (``os.getloadavg``: runnable and
    uninterruptible processes, all cores together); None where the platform has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cpu_quota(root: str | Path = "/sys/fs/cgroup") -> float | None:
    """The cgroup CPU quota of this process in cores (cgroup v2 ``cpu.max``, else v1
    ``cpu.cfs_quota_us / cpu.cfs_period_us``); None where no quota is set or readable."""
    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def cores() -> dict[str, Any]:
    """The cores the job had: ``affinity`` (the CPUs this process may run on,
    ``os.sched_getaffinity``; null where the platform lacks it), ``quota`` (the cgroup CPU
    quota in cores, :func:`cpu_quota`; null: none) and ``logical`` (``os.cpu_count()``)."""
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {"affinity": affinity, "quota": cpu_quota(), "logical": os.cpu_count()}


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class RunRecorder:
    """Appends step and eval lines to ``metrics.jsonl`` and writes the JSON files.

    ``resume_step=t`` keeps the existing lines up to step ``t`` (later ones are dropped, as
    they will be recomputed) and continues the byte counters from there.

    A write the disk cannot take (full, read-only, permission) raises
    :class:`~dist_quant.runtime.diskfault.DiskFault`; ``metrics.jsonl`` is first cut back to its
    last whole line (:class:`~dist_quant.runtime.diskfault.WholeLines`).
    """

    def __init__(self, run_dir: str | Path, config: dict[str, Any], resume_step: int | None = None,
                 model: str = "mlp", metric: str = "accuracy",
                 data: dict[str, Any] | None = None):
        self.dir = Path(run_dir)
        start = resume_step or 0
        with disk_write(self.dir, start, self.dir):
            self.dir.mkdir(parents=True, exist_ok=True)
        self.cum_up = 0
        self.cum_down = 0
        self.skipped = 0
        self.t0 = time.perf_counter()
        self.wall_offset = 0.0
        # seconds per phase summed over the lines written (kept ones included): wall, CPU
        self.phase_wall = {p: 0.0 for p in (*PHASES, EVAL_PHASE)}
        self.phase_cpu = {p: 0.0 for p in (*PHASES, EVAL_PHASE)}
        model_times: dict[int, float] = {}   # a resumed run's modelled clock, step -> time
        metrics = self.dir / "metrics.jsonl"
        if resume_step is not None and metrics.exists():
            kept = []
            for line in metrics.read_text().splitlines():
                rec = json.loads(line)
                if rec["step"] <= resume_step:
                    kept.append(line)
                    self._add_phases(rec)
                    if rec["kind"] != "step":  # a lagged eval line carries an older step's
                        continue
                    self.cum_up, self.cum_down = rec["cum_bytes_up"], rec["cum_bytes_down"]
                    self.wall_offset = rec["wall"]
                    self.skipped += rec.get("skipped", 0)
                    if "model_time" in rec:
                        model_times[rec["step"]] = rec["model_time"]
            self._write_text("metrics.jsonl", "".join(k + "\n" for k in kept), start)
        else:
            with disk_write(metrics, start, self.dir):
                metrics.write_text("")
        self._config = {"config": config, "model": model, "metric": metric,
                        **({"data": data} if data else {}),
                        "versions": versions(), "git_commit": git_commit(),
                        "machine": machine()}
        self._write_json("config.json", self._config, start)
        self._fh = WholeLines(metrics, self.dir, start)  # closed in close()
        self._tb = open_writer(self.dir, config, resume_step)  # --tensorboard, else None
        self._lr = None
        if "lr" in config:
            self._lr = (float(config["lr"]), schedule_from_config(config))
        self._clock: Clock | ArrivalClock | None = None
        self._settings = config
        self._per_byte = metric == "next_byte_accuracy"   # the text task: its loss in bits too
        self._at_target: float | None = None   # modelled time of the first evaluation there
        if config.get("clock", "wall") == "dedicated":
            self._clock = self._open_clock(config, model_times, start)
            self.t0 = time.perf_counter()   # the calibration is no part of the run's time

    def _open_clock(self, config: dict[str, Any], model_times: dict[int, float],
                    start: int) -> Clock | ArrivalClock:
        """The modelled clock (``--clock dedicated``): its calibration measured (or loaded from
        ``--calibration``) and written as ``calibration.json``."""
        # the calibration runs the model (torch): plotting and reading runs never import it
        from dist_quant.runtime.calibrate import FILE, for_run, load

        saved = self.dir / FILE
        # a resumed run keeps the calibration it started with: its clock goes on alike
        calibration = load(saved) if model_times and saved.is_file() else for_run(config)
        self._write_json("calibration.json", calibration, start)
        clock = clock_of(config, calibration)   # the asynchronous modes': their arrivals
        clock.at.update(model_times)
        clock.time = model_times[max(model_times)] if model_times else 0.0
        return clock

    @property
    def clock(self) -> Clock | ArrivalClock | None:
        """The modelled clock (``--clock dedicated``), else None."""
        return self._clock

    def wall(self) -> float:
        return self.wall_offset + time.perf_counter() - self.t0

    def _add_phases(self, rec: dict[str, Any]) -> None:
        """Add a line's ``time`` and ``cpu`` (where it has them) to the sums."""
        for key, sums in (("time", self.phase_wall), ("cpu", self.phase_cpu)):
            for phase, seconds in rec.get(key, {}).items():
                if phase in sums:
                    sums[phase] += float(seconds)

    def step(self, step: int, loss: float, bytes_up: int, bytes_down: int,
             times: dict[str, float], skipped: int = 0,
             extra: dict[str, Any] | None = None,
             cpu: dict[str, float] | None = None) -> dict[str, Any]:
        """Append a step line; ``extra`` adds fields (the sharded job's per-server bytes);
        ``cpu``: the thread CPU seconds of the phases of ``times``
        (:mod:`dist_quant.runtime.phasetime`; a phase left out is 0)."""
        self.cum_up += int(bytes_up)
        self.cum_down += int(bytes_down)
        self.skipped += int(skipped)
        rec = {"kind": "step", "step": int(step), "loss": float(loss),
               "bytes_up": int(bytes_up), "bytes_down": int(bytes_down),
               "cum_bytes_up": self.cum_up, "cum_bytes_down": self.cum_down,
               "wall": self.wall(), "time": {p: float(times.get(p, 0.0)) for p in PHASES},
               "skipped": int(skipped), **(extra or {})}
        if cpu is not None:
            rec["cpu"] = {p: float(cpu.get(p, 0.0)) for p in PHASES}
        self._add_phases(rec)
        if self._lr is not None:
            rec["lr"] = self._lr[0] * self._lr[1].factor(int(step))
        if self._clock is not None:
            rec["model_wall"] = self._clock.step(rec)
            rec["model_time"] = self._clock.time
        self._fh.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            self._tb.record(rec)
        return rec

    def eval(self, step: int, test_loss: float, test_accuracy: float,
             wall: float | None = None, cum: tuple[int, int] | None = None,
             extra: dict[str, Any] | None = None, spent: Any = None) -> dict[str, Any]:
        """Append an eval line; ``wall`` and ``cum`` (bytes up, down) default to now. A lagged
        evaluation (``--eval-lag``) gives those of its step: its time to target is that step's.
        ``spent``: the evaluation's own seconds (a :class:`~dist_quant.runtime.phasetime.Clocks`
        difference), written as ``"time": {"evaluate": wall}, "cpu": {"evaluate": cpu}``."""
        up, down = (self.cum_up, self.cum_down) if cum is None else cum
        rec = {"kind": "eval", "step": int(step), "test_loss": float(test_loss),
               "test_accuracy": float(test_accuracy), "cum_bytes_up": int(up),
               "cum_bytes_down": int(down), "wall": self.wall() if wall is None else wall,
               **(extra or {})}
        if spent is not None:
            rec["time"] = {EVAL_PHASE: float(spent.wall)}
            rec["cpu"] = {EVAL_PHASE: float(spent.cpu)}
            self._add_phases(rec)
        if self._per_byte:
            rec["test_bits_per_byte"] = float(test_loss) / math.log(2)
        if self._clock is not None:   # that of its step, as its wall time
            rec["model_time"] = self._clock.record_time(int(step))
            if self._at_target is None and stop_reached(self._settings, test_loss,
                                                        test_accuracy):
                self._at_target = rec["model_time"]
        self._fh.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            self._tb.record(rec)
        return rec

    def update(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Append an ``update`` line (one gradient of an asynchronous run)."""
        rec = {"kind": "update", **fields}
        self._fh.write(json.dumps(rec) + "\n")
        return rec

    def lost(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Append a ``lost`` line (a worker an asynchronous run dropped, ``--min-workers``)."""
        rec = {"kind": "lost", **fields}
        self._fh.write(json.dumps(rec) + "\n")
        return rec

    def summary(self, **fields: Any) -> dict[str, Any]:
        """Write ``summary.json``; return it with ``run_dir`` added (the directory is not
        written into the file: a run directory may be moved, a record committed)."""
        out = {"bytes_up": self.cum_up, "bytes_down": self.cum_down,
               "wall_seconds": self.wall(), "skipped_payloads": self.skipped,
               "time_seconds": dict(self.phase_wall), "cpu_seconds": dict(self.phase_cpu),
               "cores": self._config["machine"]["cores"],
               "load_start": self._config["machine"]["load_start"],
               "load_end": load_average(), **fields}
        if self._per_byte and "test_loss" in fields:
            out["test_bits_per_byte"] = float(fields["test_loss"]) / math.log(2)
        # config.json records the load at the end too
        self._config["machine"]["load_end"] = out["load_end"]
        self._write_json("config.json", self._config, int(fields.get("steps", 0)))
        if self._clock is not None:
            out.update(clock="dedicated", model_seconds=self._clock.time,
                       model_time_to_target=self._at_target, model_link=self._clock.links.name,
                       host_speed=self._clock.speed)
        self._write_json("summary.json", out, int(fields.get("steps", 0)))
        return {**out, "run_dir": str(self.dir)}

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()

    def _write_json(self, name: str, obj: dict[str, Any], step: int) -> None:
        self._write_text(name, json.dumps(obj, indent=2, sort_keys=True) + "\n", step)

    def _write_text(self, name: str, text: str, step: int) -> None:
        """``name`` replaced whole (a ``.tmp`` file renamed), or left as it was."""
        path, tmp = self.dir / name, self.dir / (name + ".tmp")
        with disk_write(path, step, self.dir, undo=lambda: tmp.unlink(missing_ok=True)):
            tmp.write_text(text)
            os.replace(tmp, path)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "summary.json").read_text())
