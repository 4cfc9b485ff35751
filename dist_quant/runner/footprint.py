"""What a job will need of the disk and of memory, known before it starts (checked by
:mod:`dist_quant.runner.preflight`).

**A checkpoint** (:mod:`dist_quant.runtime.checkpoint`) holds, for a model of ``n`` parameters whose
``state_dict`` is ``b`` bytes in ``T`` tensors (parameters and BatchNorm buffers), with ``P``
parameter tensors, ``W`` workers and ``S`` parameter shards (``S = W`` with ``--colocate``):

- the server's model: ``b`` (``T`` tensors);
- per shard: its slice of the flat parameters and of the workers' replica, and its downlink
  generator (``GENERATOR`` bytes); the momentum, per parameter tensor cut at the shards'
  bounds (at most ``P + S`` tensors); ``3 * 4 n`` bytes over all shards;
- per worker: its model replica (``b``, ``T`` tensors), its generators (quantiser and dropout;
  one more with several servers, two more with ``--colocate``), and with
  ``--error-feedback`` its residual (``4 n``).

``torch.save`` writes every tensor as its own record of a zip archive; ``PER_TENSOR`` bytes
per tensor bound that overhead and ``PER_FILE`` the pickled structure and the config, so
:func:`checkpoint_nbytes` = data + ``PER_TENSOR * tensors + PER_FILE``. Measured against real
checkpoints (tests/test_footprint.py): at least the file's size, and within 1.5 times it for
the smallest models (where the overhead dominates), closer for larger ones.

**The run directory** (:func:`run_disk_nbytes`) then holds at its fullest
``files * checkpoint_nbytes`` (``files``: the ``K + 1`` of ``--keep-checkpoints K`` while a
new checkpoint is written beside the kept ones, or every checkpoint of the run with ``K = 0``,
fewer when the run has fewer checkpoint steps; a resumed run counts its existing files
among the kept), plus ``metrics.jsonl`` (``STEP_LINE + SHARD_FIELD * S`` bytes per step line,
``EVAL_LINE`` per evaluation), plus ``SLACK`` for ``config.json``, ``summary.json`` and
``launch.log``.

**Memory** (:func:`rank_memory_mb`, :func:`job_memory_mb`). A rank's resident memory is
mostly torch itself: about 250 MiB for a worker of the default job, 390 MiB for the parameter
server's leader, 225 MiB for torchrun's agent (``*_MB``, measured once; the constants' comment
says where). On top of that, a rank's peak is the larger of its two phases:

- start-up, while it loads the data: ``START_MB`` + the data's peak. The data is loaded the
  same way by preflight in the launcher first, which measures the peak it adds and what it
  keeps (:func:`measured_load`; generating MNIST-1D briefly takes about 4 kB per example);
- training: a base (``WORKER_MB``, ``LEADER_MB``) + the data kept + ``c`` fp32 copies of the
  ``n`` parameters (``c`` = ``WORKER_COPIES`` for a worker: model, gradients, flat vectors,
  the quantiser's buffers; ``LEADER_COPIES + LEADER_PER_WORKER * W`` for the leader, which
  also decodes every worker's payload) + for a worker one batch of activations,
  ``ACTIVATION_BYTES`` per row and unit (inputs, hidden widths and classes).

Sharded and colocated server ranks are estimated as leaders (an upper bound), DDP ranks as
workers with the first as the leader. RSS counts the shared library pages (``SHARED_MB``) in
every process; the job's total counts them once. Preflight refuses a job whose total exceeds
the memory available (:func:`available_mb`); ``--force`` starts it anyway. The estimate was
checked against the measured peaks for W = 2, 4 and 8 (tests/test_footprint.py) and for a
model of 4.3 M parameters (``--hidden 2048,2048``) within 10%.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

from dist_quant.config import TrainConfig
from dist_quant.ps.common import build_model
from dist_quant.ps.task import Task

GENERATOR = 5056      # bytes of a CPU torch.Generator's state
PER_TENSOR = 400      # zip record, alignment and pickle entry of one tensor (bytes, bound)
PER_FILE = 8192       # the pickled structure and the config (bytes, bound)
STEP_LINE = 600       # one step line of metrics.jsonl (bytes, bound)
SHARD_FIELD = 80      # its "servers" entry per shard
EVAL_LINE = 250       # one eval line
SLACK = 256 * 1024    # config.json, summary.json, launch.log, the checkpoints' ``latest``


def model_shape(cfg: TrainConfig, in_features: int,
                num_classes: int) -> tuple[int, int, int, int]:
    """(parameters n, state_dict bytes b, state_dict tensors T, parameter tensors P) of the
    configured MLP (built on the meta device: shapes only, no memory), or of ``--task``'s
    model."""
    import torch


    model = build_model(cfg, in_features, num_classes, torch.device("meta")) \
        if cfg.task == "mnist1d-mlp" else Task.from_config(cfg).model(torch.device("meta"))
    state = model.state_dict()
    params = list(model.parameters())
    return (sum(p.numel() for p in params),
            sum(t.numel() * t.element_size() for t in state.values()), len(state), len(params))


def checkpoint_nbytes(cfg: TrainConfig, shape: tuple[int, int, int, int]) -> int:
    """A bound on the size of one checkpoint file of ``cfg`` (module docstring)."""
    n, b, tensors, param_tensors = shape
    workers = cfg.workers
    shards = workers if cfg.colocate else cfg.servers
    generators = 4 if cfg.colocate else (3 if shards > 1 else 2)   # per worker
    data = b + 12 * n + shards * GENERATOR + workers * (b + generators * GENERATOR)
    count = tensors + 3 * shards + param_tensors + shards + workers * (tensors + generators)
    if cfg.error_feedback:
        data += workers * 4 * n
        count += workers
    return data + PER_TENSOR * count + PER_FILE


def checkpoint_steps(cfg: TrainConfig, start: int) -> int:
    """Checkpoints a run writes after step ``start``: every ``checkpoint_every`` and the last."""
    every = cfg.checkpoint_every
    regular = (cfg.steps // every - start // every) if every > 0 else 0
    return regular + int(every <= 0 or cfg.steps % every != 0)


def checkpoint_files(cfg: TrainConfig, start: int, existing: int) -> int:
    """New checkpoint files the run directory must hold at once (module docstring)."""
    new = checkpoint_steps(cfg, start)
    if cfg.keep_checkpoints <= 0:
        return new
    return max(1, min(cfg.keep_checkpoints + 1, existing + new) - existing)


def metrics_nbytes(cfg: TrainConfig) -> int:
    shards = cfg.workers if cfg.colocate else cfg.servers
    evals = math.ceil(cfg.steps / cfg.eval_every) + 1 if cfg.eval_every > 0 else 1
    return cfg.steps * (STEP_LINE + SHARD_FIELD * shards) + evals * EVAL_LINE


def run_disk_nbytes(cfg: TrainConfig, shape: tuple[int, int, int, int] | None,
                    start: int = 0, existing: int = 0) -> tuple[int, int, int]:
    """(total, checkpoint files, bytes per checkpoint) the run directory needs free (module
    docstring); ``shape`` None: a job without checkpoints (``--method ddp``)."""
    files = size = 0
    if shape is not None:
        files, size = checkpoint_files(cfg, start, existing), checkpoint_nbytes(cfg, shape)
    return files * size + metrics_nbytes(cfg) + SLACK, files, size


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (where the run directory would go)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def megabytes(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 100_000 else f"{nbytes / 1e3:.0f} kB"


# ---- memory ----------------------------------------------------------------------------------
# Resident memory of the job's processes, MiB, measured once: the peak RSS (VmHWM) of every
# process of `dist-quant train` jobs, read as tests/test_footprint.py's peaks() reads it (the
# default job with W = 2, 4, 8; --hidden 2048,2048 with W = 2, 4 and --batch-size 512, 64 for
# the copies and activations), torch 2.13.0+cpu, Python 3.11, Linux x86-64.
AGENT_MB = 225          # torchrun's agent (dist_quant.localrun)
START_MB = 232          # a rank before its data: the interpreter, torch, gloo, the package
WORKER_MB = 247         # a worker while training the default job, less its data and model
LEADER_MB = 381         # the parameter server's leader (also evaluates, records, checkpoints)
SHARED_MB = 78          # of each: library pages shared by every process (counted once)
WORKER_COPIES = 6       # fp32 copies of the parameters a worker holds at its peak
LEADER_COPIES = 14      # the leader's, plus LEADER_PER_WORKER per worker
LEADER_PER_WORKER = 2.4
ACTIVATION_BYTES = 36   # per batch row and unit (input, hidden and output widths) in a step
MIB = 1 << 20


def measured_load(load):
    """``load()`` with this process's memory watched: (its result, the peak it added, the
    resident memory it kept), MiB. The peak is read from VmHWM after resetting it
    (``/proc/self/clear_refs``, Linux); elsewhere both are what it kept."""
    def status() -> dict[str, float]:
        out = {}
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(value.split()[0]) / 1024
        return out

    reset = False
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")   # VmHWM = VmRSS
        reset = True
    before = status()
    result = load()
    after = status()
    kept = max(0.0, after.get("VmRSS", 0.0) - before.get("VmRSS", 0.0))
    peak = max(kept, after.get("VmHWM", 0.0) - before.get("VmRSS", 0.0)) if reset else kept
    return result, peak, kept


def rank_memory_mb(cfg: TrainConfig, n: int, units: int, data_peak: float,
                   data_kept: float) -> list[float]:
    """Each rank's estimated peak RSS (MiB), rank order of the default placement: the larger
    of its start-up (``START_MB`` + the data's peak, as measured while preflight loaded it)
    and its training (a base, the data it keeps, fp32 copies of the ``n`` parameters, and for a
    worker one batch of activations over ``units``)."""
    copy = 4 * n / MIB
    start = START_MB + data_peak
    worker = max(start, WORKER_MB + data_kept + WORKER_COPIES * copy
                 + cfg.batch_size * units * ACTIVATION_BYTES / MIB)
    leader = max(start, LEADER_MB + data_kept
                 + (LEADER_COPIES + LEADER_PER_WORKER * cfg.workers) * copy)
    if cfg.method == "ddp":
        return [leader] + [worker] * (cfg.workers - 1)
    servers = cfg.workers if cfg.colocate else cfg.servers   # estimated as leaders
    return [leader] * servers + [worker] * (cfg.world_size - servers)


def job_memory_mb(ranks: list[float]) -> float:
    """What the job's new processes (torchrun's agent and the ranks) take at once: their RSS,
    with the shared library pages counted once."""
    return AGENT_MB + sum(ranks) - SHARED_MB * len(ranks)


def available_mb() -> float | None:
    """Memory this process's job may still take: /proc/meminfo's MemAvailable, lowered to the
    cgroup's ``memory.max - memory.current`` where one is set; None where neither is known."""
    found = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) / 1024)
    with contextlib.suppress(OSError, ValueError, IndexError):
        group = Path("/proc/self/cgroup").read_text().splitlines()[0].split("::", 1)[1]
        base = Path("/sys/fs/cgroup") / group.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit != "max":
            found.append((int(limit) - int((base / "memory.current").read_text())) / MIB)
    return min(found) if found else None
