"""The asynchronous step: the server follows arrivals instead of a lockstep.

``--consistency ssp|async`` and ``--backup-workers B`` run the same pieces as the synchronous
step (:class:`~dist_quant.ps.worker.Worker`, :class:`~dist_quant.ps.shard.ShardServer`,
the leader's evaluation and records, placed by the same
:class:`~dist_quant.ps.placement.Placement` on the star or on dedicated shard servers) in
another order: the leader takes one arrival at a time and its policy
(:mod:`dist_quant.ps.consistency`) decides which gradients form an update and which workers
go on. Colocated servers and the DDP baseline stay synchronous (refused at validation). The
parts of a rank:

- a worker (:mod:`dist_quant.ps.async_worker`): compute, send, wait for the leader's control;
- a server other than the leader (:mod:`dist_quant.ps.async_server`): carry out the leader's
  commands, so that every shard applies the same updates in the same order;
- the leader: its arrivals and decisions (:mod:`dist_quant.ps.async_leader`) and the steps
  they complete: records, evaluations, checkpoints, the end
  (:mod:`dist_quant.ps.async_record`);
- the arrival source (:mod:`dist_quant.ps.arrivals`): the network, the simulator's virtual
  clock, or the replay of a recorded run (``--simulate --replay RUN_DIR`` ends with the same
  parameters, bit for bit).

An update is one ``DecoupledMomentumSGD`` step of each shard on its decoded rows: their mean
(sync, backup workers) or their sum over W (ssp, async), bad rows left out as in the
synchronous step. Step ``t`` is complete once ``t W`` gradients have been applied (sync and
backup workers: ``t`` updates). ``--resume`` and ``--max-restarts`` end where an
uninterrupted run with the same ``--checkpoint-every`` ends.

Lost workers (``--consistency async --min-workers N``). The leader notices a lost worker when
the receive of its next gradient fails (its links closed, or ``--timeout`` passed); if at
least N workers remain it names the worker, stops waiting for it and sending to it, and queues
the loss behind the arrivals received before it, so that every other server drops the worker
after the same updates and every worker left takes its share of the lost worker's training
examples before its next ``GO``. The loss is recorded and a replay gives it out after the same
number of arrivals; the simulator's virtual clock loses a worker that left (``--inject-loss``)
when its next gradient would have arrived.
"""

from __future__ import annotations

from typing import Any

import torch

from dist_quant.compress import get_compressor
from dist_quant.config import TrainConfig
from dist_quant.errors import ConfigError
from dist_quant.ps.arrivals import NetworkArrivals, SimulatedArrivals
from dist_quant.ps.async_leader import AsyncLeader
from dist_quant.ps.async_record import AsyncSteps
from dist_quant.ps.async_server import AsyncServer
from dist_quant.ps.async_worker import AsyncWorkerLoop
from dist_quant.ps.consistency import Policy, policy_of
from dist_quant.ps.fabric import RemoteFabric
from dist_quant.ps.placement import Placement
from dist_quant.ps.state import RankState
from dist_quant.ps.task import Task


