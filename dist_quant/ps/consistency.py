"""The consistency rule of the parameter server: which arrivals make an update, who may go on.

The server of an asynchronous run (:mod:`dist_quant.ps.async_rank`) sees one event, a worker's
gradient arriving, and asks its policy two questions: which gradients form an update now, and
which workers may start their next step now. The answers depend on the order of the arrivals
only (never on the clock), so a recorded order replays to the same updates
(``dist-quant train --simulate --replay RUN_DIR``).

Versions. A server's parameters have a version, the number of updates applied so far. A
worker that is released reads the newest version ``v`` (its downlink); the gradient it sends
next was computed on ``v``. An update applied as version ``u`` to a gradient computed on ``v``
has staleness ``u - 1 - v``: the updates that landed between the read and the write.

Updates. One update is one step of ``DecoupledMomentumSGD`` (MATH 5a) on the decoded gradients
it groups: their mean in lockstep modes (:class:`Synchronous`), their sum over ``W`` in the
bounded modes (:class:`Bounded`: each gradient counts 1/W, as in a full synchronous step).
A gradient is applied lazily but never late: the gradients received since the last update are
applied together just before any worker reads the parameters (a release), so no worker ever
reads parameters that lack a gradient the server holds. When every worker is held until all
W gradients of a step are in (``sync``, ``ssp`` with ``K = 0``), the group is those W and the
update is exactly the synchronous step, bit for bit; under ``async`` a released worker is
always the one that just arrived, so every update is one gradient scaled by 1/W.

Policies (``W`` workers; a worker "has finished step t" once its t-th gradient has arrived):

- :class:`Synchronous` (``--consistency sync``, ``B = --backup-workers``): an update is the
  first ``W - B`` gradients computed on the current version (Chen et al. 2016, "Revisiting
  distributed synchronous SGD"); they are released together on the new version. A gradient
  computed on an older version arrives too late: it is dropped (counted) and its worker is
  released at once on the current version, so it joins the step being formed. With ``B = 0``
  this is the synchronous step itself.
- :class:`Bounded` (``--consistency ssp --staleness K``, stale-synchronous parallel, Ho et al.
  2013, ps-lite's bounded delay; ``async`` is ``K = infinity``): every arrival is kept; a
  worker that has finished step t may start step t + 1 once every worker has finished step
  ``t - K``, i.e. once the slowest is at most K steps behind it. ``K = 0`` holds every worker
  until the slowest has finished the same step: sync.

Arrival orders. A distributed run takes arrivals as the network delivers them; the simulator
from a virtual clock (``--slow-worker``) or a replay of a recorded run (``--replay``):
:mod:`dist_quant.ps.arrivals`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dist_quant.config import CONSISTENCY, TrainConfig


@dataclass
class Decision:
    """What one arrival decides: the arrival is ``dropped`` (too late); the workers whose
    gradients form one ``update`` now (in worker order, the rows of that update); the workers
    ``released`` now (in worker order), who read the parameters after that update."""

    dropped: bool = False
    update: list[int] = field(default_factory=list)
    release: list[int] = field(default_factory=list)


class Policy:
    """Base of the consistency rules (module docstring). ``lockstep``: every released worker
    reads the same version, and the next update is made of gradients of that version only."""

    name = ""
    lockstep = False
    mean = True  # an update is the mean of its gradients (else their sum over W)

    def __init__(self, workers: int):
        self.workers = int(workers)
        self.pending: list[int] = []   # arrived, not applied yet, in arrival order

    def arrive(self, worker: int, read: int, version: int) -> Decision:
        """Worker ``worker``'s gradient, computed on version ``read``, arrives while the
        parameters are at ``version``."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pending": list(self.pending)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["name"] != self.name:
            raise ValueError(f"a {state['name']} policy state given to {self.name}")
        self.pending = [int(i) for i in state["pending"]]


class Synchronous(Policy):
    """``sync`` with ``backup`` backup workers (see the module docstring)."""

    lockstep = True

    def __init__(self, workers: int, backup: int = 0):
        super().__init__(workers)
        if not 0 <= backup < workers:
            raise ValueError(f"backup workers must be in 0..{workers - 1}; got {backup}")
        self.backup = int(backup)
        self.name = f"sync-b{self.backup}" if backup else "sync"

    def arrive(self, worker: int, read: int, version: int) -> Decision:
        if read < version:  # a step already made without it: too late
            return Decision(dropped=True, release=[worker])
        self.pending.append(worker)
        if len(self.pending) < self.workers - self.backup:
            return Decision()
        group, self.pending = sorted(self.pending), []
        return Decision(update=group, release=group)


class Bounded(Policy):
    """``ssp`` with bound ``staleness`` (None: ``async``); see the module docstring."""

    mean = False

    def __init__(self, workers: int, staleness: int | None):
        super().__init__(workers)
        self.staleness = None if staleness is None else int(staleness)
        self.lockstep = self.staleness == 0
        self.name = "async" if staleness is None else f"ssp-k{self.staleness}"
        self.done = [0] * self.workers        # gradients arrived, per worker
        self.waiting: list[int] = []          # arrived, not released yet

    def may_start(self, worker: int) -> bool:
        """Whether ``worker``, which has finished step ``done[worker]``, may start the next."""
        if self.staleness is None:
            return True
        return min(self.done) >= self.done[worker] - self.staleness

    def arrive(self, worker: int, read: int, version: int) -> Decision:
        self.done[worker] += 1
        self.pending.append(worker)
        self.waiting.append(worker)
        ready = sorted(j for j in self.waiting if self.may_start(j))
        if not ready:
            return Decision()
        group, self.pending = sorted(self.pending), []
        self.waiting = [j for j in self.waiting if j not in ready]
        return Decision(update=group, release=ready)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "done": list(self.done), "waiting": list(self.waiting)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.done = [int(d) for d in state["done"]]
        self.waiting = [int(i) for i in state["waiting"]]


# --consistency NAME -> the policy of a config; a new mode is its Policy subclass and one
# register_policy line (the name becomes a choice of --consistency)
POLICIES: dict[str, Callable[[TrainConfig], Policy]] = {
    "sync": lambda cfg: Synchronous(cfg.workers, cfg.backup_workers),
    "ssp": lambda cfg: Bounded(cfg.workers, cfg.staleness),
    "async": lambda cfg: Bounded(cfg.workers, None),
}


def register_policy(name: str, factory: Callable[[TrainConfig], Policy]) -> None:
    """Add ``--consistency name``: ``factory(cfg)`` builds its policy. An asynchronous mode:
    it runs on the star or dedicated servers as ssp and async do."""
    if name in POLICIES:
        raise ValueError(f"consistency mode {name!r} is registered already")
    POLICIES[name] = factory
    CONSISTENCY.append(name)


def unregister_policy(name: str) -> None:
    """Remove a mode added by :func:`register_policy` (the built-in ones stay)."""
    if name in ("sync", "ssp", "async"):
        raise ValueError(f"{name!r} is a built-in consistency mode")
    POLICIES.pop(name)
    CONSISTENCY.remove(name)


def policy_of(cfg: TrainConfig) -> Policy:
    """The policy of ``cfg``'s ``--consistency``, ``--staleness`` and ``--backup-workers``."""
    return POLICIES[cfg.consistency](cfg)
