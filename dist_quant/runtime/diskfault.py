"""A write to the run directory that fails for lack of space or permission.

Every write of a run's records (``metrics.jsonl``, ``config.json``, ``summary.json``,
checkpoints; :mod:`dist_quant.runtime.metrics`, :mod:`dist_quant.runtime.checkpoint`) runs inside
:func:`disk_write`. An ``OSError`` whose errno says the disk cannot take the data
(``DISK_ERRNOS``: no space, quota, file too large, read-only, permission) first runs the
write's ``undo`` (remove the temporary file, cut ``metrics.jsonl`` back to its last whole
line), then becomes :class:`DiskFault`: a :class:`~dist_quant.errors.RunAborted`, so the
rank ends with the one line every aborted run gets, which names the path, the step, and the
newest complete checkpoint to continue from with ``--resume``. Any other ``OSError`` is left
as it is.

What was written before stays valid: checkpoints are renamed into place only when complete
(the previous ``latest`` stays current), JSON files likewise, and ``metrics.jsonl`` ends on a
whole line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from dist_quant.errors import ConfigError, RunAborted
from dist_quant.runtime.checkpoint_files import latest_checkpoint

DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                         errno.EPERM})


class DiskFault(RunAborted):
    """The run directory could not take a write (``DISK_ERRNOS``); the message says what to
    do next."""

    def __init__(self, path: Path, step: int, run_dir: Path, err: OSError):
        self.path, self.step, self.run_dir = Path(path), int(step), Path(run_dir)
        self.errno = err.errno
        super().__init__(f"cannot write {self.path} at step {self.step} "
                         f"({err.strerror or err}); {next_step(self.run_dir)}")


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, when it names a complete one; else None."""
    try:
        return latest_checkpoint(run_dir)
    except (ConfigError, OSError):
        return None


def next_step(run_dir: Path) -> str:
    """What to do after the fault: continue from the newest complete checkpoint, or start
    again when there is none."""
    newest = newest_checkpoint(run_dir)
    if newest is None:
        return "no checkpoint was written, so the run starts again: free space or choose " \
               "another --run-dir"
    return (f"the newest complete checkpoint is {newest}: free space and continue with "
            f"--resume {run_dir} (add --run-dir DIR to continue elsewhere)")


@contextlib.contextmanager
def disk_write(path: Path, step: int, run_dir: Path,
               undo: Callable[[], object] | None = None) -> Iterator[None]:
    """Run a write of ``path`` at ``step``; a disk-full or permission error runs ``undo`` and
    raises :class:`DiskFault` (module docstring)."""
    try:
        yield
    except OSError as err:
        if err.errno not in DISK_ERRNOS:
            raise
        if undo is not None:
            with contextlib.suppress(OSError):
                undo()
        raise DiskFault(path, step, run_dir, err) from err


class WholeLines:
    """An append-only text file (``write``, ``flush``, ``fileno``, ``close``) whose every
    write lands whole or not at all: the bytes go straight to the file (no buffer left to
    fail later), and a write the disk cannot take first cuts the file back to its size
    before that write, then raises :class:`DiskFault` at the step the text names
    (``"step": t``; else the last one seen, from ``step`` on)."""

    STEP = re.compile(r'"step": (\d+)')

    def __init__(self, path: Path, run_dir: Path, step: int = 0):
        self.path, self.run_dir, self.step = Path(path), Path(run_dir), int(step)
        self.name = str(path)
        with disk_write(self.path, self.step, self.run_dir):
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, text: str) -> int:
        if found := self.STEP.search(text):
            self.step = int(found.group(1))
        size = os.fstat(self._fd).st_size
        with disk_write(self.path, self.step, self.run_dir,
                        undo=lambda: os.ftruncate(self._fd, size)):
            write_all(self._fd, text.encode())
        return len(text)

    def flush(self) -> None:
        """Nothing is buffered."""

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte of ``data`` is written (a write may take fewer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
