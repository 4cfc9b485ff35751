"""What a job will need of the disk, known before it starts (checked by
:mod:`dist_quant.preflight`).

**A checkpoint** (:mod:`dist_quant.checkpoint`) holds, for a model of ``n`` parameters whose
``state_dict`` is ``b`` bytes in ``T`` tensors (parameters and BatchNorm buffers), with ``P``
parameter tensors, ``W`` workers and ``S`` parameter shards (``S = W`` with ``--colocate``):

- the server's model: ``b`` (``T`` tensors);
- per shard: its slice of the flat parameters, of the momentum and of the workers' replica
  (``3 * 4 n`` bytes over all shards; momentum kept per parameter tensor by a single server,
  ``P`` tensors, else one flat buffer) and its downlink generator (``GENERATOR`` bytes);
- per worker: its model replica (``b``, ``T`` tensors), two generators (quantiser, dropout),
  and with ``--error-feedback`` its residual (``4 n``).

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
"""

from __future__ import annotations

import math
from pathlib import Path

from dist_quant.config import TrainConfig

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
    configured MLP (built on the CPU)."""
    import torch

    from dist_quant.roles.common import build_model

    model = build_model(cfg, in_features, num_classes, torch.device("cpu"))
    state = model.state_dict()
    params = list(model.parameters())
    return (sum(p.numel() for p in params),
            sum(t.numel() * t.element_size() for t in state.values()), len(state), len(params))


def checkpoint_nbytes(cfg: TrainConfig, shape: tuple[int, int, int, int]) -> int:
    """A bound on the size of one checkpoint file of ``cfg`` (module docstring)."""
    n, b, tensors, param_tensors = shape
    workers = cfg.workers
    shards = workers if cfg.colocate else cfg.servers
    momentum = param_tensors if shards == 1 else 1
    data = b + 12 * n + shards * GENERATOR + workers * (b + 2 * GENERATOR)
    count = tensors + shards * (3 + momentum) + workers * (tensors + 2)
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
