"""A rank's last line of defence against a collective that never returns.

gloo ends a collective that waits on a dead or silent peer after the process group's timeout
(``--timeout``), and the rank then names the lost peer. One kind of hang escapes that: a
collective that never *starts*, because the thread that would run it is itself blocked (a
communication hook that waits, inside one of gloo's callbacks, for work queued behind it: every
rank then waits for good, and no timeout of gloo's ever fires). :class:`StepWatchdog` covers it.

The training loop calls :meth:`StepWatchdog.beat` after every step; a daemon thread checks
that the last beat is at most ``limit`` seconds old and otherwise ends the process with one
line naming the rank and the step it was in (:func:`dist_quant.runtime.rank.fail`, exit 1), so
torchrun's agent stops the other ranks. ``limit`` is twice ``--timeout``: every wait that gloo
times out itself is reported first, by gloo's timeout and the rank's own sentence for it, and
the watchdog speaks only when nothing else will. The thread wakes every ``limit / 20`` seconds
(at most once a second), so a hang ends within ``1.05 * limit`` of the last beat.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from dist_quant.runtime.rank import fail


def _default_end(who: str, message: str) -> None:
    fail(who, message, 1)


class StepWatchdog:
    """Ends the process when no step finished within ``limit`` seconds (see the module)."""

    def __init__(self, who: str, limit: float,
                 end: Callable[[str, str], None] = _default_end) -> None:
        if not limit > 0:
            raise ValueError(f"the watchdog's limit must be positive; got {limit}")
        self.who, self.limit, self._end = who, float(limit), end
        self.step = 0
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="dist_quant-watchdog",
                                        daemon=True)

    def __enter__(self) -> StepWatchdog:
        self._last = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def beat(self, step: int) -> None:
        """Step ``step`` finished."""
        self.step, self._last = step, time.monotonic()

    def _watch(self) -> None:
        every = min(1.0, self.limit / 20)
        while not self._stop.wait(every):
            idle = time.monotonic() - self._last
            if idle > self.limit:
                self._end(self.who, f"no training step finished for {idle:.0f} s (step "
                          f"{self.step + 1} never completed; twice --timeout is "
                          f"{self.limit:g} s): a collective never started or never returned, "
                          "and no timeout of the backend fired; ending the run")
                return
