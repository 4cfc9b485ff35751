"""The single-process reference: W virtual workers and the server in one process.

``dist-quant train --simulate`` runs exactly the distributed job's step: the same
:class:`~dist_quant.roles.worker.Worker` objects (shards, samplers, generators seeded from
``(seed, i)``, compressors, error feedback), the same :func:`~dist_quant.roles.server.run_server`
loop and :class:`~dist_quant.roles.server.Server` update; only the payloads are handed over in
memory instead of over torch.distributed. On the same device type and seed it ends with the
same parameters, bit for bit, so tests use it as the reference. Bytes are counted from the
same tensors a transport would be handed; phase times are sums over the virtual workers, and
``communicate`` is the in-memory hand-over (close to zero). Sharded and colocated servers run
every rank's phases of :mod:`dist_quant.roles.exchange` in turn over an in-memory fabric.
"""

from __future__ import annotations

from typing import Any

import torch

from dist_quant.config import TrainConfig
from dist_quant.data import load_dataset
from dist_quant.roles import common
from dist_quant.roles.server import Server, run_server
from dist_quant.roles.worker import RunAborted, Worker
from dist_quant.transport import ABORT


class LocalWorkers:
    """W :class:`Worker` objects in this process, behind the server's ``Workers`` interface."""

    sequential = True

    def __init__(self, workers: list[Worker]):
        self.workers = workers
        self.bytes_up = 0
        self.bytes_down = 0

    def uplink(self, with_stats: bool):
        payloads, telemetry = zip(*(w.step_up() for w in self.workers), strict=True)
        payloads = torch.stack([p[0] for p in payloads])
        telemetry = torch.stack(telemetry)
        self.bytes_up += payloads.numel()
        stats = None
        if with_stats and self.workers[0].n_stats:
            stats = torch.stack([w.bn_stats() for w in self.workers])
            self.bytes_up += stats.numel() * stats.element_size()
        return payloads, telemetry, stats

    def downlink(self, control: int, payload: torch.Tensor | None) -> None:
        if control == ABORT:
            return
        for w in self.workers:
            w.receive_downlink([payload])
            self.bytes_down += payload.numel()

    def collect_states(self) -> list[dict[str, Any]]:
        return [w.state_dict() for w in self.workers]

    def restore_states(self, states: list[dict[str, Any]]) -> None:
        for w, state in zip(self.workers, states, strict=True):
            w.load_state_dict(state)


def run_simulate(cfg: TrainConfig, device: torch.device, run_dir: str) -> dict[str, Any]:
    """Run the whole job in this process; return its summary."""
    data = load_dataset(cfg)
    if cfg.num_shards > 1:  # sharded or colocated servers: every rank's pieces in turn
        from dist_quant.roles.exchange import run_all
        from dist_quant.roles.placement import place

        model = common.build_model(cfg, data.in_features, data.num_classes, device)
        return run_all(cfg, place(cfg, common.num_params(model)), data, device)
    server = Server(cfg, data, device)
    workers = LocalWorkers([Worker(cfg, data, i, device) for i in range(cfg.workers)])
    return run_server(cfg, server, workers, run_dir)


__all__ = ["LocalWorkers", "RunAborted", "run_simulate"]
