"""A worker in the asynchronous step: compute, send, wait for the leader's control.

A worker loops: compute and encode its gradient (one payload per shard, sent to each server),
send its telemetry (``TELEMETRY_ASYNC``: with its waiting time) and, when asked, its BatchNorm
statistics to the leader, then wait for the leader's control (:mod:`dist_quant.ps.protocol`):
``GO`` (with the downlink of every shard: the newest parameters, fp32 or the compressed change
of its own replica), ``STATE`` (send its state for a checkpoint, wait again), ``RESHARD`` (take
a share of a dropped worker's examples, wait again), ``LAST`` or ``ABORT``. The time from its
send to its next ``GO`` is its waiting time.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from dist_quant.ps.fabric import TAG_CONTROL, TAG_DOWN
from dist_quant.ps.protocol import ABORT, CONTROL, LAST, RESHARD, STATE
from dist_quant.ps.schedule import wants_stats
from dist_quant.ps.worker import RunAborted, WorkerLeaves


class AsyncWorkerLoop:
    """The worker's part of :class:`~dist_quant.ps.async_rank.AsyncRank` (a mixin over its
    :class:`~dist_quant.ps.state.RankState`). Its own state: ``left`` (it left the run, by
    ``--inject-loss`` or dropped before the checkpoint a run resumed from), ``leave_at`` (the
    ``(worker, gradient)`` of ``--inject-loss``), ``t_sent`` (when its last gradient went) and,
    distributed, the receives posted ahead for its next control and downlink."""

    def init_worker_loop(self) -> None:
        self.left = False
        self.leave_at = self.cfg.lost_at
        self.t_sent: float | None = None
        self.next_control: Any = None
        self.next_down: list | None = None

    def go(self, stats: bool, wait: float) -> None:
        """Compute and send one gradient (every shard's payload), then its telemetry; or leave
        (``--inject-loss``): a distributed worker's process then ends, a simulated one sends
        nothing more."""
        k = self.worker.step + 1
        if self.leave_at == (self.worker.index, k):
            self.left = True
            if self.early:
                raise WorkerLeaves(f"worker {self.worker.index} leaves the run instead of "
                                   f"computing its gradient {k} (--inject-loss)")
            return
        telemetry = self.ship_gradient()
        self.send_telemetry(torch.cat([telemetry, torch.tensor([wait], dtype=torch.float64,
                                                               device=self.device)]), stats)
        self.t_sent = time.perf_counter()
        self._post()

    def _post(self) -> None:
        """Distributed: post the receives of the next control and of every shard's downlink."""
        if not self.early:
            return
        f, w = self.fabric, self.worker
        if self.next_control is None:
            self.next_control = f.recv_later(self.p.leader, self.rank, TAG_CONTROL, "control",
                                             CONTROL, torch.int64)
        if self.next_down is None:
            self.next_down = [f.recv_later(self.p.server_ranks[s], self.rank, TAG_DOWN,
                                           "parameters payload", box.numel(), torch.uint8,
                                           out=box) for s, box in enumerate(w.inboxes)]

    def first_go(self) -> None:
        """A fresh run: every worker starts on the initial parameters (its first wait, which
        holds the leader's start-up, is not counted)."""
        self.go(wants_stats(self.cfg, self.policy.lockstep, 0), 0.0)
        self.t_sent = None

    def on_control(self, control: torch.Tensor) -> bool:
        """Carry out one control from the leader; False once the run has ended."""
        code, stats = int(control[0]), bool(int(control[1]))
        if code == RESHARD:   # worker control[1] was dropped: take a share of its examples
            self.worker.take_over(int(control[1]))
            return True
        if code == STATE:
            self.fabric.send_blob(self.rank, self.p.leader, self.own_state(), "rank state")
            return True
        if code == LAST:
            self.fabric.flush()
            return False
        if code == ABORT:
            raise RunAborted("the leader ended the run (see the message of the rank that "
                             "refused a payload, or the leader's)")
        w = self.worker
        if self.next_down is not None:   # posted: each waited for as the forward reaches it
            w.receive_downlink(self.next_down)
            w.apply_pending()
            self.next_down = None
        else:
            w.receive_downlink([self.fabric.recv(self.p.server_ranks[s], self.rank, TAG_DOWN,
                                                 "parameters payload", box.numel(),
                                                 torch.uint8, out=box)
                                for s, box in enumerate(w.inboxes)])
        self.fabric.flush()
        wait = 0.0 if self.t_sent is None else time.perf_counter() - self.t_sent
        self.go(stats, wait)
        return True

    def _next_control(self) -> torch.Tensor:
        if self.next_control is not None:
            wait, self.next_control = self.next_control, None
            control = wait()
            self._post()
            return control
        return self.fabric.recv(self.p.leader, self.rank, TAG_CONTROL, "control", CONTROL,
                                torch.int64)

    def work(self) -> None:
        """A worker rank's whole run (distributed)."""
        if self.left:
            raise WorkerLeaves(f"worker {self.worker.index} was dropped before the checkpoint "
                               "this run resumes from (--min-workers): it stays out")
        if not self.cfg.resume:
            self.first_go()
        else:
            self._post()
        while self.on_control(self._next_control()):
            pass

    def work_queued(self) -> bool:
        """Simulator: carry out the controls waiting for this worker; whether there were any."""
        done = False
        while not self.left and self.fabric.has(self.p.leader, self.rank, TAG_CONTROL):
            self.on_control(self._next_control())
            done = True
        return done
