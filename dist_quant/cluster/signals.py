"""Stop signals around a cluster job, for every engine.

A job holds things outside this process (namespaces, containers, their processes) that must be
removed however it ends: :func:`interrupts_raise` turns SIGTERM and SIGHUP into the
``KeyboardInterrupt`` of Ctrl-C, so one ``try``/``finally`` cleans up on all three, and
:func:`no_interrupts` holds every stop signal off while that cleanup runs. Both do nothing
outside the main thread (signal handlers can only be set there).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """SIGTERM/SIGHUP raise KeyboardInterrupt (like Ctrl-C), so cleanup runs on all three."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def no_interrupts() -> Iterator[None]:
    """Cleanup must not itself be interrupted by a second Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN)
           for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
