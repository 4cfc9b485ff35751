"""Where the asynchronous leader's arrivals come from: the network, a virtual clock, a replay.

The leader of an asynchronous run (:mod:`dist_quant.ps.async_rank`) takes one arrival at a
time, a worker's gradient, and its policy (:mod:`dist_quant.ps.consistency`) decides on it.
The decisions depend on the order of the arrivals only (never on the clock), so one order gives
one run. An arrival source has two calls: ``released(workers)`` (those workers start
computing their next gradient now) and ``next()`` (the next arrival: ``(worker, payload,
telemetry, statistics)``, the last three None where the leader reads them from an in-memory
fabric), which raises :class:`~dist_quant.core.transport.PeerLostError` for a worker lost
instead.

- :class:`NetworkArrivals`: a distributed leader's, in the order the network delivers them.
- :class:`SimulatedArrivals` over a :class:`VirtualClock` (``--simulate``): worker ``i``
  computes for ``f_i`` time units per gradient (``f_i`` from ``--slow-worker``, 1 otherwise),
  from the moment of the arrival that released it (the server takes no time, links take none);
  the next arrival is the smallest ``(due time, worker index)``.
- :class:`SimulatedArrivals` over a :class:`Replay` (``--simulate --replay RUN_DIR``): the
  order recorded in that run's ``metrics.jsonl`` (:func:`recorded_order`), lost workers
  included; the run ends with the recorded run's parameters, bit for bit.
- ``--clock dedicated``: :meth:`SimulatedArrivals.attach` puts the modelled cluster's
  :class:`~dist_quant.runtime.arrivalclock.ArrivalClock` in the virtual clock's place (the
  order of the modelled times), or beside a :class:`Replay` (the recorded order, timed).
  The leader tells every source what it decided (``updated(group, step)``,
  ``dropped(worker)``); only the modelled clock uses it.
"""

from __future__ import annotations

import datetime
import json
import queue
import threading
from pathlib import Path
from typing import Any

import torch

from dist_quant.config import TrainConfig
from dist_quant.core.transport import PeerLostError, _cause
from dist_quant.errors import ConfigError
from dist_quant.ps.fabric import TAG_STATS, TAG_TELEMETRY, TAG_UP
from dist_quant.ps.placement import Placement
from dist_quant.ps.protocol import TELEMETRY_ASYNC
from dist_quant.runtime.arrivalclock import ArrivalClock
from dist_quant.runtime.metrics import read_metrics

# options a replay may change: they name or place the run, or change its wall time only (or,
# the calibration, its modelled time: a replay takes its order from the record)
REPLAY_FREE = frozenset({"run_dir", "resume", "progress", "simulate", "replay", "slow_worker",
                         "timeout", "backend", "device", "keep_checkpoints", "max_restarts",
                         "calibration"})


