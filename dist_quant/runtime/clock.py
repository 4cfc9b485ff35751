"""The modelled clock: the time of a synchronous step as if every rank had a host of its own.

``--clock dedicated`` times each step of a run (``model_wall``, cumulative ``model_time``) on
a cluster this machine is not: every rank on a dedicated host ``--host-speed X`` times faster
than the one that measured the calibration (:mod:`dist_quant.runtime.calibrate`), every host
on a link of ``--rate`` Mbit/s (worker I on ``--worker-rate I=MBIT``), ``--latency`` ms one way,
``--mtu``. The time is composed, not measured: it depends only on the configuration, the
calibration and the bytes each step recorded, so it is the same on a loaded machine as on a
quiet one and the same on every replay of a run.

Compute. With ``c_p`` the calibrated CPU seconds of phase ``p`` for the whole model of ``n``
parameters, ``q_s = n_s / n`` the share of shard ``s`` (from the step's per-server bytes:
payloads are proportional to their coordinates) and ``f_i`` worker i's ``--slow-worker``
factor (1 by default), the costs on the modelled hosts are::

    forward of worker i on shard s's layers      f_i c_forward  q_s / X
    backward of worker i on them                 f_i c_backward q_s / X
    encoding shard s / decoding its downlink     c_encode q_s / X,  c_down_decode q_s / X
    server s: decode W rows, step, encode down   (W c_decode + c_update + c_down_encode) q_s / X
    an evaluation (on the leader)                c_evaluate / X

Links. A message of ``m`` payload bytes from host a to host b is framed as the link model
frames it (``wire(m)``, :mod:`dist_quant.analysis.linkmodel`) and served by a's outgoing and
b's incoming link, each a first-in-first-out queue at that host's rate ``R_h``: a message
ready at ``r`` leaves a's queue at ``o = max(r, o_prev) + wire(m) / R_a``, goes through b's
queue as ``i = max(r, i_prev) + wire(m) / R_b`` (messages taken in order of readiness), and
arrives at ``max(o, i) + L``. With every message ready at once this is the link model's phase,
``L + max over link directions of sum wire(m) / R``.

A synchronous parameter-server step (star, sharded, colocated; times from the step's start)::

    worker i   t = max_s a_is + c_down_decode / X + f_i c_forward / X     (a_is: arrival of
               t += f_i c_backward / X; shard s ready at t + sum_{s'<=s} c_encode q_s' / X
               --overlap: forward of shard s's layers after a_is arrives (its decode
               first), backward from the last shard to the first, each shard encoded and
               sent as soon as its gradients are complete
    up         every worker sends shard s's payload to server s (a payload on its own rank
               stays there), BN statistics to the leader at evaluation steps
    server s   D_s = max(A_s, C_s if colocated) + (W c_decode + c_update + c_down_encode) q_s / X
               (A_s: its last uplink message's arrival; C_s: its own worker's last encode)
    lead       T_lead = max_s (D_s + L [s not on the leader's host]) + c_evaluate / X at an
               evaluation due here (--eval-lag 0: after the servers' shards have arrived, sent
               at D_s)
    down       server s sends its downlink at B_s = T_lead + L [s not on the leader's host]
               (the control); a worker's downlink of its own rank's shard arrives at B_s
    step       T = max(arrivals of every downlink, T_lead, the evaluation settled here)

Shard s's downlink arrives at worker i at time ``a_is``, so the next step's ``a_is`` is that
time less ``T`` (at most 0): a worker whose downlink came early starts early, the step time is
the time between the moments the last downlink arrives. ``--eval-lag L_e``: piece j of the
evaluation of step s (``4 n_s / L_e`` bytes of each shard not on the leader's host) is sent at
the start of step ``s + 1 + j``, ready at 0, into the same queues as the uplink; the evaluation
runs in the lead of step ``s + L_e``. The last step and checkpoint steps settle the evaluations
in flight: what is left of their pieces is sent at ``B_s``, then they are evaluated.

DDP (``A`` allreduces one after the other, together ``S = bytes_up + bytes_down`` over all
ranks, each a ring on the slowest link ``R``; ``A = 1``, PowerSGD's hook ``A = 3``: its
uncompressed tensors, then P, then Q)::

    T = max_i (f_i (c_forward + c_backward) + c_encode) / X + A 2 (W-1) (L + wire(c) / R)
        + (c_decode + c_update) / X + c_evaluate / X at evaluation steps,  c = S / (2 W (W-1) A)

and the ``onebit`` hook as the colocated exchange on slices of ``n / W`` (no control, every
rank steps the whole model). Not modelled: the telemetry and control messages' bytes, TCP slow
start, checkpoint writing, the settling of evaluations other than the one due at a step that
``--stop-accuracy`` ends, and a resumed run's head starts (it starts with every downlink in).
The asynchronous modes (their arrival order) have a clock of their own:
:mod:`dist_quant.runtime.arrivalclock`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dist_quant.errors import ConfigError
from dist_quant.runtime.links import Link, ring_step_seconds, wire_bytes

Message = tuple[str, str, float, float, Any]   # (sender, receiver, bytes, ready, tag)


def parse_rates(text: str) -> dict[int, float]:
    """``I=MBIT[,J=MBIT]`` as ``{I: MBIT}`` (ValueError when malformed)."""
    out: dict[int, float] = {}
    for item in filter(None, (t.strip() for t in str(text or "").split(","))):
        worker, sep, rate = item.partition("=")
        if not sep or int(worker) in out:
            raise ValueError(item)
        out[int(worker)] = float(rate)
    return out


@dataclass(frozen=True)
class Links:
    """The modelled cluster's links: every host at ``rate_mbit`` (None = uncapped), worker I
    at ``worker_rates[I]``, ``latency_ms`` one way between two hosts."""

    rate_mbit: float | None
    latency_ms: float = 0.0
    mtu: int = 1500
    worker_rates: tuple[tuple[int, float], ...] = ()

    @classmethod
    def of(cls, config: dict[str, Any]) -> Links:
        rate = float(config.get("rate", 0.0) or 0.0)
        return cls(rate or None, float(config.get("latency", 0.0)), int(config.get("mtu", 1500)),
                   tuple(sorted(parse_rates(config.get("worker_rate", "")).items())))

    def bytes_per_second(self, worker: int | None) -> float:
        rate = dict(self.worker_rates).get(worker, self.rate_mbit) if worker is not None \
            else self.rate_mbit
        return math.inf if rate is None else rate * 1e6 / 8

    @property
    def latency_s(self) -> float:
        return self.latency_ms / 1000

    @property
    def name(self) -> str:
        rate = "uncapped" if self.rate_mbit is None else f"{self.rate_mbit:g} Mbit/s"
        own = "".join(f", worker {i} at {r:g}" for i, r in self.worker_rates)
        return f"{rate}, {self.latency_ms:g} ms{own}"


def deliver(messages: list[Message], rate: dict[str, float], latency: float,
            mtu: int) -> list[float]:
    """The arrival time of each message (module docstring: FIFO queues at both ends)."""
    order = sorted(range(len(messages)), key=lambda j: (messages[j][3], j))
    out_free: dict[str, float] = {}
    in_free: dict[str, float] = {}
    arrival = [0.0] * len(messages)
    for j in order:
        src, dst, m, ready, _ = messages[j]
        wire = wire_bytes(math.ceil(m), mtu)
        o = max(ready, out_free.get(src, 0.0)) + wire / rate[src]
        i = max(ready, in_free.get(dst, 0.0)) + wire / rate[dst]
        out_free[src], in_free[dst] = o, i
        arrival[j] = max(o, i) + latency
    return arrival


def pieces(n: int, lag: int) -> list[int]:
    """Coordinates of the ``max(lag, 1)`` near-equal pieces of an ``n``-coordinate shard."""
    k = max(lag, 1)
    cuts = [n * j // k for j in range(k + 1)]
    return [b - a for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


class Clock:
    """Times the steps of one synchronous run (module docstring); :meth:`step` per record."""

    def __init__(self, config: dict[str, Any], calibration: dict[str, Any],
                 links: Links | None = None, host_speed: float | None = None,
                 allreduces: int = 1):
        if config.get("consistency", "sync") != "sync" or config.get("backup_workers", 0):
            raise ConfigError("--clock", "the synchronous step's clock cannot time --consistency "
                              "ssp|async or --backup-workers: their arrivals are "
                              "dist_quant.runtime.arrivalclock's")
        self.links = links or Links.of(config)
        self.speed = float(host_speed if host_speed is not None
                           else config.get("host_speed", 1.0))
        self.c = {p: float(v) / self.speed for p, v in calibration["seconds"].items()}
        self.n = int(calibration["params"])
        self.w = int(config["workers"])
        self.cfg = config
        # torch's PowerSGD hook allreduces three buffers one after the other: the tensors it
        # leaves uncompressed (biases, norms, matrices not worth a rank-r factor), P, then Q
        self.allreduces = allreduces if allreduces != 1 or config.get("ddp_hook") != "powersgd" \
            else 3
        if config.get("method") == "ddp":
            self.kind = "hook" if config.get("ddp_hook") == "onebit" else "ring"
        elif config.get("colocate"):
            self.kind = "colocated"
        else:
            self.kind = "star" if int(config.get("servers", 1)) == 1 else "sharded"
        self.slow = {int(i): float(f) for i, f in
                     parse_rates(config.get("slow_worker", "")).items()}
        self.lag = int(config.get("eval_lag", 0))
        self.time = 0.0
        self.at: dict[int, float] = {}          # cumulative modelled time after each step
        self.arrive: dict[int, list[float]] = {}  # a_is of the next step, relative (<= 0)
        self.pending: list[list[Any]] = []      # [eval step, pieces sent] in flight

    # ---- hosts -----------------------------------------------------------------------------
    def _colocated(self) -> bool:
        return self.kind in ("colocated", "hook")

    def worker_host(self, i: int) -> str:
        return f"rank{i}" if self._colocated() else f"worker{i}"

    def server_host(self, s: int) -> str:
        return f"rank{s}" if self._colocated() else f"server{s}"

    def _rates(self, shards: int) -> dict[str, float]:
        rate = {self.worker_host(i): self.links.bytes_per_second(i) for i in range(self.w)}
        for s in range(shards):
            rate.setdefault(self.server_host(s), self.links.bytes_per_second(None))
        return rate

    # ---- the schedule ----------------------------------------------------------------------
    def is_eval(self, step: int) -> bool:
        return step % int(self.cfg.get("eval_every", 100)) == 0 or \
            step == int(self.cfg.get("steps", 0))

    def settles(self, step: int, last: bool) -> bool:
        every = int(self.cfg.get("checkpoint_every", 0))
        return last or step == int(self.cfg.get("steps", 0)) or (every > 0 and step % every == 0)

    # ---- one step --------------------------------------------------------------------------
    def step(self, rec: dict[str, Any], last: bool = False) -> float:
        """The modelled seconds of the step record ``rec``; adds them to :attr:`time`."""
        t = int(rec["step"])
        seconds = self._ring(rec, t) if self.kind == "ring" else self._exchange(rec, t, last)
        self.time += seconds
        self.at[t] = self.time
        return seconds

    def _ring(self, rec: dict[str, Any], t: int) -> float:
        c = self.c
        compute = max(self.slow.get(i, 1.0) * (c["forward"] + c["backward"])
                      for i in range(self.w)) + c["encode"]
        slowest = min(self.links.bytes_per_second(i) for i in range(self.w))
        link = Link(None if math.isinf(slowest) else slowest * 8 / 1e6, self.links.latency_ms,
                    0.0, self.links.mtu)
        comm = ring_step_seconds(int(rec["bytes_up"]) + int(rec["bytes_down"]), self.w, link,
                                 self.allreduces)
        return (compute + comm + c["decode"] + c["update"]
                + (c["evaluate"] if self.is_eval(t) else 0.0))

    def _shares(self, rec: dict[str, Any]) -> tuple[list[float], list[float], list[float]]:
        """(uplink bytes per message, downlink bytes per message, q_s) per shard."""
        w, stats = self.w, int(rec.get("bytes_stats", 0))
        if self.kind == "hook":
            shards = self.w
        else:
            shards = len(rec["servers"]) if rec.get("servers") else (
                self.w if self.kind == "colocated" else int(self.cfg.get("servers", 1)))
        remote = w - 1 if self._colocated() else w
        if remote == 0:
            return [0.0] * shards, [0.0] * shards, [1.0 / shards] * shards
        if rec.get("servers") and self.kind != "hook":
            ups = [s["bytes_up"] / remote for s in rec["servers"]]
            downs = [s["bytes_down"] / remote for s in rec["servers"]]
        else:   # even shards (the hook's slices; a record without per-server bytes)
            stats = 0 if self.kind == "hook" else stats
            ups = [max(int(rec["bytes_up"]) - stats, 0) / remote / shards] * shards
            downs = [int(rec["bytes_down"]) / remote / shards] * shards
        base = ups if sum(ups) > 0 else downs
        total = sum(base)
        q = [b / total for b in base] if total > 0 else [1.0 / shards] * shards
        return ups, downs, q

    def _exchange(self, rec: dict[str, Any], t: int, last: bool) -> float:
        c, w, lat = self.c, self.w, self.links.latency_s
        ddp = self.kind == "hook"
        ups, downs, q = self._shares(rec)
        shards = len(q)
        n_s = [round(self.n * x) for x in q]
        rate = self._rates(shards)
        leader = self.server_host(0)
        overlap = bool(self.cfg.get("overlap")) and not ddp

        # workers: compute, then each shard's payload ready
        ready: dict[tuple[int, int], float] = {}
        done: dict[int, float] = {}
        for i in range(w):
            f = self.slow.get(i, 1.0)
            arrive = self.arrive.get(i, [0.0] * shards)
            if overlap:   # from the first shard's arrival, which may precede the step
                clock = -math.inf
                for s in range(shards):
                    clock = max(clock, arrive[s]) + (c["down_decode"] + f * c["forward"]) * q[s]
                for s in reversed(range(shards)):
                    clock += (f * c["backward"] + c["encode"]) * q[s]
                    ready[i, s] = clock
            else:   # the hook decodes its downlink at the end of the step (tail)
                clock = (0.0 if ddp else max(arrive) + c["down_decode"]) \
                    + f * (c["forward"] + c["backward"])
                for s in range(shards):
                    clock += c["encode"] * q[s]
                    ready[i, s] = clock
            done[i] = max(ready[i, s] for s in range(shards))

        # up: payloads, BN statistics, pieces of the evaluations in flight
        msgs: list[Message] = []
        for i in range(w):
            for s in range(shards):
                if self.worker_host(i) != self.server_host(s) and ups[s] > 0:
                    msgs.append((self.worker_host(i), self.server_host(s), ups[s], ready[i, s],
                                 ("up", s)))
        stats = int(rec.get("bytes_stats", 0)) if not ddp else 0
        senders = [i for i in range(w) if self.worker_host(i) != leader]
        if stats and senders:
            msgs += [(self.worker_host(i), leader, stats / len(senders), done[i], ("stats", i))
                     for i in senders]
        due = 0   # evaluations that run in this step's lead
        if not ddp and self.lag > 0:
            for entry in self.pending:
                sent = entry[1]
                if sent < max(self.lag, 1):
                    for s in range(shards):
                        if self.server_host(s) != leader:
                            size = pieces(n_s[s], self.lag)[sent]
                            if size:
                                msgs.append((self.server_host(s), leader, 4.0 * size, 0.0,
                                             ("piece", s)))
                    entry[1] = sent + 1
            due = sum(1 for e, _ in self.pending if e + self.lag == t)
            self.pending = [p for p in self.pending if p[0] + self.lag != t]
        arrival = deliver(msgs, rate, lat, self.links.mtu)
        got: dict[str, float] = {}
        for (_, dst, _, _, _), a in zip(msgs, arrival, strict=True):
            got[dst] = max(got.get(dst, 0.0), a)

        # servers, the lead and its evaluation, the control
        serve = [(w * c["decode"] + c["update"] + c["down_encode"]) * q[s] for s in range(shards)]
        d = []
        for s in range(shards):
            start = got.get(self.server_host(s), 0.0)
            if self._colocated():
                start = max(start, done[s])
            d.append(start + serve[s])
        remote_hop = [0.0 if self.server_host(s) == leader or ddp else lat for s in range(shards)]
        lead = max((d[s] + remote_hop[s] for s in range(shards)), default=0.0)
        lead = max(lead, got.get(leader, 0.0))
        evaluating = self.is_eval(t)
        if evaluating and self.lag == 0 and not ddp:
            gather = [(self.server_host(s), leader, 4.0 * n_s[s], d[s], ("gather", s))
                      for s in range(shards) if self.server_host(s) != leader]
            lead = max([lead, *deliver(gather, rate, lat, self.links.mtu)]) + c["evaluate"]
        lead += due * c["evaluate"]
        b = [lead + remote_hop[s] for s in range(shards)]
        if ddp:   # no control: each rank sends its slice's mean when it has it
            b = d

        # down: every shard to every worker; what settles here after it
        down: list[Message] = []
        for s in range(shards):
            for i in range(w):
                if self.worker_host(i) != self.server_host(s) and downs[s] > 0:
                    down.append((self.server_host(s), self.worker_host(i), downs[s], b[s],
                                 ("down", i, s)))
        settle = 0
        if not ddp and self.lag > 0:
            if evaluating:
                self.pending.append([t, 0])
            if self.settles(t, last) and self.pending:
                for _, sent in self.pending:
                    for s in range(shards):
                        if self.server_host(s) != leader:
                            rest = sum(pieces(n_s[s], self.lag)[sent:])
                            if rest:
                                down.append((self.server_host(s), leader, 4.0 * rest, b[s],
                                             ("piece", s)))
                settle = len(self.pending)
                self.pending = []
        arrival = deliver(down, rate, lat, self.links.mtu)
        arrive = {i: [b[s] for s in range(shards)] for i in range(w)}   # own shard: local
        end = max([lead, *b])
        to_leader = lead
        for (_, _, _, _, tag), a in zip(down, arrival, strict=True):
            if tag[0] == "down":
                arrive[tag[1]][tag[2]] = a
            else:
                to_leader = max(to_leader, a)
        if settle:
            end = max(end, to_leader + settle * c["evaluate"])
        tail = (c["down_decode"] + c["update"]) if ddp else 0.0
        end = max([end, *(max(a) for a in arrive.values())]) + tail
        if ddp and evaluating:
            end += c["evaluate"]
        if not ddp:   # the next step's a_is: a worker whose downlink came early starts early
            self.arrive = {i: [min(x - end, 0.0) for x in a] for i, a in arrive.items()}
        return end

    def record_time(self, step: int) -> float:
        """The cumulative modelled time after ``step`` (the latest before it if not timed)."""
        if step in self.at:
            return self.at[step]
        before = [s for s in self.at if s <= step]
        return self.at[max(before)] if before else 0.0