class AsyncRank(AsyncWorkerLoop, AsyncServer, AsyncLeader, AsyncSteps, RankState):
    """The pieces one rank holds, in the asynchronous step (module docstring)."""

    def __init__(self, cfg: TrainConfig, placement: Placement, rank: int, task: Task,
                 device: torch.device, fabric: Any):
        super().__init__(cfg, placement, rank, task, device, fabric)
        self.policy: Policy = policy_of(cfg)
        self.W = cfg.workers
        self.pump = lambda: None      # the simulator lets the other ranks act (distributed: no)
        # a distributed rank posts its receives before the message can come: every message of
        # an arrival's cycle then flows as soon as it is sent, without a round trip (gloo
        # sends once the receiver has posted; under CPU load each round trip costs a wake-up)
        self.early = isinstance(fabric, RemoteFabric)
        if self.worker is not None:
            self.init_worker_loop()
        if self.shard is not None:
            self.init_server()
        if self.is_leader:
            self.init_leader()

    def own_state(self) -> dict[str, Any]:
        state = super().own_state()
        if state["shard"] is not None:
            self.shard_state(state["shard"])
        return state

    # ---- resume -----------------------------------------------------------------------------
    def hand_out(self) -> None:
        """The leader of a resumed run hands every rank its pieces' states and keeps its own
        arrival state."""
        state = self.hand_out_resume()
        if state is not None:
            if "consistency" not in state:
                raise ConfigError("--resume", "the checkpoint was written by a synchronous run "
                                  "(no arrival state); resume it with --consistency sync")
            self.resumed_leader = state["consistency"]

    def take_resumed(self) -> None:
        if not self.cfg.resume:
            return
        mine = self.resumed_pieces()
        if self.worker is not None:
            if mine["worker"] is None:
                self.left = True
            else:
                self.worker.load_state_dict(mine["worker"])
        if self.shard is not None:
            self.load_shard(mine["shard"])
        if self.is_leader:
            self.load_leader(self.resumed_leader)

    def close_records(self, **extra: Any) -> dict[str, Any] | None:
        fp32 = get_compressor("none")
        per = sum(fp32.payload_nbytes(hi - lo) for lo, hi in self.p.bounds)
        seen = sum(self.staleness.values())
        mean = sum(k * v for k, v in self.staleness.items()) / seen if seen else 0.0
        bound = self.cfg.staleness if self.cfg.consistency == "ssp" else (
            0 if self.cfg.consistency == "sync" else None)
        return super().close_records(
            fp32_bytes_up=self.received * per + self.stats_bytes,
            fp32_bytes_down=self.released_total * per,
            consistency=self.cfg.consistency, staleness_bound=bound,
            backup_workers=self.cfg.backup_workers, updates=self.version,
            gradients=self.received, applied_per_worker=list(self.applied_by),
            dropped_per_worker=list(self.dropped_by),
            wait_seconds_per_worker=[round(w, 6) for w in self.wait_by],
            staleness_mean=mean, lost_workers=list(self.lost),
            workers_at_end=self.W - len(self.gone),
            staleness_histogram={str(k): v for k, v in sorted(self.staleness.items())},
            **extra)


def run_async_all(cfg: TrainConfig, ranks: list[AsyncRank]) -> dict[str, Any]:
    """Every rank of the job in this process (``--simulate``, the leader last); the arrival
    order from ``--replay``, the modelled cluster (``--clock dedicated``) or the virtual clock
    of ``--slow-worker``; returns the summary."""
    leader, others = ranks[-1], ranks[:-1]
    by_worker = {r.p.worker_of(r.rank): r for r in ranks if r.worker is not None}
    leader.arrivals = SimulatedArrivals.of(cfg, leader.p, lambda i: by_worker[i].left)
    leader.hand_out()
    for r in ranks:
        r.take_resumed()
    for r in ranks:
        r.open_records(sequential=True)
    clock = leader.recorder.clock
    if clock is not None:   # --clock dedicated: the modelled cluster's arrival order
        shard, bounds = leader.shard, leader.p.bounds
        clock.configure([hi - lo for lo, hi in bounds],
                        [shard.up.payload_nbytes(hi - lo) for lo, hi in bounds],
                        [shard.down.payload_nbytes(hi - lo) for lo, hi in bounds],
                        4 * leader.n_stats, flags=lambda i: leader.flags[i])
        leader.arrivals.attach(clock)
    if cfg.resume:
        leader.arrivals.resume(leader.resumed_order, leader.received)

    def pump() -> None:
        busy = True
        while busy:
            busy = False
            for r in others:
                if r.shard is not None:
                    busy |= r.serve_queued()
            for r in others:
                if r.worker is not None:
                    busy |= r.work_queued()

    leader.pump = pump
    if not cfg.resume:
        for r in others:
            if r.worker is not None:
                r.first_go()
    try:
        return leader.run_leader()
    finally:
        leader.progress.close()


def run_async_rank(r: AsyncRank) -> dict[str, Any] | None:
    """This process's rank of a distributed asynchronous job; the leader returns the summary."""
    r.hand_out()
    r.take_resumed()
    r.open_records(sequential=False)
    if r.is_leader:
        r.arrivals = NetworkArrivals(r)
        try:
            return r.run_leader()
        finally:
            r.progress.close()
    if r.shard is not None:
        r.serve_all()
    else:
        r.work()
    return None