class VirtualClock:
    """``--simulate``'s arrival order (module docstring): worker ``i`` takes ``factors[i]``
    (default 1) time units per gradient from its release; ties go to the lower index."""

    def __init__(self, workers: int, factors: dict[int, float] | None = None):
        self.factors = [float((factors or {}).get(i, 1.0)) for i in range(workers)]
        self.now = 0.0
        self.due: dict[int, float] = {}

    def released(self, workers: list[int]) -> None:
        for i in workers:
            self.due[i] = self.now + self.factors[i]

    def next(self) -> int:
        if not self.due:
            raise RuntimeError("no worker is computing: nothing can arrive")
        worker = min(self.due, key=lambda i: (self.due[i], i))
        self.now = self.due.pop(worker)
        return worker

    def state_dict(self) -> dict[str, Any]:
        return {"now": self.now, "due": {str(i): t for i, t in self.due.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.now = float(state["now"])
        self.due = {int(i): float(t) for i, t in state["due"].items()}


class Replay:
    """The arrival order of a recorded run (``order[k]`` = the worker of arrival ``k``);
    ``losses[k]``: the workers the run lost after ``k`` arrivals (``--min-workers``), in the
    order it noticed them."""

    def __init__(self, order: list[int], source: str = "the record",
                 losses: dict[int, list[int]] | None = None):
        self.order, self.source = [int(i) for i in order], source
        self.losses = {int(k): [int(i) for i in v] for k, v in (losses or {}).items()}
        self.position = 0
        self.computing: set[int] = set()
        self.noticed = 0   # losses at the current position already given out

    def loss(self) -> int | None:
        """The next worker the record lost before the arrival at ``position``, if any."""
        here = self.losses.get(self.position, [])
        if self.noticed >= len(here):
            return None
        worker = here[self.noticed]
        self.noticed += 1
        self.computing.discard(worker)
        return worker

    def released(self, workers: list[int]) -> None:
        self.computing.update(workers)

    def next(self) -> int:
        if self.position >= len(self.order):
            raise ConfigError("--replay", f"{self.source} ends after {len(self.order)} "
                              "arrivals; this run needs more (a different config, or an "
                              "unfinished run)")
        worker = self.order[self.position]
        if worker not in self.computing:
            raise ConfigError("--replay", f"{self.source}: arrival {self.position} is worker "
                              f"{worker}, which is not computing here; the record was made "
                              "by another config")
        self.computing.discard(worker)
        self.position += 1
        self.noticed = 0
        return worker

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "noticed": self.noticed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state.get("position", 0))
        self.noticed = int(state.get("noticed", 0))


def recorded_order(cfg: TrainConfig) -> tuple[list[int], dict[int, list[int]]]:
    """The arrival order recorded in ``cfg.replay``'s ``metrics.jsonl`` (its ``update``
    lines) and the workers lost after each number of arrivals (its ``lost`` lines), after
    checking that the run had ``cfg``'s options (but ``REPLAY_FREE``); ConfigError naming
    ``--replay`` otherwise."""
    run_dir = cfg.replay
    try:
        saved = json.loads((Path(run_dir) / "config.json").read_text())["config"]
        records = read_metrics(run_dir)
        lines = [r for r in records if r.get("kind") == "update"]
        losses: dict[int, list[int]] = {}
        for r in records:
            if r.get("kind") == "lost":
                losses.setdefault(int(r["after"]), []).append(int(r["worker"]))
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError("--replay", f"cannot read the record of {run_dir}: {err}") from None
    mine = cfg.to_dict()
    for name in sorted(set(mine) - REPLAY_FREE):
        if name in saved and saved[name] != mine[name]:
            raise ConfigError("--replay", f"{run_dir} ran with --{name.replace('_', '-')} "
                              f"{saved[name]!r}, this run has {mine[name]!r}: a record replays "
                              "only the run it was made by")
    lines.sort(key=lambda r: r["arrival"])
    if not lines or [r["arrival"] for r in lines] != list(range(len(lines))):
        raise ConfigError("--replay", f"{run_dir}/metrics.jsonl holds no complete arrival "
                          "record (arrivals 0..N-1): not an ssp, async or backup-workers run")
    return [int(r["worker"]) for r in lines], losses


class SimulatedArrivals:
    """The simulator's arrivals: the order of a :class:`VirtualClock`, an
    :class:`~dist_quant.runtime.arrivalclock.ArrivalClock` or a :class:`Replay` (``timer``:
    the modelled clock that times a replay, or None); the payload is then read from the
    in-memory fabric. ``left(i)``: whether worker ``i`` has left the run (``--inject-loss``)."""

    def __init__(self, order: VirtualClock | ArrivalClock | Replay, placement: Placement,
                 left: Any = lambda i: False):
        self.order, self.p, self.left = order, placement, left
        self.timer: ArrivalClock | None = None

    def attach(self, clock: ArrivalClock) -> None:
        """``--clock dedicated``: the modelled cluster's arrivals replace the virtual clock's
        (a replay keeps its order and is timed by ``clock``)."""
        if isinstance(self.order, Replay):
            self.timer = clock
        else:
            self.order = clock

    @property
    def clock(self) -> ArrivalClock | None:
        """The modelled clock, if any."""
        return self.timer or (self.order if isinstance(self.order, ArrivalClock) else None)

    def modelled(self) -> dict[str, float]:
        """The modelled times of the arrival just taken (``model_time``: when the leader took
        it, ``model_wall``: its worker's cycle since its release); empty without the clock."""
        clock = self.clock
        if clock is None or clock.taken is None:
            return {}
        return {"model_time": clock.taken[1], "model_wall": clock.taken[2]}

    def updated(self, group: list[int], step: int) -> None:
        if self.clock is not None:
            self.clock.updated(group, step)

    def dropped(self, worker: int) -> None:
        if self.clock is not None:
            self.clock.dropped(worker)

    @classmethod
    def of(cls, cfg: TrainConfig, placement: Placement, left: Any) -> SimulatedArrivals:
        """``--replay``'s order if given, else the virtual clock of ``--slow-worker``."""
        if cfg.replay:
            order, losses = recorded_order(cfg)
            return cls(Replay(order, f"the record of {cfg.replay}", losses), placement, left)
        return cls(VirtualClock(cfg.workers, cfg.slow_factors), placement, left)

    def released(self, workers: list[int]) -> None:
        self.order.released(workers)
        if self.timer is not None:
            self.timer.released(workers)

    def next(self) -> tuple[int, None, None, None]:
        """The next arrival; a worker that left (``--inject-loss``) is lost at the moment
        its next gradient would have arrived, one the record lost where the record lost it."""
        lost = self.order.loss() if isinstance(self.order, Replay) else None
        if lost is not None and self.timer is not None:
            self.timer.forget(lost)
        if lost is None:
            worker = self.order.next()
            if self.timer is not None:
                self.timer.next(forced=worker)
            if not self.left(worker):
                return worker, None, None, None
            lost = worker
        rank = self.p.worker_ranks[lost]
        raise PeerLostError(f"lost contact with {self.p.describe(rank)} while waiting for its "
                            "gradient (it left the run)", rank)

    def resume(self, state: dict[str, Any], received: int) -> None:
        """Carry on from a checkpoint's order state, ``received`` arrivals in."""
        self.load_state_dict(state)
        if isinstance(self.order, Replay):
            self.order.position = received

    def state_dict(self) -> dict[str, Any]:
        state = {"kind": type(self.order).__name__, **self.order.state_dict()}
        if self.timer is not None:
            state["timer"] = self.timer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") == type(self.order).__name__:
            self.order.load_state_dict(state)
        if self.timer is not None and "timer" in state:
            self.timer.load_state_dict(state["timer"])


class NetworkArrivals:
    """A distributed leader's arrivals: a receive of shard 0's payload is posted from every
    worker that computes, each waited for by a thread; whichever completes first is the next
    arrival. (One receive from any source would be bound to the first sender to announce its
    message, and a worker on a slow link would hold up every other worker behind it.)

    ``leader``: the leader's rank state (its fabric, placement, shard, device, ``flags``: per
    worker, whether its next gradient brings BatchNorm statistics)."""

    def __init__(self, leader: Any):
        self.r = leader
        self.done: queue.Queue = queue.Queue()
        self.buffers: dict[int, list[torch.Tensor]] = {}

    def released(self, workers: list[int]) -> None:
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
        try:
            for work in works:
                work.wait(timeout=datetime.timedelta(seconds=self.r.cfg.timeout))
        except RuntimeError as err:
            self.done.put((worker, err))
            return
        self.done.put((worker, None))

    def next(self) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        worker, err = self.done.get()
        if isinstance(err, PeerLostError):
            raise err
        if err is not None:
            lost = self.r.p.worker_ranks[worker]
            raise PeerLostError(f"lost contact with {self.r.p.describe(lost)} while waiting for "
                                f"its gradient ({_cause(err)})", lost) from err
        bufs = self.buffers.pop(worker)
        return worker, bufs[0], bufs[1], bufs[2] if len(bufs) > 2 else None

    def modelled(self) -> dict[str, float]:
        return {}   # a distributed run has no modelled clock

    def updated(self, group: list[int], step: int) -> None:
        pass

    def dropped(self, worker: int) -> None:
        pass
