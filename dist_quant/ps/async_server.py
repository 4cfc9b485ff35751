"""A shard's server in the asynchronous step: it carries out the leader's commands.

The leader (the server of shard 0) decides; every other server follows its commands
(:mod:`dist_quant.ps.protocol`), so every shard applies the same updates in the same order:

- ``UPDATE`` (workers, step, summed staleness): one ``DecoupledMomentumSGD`` step of the shard
  on those workers' next payloads, decoded; bad rows are left out as in the synchronous step.
  The update is their mean (sync, backup workers) or their sum over W (ssp, async), and with
  ``--staleness-lr`` it is scaled by ``n / sum of staleness`` (the group's mean staleness,
  each at least 1). Its learning rate is the schedule's at the step it counts towards. The
  server reports ``STATUS`` to the leader.
- ``DROP``: the workers' next payloads are read and discarded.
- ``RELEASE``: the shard's downlink to those workers.
- ``EVAL``: the shard's parameters to the leader.
- ``SAVE``: every payload on its way into the inbox, then the rank's state to the leader.
- ``LOST``: a worker was dropped: nothing more is taken from it or sent to it.
- ``STOP`` ends the run, ``HALT`` aborts it.

Replicas. With a compressed downlink a server tracks, per shard, one replica per group of
workers that have read exactly the same downlinks (one group while every worker is released
together, as in the synchronous step; a group splits when only part of it is released), and
sends a group ``C(theta - r)`` once, with the shard's one generator.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Any

import torch

from dist_quant.ps.fabric import TAG_COMMAND, TAG_DOWN, TAG_STATUS, TAG_THETA, TAG_UP, LocalFabric
from dist_quant.ps.protocol import DROP, EVAL, HALT, HEAD, LOST, RELEASE, SAVE, STATUS, UPDATE
from dist_quant.ps.worker import RunAborted
from dist_quant.runtime.phasetime import charge, now, since


class AsyncServer:
    """The server's part of :class:`~dist_quant.ps.async_rank.AsyncRank` (a mixin over its
    :class:`~dist_quant.ps.state.RankState`). Its own state, per worker in order: ``inbox``
    (payloads here but not applied), ``posted`` (receives posted for more); ``groups`` (the
    replica groups, None with ``--downlink none``) and ``encode_s`` (downlink encodes since its
    last report)."""

    def init_server(self) -> None:
        self.encode_s = self.encode_cpu = 0.0
        self.inbox: defaultdict[int, deque[torch.Tensor]] = defaultdict(deque)
        self.posted: defaultdict[int, deque[Any]] = defaultdict(deque)
        self.groups = None if self.cfg.downlink == "none" else [
            (list(range(self.W)), self.shard.replica)]

    def take(self, worker: int) -> torch.Tensor:
        """Worker ``worker``'s next payload of this shard (received now unless it is here)."""
        if self.inbox[worker]:
            return self.inbox[worker].popleft()
        if self.posted[worker]:
            return self.posted[worker].popleft()()
        return self.fabric.recv(self.p.worker_ranks[worker], self.rank, TAG_UP,
                                "gradient payload", self.shard.up_nbytes(), torch.uint8)

    def apply_update(self, workers: list[int], step: int, late: int = 0) -> torch.Tensor:
        """One update of this shard with the payloads of ``workers``; its ``STATUS`` (with
        the downlink encodes since the last report). ``late``: the staleness of the update's
        gradients, summed (``--staleness-lr``)."""
        sh = self.shard
        self.step = step
        rows = torch.stack([self.take(i) for i in workers])
        t1 = now()
        g, bad = sh.aggregate(rows)
        if g is not None and not self.policy.mean:   # each gradient counts 1/W
            good = len(workers) - len(bad)
            if good != self.W:
                g.mul_(good / self.W)
        if g is not None and self.cfg.staleness_lr and late > len(workers):
            g.mul_(len(workers) / late)   # lr / staleness, the mean staleness of the group
        t2 = now()
        sh.update(g, at_step=step)
        t3 = now()
        decode, update = t2 - t1, t3 - t2
        charge(decode.cpu + update.cpu)
        abort = self.judge_rows(bad)
        status = torch.zeros(len(STATUS), dtype=torch.float64)
        status[:5] = torch.tensor([float(len(bad)), float(g is None), float(abort), decode.wall,
                                   update.wall], dtype=torch.float64)
        status[5] = self.encode_s
        status[STATUS.index("cpu_decode")] = decode.cpu
        status[STATUS.index("cpu_update")] = update.cpu
        status[STATUS.index("cpu_encode")] = self.encode_cpu
        self.encode_s = self.encode_cpu = 0.0
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

    def send_downlink(self, workers: list[int]) -> None:
        """Send this shard's downlink to ``workers``."""
        t0 = now()
        sends = ([(workers, self.shard.downlink().clone())] if self.groups is None else
                 [(sel, self.shard.downlink(replica)) for sel, replica in self._split(workers)])
        encode = since(t0, charge_cpu=True)
        self.encode_s += encode.wall
        self.encode_cpu += encode.cpu
        for sel, payload in sends:
            for i in sel:
                self.fabric.send(self.rank, self.p.worker_ranks[i], TAG_DOWN, payload,
                                 "parameters payload")
        if not self.is_leader:
            self.post_payloads(workers)

    def post_payloads(self, workers: list[int]) -> None:
        """Distributed, a server but the leader: post the receives of ``workers``' next
        payloads (the leader's arrive through its arrival source)."""
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
            status = self.apply_update(workers, step, late)
            self.fabric.send(self.rank, self.p.leader, TAG_STATUS, status, "server status")
        elif op == DROP:
            for i in workers:
                self.take(i)
        elif op == RELEASE:
            self.send_downlink(workers)
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
        """Simulator: carry out the commands waiting for this server; whether there were any."""
        done = False
        while self.fabric.has(self.p.leader, self.rank, TAG_COMMAND):
            self.execute(self._next_command())
            done = True
        return done

    # ---- checkpoints ------------------------------------------------------------------------
    def shard_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """The shard's checkpoint state with its inbox and replica groups added."""
        state["inbox"] = {str(i): [p.to("cpu", copy=True) for p in box]
                          for i, box in self.inbox.items() if box}
        state["groups"] = None if self.groups is None else [
            {"workers": list(m), "replica": r.to("cpu", copy=True)} for m, r in self.groups]
        if self.groups is not None:  # "replica": worker 0's (a synchronous run's one)
            state["replica"] = state["groups"][0]["replica"]
        return state

    def load_shard(self, state: dict[str, Any]) -> None:
        self.shard.load_state_dict(state)
        for i, box in state["inbox"].items():
            self.inbox[int(i)] = deque(p.to(self.device) for p in box)
        if self.groups is not None:
            self.groups = [(list(g["workers"]), g["replica"].to(self.device))
                           for g in state["groups"]]
