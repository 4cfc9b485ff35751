"""The single-process reference: every rank of the job in one process.

``dist-quant train --simulate`` runs exactly the distributed job's step: the same
:class:`~dist_quant.ps.worker.Worker` objects (shards, samplers, generators seeded from
``(seed, i)``, compressors, error feedback), the same
:class:`~dist_quant.ps.shard.ShardServer` updates and the same phases of
:mod:`dist_quant.ps.sync_step`, placed by the same :class:`~dist_quant.ps.placement.
Placement` (star, sharded or colocated); only the payloads are handed over in memory
(:class:`~dist_quant.ps.fabric.LocalFabric`) instead of over torch.distributed. On the same
device type and seed it ends with the same parameters, bit for bit, so tests use it as the
reference. Bytes are counted for the same links a distributed run uses; phase times are sums
over the virtual workers and servers, and ``communicate`` is the in-memory hand-over (close
to zero).
"""

from __future__ import annotations

from typing import Any

import torch

from dist_quant.config import TrainConfig
from dist_quant.ps import common
from dist_quant.ps.placement import place
from dist_quant.ps.start import run_all
from dist_quant.ps.task import Task
from dist_quant.ps.worker import RunAborted


def run_simulate(cfg: TrainConfig, device: torch.device, run_dir: str,
                 task: Task | None = None) -> dict[str, Any]:
    """Run the whole job in this process; return its summary. ``task``: what is trained
    (:mod:`dist_quant.ps.task`; None: the MLP on ``cfg.dataset``, as ``dist-quant train``)."""
    cfg = cfg.replace(run_dir=run_dir)
    task = task or Task.from_config(cfg)
    model = task.model(device)
    placement = place(cfg, common.num_params(model))
    return run_all(cfg, placement, task, device)


__all__ = ["RunAborted", "run_simulate"]
