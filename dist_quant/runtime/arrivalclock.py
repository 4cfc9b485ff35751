"""The modelled clock of the asynchronous modes: the arrival order of dedicated hosts.

``--clock dedicated`` with ``--consistency ssp|async`` or ``--backup-workers`` (under
``--simulate``) replaces the simulator's unit-time virtual clock
(:class:`dist_quant.ps.arrivals.VirtualClock`) by the times of the modelled cluster of
:mod:`dist_quant.runtime.clock`: every rank on a host of its own ``--host-speed X`` times
faster than the calibration's CPU, on links of ``--rate`` (worker I: ``--worker-rate``),
``--latency`` L one way, ``--mtu``. The leader's decisions depend on the order of the
arrivals only, so the clock changes which run is made, never how an order is applied; the
order is a function of the configuration and the calibration alone, so a modelled run is
reproducible bit for bit, and its recorded order replays (``--replay``) to the same run.

Costs (``c_p``: calibrated seconds of phase ``p`` for the whole model, divided by X; ``q_s``:
the share of shard ``s``; ``f_i``: worker i's ``--slow-worker`` factor)::

    worker i, from its last downlink in    c_down_decode + f_i (c_forward + c_backward),
                                           then shard s's payload ready after sum_{s'<=s}
                                           c_encode q_s'; its BatchNorm statistics (when
                                           asked) to the leader once the last is encoded
    an update of g gradients on server s   (g c_decode + c_update) q_s
    a release on server s                  c_down_encode q_s (once per release)
    an evaluation (leader)                 c_evaluate

Messages go through first-in-first-out queues at both ends at each host's rate, in the order
they are ready (:func:`dist_quant.runtime.clock.deliver`: a message ready at ``r`` leaves
``max(r, out) + wire / R_a``, is taken in ``max(r, in) + wire / R_b``, arrives at the later
of the two plus L); the leader's commands to the other servers and their statuses take L.
The queues run across the whole run: nothing restarts at a step.

What waits for what (the leader is server 0; ``T``: the leader's clock, which moves only
forward, and is busy while it works)::

    arrival      worker i's gradient is at the leader at a_i = the later of its shard-0
                 payload's and (when sent) its statistics' arrivals; the next arrival is the
                 smallest (a_i, i) among the workers computing, and the leader takes it at
                 T = max(T, a_i) (it handles one arrival at a time, in that order)
    update       the leader sends UPDATE to every other server (in at T + L) and steps its
                 shard: T += (g c_decode + c_update) q_0. Server s steps once it has the
                 command, is free, and has the group's payloads of shard s:
                 D = max(free_s, T_cmd + L, their arrivals) + (g c_decode + c_update) q_s,
                 its status in at the leader at D + L
    drop         (a backup worker's late gradient) DROP: server s reads the payload and
                 discards it: free_s = max(free_s, T_cmd + L, its arrival)
    step done    the leader waits for the statuses of the step's updates,
                 T = max(T, every status); at an evaluation step it sends EVAL, server s
                 sends its ``4 n_s`` bytes of parameters at max(free_s, T + L), and
                 T = max(T, their arrivals) + c_evaluate. The step's modelled time is T.
    release      RELEASE to every other server (in at T + L); the leader encodes and sends
                 its shard: T += c_down_encode q_0, downlinks ready at T; server s at
                 free_s = max(free_s, T_cmd + L) + c_down_encode q_s, ready then. A released
                 worker starts once every shard's downlink is in (the first release of a
                 fresh run: at 0, without a downlink, as the workers start on the initial
                 parameters)

So under ``async`` a fast worker's gradients reach the leader more often, each update is one
gradient, and the workers' links and the server's link queue them; under ``ssp`` a worker
too far ahead waits at the leader for the slowest; ``--backup-workers B`` releases the first
``W - B`` of a step together, and the late one is dropped and released at once.

Recorded (:class:`dist_quant.runtime.metrics.RunRecorder`): a step line's ``model_time`` is
the leader's T when the step was done (its evaluation included), ``model_wall`` the time
since the previous step's; an eval line's ``model_time`` is its step's; an ``update`` line
adds ``model_time`` (when the leader took the gradient) and ``model_wall`` (its worker's
cycle, from its release to that moment). ``--replay`` under this clock follows the recorded
order and times it the same way (the recorded run's calibration, ``--calibration RUN``,
gives the recorded times). Not modelled: the telemetry, control and command messages' bytes,
checkpoint writing (a checkpoint's pause is: every gradient in flight is taken first), the
replica groups of a compressed downlink (one encode per release).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any

from dist_quant.runtime.clock import Clock, Links, parse_rates
from dist_quant.runtime.links import wire_bytes


def asynchronous(config: dict[str, Any]) -> bool:
    """Whether ``config`` (``config.json``'s) follows arrivals: ssp, async, backup workers."""
    return config.get("consistency", "sync") != "sync" or int(config.get("backup_workers", 0)) > 0


def clock_of(config: dict[str, Any], calibration: dict[str, Any]) -> Clock | ArrivalClock:
    """The modelled clock of the run ``config``: arrivals for the asynchronous modes, the
    synchronous step's otherwise."""
    return ArrivalClock(config, calibration) if asynchronous(config) else Clock(config, calibration)


class ArrivalClock:
    """The arrival order and modelled times of one asynchronous run (module docstring).

    The leader's arrival source: ``released(workers)``, ``next()`` (the next worker whose
    gradient the leader takes; ``next(forced=i)`` under ``--replay``), and the leader tells it
    what it decided: ``updated(group, step)`` (``step``: the step that update completes, 0
    if none), ``dropped(worker)``. :meth:`configure` gives it the shards and payload sizes
    before the first call. The recorder's :meth:`step` and :meth:`record_time` read the
    times of the steps as :class:`~dist_quant.runtime.clock.Clock`'s do."""

    def __init__(self, config: dict[str, Any], calibration: dict[str, Any],
                 links: Links | None = None, host_speed: float | None = None):
        self.links = links or Links.of(config)
        self.speed = float(host_speed if host_speed is not None
                           else config.get("host_speed", 1.0))
        self.c = {p: float(v) / self.speed for p, v in calibration["seconds"].items()}
        self.n = int(calibration["params"])
        self.w = int(config["workers"])
        self.cfg = config
        self.slow = {int(i): float(f) for i, f in
                     parse_rates(config.get("slow_worker", "")).items()}
        self.flags: Callable[[int], bool] = lambda i: False
        self.configure([self.n], [0.0], [0.0], 0)
        self.time = 0.0
        self.at: dict[int, float] = {}      # step -> the leader's T when it was done
        self.lead = 0.0                     # the leader's clock T
        self.started = False                # the first release: no downlink
        self.seq = 0
        self.heap: list[list[Any]] = []     # [time, seq, kind, data]: events to come
        self.out_free: dict[str, float] = {}
        self.in_free: dict[str, float] = {}
        self.free = [0.0] * self.shards     # servers' clocks (0: the leader's is ``lead``)
        self.commands: list[list[list[Any]]] = [[] for _ in range(self.shards)]
        self.payloads = [[[] for _ in range(self.w)] for _ in range(self.shards)]
        self.status = [0.0] * self.shards   # the latest status in at the leader
        self.down: dict[int, list[float | None]] = {}   # downlinks in, per released worker
        self.owed: dict[int, list[Any]] = {}    # worker -> [messages to the leader left, in]
        self.arrived: dict[int, float] = {}     # gradients at the leader, not taken
        self.computing: set[int] = set()
        self.released_at = [0.0] * self.w
        self.thetas: list[float] = []
        self.taken: tuple[int, float, float] | None = None   # (worker, T, cycle) of next()

    def configure(self, sizes: list[int], up: list[float], down: list[float], stats: int,
                  flags: Callable[[int], bool] | None = None) -> None:
        """The shards (``sizes``: coordinates of each), one payload's bytes per shard up and
        down, the statistics' bytes, and ``flags(i)``: whether worker i's next gradient
        brings statistics (read at its release)."""
        total = sum(sizes)
        self.q = [s / total for s in sizes]
        self.n_s = [int(s) for s in sizes]
        self.shards = len(sizes)
        self.ups, self.downs, self.stats_bytes = list(up), list(down), int(stats)
        if flags is not None:
            self.flags = flags
        if hasattr(self, "free") and len(self.free) != self.shards:
            self.free = [0.0] * self.shards
            self.commands = [[] for _ in range(self.shards)]
            self.payloads = [[[] for _ in range(self.w)] for _ in range(self.shards)]
            self.status = [0.0] * self.shards

    # ---- hosts and links --------------------------------------------------------------------
    def _rate(self, host: str) -> float:
        return self.links.bytes_per_second(int(host[6:]) if host.startswith("worker") else None)

    def _send(self, src: str, dst: str, nbytes: float, ready: float, tag: list[Any]) -> None:
        self._push(ready, "ready", [src, dst, float(nbytes), tag])

    def _push(self, time: float, kind: str, data: list[Any]) -> None:
        heapq.heappush(self.heap, [time, self.seq, kind, data])
        self.seq += 1

    def _pop(self) -> None:
        """Process the earliest event."""
        time, _, kind, data = heapq.heappop(self.heap)
        if kind == "ready":   # into both links' queues, in the order of readiness
            src, dst, m, tag = data
            wire = wire_bytes(math.ceil(m), self.links.mtu)
            o = max(time, self.out_free.get(src, 0.0)) + wire / self._rate(src)
            i = max(time, self.in_free.get(dst, 0.0)) + wire / self._rate(dst)
            self.out_free[src], self.in_free[dst] = o, i
            self._push(max(o, i) + self.links.latency_s, "arrive", tag)
            return
        what = data[0]
        if what == "down":          # ["down", worker, shard]
            _, i, s = data
            self.down[i][s] = time
            if all(t is not None for t in self.down[i]):
                self._compute(i, max(self.down[i]) + self.c["down_decode"])
        elif what == "up":          # ["up", worker, shard]: at a server but the leader
            self.payloads[data[2]][data[1]].append(time)
            self._serve(data[2])
        elif what == "lead":        # ["lead", worker]: shard 0's payload or the statistics
            owed = self.owed[data[1]]
            owed[0] -= 1
            owed[1] = max(owed[1], time)
            if owed[0] == 0:
                self.arrived[data[1]] = owed[1]
                del self.owed[data[1]]
        elif what == "theta":
            self.thetas.append(time)

    def _compute(self, i: int, start: float) -> None:
        """Worker i computes from ``start`` and sends its payloads (module docstring)."""
        del self.down[i]
        c, f = self.c, self.slow.get(i, 1.0)
        clock = start + f * (c["forward"] + c["backward"])
        host = f"worker{i}"
        stats = self.flags(i) and self.stats_bytes > 0
        self.owed[i] = [2 if stats else 1, 0.0]
        for s in range(self.shards):
            clock += c["encode"] * self.q[s]
            self._send(host, f"server{s}", self.ups[s], clock,
                       ["lead", i] if s == 0 else ["up", i, s])
        if stats:
            self._send(host, "server0", self.stats_bytes, clock, ["lead", i])

    def _serve(self, s: int) -> None:
        """Server s carries out its commands in order, as far as their payloads are in."""
        queue, c, lat = self.commands[s], self.c, self.links.latency_s
        while queue:
            sent, op, workers = queue[0]
            start = max(self.free[s], sent + lat)
            if op in ("update", "drop"):
                if any(not self.payloads[s][i] for i in workers):
                    return
                start = max([start, *(self.payloads[s][i].pop(0) for i in workers)])
            queue.pop(0)
            if op == "update":
                self.free[s] = start + (len(workers) * c["decode"] + c["update"]) * self.q[s]
                self.status[s] = self.free[s] + lat
            elif op == "drop":
                self.free[s] = start
            elif op == "release":
                self.free[s] = start + c["down_encode"] * self.q[s]
                for i in workers:
                    self._send(f"server{s}", f"worker{i}", self.downs[s], self.free[s],
                               ["down", i, s])
            else:   # "eval": the shard's parameters to the leader
                self.free[s] = start
                self._send(f"server{s}", "server0", 4.0 * self.n_s[s], start, ["theta"])

    def _command(self, op: str, workers: list[int]) -> None:
        for s in range(1, self.shards):
            self.commands[s].append([self.lead, op, list(workers)])
            self._serve(s)

    def _until(self, done: Callable[[], bool]) -> None:
        while not done():
            if not self.heap:
                raise RuntimeError("the modelled clock waits for an event that cannot come")
            self._pop()

    # ---- the leader's arrival source ---------------------------------------------------------
    def released(self, workers: list[int]) -> None:
        """The leader releases ``workers`` now (module docstring: release)."""
        workers = list(workers)
        self.computing.update(workers)
        for i in workers:
            self.released_at[i] = self.lead
        if not self.started:   # a fresh run: every worker starts at 0 on the initial model
            self.started = True
            for i in workers:
                self.down[i] = []
                self._compute(i, 0.0)
            return
        self._command("release", workers)
        self.lead += self.c["down_encode"] * self.q[0]
        for i in workers:
            self.down[i] = [None] * self.shards
            self._send("server0", f"worker{i}", self.downs[0], self.lead, ["down", i, 0])

    def next(self, forced: int | None = None) -> int:
        """The worker whose gradient the leader takes next (``forced``: that one, when it
        is in); the leader's clock moves to its arrival."""
        if forced is None and not self.computing:
            raise RuntimeError("no worker is computing: nothing can arrive")
        while True:
            if forced is None:
                first = min(self.arrived.items(), key=lambda kv: (kv[1], kv[0]), default=None)
            else:
                first = (forced, self.arrived[forced]) if forced in self.arrived else None
            if first is not None and (not self.heap or self.heap[0][0] > first[1]):
                break
            if not self.heap:
                raise RuntimeError(f"worker {forced}'s gradient cannot arrive: it is not "
                                   "computing under the modelled clock")
            self._pop()
        worker, arrival = first
        del self.arrived[worker]
        self.computing.discard(worker)
        self.lead = max(self.lead, arrival)
        self.taken = (worker, self.lead, self.lead - self.released_at[worker])
        return worker

    def forget(self, worker: int) -> None:
        """A worker lost where a replayed record lost it: it is no longer waited for."""
        self.computing.discard(worker)
        self.arrived.pop(worker, None)

    def updated(self, group: list[int], step: int) -> None:
        """The leader makes an update of ``group``; it completes ``step`` (0: none)."""
        self._command("update", group)
        self.lead += (len(group) * self.c["decode"] + self.c["update"]) * self.q[0]
        if not step:
            return
        others = range(1, self.shards)
        self._until(lambda: not any(op == "update" for s in others
                                    for _, op, _ in self.commands[s]))
        self.lead = max([self.lead, *(self.status[s] for s in others)])
        if self.is_eval(step):
            self.thetas = []
            self._command("eval", [])
            self._until(lambda: len(self.thetas) == self.shards - 1)
            self.lead = max([self.lead, *self.thetas]) + self.c["evaluate"]
        self.at[step] = self.lead

    def dropped(self, worker: int) -> None:
        """The leader drops a late gradient of ``worker`` (backup workers)."""
        self._command("drop", [worker])

    def is_eval(self, step: int) -> bool:
        return step % int(self.cfg.get("eval_every", 100)) == 0 or \
            step == int(self.cfg.get("steps", 0))

    # ---- the recorder's side ---------------------------------------------------------------
    def step(self, rec: dict[str, Any], last: bool = False) -> float:
        """The modelled seconds of step ``rec["step"]`` (since the previous one was done)."""
        t = int(rec["step"])
        done = self.at.get(t, self.lead)
        seconds, self.time = done - self.time, done
        self.at[t] = done
        return seconds

    def record_time(self, step: int) -> float:
        """The modelled time of ``step`` (the latest before it if not timed)."""
        before = [s for s in self.at if s <= step]
        return self.at[max(before)] if before else 0.0

    # ---- checkpoints -----------------------------------------------------------------------
    STATE = ("lead", "started", "seq", "heap", "out_free", "in_free", "free", "commands",
             "payloads", "status", "down", "owed", "arrived", "computing", "released_at")

    def state_dict(self) -> dict[str, Any]:
        state = {k: getattr(self, k) for k in self.STATE}
        state["computing"] = sorted(self.computing)
        return {k: _plain(v) for k, v in state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in self.STATE:
            setattr(self, k, _plain(state[k]))
        self.computing = set(self.computing)
        for name in ("down", "owed", "arrived"):
            setattr(self, name, {int(i): v for i, v in getattr(self, name).items()})


def _plain(value: Any) -> Any:
    """A copy made of lists, dicts and scalars (a checkpoint loads nothing else)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
