"""The asynchronous leader's steps: when one is complete, record, evaluate, checkpoint, stop.

Steps. Step ``t`` is complete once ``t W`` gradients have been applied (sync and backup
workers: once ``t`` updates have been made); then the leader writes the step line, evaluates
at evaluation steps (every shard's parameters, with the mean of the newest BatchNorm
statistics of the workers not dropped), checkpoints, and stops at ``--steps`` or
``--stop-accuracy``. A step line holds the means over the gradients applied in that step
(loss, compute, encode, decode, wait), the leader's own update and encode time, and the bytes
that crossed links since the previous line (uplink at arrival, downlink at release). Its
``cpu`` holds the same phases in thread CPU time (:mod:`dist_quant.runtime.phasetime`): the
means of the gradients' worker figures plus the leader's own server's, and for
``communicate`` the CPU of the leader's thread in the step outside every phase measured on it
(simulated, every role's). The evaluation's own wall and CPU time go on its eval line.

Checkpoints. At a checkpoint step the leader stops releasing, receives every gradient still
being computed (without processing it) and saves, besides every shard's and worker's state
(:mod:`dist_quant.ps.state`'s format 1), its own under ``"consistency"``
(:meth:`AsyncSteps.leader_state`): the policy's state, the received but unprocessed arrivals
(their payloads in each shard's ``inbox``, their telemetry in the leader's), the workers it
decided to release, the per-worker counters and the arrival order's state. A resumed run
carries on from there: the same decisions follow, so ``--resume`` and ``--max-restarts`` end
where an uninterrupted run with the same ``--checkpoint-every`` ends (the pause is part of
both). At the end the leader does the same, then records the unprocessed gradients as
``"end"`` and stops everyone. Checkpoints hold ``None`` for a lost worker; a run resumed from
one goes on without it.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

import torch

from dist_quant.config import stop_reached
from dist_quant.ps.fabric import TAG_STATUS, TAG_THETA
from dist_quant.ps.protocol import (
    ABORT,
    EVAL,
    HALT,
    LAST,
    SAVE,
    STATE,
    STATUS,
    STOP,
    TELEMETRY_ASYNC,
    cpu_phases,
    cpu_roles,
)
from dist_quant.ps.schedule import is_checkpoint_step, is_eval_step
from dist_quant.ps.server import STUCK_STEPS, evaluate_model
from dist_quant.ps.worker import RunAborted, replica_of
from dist_quant.runtime.phasetime import Window, now, since


class AsyncSteps:
    """The leader's steps in :class:`~dist_quant.ps.async_rank.AsyncRank` (a mixin over
    :class:`~dist_quant.ps.async_leader.AsyncLeader`'s counters). The window: what the step
    being made has gathered so far (telemetry of its applied gradients, bytes per shard, the
    leader's own update statuses)."""

    def new_window(self) -> None:
        self.win_tel: list[torch.Tensor] = []
        self.win_up = [0] * self.p.num_shards
        self.win_down = [0] * self.p.num_shards
        self.win_stats = 0
        self.win_updates = 0
        self.win_status: list[torch.Tensor] = []   # the leader's own shard, per update
        self.window = Window()
        self.win_eval = 0.0
        self.eval_spent = None   # the evaluation's own time (evaluate_model), at eval steps

    def complete_step(self) -> None:
        """Step ``completed + 1`` is made: record it, evaluate, checkpoint or stop."""
        self.completed += 1
        t = self.step = self.completed
        self.pump()
        statuses = [torch.stack(self.win_status)]
        for r in self.p.server_ranks[1:]:
            statuses.append(torch.stack([
                self.fabric.recv(r, self.rank, TAG_STATUS, "server status", len(STATUS),
                                 torch.float64).cpu() for _ in range(self.win_updates)]))
        reason = self._check(statuses, t)
        tel = torch.stack(self.win_tel) if self.win_tel else torch.zeros(
            1, len(TELEMETRY_ASYNC), dtype=torch.float64)
        loss = float(tel[:, 0].mean())
        if not reason:
            reason = self.monitor.observe(t, loss) or ""
        last = t == self.cfg.steps
        if is_eval_step(self.cfg, t) and not reason:
            te = now()
            self.evaluate_now()
            self.evals += 1
            last = last or stop_reached(self.cfg, self.test_loss, self.test_acc)
            self.win_eval = (now() - te).wall
        if reason:
            self.abort(reason)
        self._record(t, loss, tel, statuses)
        if last:
            self.finish()
        elif is_checkpoint_step(self.cfg, t, last=False):
            self.pause()
            self.checkpoint()

    def _check(self, statuses: list[torch.Tensor], t: int) -> str:
        """The reason to abort after the updates of step ``t`` (per shard, per update), if
        any."""
        for s, st in enumerate(statuses):
            for row in st:
                self.stuck[s] = self.stuck[s] + 1 if row[1] else 0
                if max(self.stuck) >= STUCK_STEPS:
                    return self.stuck_reason(s, t, "updates")
            if st[:, 2].any():
                return self.refused(t)
        return ""

    def _record(self, t: int, loss: float, tel: torch.Tensor,
                statuses: list[torch.Tensor]) -> None:
        mean = tel.mean(0).tolist()    # TELEMETRY_ASYNC: loss, decode, compute, encode, ...
        own = statuses[0].sum(0).tolist()
        times = {"compute": mean[2], "encode": mean[3] + own[5], "decode": mean[1] + own[3],
                 "update": own[4]}
        wall = self.window.elapsed().wall - self.win_eval
        times["communicate"] = max(0.0, wall - sum(times.values()))
        cpu = cpu_phases(mean, own, self.window.rest())
        skipped = [int(st[:, 0].sum()) for st in statuses]
        rec = self.recorder.step(
            t, loss, sum(self.win_up) + self.win_stats, sum(self.win_down), times,
            skipped=sum(skipped),
            extra={"servers": [{"bytes_up": u, "bytes_down": d, "skipped": k} for u, d, k in
                               zip(self.win_up, self.win_down, skipped, strict=True)],
                   "bytes_stats": self.win_stats, "time_overlap": 0.0,
                   "time_overlap_down": 0.0, "time_wait": mean[TELEMETRY_ASYNC.index("wait")],
                   "updates": self.win_updates, "gradients": len(self.win_tel),
                   "cpu_roles": cpu_roles(mean, own)}, cpu=cpu)
        if is_eval_step(self.cfg, t):
            self.recorder.eval(t, self.test_loss, self.test_acc, spent=self.eval_spent)
        self.progress.update(t, rec["loss"], self.test_acc, self.recorder.cum_up,
                             self.recorder.cum_down)
        self.new_window()

    def evaluate_now(self) -> None:
        """Gather every shard's parameters and evaluate them (module docstring)."""
        self.command(EVAL)
        self.pump()
        for s, (lo, hi) in enumerate(self.p.bounds):
            if s == 0:
                self.theta[lo:hi].copy_(self.shard.theta)
            else:
                self.fabric.recv(self.p.server_ranks[s], self.rank, TAG_THETA,
                                 "parameters for evaluation", hi - lo, torch.float32,
                                 out=self.theta[lo:hi])
        alive = [i for i in range(self.W) if i not in self.gone]
        t0 = now()
        self.test_loss, self.test_acc = evaluate_model(
            self.model, self.x_test, self.y_test,
            self.last_stats[alive].mean(0) if self.n_stats else None, self.task.loss_fn,
            self.task.metric)
        self.eval_spent = since(t0, charge_cpu=True)

    def abort(self, reason: str) -> None:
        self.command(HALT)
        for i in range(self.W):
            if i not in self.gone:
                self.send_control(i, ABORT)
        self.fabric.flush()
        raise RunAborted(reason)

    def pause(self) -> None:
        """Stop releasing and receive every gradient still being computed (not processed)."""
        while self.computing:
            self.receive()

    def finish(self) -> None:
        """The last step: pause, save, record what was never applied, stop everyone."""
        self.pause()
        self.checkpoint()
        for info in [*(d for held in self.held.values() for d in held), *self.queue]:
            if "lost" in info:
                self.drop_worker(info)
            else:
                self.drop_gradient(info, "end")
        self.command(STOP)
        for i in range(self.W):
            if i not in self.gone:
                self.send_control(i, LAST)
        self.fabric.flush()
        self.ended = True

    # ---- checkpoints ------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Every rank's state and the leader's into one checkpoint (at a pause: nothing is
        being computed)."""
        if not is_checkpoint_step(self.cfg, self.completed, last=True):
            return
        p = self.p
        self.command(SAVE)
        self.take_in()
        for i in range(self.W):
            if i not in self.gone:
                self.send_control(i, STATE)
        self.pump()
        gone = {p.worker_ranks[i] for i in self.gone}
        states = {r: self.fabric.recv_blob(r, self.rank, "rank state")
                  for r in p.ranks if r != self.rank and r not in gone}
        states[self.rank] = self.own_state()
        self.write_checkpoint(self.completed, states, {"consistency": self.leader_state()})

    def check_replicas(self, shards: list[dict], workers: list[dict | None]) -> None:
        """Every worker's replica equals the replica its group's server tracks, per shard."""
        for i, state in enumerate(workers):
            if state is None:
                continue
            mine = replica_of(self.model, state)
            for s, (lo, hi) in enumerate(self.p.bounds):
                groups = shards[s]["groups"]
                tracked = (shards[s]["theta"] if groups is None else
                           next(g["replica"] for g in groups if i in g["workers"]))
                if groups is not None and not torch.equal(mine[lo:hi], tracked):
                    raise RuntimeError(f"worker {i}'s replica differs from the tracked copy "
                                       f"of shard {s}")

    def leader_state(self) -> dict[str, Any]:
        """The leader's arrival state (module docstring), as the checkpoint holds it."""
        def info(d: dict) -> dict:
            return {**d, "telemetry": d["telemetry"].clone()} if "telemetry" in d else dict(d)

        order = self.arrivals.state_dict() if hasattr(self.arrivals, "state_dict") else {}
        return {"policy": self.policy.state_dict(), "version": self.version,
                "applied": self.applied, "completed": self.completed,
                "received": self.received, "read": list(self.read),
                "flags": [int(f) for f in self.flags], "started_after": list(self.started_after),
                "worker_steps": list(self.worker_steps),
                "queue": [info(d) for d in self.queue],
                "held": {str(i): [info(d) for d in held] for i, held in self.held.items()
                         if held},
                "to_release": list(self.to_release),
                "last_stats": self.last_stats.to("cpu", copy=True),
                "applied_by": list(self.applied_by), "dropped_by": list(self.dropped_by),
                "wait_by": list(self.wait_by),
                "staleness": {str(k): v for k, v in self.staleness.items()},
                "stuck": list(self.stuck), "order": order, "current": self.current,
                "stats_bytes": self.stats_bytes, "released": self.released_total,
                "window": {"up": list(self.win_up), "down": list(self.win_down),
                           "stats": self.win_stats},
                "gone": sorted(self.gone),
                "lost": [{k: v for k, v in d.items() if k != "cause"} for d in self.lost]}

    def load_leader(self, st: dict[str, Any]) -> None:
        self.policy.load_state_dict(st["policy"])
        for name in ("version", "applied", "completed", "received"):
            setattr(self, name, int(st[name]))
        self.step = self.completed
        self.read = [int(v) for v in st["read"]]
        self.flags = [bool(f) for f in st["flags"]]
        self.started_after = [int(v) for v in st["started_after"]]
        self.worker_steps = [int(v) for v in st["worker_steps"]]
        self.queue = deque(st["queue"])
        for i, held in st["held"].items():
            self.held[int(i)] = deque(held)
        self.to_release = [int(i) for i in st["to_release"]]
        self.last_stats.copy_(st["last_stats"])
        self.applied_by = [int(v) for v in st["applied_by"]]
        self.dropped_by = [int(v) for v in st["dropped_by"]]
        self.wait_by = [float(v) for v in st["wait_by"]]
        self.staleness = Counter({int(k): int(v) for k, v in st["staleness"].items()})
        self.stuck = [int(v) for v in st["stuck"]]
        self.resumed_order = st["order"]
        self.current = int(st["current"])
        self.stats_bytes = int(st["stats_bytes"])
        self.released_total = int(st["released"])
        self.gone = {int(i) for i in st.get("gone", [])}
        self.lost = list(st.get("lost", []))
        # the bytes of the arrivals received while pausing count towards the next step
        self.win_up = [int(b) for b in st["window"]["up"]]
        self.win_down = [int(b) for b in st["window"]["down"]]
        self.win_stats = int(st["window"]["stats"])
