"""Stop signals around a cluster job, for every engine.

A job holds things outside this process (namespaces, containers, their processes) that must be
removed however it ends: :func:`interrupts_raise` turns SIGINT, SIGTERM and SIGHUP into
``KeyboardInterrupt``, so one ``try``/``finally`` cleans up on all three, and
:func:`no_interrupts` holds every stop signal off while that cleanup runs. Both do nothing
outside the main thread (signal handlers can only be set there).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP raise KeyboardInterrupt, so cleanup runs on all three. SIGINT
    too gets its handler here: a process started in the background by a shell without job
    control, or by a parent that ignored it, inherits SIGINT ignored, and Python then keeps
    ignoring it; and none of the three stays blocked (a mask inherited from the parent)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, signal.default_int_handler if s == signal.SIGINT else handler)
           for s in STOP_SIGNALS}
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def no_interrupts() -> Iterator[None]:
    """Cleanup must not itself be interrupted by a second Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
