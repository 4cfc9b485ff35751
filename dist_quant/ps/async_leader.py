"""The leader of the asynchronous step: one arrival at a time, through the policy.

The leader (the server of shard 0) takes the next arrival from its source
(:mod:`dist_quant.ps.arrivals`), asks the policy (:mod:`dist_quant.ps.consistency`), and
carries the decision out: an update (its own shard, and an ``UPDATE`` command to every other
server, which applies the same workers' payloads of its shard in the same order), a dropped
gradient (``DROP``: the payload is read and discarded everywhere), releases (``RELEASE`` to
every server, each sending its shard's downlink; ``GO`` to the workers). Every shard therefore
applies the same updates in the same order, and one record describes them all.

Records (``metrics.jsonl``, one ``update`` line per gradient that arrived)::

    {"kind": "update", "arrival": a, "worker": i, "worker_step": k, "read": v,
     "applied": u, "staleness": u - 1 - v, "step": t, "started_after": r, "dropped": null}

``arrival``: its place in the order the leader received gradients (0, 1, ...); ``worker_step``:
the worker's own count (its k-th gradient); ``read``: the version it was computed on;
``applied``: the version the update that applied it produced (null if ``dropped``:
``"late"`` for a backup worker's gradient that came after its step was made, ``"end"`` for one
still unapplied when the run ended); ``step``: the step it counts towards;
``started_after``: the arrival whose decision released the worker to compute it (-1: the
start), from which the bound of ``ssp`` can be checked. ``--clock dedicated`` adds
``model_time`` (when the leader took it, modelled) and ``model_wall`` (its worker's cycle
since its release): :mod:`dist_quant.runtime.arrivalclock`.

Lost workers (``--consistency async --min-workers N``): :meth:`AsyncLeader.notice`.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter, defaultdict, deque
from typing import Any

import torch

from dist_quant.core.transport import PeerLostError
from dist_quant.ps import common
from dist_quant.ps.fabric import TAG_COMMAND, TAG_CONTROL, TAG_STATS, TAG_TELEMETRY, TAG_UP
from dist_quant.ps.protocol import DROP, GO, HEAD, LOST, RELEASE, RESHARD, TELEMETRY_ASYNC, UPDATE
from dist_quant.ps.schedule import wants_stats


class AsyncLeader:
    """The leader's arrivals and decisions in :class:`~dist_quant.ps.async_rank.AsyncRank`
    (a mixin over its :class:`~dist_quant.ps.state.RankState`; the steps an update completes
    are :class:`~dist_quant.ps.async_record.AsyncSteps`).

    Its counters: ``version`` (updates made), ``applied`` (gradients applied), ``completed``
    (steps complete), ``received`` (arrivals); per worker, the version its current gradient
    reads (``read``), whether it brings BatchNorm statistics (``flags``), the arrival that
    released it (``started_after``), its gradients so far (``worker_steps``), and the totals
    the summary reports. Its queues: ``queue`` (received, not processed: arrivals and losses),
    ``held`` (processed, not applied: the policy's pending, per worker in its order),
    ``to_release`` (the workers the last decision lets go) and ``computing``."""

    def init_leader(self) -> None:
        W = self.W
        self.arrivals: Any = None     # the arrival source (set by the driver)
        self.version = self.applied = self.completed = self.received = 0
        self.read = [0] * W
        self.flags = [False] * W
        self.started_after = [-1] * W
        self.worker_steps = [0] * W
        self.computing: set[int] = set()
        self.queue: deque[dict] = deque()
        self.held: defaultdict[int, deque[dict]] = defaultdict(deque)
        self.to_release: list[int] = []
        self.last_stats = torch.zeros(W, self.n_stats, dtype=torch.float32, device=self.device)
        if self.n_stats:
            self.last_stats[:] = common.bn_stats(self.model).to(self.device)
        self.applied_by, self.dropped_by = [0] * W, [0] * W
        self.wait_by = [0.0] * W
        self.staleness = Counter()
        self.stats_bytes = self.released_total = 0
        self.current = -1             # the arrival whose decision is being carried out
        self.resumed_order: dict[str, Any] = {}
        self.ended = False
        self.gone: set[int] = set()   # workers noticed lost (--min-workers)
        self.lost: list[dict] = []    # their records, once processed, in order
        self.new_window()

    # ---- messages to the others -------------------------------------------------------------
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

    # ---- arrivals ---------------------------------------------------------------------------
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
                           "started_after": self.started_after[i], "telemetry": tel,
                           **self.arrivals.modelled()})
        self.received += 1

    def notice(self, err: PeerLostError) -> None:
        """A worker is lost (its links closed, or it did not answer within ``--timeout``).
        Under ``--consistency async`` with ``--min-workers`` allowing it, it is dropped: it is
        named at once, no longer waited for or sent to, and queued behind the arrivals
        received before it, so that the other servers drop it after the same updates
        (:meth:`drop_worker`); the run goes on with the others (a step is still ``W``
        gradients, now from fewer workers). Otherwise the run ends, naming it."""
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
        """A lost worker's turn in the queue: every other server drops it (``LOST``), every
        worker left gets ``RESHARD`` and takes its share of the lost worker's examples
        (:meth:`~dist_quant.ps.worker.Worker.take_over`); recorded as
        ``{"kind": "lost", "worker": i, "after": arrivals before it, "step": t, "cause"}``."""
        i = info["lost"]
        self.command(LOST, [i])
        for k in range(self.W):
            if k not in self.gone:
                self.send_control(k, RESHARD, i)
        rec = {"worker": i, "after": info["after"], "step": self.completed + 1,
               "cause": info["cause"]}
        self.lost.append(rec)
        self.recorder.lost(rec)

    # ---- decisions --------------------------------------------------------------------------
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
            self.drop_gradient(info, "late")
        else:
            self.held[i].append(info)
        self.to_release = list(decision.release)
        if decision.update:
            self.update(decision.update)
        if not self.ended:
            self.release()

    def drop_gradient(self, info: dict, why: str) -> None:
        """A gradient that is never applied (``why``: ``"late"`` or ``"end"``), recorded."""
        i = info["worker"]
        self.dropped_by[i] += 1
        if why == "late":
            self.command(DROP, [i])
            self.take(i)
            self.arrivals.dropped(i)
        self.recorder.update({**self.update_line(info, self.completed + 1), "applied": None,
                              "staleness": None, "dropped": why})

    def update_line(self, info: dict, step: int) -> dict:
        return {k: info[k] for k in ("arrival", "worker", "worker_step", "read",
                                     "started_after")} | {"step": step} | {
            k: info[k] for k in ("model_time", "model_wall") if k in info}

    def release(self) -> None:
        """Release the workers the last decision let go (every shard sends its downlink)."""
        workers, self.to_release = self.to_release, []
        if not workers:
            return
        self.command(RELEASE, workers)
        self.send_downlink(workers)
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
        self.win_status.append(self.apply_update(group, step, late))
        self.win_updates += 1
        self.version += 1
        self.applied += len(group)
        done = self.applied >= (self.completed + 1) * self.W or self.policy.lockstep
        self.arrivals.updated(group, step if done else 0)
        for i, info in zip(group, infos, strict=True):
            late = self.version - 1 - info["read"]
            self.staleness[late] += 1
            self.applied_by[i] += 1
            self.win_tel.append(info["telemetry"])
            self.recorder.update({**self.update_line(info, step), "applied": self.version,
                                  "staleness": late, "dropped": None})
        if done:
            self.complete_step()

    # ---- the run ----------------------------------------------------------------------------
    def run_leader(self) -> dict[str, Any] | None:
        """The leader's whole run: take arrivals until the last step; return the summary."""
        if not self.cfg.resume:
            everyone = list(range(self.W))
            stats = wants_stats(self.cfg, self.policy.lockstep, 0)
            self.flags = [stats] * self.W
            self.computing = set(everyone)
            self.arrivals.released(everyone)
        while not self.ended:
            self.pump()
            if self.to_release:
                self.release()
            elif self.queue:
                self.process(self.queue.popleft())
            else:
                self.receive()
        return self.close_records()
