"""The asynchronous step: the server follows arrivals instead of a lockstep.

``--consistency ssp|async`` and ``--backup-workers B`` run the same pieces as the synchronous
step (:class:`~dist_quant.ps.worker.Worker`, :class:`~dist_quant.ps.shard.ShardServer`,
the leader's evaluation and records, placed by the same
:class:`~dist_quant.ps.placement.Placement` on the star or on dedicated shard servers) in
another order: the leader takes one arrival at a time and its policy
(:mod:`dist_quant.ps.consistency`) decides which gradients form an update and which workers
go on. Colocated servers and the DDP baseline stay synchronous (refused at validation).

Roles.

- A worker loops: compute and encode its gradient (one payload per shard, sent to each
  server), send its telemetry (and, when asked, its BatchNorm statistics) to the leader, then
  wait for the leader's control: ``GO`` (with the downlink of every shard: the newest
  parameters, fp32 or the compressed change of its own replica), ``STATE`` (send its state
  for a checkpoint, wait again), ``LAST`` or ``ABORT``. The time from its send to its next
  ``GO`` is its waiting time.
- The leader (the server of shard 0) takes the next arrival (its shard-0 payload), asks the
  policy, and carries the decision out: an update (its own shard, and an ``UPDATE`` command
  to every other server, which applies the same workers' payloads of its shard in the same
  order), a dropped gradient (``DROP``: the payload is read and discarded everywhere), releases
  (``RELEASE`` to every server, each sending its shard's downlink; ``GO`` to the workers).
  Every shard therefore applies the same updates in the same order, and one record describes
  them all.
- An update is one ``DecoupledMomentumSGD`` step of each shard on its decoded rows (left-out
  bad rows as in the synchronous step, per shard and update): their mean (sync, backup
  workers) or their sum over W (ssp, async). Its learning rate is the schedule's at the step
  it counts towards.

Steps. Step ``t`` is complete once ``t W`` gradients have been applied (sync and backup
workers: once ``t`` updates have been made); then the leader writes the step line, evaluates
at evaluation steps, checkpoints, and stops at ``--steps`` or ``--stop-accuracy``. A step line
of an asynchronous run holds the means over the gradients applied in that step (loss,
compute, encode, decode, wait), the leader's own update and encode time, and the bytes that
crossed links since the previous line (uplink at arrival, downlink at release).

Records (``metrics.jsonl``, one ``update`` line per gradient that arrived)::

    {"kind": "update", "arrival": a, "worker": i, "worker_step": k, "read": v,
     "applied": u, "staleness": u - 1 - v, "step": t, "started_after": r, "dropped": null}

``arrival``: its place in the order the leader received gradients (0, 1, ...); ``worker_step``:
the worker's own count (its k-th gradient); ``read``: the version it was computed on;
``applied``: the version the update that applied it produced (null if ``dropped``:
``"late"`` for a backup worker's gradient that came after its step was made, ``"end"`` for one
still unapplied when the run ended); ``step``: the step it counts towards;
``started_after``: the arrival whose decision released the worker to compute it (-1: the
start), from which the bound of ``ssp`` can be checked. ``--simulate --replay RUN_DIR`` feeds
the ``arrival`` order back (:class:`~dist_quant.ps.consistency.Replay`) and ends with the
same parameters, bit for bit.

Checkpoints. At a checkpoint step the leader stops releasing, receives every gradient still
being computed (without processing it) and saves, besides every shard's and worker's state,
its own: the policy's state, the received but unprocessed arrivals (their payloads in each
shard's state, their telemetry in the leader's), the workers it decided to release, the
per-worker counters and the arrival order's state. A resumed run carries on from there: the
same decisions follow, so ``--resume`` and ``--max-restarts`` end where an uninterrupted run
with the same ``--checkpoint-every`` ends (the pause is part of both). At the end the leader
does the same, then records the unprocessed gradients as ``"end"`` and stops everyone.

Lost workers (``--consistency async --min-workers N``). The leader notices a lost worker when
the receive of its next gradient fails (its links closed, or ``--timeout`` passed); if at
least N workers remain it names the worker, stops waiting for it (``computing``) and sending
to it (the fabric forgets the sends posted to it), and queues the loss behind the arrivals
received before it, so that every other server drops the worker (``LOST``: the payloads it
sent after its last arrival at the leader are discarded) after the same updates, and every
worker left gets a ``RESHARD`` control naming it before its next ``GO``: it takes its share of
the lost worker's training examples (:meth:`~dist_quant.ps.worker.Worker.take_over`). The
loss is recorded (``{"kind": "lost", "worker": i, "after": arrivals received before it, "step": t,
"cause": ...}``) and :class:`~dist_quant.ps.consistency.Replay` gives it out after the same
number of arrivals; the simulator's virtual clock loses a worker that left
(``--inject-loss``) when its next gradient would have arrived. Checkpoints hold ``None`` for a
lost worker; a run resumed from one goes on without it.

Replicas. With a compressed downlink a server tracks, per shard, one replica per group of
workers that have read exactly the same downlinks (one group while every worker is released
together, as in the synchronous step; a group splits when only part of it is released), and
sends a group ``C(theta - r)`` once, with the shard's one generator.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import Counter, defaultdict, deque
from typing import Any

import torch

from dist_quant.config import TrainConfig
from dist_quant.core.transport import ABORT, CONTINUE, LAST, PeerLostError
from dist_quant.ps.consistency import Policy, Replay, VirtualClock, policy_of, recorded_order
from dist_quant.ps.exchange import STATUS, RankRoles
from dist_quant.ps.fabric import (
    TAG_COMMAND,
    TAG_CONTROL,
    TAG_DOWN,
    TAG_STATS,
    TAG_STATUS,
    TAG_TELEMETRY,
    TAG_THETA,
    TAG_UP,
    LocalFabric,
    RemoteFabric,
)
from dist_quant.ps.placement import Placement
from dist_quant.ps.schedule import is_checkpoint_step, is_eval_step
from dist_quant.ps.server import STUCK_STEPS, evaluate_model
from dist_quant.ps.task import Task
from dist_quant.ps.worker import TELEMETRY, RunAborted, WorkerLeaves, replica_of

GO, STATE, RESHARD = CONTINUE, 3, 4   # controls besides LAST and ABORT
CONTROL = 2                        # int64: code, send BatchNorm statistics (0/1)
UPDATE, DROP, RELEASE, EVAL, SAVE, STOP, HALT, LOST = range(8)  # commands to other servers
HEAD = 4                           # a command: op, step, workers, staleness sum; the workers
TELEMETRY_ASYNC = (*TELEMETRY, "wait")


def wants_stats(cfg: TrainConfig, lockstep: bool, completed: int) -> bool:
    """Whether a worker released after ``completed`` steps sends its BatchNorm statistics with
    its next gradient: when that gradient counts towards an evaluation step (lockstep), or may
    (else: the next two steps), so that an evaluation finds recent statistics of every worker
    that has sent since."""
    t = completed + 1
    return is_eval_step(cfg, t) or (not lockstep and is_eval_step(cfg, t + 1))


class EventRank(RankRoles):
    """The pieces one rank holds, in the asynchronous step (module docstring)."""

    def __init__(self, cfg: TrainConfig, placement: Placement, rank: int, task: Task,
                 device: torch.device, fabric: Any):
        super().__init__(cfg, placement, rank, task, device, fabric)
        self.policy: Policy = policy_of(cfg)
        self.W = cfg.workers
        self.pump = lambda: None      # the simulator lets the other ranks act (distributed: no)
        self.encode_s = 0.0           # this server's downlink encodes since its last report
        # a distributed rank posts its receives before the message can come: every message of
        # an arrival's cycle then flows as soon as it is sent, without a round trip (gloo
        # sends once the receiver has posted; under CPU load each round trip costs a wake-up)
        self.early = isinstance(fabric, RemoteFabric)
        if self.worker is not None:
            self.left = False             # --inject-loss, or dropped before a resumed checkpoint
            self.leave_at = cfg.lost_at   # (worker, gradient) of --inject-loss, or None
            self.t_sent: float | None = None
            self.next_control: Any = None
            self.next_down: list | None = None
        if self.shard is not None:
            # per worker, in order: payloads here but not applied; receives posted for more
            self.inbox: defaultdict[int, deque[torch.Tensor]] = defaultdict(deque)
            self.posted: defaultdict[int, deque[Any]] = defaultdict(deque)
            self.groups = None if cfg.downlink == "none" else [
                (list(range(self.W)), self.shard.replica)]
        if self.is_leader:
            self._init_leader()

    def _init_leader(self) -> None:
        W = self.W
        self.arrivals: Any = None     # the arrival order (set by the driver)
        self.version = self.applied = self.completed = self.received = 0
        self.read = [0] * W           # the version each worker's current gradient reads
        self.flags = [False] * W      # whether its next gradient brings BN statistics
        self.started_after = [-1] * W
        self.worker_steps = [0] * W
        self.computing: set[int] = set()
        self.queue: deque[dict] = deque()   # received, not processed
        # processed, not applied (the policy's pending), per worker in its order
        self.held: defaultdict[int, deque[dict]] = defaultdict(deque)
        self.to_release: list[int] = []
        self.last_stats = torch.zeros(W, self.n_stats, dtype=torch.float32, device=self.device)
        if self.n_stats:
            self.last_stats[:] = self.worker_stats_at_start()
        self.applied_by, self.dropped_by = [0] * W, [0] * W
        self.wait_by = [0.0] * W
        self.staleness = Counter()
        self.stats_bytes = self.released_total = 0
        self.current = -1             # the arrival whose decision is being carried out
        self.resumed_order: dict[str, Any] = {}
        self.finished = False
        self.gone: set[int] = set()   # workers noticed lost (--min-workers)
        self.lost: list[dict] = []    # their records, once processed, in order
        self._new_window()

    def worker_stats_at_start(self) -> torch.Tensor:
        from dist_quant.ps import common

        return common.bn_stats(self.model).to(self.device)

    def _new_window(self) -> None:
        self.win_tel: list[torch.Tensor] = []
        self.win_up = [0] * self.p.num_shards
        self.win_down = [0] * self.p.num_shards
        self.win_stats = 0
        self.win_updates = 0
        self.win_status: list[torch.Tensor] = []   # the leader's own shard, per update
        self.win_t0 = time.perf_counter()
        self.win_eval = 0.0

    def _where(self) -> str:
        one = self.p.num_shards == 1
        return f"step {self.step}" + ("" if one else f": shard {self.shard.index}")

    # ---- workers ------------------------------------------------------------------------
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

        def ship(s: int, payload: torch.Tensor) -> None:
            self.fabric.send(self.rank, self.p.server_ranks[s], TAG_UP, payload,
                             "gradient payload")

        _, telemetry = self.worker.step_up(ship)
        tel = torch.cat([telemetry, torch.tensor([wait], dtype=torch.float64,
                                                 device=self.device)])
        self.fabric.send(self.rank, self.p.leader, TAG_TELEMETRY, tel, "telemetry")
        if stats and self.n_stats:
            self.fabric.send(self.rank, self.p.leader, TAG_STATS, self.worker.bn_stats(),
                             "BatchNorm statistics")
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
            w._apply_pending()
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

    # ---- servers --------------------------------------------------------------------------
    def take(self, worker: int) -> torch.Tensor:
        """Worker ``worker``'s next payload of this shard (received now unless it is here)."""
        if self.inbox[worker]:
            return self.inbox[worker].popleft()
        if self.posted[worker]:
            return self.posted[worker].popleft()()
        return self.fabric.recv(self.p.worker_ranks[worker], self.rank, TAG_UP,
                                "gradient payload", self.shard.up_nbytes(), torch.uint8)

    def apply(self, workers: list[int], step: int, late: int = 0) -> torch.Tensor:
        """One update of this shard with the payloads of ``workers``; its status (``STATUS``).
        ``late``: the staleness of the update's gradients, summed (``--staleness-lr``)."""
        sh = self.shard
        self.step = step
        rows = torch.stack([self.take(i) for i in workers])
        t1 = time.perf_counter()
        g, bad = sh.aggregate(rows)
        if g is not None and not self.policy.mean:   # each gradient counts 1/W
            good = len(workers) - len(bad)
            if good != self.W:
                g.mul_(good / self.W)
        if g is not None and self.cfg.staleness_lr and late > len(workers):
            g.mul_(len(workers) / late)   # lr / staleness, the mean staleness of the group
        t2 = time.perf_counter()
        sh.update(g, at_step=step)
        t3 = time.perf_counter()
        abort = bool(bad) and self.cfg.on_nonfinite == "abort"
        if bad:
            self._report_bad(bad, abort)
        self.abort_reason = f"{self._where()}: {'; '.join(bad)} (--on-nonfinite abort)" \
            if abort else ""
        status = torch.zeros(len(STATUS), dtype=torch.float64)
        status[:5] = torch.tensor([float(len(bad)), float(g is None), float(abort), t2 - t1,
                                   t3 - t2], dtype=torch.float64)
        return status

    def _split(self, released: list[int]) -> list[tuple[list[int], torch.Tensor]]:
        """The replica groups to send to (module docstring), splitting those only partly
        released; in the order of their first worker."""
        out, groups = [], []
        for members, replica in self.groups:
            sel = [i for i in members if i in released]
            rest = [i for i in members if i not in released]
            if not sel:
                groups.append((members, replica))
                continue
            if rest:
                groups.append((rest, replica))
                replica = replica.clone()
            groups.append((sel, replica))
            out.append((sel, replica))
        self.groups = sorted(groups, key=lambda g: g[0][0])
        return out

    def release(self, workers: list[int]) -> None:
        """Send this shard's downlink to ``workers``."""
        t0 = time.perf_counter()
        sends = ([(workers, self.shard.downlink().clone())] if self.groups is None else
                 [(sel, self.shard.downlink(replica)) for sel, replica in self._split(workers)])
        self.encode_s += time.perf_counter() - t0
        for sel, payload in sends:
            for i in sel:
                self.fabric.send(self.rank, self.p.worker_ranks[i], TAG_DOWN, payload,
                                 "parameters payload")
        if not self.is_leader:
            self.post_payloads(workers)

    def post_payloads(self, workers: list[int]) -> None:
        """Distributed, a server but the leader: post the receives of ``workers``' next
        payloads (the leader's arrive through :class:`NetworkArrivals`)."""
        if self.early:
            for i in workers:
                self.posted[i].append(self.fabric.recv_later(
                    self.p.worker_ranks[i], self.rank, TAG_UP, "gradient payload",
                    self.shard.up_nbytes(), torch.uint8))

    def take_in(self) -> None:
        """A pause (every worker has sent its last gradient): every payload on its way to
        this shard into the inbox, so that a checkpoint holds it."""
        for i in range(self.W):
            while self.posted[i]:
                self.inbox[i].append(self.posted[i].popleft()())
            if isinstance(self.fabric, LocalFabric) and not self.early:
                r = self.p.worker_ranks[i]
                while self.fabric.has(r, self.rank, TAG_UP):
                    self.inbox[i].append(self.fabric.recv(r, self.rank, TAG_UP,
                                                          "gradient payload"))

    def execute(self, command: torch.Tensor) -> bool:
        """Carry out one command of the leader (a server other than the leader's); False once
        the run has ended."""
        op, step, n, late = (int(v) for v in command[:HEAD])
        workers = [int(i) for i in command[HEAD:HEAD + n]]
        if op == UPDATE:
            status = self.apply(workers, step, late)
            status[5] = self.encode_s
            self.encode_s = 0.0
            self.fabric.send(self.rank, self.p.leader, TAG_STATUS, status, "server status")
        elif op == DROP:
            for i in workers:
                self.take(i)
        elif op == RELEASE:
            self.release(workers)
        elif op == EVAL:
            self.fabric.send(self.rank, self.p.leader, TAG_THETA, self.shard.theta.clone(),
                             "parameters for evaluation")
        elif op == SAVE:
            self.take_in()
            self.fabric.send_blob(self.rank, self.p.leader, self.own_state(), "rank state")
        elif op == HALT:
            raise RunAborted("the leader ended the run (see its message)")
        elif op == LOST:
            self.forget(workers[0])
        else:
            self.fabric.flush()
            return False
        self.fabric.reap()
        return True

    def forget(self, worker: int) -> None:
        """A server: worker ``worker`` was dropped: nothing more is taken from it or sent to it
        (the payloads it sent after its last arrival at the leader are discarded)."""
        self.inbox.pop(worker, None)
        self.posted.pop(worker, None)
        self.fabric.forget(self.p.worker_ranks[worker])

    def _next_command(self) -> torch.Tensor:
        return self.fabric.recv(self.p.leader, self.rank, TAG_COMMAND, "command", HEAD + self.W,
                                torch.int64)

    def serve_all(self) -> None:
        """A server rank's whole run (distributed), but the leader's."""
        if not self.cfg.resume:
            self.post_payloads(list(range(self.W)))
        while self.execute(self._next_command()):
            pass

    def serve_queued(self) -> bool:
        done = False
        while self.fabric.has(self.p.leader, self.rank, TAG_COMMAND):
            self.execute(self._next_command())
            done = True
        return done

    # ---- the leader: arrivals -----------------------------------------------------------
    def command(self, op: int, workers: list[int] = (), step: int = 0, late: int = 0) -> None:
        """Send a command to every other server."""
        cmd = torch.full((HEAD + self.W,), -1, dtype=torch.int64)
        cmd[:HEAD] = torch.tensor([op, step, len(workers), late])
        if workers:
            cmd[HEAD:HEAD + len(workers)] = torch.tensor(workers)
        for r in self.p.server_ranks[1:]:
            self.fabric.send(self.rank, r, TAG_COMMAND, cmd, "command")

    def send_control(self, worker: int, code: int, stats: bool | int = False) -> None:
        self.fabric.send(self.rank, self.p.worker_ranks[worker], TAG_CONTROL,
                         torch.tensor([code, int(stats)], dtype=torch.int64), "control")

    def receive(self) -> None:
        """The next arrival (whichever worker it is), queued for processing; or a lost
        worker, noticed (:meth:`notice`)."""
        try:
            i, payload, tel, stats = self.arrivals.next()
        except PeerLostError as err:
            self.notice(err)
            return
        r = self.p.worker_ranks[i]
        if payload is None:   # the simulator: read from the in-memory fabric
            payload = self.fabric.recv(r, self.rank, TAG_UP, "gradient payload",
                                       self.shard.up_nbytes(), torch.uint8)
            tel = self.fabric.recv(r, self.rank, TAG_TELEMETRY, "telemetry",
                                   len(TELEMETRY_ASYNC), torch.float64)
            if self.flags[i] and self.n_stats:
                stats = self.fabric.recv(r, self.rank, TAG_STATS, "BatchNorm statistics",
                                         self.n_stats, torch.float32)
        self.inbox[i].append(payload)
        tel = tel.cpu()
        if stats is not None:
            self.last_stats[i] = stats
            self.win_stats += 4 * self.n_stats
            self.stats_bytes += 4 * self.n_stats
        self.computing.discard(i)
        self.worker_steps[i] += 1
        for s, (lo, hi) in enumerate(self.p.bounds):
            self.win_up[s] += self.shard.up.payload_nbytes(hi - lo)
        self.queue.append({"arrival": self.received, "worker": i,
                           "worker_step": self.worker_steps[i], "read": self.read[i],
                           "started_after": self.started_after[i], "telemetry": tel})
        self.received += 1

    def notice(self, err: PeerLostError) -> None:
        """A worker is lost (its links closed, or it did not answer within ``--timeout``).
        Under ``--consistency async`` with ``--min-workers`` allowing it, it is dropped: it is
        named at once, no longer waited for or sent to, and queued so that the other servers
        drop it after the arrivals received before it (:meth:`drop_worker`); the run goes on
        with the others (a step is still ``W`` gradients, now from fewer workers). Otherwise
        the run ends, naming it."""
        ranks = list(self.p.worker_ranks)
        alive = self.W - len(self.gone) - 1
        if err.rank not in ranks or alive < self.cfg.min_alive:
            raise err
        i = ranks.index(err.rank)
        self.gone.add(i)
        self.computing.discard(i)
        self.fabric.forget(err.rank)
        print(f"dist_quant: {err}; dropped at step {self.completed + 1}, going on with "
              f"{alive} of {self.W} workers (--min-workers {self.cfg.min_alive})",
              file=sys.stderr, flush=True)
        self.queue.append({"lost": i, "after": self.received, "cause": str(err)})

    def drop_worker(self, info: dict) -> None:
        """A lost worker's turn in the queue: the other servers drop it too; recorded."""
        i = info["lost"]
        self.command(LOST, [i])
        for k in range(self.W):   # the others share its examples (Worker.take_over)
            if k not in self.gone:
                self.send_control(k, RESHARD, i)
        rec = {"worker": i, "after": info["after"], "step": self.completed + 1,
               "cause": info["cause"]}
        self.lost.append(rec)
        self.recorder.lost(rec)

    def process(self, info: dict) -> None:
        """One arrival through the policy, and what it decides."""
        if "lost" in info:
            self.drop_worker(info)
            return
        i = info["worker"]
        self.current = info["arrival"]
        self.wait_by[i] += float(info["telemetry"][-1])
        decision = self.policy.arrive(i, info["read"], self.version)
        if decision.dropped:
            self.drop(info, "late")
        else:
            self.held[i].append(info)
        self.to_release = list(decision.release)
        if decision.update:
            self.update(decision.update)
        if not self.finished:
            self.release_now()

    def drop(self, info: dict, why: str) -> None:
        i = info["worker"]
        self.dropped_by[i] += 1
        if why == "late":
            self.command(DROP, [i])
            self.take(i)
        step = self.completed + 1
        self.recorder.update({**self._line(info, step), "applied": None, "staleness": None,
                              "dropped": why})

    def _line(self, info: dict, step: int) -> dict:
        return {k: info[k] for k in ("arrival", "worker", "worker_step", "read",
                                     "started_after")} | {"step": step}

    def release_now(self) -> None:
        """Release the workers the last decision let go (every shard sends its downlink)."""
        workers, self.to_release = self.to_release, []
        if not workers:
            return
        self.command(RELEASE, workers)
        self.release(workers)
        stats = wants_stats(self.cfg, self.policy.lockstep, self.completed)
        for s, (lo, hi) in enumerate(self.p.bounds):
            self.win_down[s] += len(workers) * self.shard.down.payload_nbytes(hi - lo)
        self.released_total += len(workers)
        for i in workers:
            self.read[i] = self.version
            self.flags[i] = stats
            self.started_after[i] = self.current
            self.computing.add(i)
            # its link closed: the receive posted for it next reports the loss
            with contextlib.suppress(PeerLostError):
                self.send_control(i, GO, stats)
        self.arrivals.released(workers)
        self.fabric.reap()

    def update(self, group: list[int]) -> None:
        """One update made of ``group``'s held gradients, on every shard."""
        step = self.completed + 1
        infos = [self.held[i].popleft() for i in group]   # a worker's in its order
        late = sum(max(1, self.version - info["read"]) for info in infos)
        self.command(UPDATE, group, step, late)
        status = self.apply(group, step, late)
        status[5] = self.encode_s
        self.encode_s = 0.0
        self.win_status.append(status)
        self.win_updates += 1
        self.version += 1
        self.applied += len(group)
        for i, info in zip(group, infos, strict=True):
            late = self.version - 1 - info["read"]
            self.staleness[late] += 1
            self.applied_by[i] += 1
            self.win_tel.append(info["telemetry"])
            self.recorder.update({**self._line(info, step), "applied": self.version,
                                  "staleness": late, "dropped": None})
        if self.applied >= (self.completed + 1) * self.W or self.policy.lockstep:
            self.complete_step()

    # ---- the leader: steps --------------------------------------------------------------
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
            te = time.perf_counter()
            self.evaluate()
            self.evals += 1
            last = last or 0 < self.cfg.stop_accuracy <= self.test_acc
            self.win_eval = time.perf_counter() - te
        if reason:
            self.abort(reason)
        self._record(t, loss, tel, statuses)
        if last:
            self.finish()
        elif is_checkpoint_step(self.cfg, t, last=False):
            self.pause()
            self.save()

    def _check(self, statuses: list[torch.Tensor], t: int) -> str:
        for s, st in enumerate(statuses):
            for row in st:
                self.stuck[s] = self.stuck[s] + 1 if row[1] else 0
                if max(self.stuck) >= STUCK_STEPS:
                    which = "" if self.p.num_shards == 1 else f" for shard {s}"
                    return (f"no valid payload{which} for {self.stuck[s]} consecutive updates "
                            f"(up to step {t}): training diverged; lower --lr")
            if st[:, 2].any():
                return self.abort_reason or f"step {t}: a payload was refused " \
                    "(--on-nonfinite abort)"
        return ""

    def _record(self, t: int, loss: float, tel: torch.Tensor,
                statuses: list[torch.Tensor]) -> None:
        mean = tel.mean(0).tolist()    # loss, decode, compute, encode, overlap, down, wait
        own = statuses[0].sum(0).tolist()
        times = {"compute": mean[2], "encode": mean[3] + own[5], "decode": mean[1] + own[3],
                 "update": own[4]}
        wall = time.perf_counter() - self.win_t0 - self.win_eval
        times["communicate"] = max(0.0, wall - sum(times.values()))
        skipped = [int(st[:, 0].sum()) for st in statuses]
        rec = self.recorder.step(
            t, loss, sum(self.win_up) + self.win_stats, sum(self.win_down), times,
            skipped=sum(skipped),
            extra={"servers": [{"bytes_up": u, "bytes_down": d, "skipped": k} for u, d, k in
                               zip(self.win_up, self.win_down, skipped, strict=True)],
                   "bytes_stats": self.win_stats, "time_overlap": 0.0,
                   "time_overlap_down": 0.0, "time_wait": mean[6],
                   "updates": self.win_updates, "gradients": len(self.win_tel)})
        if is_eval_step(self.cfg, t):
            self.recorder.eval(t, self.test_loss, self.test_acc)
        self.progress.update(t, rec["loss"], self.test_acc, self.recorder.cum_up,
                             self.recorder.cum_down)
        self._new_window()

    def evaluate(self) -> None:
        self.command(EVAL)
        self.pump()
        for s, (lo, hi) in enumerate(self.p.bounds):
            if s == 0:
                self.theta[lo:hi].copy_(self.shard.theta)
            else:
                self.fabric.recv(self.p.server_ranks[s], self.rank, TAG_THETA,
                                 "parameters for evaluation", hi - lo, torch.float32,
                                 out=self.theta[lo:hi])
        self.test_loss, self.test_acc = evaluate_model(
            self.model, self.x_test, self.y_test,
            self.alive_stats() if self.n_stats else None, self.task.loss_fn,
            self.task.metric)

    def alive_stats(self) -> torch.Tensor:
        """The mean of the newest BatchNorm statistics of the workers not dropped."""
        alive = [i for i in range(self.W) if i not in self.gone]
        return self.last_stats[alive].mean(0)

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
        self.save()
        step = self.completed + 1
        for info in [*(d for held in self.held.values() for d in held), *self.queue]:
            if "lost" in info:
                self.drop_worker(info)
                continue
            self.dropped_by[info["worker"]] += 1
            self.recorder.update({**self._line(info, step), "applied": None,
                                  "staleness": None, "dropped": "end"})
        self.command(STOP)
        for i in range(self.W):
            if i not in self.gone:
                self.send_control(i, LAST)
        self.fabric.flush()
        self.finished = True

    # ---- the leader: the run --------------------------------------------------------------
    def lead(self) -> dict[str, Any] | None:
        """The leader's whole run: take arrivals until the last step; return the summary."""
        if not self.cfg.resume:
            everyone = list(range(self.W))
            stats = wants_stats(self.cfg, self.policy.lockstep, 0)
            self.flags = [stats] * self.W
            self.computing = set(everyone)
            self.arrivals.released(everyone)
        while not self.finished:
            self.pump()
            if self.to_release:
                self.release_now()
            elif self.queue:
                self.process(self.queue.popleft())
            else:
                self.receive()
        return self.close_records()

    def close_records(self) -> dict[str, Any] | None:
        from dist_quant.compress import get_compressor

        fp32 = get_compressor("none")
        per = sum(fp32.payload_nbytes(hi - lo) for lo, hi in self.p.bounds)
        seen = sum(self.staleness.values())
        mean = sum(k * v for k, v in self.staleness.items()) / seen if seen else 0.0
        return super().close_records(
            fp32_bytes_up=self.received * per + self.stats_bytes,
            fp32_bytes_down=self.released_total * per,
            consistency=self.cfg.consistency, staleness_bound=self.policy_bound(),
            backup_workers=self.cfg.backup_workers, updates=self.version,
            gradients=self.received, applied_per_worker=list(self.applied_by),
            dropped_per_worker=list(self.dropped_by),
            wait_seconds_per_worker=[round(w, 6) for w in self.wait_by],
            staleness_mean=mean, lost_workers=list(self.lost),
            workers_at_end=self.W - len(self.gone),
            staleness_histogram={str(k): v for k, v in sorted(self.staleness.items())})

    def policy_bound(self) -> int | None:
        return self.cfg.staleness if self.cfg.consistency == "ssp" else (
            0 if self.cfg.consistency == "sync" else None)

    # ---- checkpoints and resume ---------------------------------------------------------
    def own_state(self) -> dict[str, Any]:
        state = super().own_state()
        if state["shard"] is not None:
            state["shard"]["inbox"] = {str(i): [p.to("cpu", copy=True) for p in box]
                                       for i, box in self.inbox.items() if box}
            state["shard"]["groups"] = None if self.groups is None else [
                {"workers": list(m), "replica": r.to("cpu", copy=True)} for m, r in self.groups]
            if self.groups is not None:  # "replica": worker 0's (a synchronous run's one)
                state["shard"]["replica"] = state["shard"]["groups"][0]["replica"]
        return state

    def leader_state(self) -> dict[str, Any]:
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

    def save(self) -> None:
        """Every rank's state and the leader's into one checkpoint (at a pause: nothing is
        being computed)."""
        if not is_checkpoint_step(self.cfg, self.completed, last=True):
            return
        from dist_quant.runtime.checkpoint import save_checkpoint

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
        shards = [states[p.server_ranks[s]]["shard"] for s in range(p.num_shards)]
        workers = [None if i in self.gone else states[p.worker_ranks[i]]["worker"]
                   for i in range(self.W)]
        for i, state in enumerate(workers):
            if state is None:
                continue
            mine = replica_of(self.model, state)
            for s, (lo, hi) in enumerate(p.bounds):
                groups = shards[s]["groups"]
                tracked = (shards[s]["theta"] if groups is None else
                           next(g["replica"] for g in groups if i in g["workers"]))
                if groups is not None and not torch.equal(mine[lo:hi], tracked):
                    raise RuntimeError(f"worker {i}'s replica differs from the tracked copy "
                                       f"of shard {s}")
        with torch.no_grad():
            self.theta.copy_(torch.cat([s["theta"] for s in shards]).to(self.device))
        model = {k: v.to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        save_checkpoint(self.cfg.run_dir, self.completed, {
            "format": 1, "step": self.completed, "config": self.cfg.to_dict(),
            "server": {"model": model, **shards[0]}, "shards": shards[1:], "workers": workers,
            "consistency": self.leader_state()}, keep=self.cfg.keep_checkpoints)

    def resume_send(self) -> None:
        super().resume_send()
        if self.cfg.resume and self.is_leader:
            from dist_quant.runtime.checkpoint import load_for_resume

            state = load_for_resume(self.cfg)
            if "consistency" not in state:
                from dist_quant.errors import ConfigError

                raise ConfigError("--resume", "the checkpoint was written by a synchronous run "
                                  "(no arrival state); resume it with --consistency sync")
            self.resumed_leader = state["consistency"]

    def resume_recv(self) -> None:
        if not self.cfg.resume:
            return
        mine = self.resumed if self.is_leader else self.fabric.recv_blob(
            self.p.leader, self.rank, "resume state")
        if self.worker is not None:
            if mine["worker"] is None:
                self.left = True
            else:
                self.worker.load_state_dict(mine["worker"])
        if self.shard is not None:
            state = mine["shard"]
            self.shard.load_state_dict(state)
            for i, box in state["inbox"].items():
                self.inbox[int(i)] = deque(p.to(self.device) for p in box)
            if self.groups is not None:
                self.groups = [(list(g["workers"]), g["replica"].to(self.device))
                               for g in state["groups"]]
        if self.is_leader:
            self._load_leader(self.resumed_leader)

    def _load_leader(self, st: dict[str, Any]) -> None:
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


# ---- arrival orders of the two drivers --------------------------------------------------
class SimulatedArrivals:
    """The simulator's arrivals: the order of a :class:`VirtualClock` or a :class:`Replay`;
    the payload is then read from the in-memory fabric."""

    def __init__(self, order: VirtualClock | Replay, placement: Placement,
                 left: Any = lambda i: False):
        self.order, self.p, self.left = order, placement, left

    def released(self, workers: list[int]) -> None:
        self.order.released(workers)

    def next(self) -> tuple[int, None, None, None]:
        """The next arrival; a worker that left (``--inject-loss``) is lost at the moment
        its next gradient would have arrived, one the record lost where the record lost it."""
        lost = self.order.loss() if isinstance(self.order, Replay) else None
        if lost is None:
            worker = self.order.next()
            if not self.left(worker):
                return worker, None, None, None
            lost = worker
        rank = self.p.worker_ranks[lost]
        raise PeerLostError(f"lost contact with {self.p.describe(rank)} while waiting for its "
                            "gradient (it left the run)", rank)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": type(self.order).__name__, **self.order.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") == type(self.order).__name__:
            self.order.load_state_dict(state)


