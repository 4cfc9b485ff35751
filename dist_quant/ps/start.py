"""Where a rank of the parameter-server job starts, and which step it runs.

Every way into the job comes through here: ``--simulate`` runs every rank in one process
(:func:`run_all`, over a :class:`~dist_quant.ps.fabric.LocalFabric`), a torchrun process runs
its own (:func:`run_distributed_rank`: the process groups, the placement, the lost-peer
notices, then :func:`run_rank` over a :class:`~dist_quant.ps.fabric.RemoteFabric`). Both pick
the step the same way: the synchronous step (:mod:`dist_quant.ps.sync_step`) unless the run
follows arrivals (``--consistency ssp|async``, ``--backup-workers``:
:mod:`dist_quant.ps.async_rank`). The simulator and the distributed job run the same
arithmetic on the same random streams in the same order, so they end with the same
parameters, bit for bit.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from dist_quant.config import MAX_TIMEOUT, TrainConfig
from dist_quant.core.transport import PeerLostError, collective
from dist_quant.ps import common
from dist_quant.ps.async_rank import AsyncRank, run_async_all, run_async_rank
from dist_quant.ps.fabric import LocalFabric, RemoteFabric
from dist_quant.ps.placement import ROLES, Placement, place
from dist_quant.ps.sync_step import SyncRank, run_sync
from dist_quant.ps.task import Task
from dist_quant.ps.worker import WorkerLeaves
from dist_quant.runtime.rank import continue_after_restart, default_run_dir


def run_all(cfg: TrainConfig, placement: Placement, task: Task, device: torch.device,
            fabric: Any = None) -> dict[str, Any]:
    """Every rank of ``placement`` in this process (``--simulate``); returns the summary.
    The leader runs last in each phase, after the ranks whose messages it gathers."""
    fabric = fabric or LocalFabric(placement)
    order = [r for r in placement.ranks if r != placement.leader] + [placement.leader]
    kind = AsyncRank if cfg.asynchronous else SyncRank
    ranks = [kind(cfg, placement, r, task, device, fabric) for r in order]
    if cfg.asynchronous:
        return run_async_all(cfg, ranks)
    return run_sync(cfg, ranks, sequential=True)


def run_rank(cfg: TrainConfig, placement: Placement, rank: int, task: Task,
             device: torch.device, fabric: Any) -> dict[str, Any] | None:
    """This process's rank of a distributed job; the leader returns the summary."""
    if cfg.asynchronous:
        return run_async_rank(AsyncRank(cfg, placement, rank, task, device, fabric))
    return run_sync(cfg, [SyncRank(cfg, placement, rank, task, device, fabric)],
                    sequential=False)


def gather_roles(device: torch.device) -> tuple[list[str], list[int | None]]:
    """Every rank's ``DIST_QUANT_ROLE`` and ``DIST_QUANT_WORKER`` (one ``all_gather`` of two
    small codes per rank): the role, and the worker index a host was given (None: unset)."""
    role = os.environ.get("DIST_QUANT_ROLE", "")
    code = ROLES.index(role) + 1 if role in ROLES else (0 if not role else -1)
    index = os.environ.get("DIST_QUANT_WORKER", "")
    number = int(index) if index.isdigit() else (-1 if not index else -2)
    mine = torch.tensor([code, number], dtype=torch.int64, device=device)
    codes = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(codes, mine)
    roles = ["" if int(c[0]) == 0 else ROLES[int(c[0]) - 1] if int(c[0]) > 0 else "?"
             for c in codes]
    return roles, [None if int(c[1]) == -1 else int(c[1]) for c in codes]


NOTICE_GRACE = 2.0  # seconds a rank that lost the leader waits for the leader's notice
NOTICE_WAIT = 10.0  # seconds a rank waits, after its last step, for the leader's last notice


def run_distributed_rank(cfg: TrainConfig, device: torch.device, backend: str,
                         task: Task | None = None,
                         on_lost: Any = None) -> dict[str, Any] | None:
    """This torchrun process's part of the parameter-server job (``dist_quant.train``, or
    :func:`dist_quant.fit` with its ``task``; None: the MLP on ``cfg.dataset``): the training
    traffic gets its own process group with the short ``--timeout``. The leader returns the
    summary, the other ranks None.

    Lost peers: the leader that loses rank ``j`` tells every other rank through a separate
    gloo group (:meth:`~dist_quant.core.transport.Transport.notify_lost`), and ``on_lost(error)``
    runs on each of them (it should end the process), so every rank names the same peer; the
    others wait for the leader ``--timeout`` plus a grace, so the leader names the culprit
    first, and a rank that loses a peer first reports it to the leader
    (:meth:`~dist_quant.core.transport.Transport.report_lost`), which passes it on: the leader may
    be waiting on that rank meanwhile, and would blame it once it left. On a torchrun restart
    the leader's run directory decides whether every rank continues from its latest checkpoint
    (:func:`dist_quant.runtime.rank.continue_after_restart`)."""
    with collective("exchanging the ranks' roles"):
        roles, indices = gather_roles(device)
    task = task or Task.from_config(cfg)
    rank = dist.get_rank()
    n = common.num_params(task.model(device))
    placement = place(cfg, n, roles, indices)
    leader = rank == placement.leader
    with collective("agreeing where to continue after a restart"):
        cfg = continue_after_restart(cfg, leader, placement.leader, device)
    with collective("connecting the ranks' links"):
        group = dist.new_group(backend=backend,
                               timeout=datetime.timedelta(seconds=cfg.timeout))
        # the lost-peer notices: gloo on the CPU, alive after the training group timed out
        notices = dist.new_group(backend="gloo",
                                 timeout=datetime.timedelta(seconds=MAX_TIMEOUT))
    if leader and not cfg.run_dir:
        cfg = cfg.replace(run_dir=default_run_dir(cfg))
    fabric = RemoteFabric(placement, rank, device, group, timeout=cfg.timeout,
                          notice_group=notices)
    with collective("waiting for every rank to start"):
        dist.barrier()
    if leader:
        reports = fabric.watch_reports(on_lost) if on_lost is not None else None
        try:
            summary = run_rank(cfg, placement, rank, task, device, fabric)
        except PeerLostError as err:
            fabric.notify_lost(err.rank)  # the other ranks name the same peer
            raise
        fabric.notify_done()
        if reports is not None:
            reports.join(timeout=NOTICE_WAIT)
        return summary
    watcher = fabric.watch_notices(on_lost) if on_lost is not None else None
    try:
        run_rank(cfg, placement, rank, task, device, fabric)
    except WorkerLeaves:
        fabric.report_done()   # the leader counts it as done; it drops it when its links close
        raise
    except PeerLostError as err:
        # the leader may be waiting on this rank: tell it who was lost, or it would blame this
        # rank once it leaves; its notice naming the rank follows: the message to give
        if watcher is not None:
            fabric.report_lost(err.rank)
            watcher.join(timeout=NOTICE_GRACE)
        raise
    fabric.report_done()
    if watcher is not None:
        watcher.join(timeout=cfg.timeout + NOTICE_WAIT)
    return None
