"""Wall time and thread CPU time of a phase, taken together.

Every phase a rank records (compute, encode, decode, update, evaluation) is measured on two
clocks at once: :func:`time.perf_counter` (wall: what the phase took on this machine, waiting
for the CPU included) and :func:`time.thread_time` (CPU: the seconds the **calling thread** ran
on a CPU, user and system, in that interval). :func:`now` reads both; the difference of two
readings (:class:`Clocks`) is the phase's ``wall`` and ``cpu``. The wall readings are the ones
the phases always took, at the same points of the code, so the recorded wall times keep their
meaning; the CPU reading is taken right after the wall one.

Why both: when the runnable processes outnumber the cores, a phase's wall time grows with the
queue for the CPU, while its thread CPU time stays what the computation costs. A phase that
waits (for bytes, a lock, a sleep such as ``--slow-worker``'s) adds wall time, not CPU time.

What is counted. Only the thread that runs the phase: torch runs with one intra-op thread in
every training process (:mod:`dist_quant.runtime.rank`), so a CPU phase's work is on that
thread. Not counted: work on other threads, namely the transport's (gloo sends and receives
bytes on threads of its own), the threads that wait for asynchronous arrivals
(:mod:`dist_quant.ps.arrivals`: they block, they do not compute), DDP's callbacks run when a
collective completes (:mod:`dist_quant.baselines.ddp`), and any other process.
``--overlap``'s encodes run inside backward's hooks on the training thread, so they are
counted (as ``encode``, taken out of ``compute``).

The rest of the recording thread. Each phase's CPU is :func:`charge`-d to its thread when it
is measured; a :class:`Window` over a step gives the CPU its thread spent in the step outside
any charged phase (:meth:`Window.rest`): the fabric's packing, sending and bookkeeping, the
``communicate`` entry of the step's ``cpu``. In ``--simulate`` one thread runs every role, so
that rest is the simulator's own overhead; distributed, it is the recording rank's.
"""

from __future__ import annotations

import threading
import time

_local = threading.local()


class Clocks:
    """A reading of both clocks (:func:`now`), or the difference of two: seconds."""

    __slots__ = ("cpu", "wall")

    def __init__(self, wall: float = 0.0, cpu: float = 0.0):
        self.wall, self.cpu = wall, cpu

    def __sub__(self, other: Clocks) -> Clocks:
        return Clocks(self.wall - other.wall, self.cpu - other.cpu)

    def __add__(self, other: Clocks) -> Clocks:
        return Clocks(self.wall + other.wall, self.cpu + other.cpu)

    def __repr__(self) -> str:
        return f"Clocks(wall={self.wall!r}, cpu={self.cpu!r})"


def now() -> Clocks:
    """Both clocks now: ``perf_counter`` first (the phase's wall point), then this thread's
    ``thread_time``."""
    wall = time.perf_counter()
    return Clocks(wall, time.thread_time())


def charge(cpu: float) -> None:
    """Count ``cpu`` seconds of this thread as spent in a recorded phase (see
    :class:`Window`). Call it once per measured phase, with the CPU figure it records."""
    _local.charged = charged() + max(0.0, float(cpu))


def charged() -> float:
    """The CPU seconds charged to phases on this thread so far."""
    return getattr(_local, "charged", 0.0)


def since(start: Clocks, charge_cpu: bool = False) -> Clocks:
    """The time from ``start`` to now on both clocks; ``charge_cpu``: also :func:`charge` its
    CPU time."""
    spent = now() - start
    if charge_cpu:
        charge(spent.cpu)
    return spent


class Window:
    """A stretch of this thread's time (a step): started now, or again by :meth:`start`."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self.t0 = now()
        self.charged0 = charged()

    def elapsed(self) -> Clocks:
        return now() - self.t0

    def rest(self, minus: float = 0.0) -> float:
        """The CPU seconds this thread spent since :meth:`start` outside the phases charged
        since then, less ``minus`` (CPU of something excluded from the step and not charged,
        e.g. an evaluation); never negative."""
        spent = time.thread_time() - self.t0.cpu
        return max(0.0, spent - (charged() - self.charged0) - minus)