class NetworkArrivals:
    """A distributed leader's arrivals: a receive of shard 0's payload is posted from every
    worker that computes, each waited for by a thread; whichever completes first is the next
    arrival. (One receive from any source would be bound to the first sender to announce its
    message, and a worker on a slow link would hold up every other worker behind it.)"""

    def __init__(self, roles: EventRank):
        import queue

        self.r = roles
        self.done: queue.Queue = queue.Queue()
        self.buffers: dict[int, list[torch.Tensor]] = {}

    def released(self, workers: list[int]) -> None:
        import threading

        r = self.r
        for i in workers:
            src = r.p.worker_ranks[i]
            bufs = [torch.empty(r.shard.up_nbytes(), dtype=torch.uint8, device=r.device),
                    torch.empty(len(TELEMETRY_ASYNC), dtype=torch.float64, device=r.device)]
            tags = [TAG_UP, TAG_TELEMETRY]
            if r.flags[i] and r.n_stats:
                bufs.append(torch.empty(r.n_stats, dtype=torch.float32, device=r.device))
                tags.append(TAG_STATS)
            self.buffers[i] = bufs
            try:
                works = [r.fabric._irecv(b, src, t) for b, t in zip(bufs, tags, strict=True)]
            except PeerLostError as err:   # its link closed already: the next arrival
                self.done.put((i, err))
                continue
            threading.Thread(target=self._wait, args=(i, works), daemon=True,
                             name=f"dist_quant-arrival-{i}").start()

    def _wait(self, worker: int, works: list[Any]) -> None:
        import datetime

        try:
            for work in works:
                work.wait(timeout=datetime.timedelta(seconds=self.r.cfg.timeout))
        except RuntimeError as err:
            self.done.put((worker, err))
            return
        self.done.put((worker, None))

    def next(self) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        from dist_quant.core.transport import PeerLostError, _cause

        worker, err = self.done.get()
        if isinstance(err, PeerLostError):
            raise err
        if err is not None:
            lost = self.r.p.worker_ranks[worker]
            raise PeerLostError(f"lost contact with {self.r.p.describe(lost)} while waiting for "
                                f"its gradient ({_cause(err)})", lost) from err
        bufs = self.buffers.pop(worker)
        return worker, bufs[0], bufs[1], bufs[2] if len(bufs) > 2 else None


# ---- drivers ------------------------------------------------------------------------------
def run_events_all(cfg: TrainConfig, placement: Placement, task: Task, device: torch.device,
                   ) -> dict[str, Any]:
    """Every rank in this process (``--simulate``); the arrival order from ``--replay`` or the
    virtual clock of ``--slow-worker``; returns the summary."""
    fabric = LocalFabric(placement)
    order = [r for r in placement.ranks if r != placement.leader] + [placement.leader]
    ranks = [EventRank(cfg, placement, r, task, device, fabric) for r in order]
    leader, others = ranks[-1], ranks[:-1]
    if cfg.replay:
        order, losses = recorded_order(cfg)
        source = Replay(order, f"the record of {cfg.replay}", losses)
    else:
        source = VirtualClock(cfg.workers, cfg.slow_factors)
    by_worker = {r.p.worker_of(r.rank): r for r in ranks if r.worker is not None}
    leader.arrivals = SimulatedArrivals(source, placement, lambda i: by_worker[i].left)
    leader.resume_send()
    for r in ranks:
        r.resume_recv()
    for r in ranks:
        r.open_records(sequential=True)
    if cfg.resume:
        leader.arrivals.load_state_dict(leader.resumed_order)
        if isinstance(source, Replay):
            source.position = leader.received

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
        return leader.lead()
    finally:
        leader.progress.close()


def run_event_rank(cfg: TrainConfig, placement: Placement, rank: int, task: Task,
                   device: torch.device, fabric: Any) -> dict[str, Any] | None:
    """This process's rank of a distributed asynchronous job; the leader returns the summary."""
    r = EventRank(cfg, placement, rank, task, device, fabric)
    r.resume_send()
    r.resume_recv()
    r.open_records(sequential=False)
    if r.is_leader:
        r.arrivals = NetworkArrivals(r)
        try:
            return r.lead()
        finally:
            r.progress.close()
    if r.shard is not None:
        r.serve_all()
    else:
        r.work()
    return None
