"""The torchrun process of ``dist-quant train``: started, watched, stopped, and summarised.

:func:`run_torchrun` starts torchrun in its own session (process group) with its stderr on a
pipe, and

- **stops it when told**: SIGINT, SIGTERM and SIGHUP to the launcher are forwarded to torchrun
  as SIGTERM (torchrun passes it to every rank, which ends at once: no rank handles SIGTERM);
  whatever is still alive ``STOP_GRACE`` seconds later (torchrun and every process below it,
  found through ``/proc``) gets SIGKILL. The ranks also die with their parent
  (:func:`die_with_parent`), so nothing is left training after the launcher has returned.
  The exit status is then ``128 + signal`` and the run directory gets ``stopped.json``;
- **takes the job with it when it dies**: torchrun gets ``DIST_QUANT_PARENT`` (this process)
  and, run as ``python -m dist_quant.localrun``, asks the kernel for SIGTERM when its parent dies by
  any signal, SIGKILL included; it then stops its ranks and writes ``stopped.json`` itself
  (``DIST_QUANT_RUN_DIR``);
- **shows errors once**: every byte of torchrun's stderr goes to ``<run_dir>/launch.log``
  (tracebacks, torchrun's own report; when the disk cannot take it, the log stops there, the
  terminal still gets what it would, and the last line says the log is incomplete and why);
  the terminal gets only the ranks' one-line
  ``dist_quant ...`` messages, each distinct message once per attempt (the rank prefix is not
  part of the comparison), the server's progress bar and its ``step t: left out ...`` lines;
- **summarises a failure** torchrun reports but no rank explained (a rank killed by a signal
  prints nothing): one line per such rank from torchrun's failure report, e.g. ``rank 0 (the
  server) was killed by SIGKILL``, then where the full log is; and a line for each elastic
  restart torchrun starts. A rank that torchrun stopped because another failed (its SIGTERM,
  or the SIGKILL below when it did not end) gets no such line: that was the stop, not a fault;
- **bounds the shutdown after a failure**: a rank torchrun sends SIGTERM to (its peers failed)
  and that is still alive ``SHUTDOWN_TIMEOUT`` seconds later gets SIGKILL from the launcher
  (:func:`_enforce_shutdown`), so a hung rank does not hold the run, or its restart, for
  torchrun's 30 s.

Progress on a terminal: the ranks' stderr is a pipe, so the launcher passes
``DIST_QUANT_TTY=1`` when its own stderr is a terminal and
:class:`dist_quant.runtime.progress.Progress`
redraws in place as it would on one.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from dist_quant.runtime.diskfault import write_all

STOP_GRACE = 5.0    # seconds between the forwarded SIGTERM and SIGKILL
SHUTDOWN_TIMEOUT = 1  # seconds a rank torchrun told to stop may take before SIGKILL
TAIL_BYTES = 1 << 18  # torchrun's stderr kept in memory for its failure report
PROGRESS_LINE = re.compile(r"^\[[#.]+\] ")
SHOWN = re.compile(r"^(dist_quant( rank \d+)?: |step \d+: left out )")
RANK_PREFIX = re.compile(r"^dist_quant rank \d+: ")
CAUSE = re.compile(r"\(.*\)")
CLOSING = re.compile(r"Sending process (\d+) closing signal SIG")
KILLED = re.compile(r"failed \(exitcode: (-\d+)\) local_rank: (\d+)(?: \(pid: (\d+)\))?")
FAILURE = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank[^)]*\)\s*\n\s*exitcode\s*:\s*(-?\d+)"
                     r"(?:\s*\(pid:\s*(\d+)\))?")


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent (torchrun) ends; no-op elsewhere.

    The parent may have ended before the signal was armed: then this process was handed to
    another one (its parent pid changed) and leaves at once. A parent that is pid 1 is no sign
    of that: in a container torchrun is the entrypoint, pid 1 of its namespace.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent ended before the signal was armed
            os.write(2, b"dist_quant: the launcher ended before this rank started\n")
            os._exit(1)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from ``/proc``; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def describe_rank(rank: int, method: str) -> str:
    if method == "ddp":
        return f"rank {rank}"
    return "rank 0 (the server)" if rank == 0 else f"rank {rank} (worker {rank - 1})"


class StderrFilter:
    """Splits torchrun's stderr into what the user sees and what only the log keeps."""

    def __init__(self, out: TextIO, method: str = "ps"):
        self.out, self.method = out, method
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.rest = ""
        self.shown: set[str] = set()
        self.errors: list[str] = []     # distinct dist_quant messages shown, all attempts
        self.closing: list[tuple[int, float]] = []   # (pid, when) torchrun sent SIGTERM
        self.closed: set[int] = set()   # every pid torchrun itself stopped (all attempts)

    def feed(self, data: bytes) -> None:
        text = self.rest + self.decoder.decode(data)
        start = 0
        for i, ch in enumerate(text):
            if ch == "\n":
                self._segment(text[start:i + 1])
                start = i + 1
            elif ch == "\r" and i > start:
                self._segment(text[start:i])
                start = i
        self.rest = text[start:]

    def close(self) -> None:
        if self.rest:
            self._segment(self.rest)
            self.rest = ""

    def _segment(self, seg: str) -> None:
        body = seg.lstrip("\r").rstrip("\n")
        if PROGRESS_LINE.match(body):
            self._write(seg)
        elif SHOWN.match(body):
            key = CAUSE.sub("()", RANK_PREFIX.sub("", body))
            if key not in self.shown:
                self.shown.add(key)
                if body.startswith("dist_quant"):
                    self.errors.append(body)
                self._write(body + "\n")
        elif m := CLOSING.search(body):
            self.closing.append((int(m.group(1)), time.monotonic()))
            self.closed.add(int(m.group(1)))
        elif m := KILLED.search(body):   # torchrun's line for a rank ended by a signal
            self.shown.clear()   # the next attempt's messages are new
            if m.group(3) is not None and int(m.group(3)) in self.closed:
                return   # torchrun's own stop of a rank after another one failed: no fault
            line = killed_line(int(m.group(2)), int(m.group(1)), self.method)
            self.errors.append(line)
            self._write(line + "\n")

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.out.write(text)
            self.out.flush()


def killed_line(rank: int, code: int, method: str) -> str:
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"dist_quant: {describe_rank(rank, method)} was killed by {name}"


def failure_report(log_text: str, method: str, explained: list[str],
                   stopped: set[int] | frozenset[int] = frozenset()) -> list[str]:
    """Lines for the failed ranks of torchrun's report that no line shown so far explains:
    killed by a signal, or (when nothing was shown) ended with a traceback. A rank whose pid
    is in ``stopped`` (torchrun stopped it after another rank failed, and the launcher killed
    it if it did not end) ended by that stop, not by a fault of its own: no line."""
    lines, seen = [], set()
    for m in FAILURE.finditer(log_text):
        rank, code = int(m.group(1)), int(m.group(2))
        if rank in seen:
            continue
        seen.add(rank)
        if code < 0 and m.group(3) is not None and int(m.group(3)) in stopped:
            continue
        if code < 0:
            line = killed_line(rank, code, method)
            if line not in explained:
                lines.append(line)
        elif not explained:
            lines.append(f"dist_quant: {describe_rank(rank, method)} failed with exit status "
                         f"{code} (its traceback is in the log)")
    return lines


def _enforce_shutdown(filt: StderrFilter, torchrun: int) -> None:
    """SIGKILL a rank torchrun told to stop ``SHUTDOWN_TIMEOUT`` seconds ago and that is still
    there (a hung or stopped process ignores SIGTERM; torchrun itself would wait 30 s: it
    passes its ``--shutdown-timeout`` to a stop on a signal only, not after a failed rank)."""
    now = time.monotonic()
    due = [pid for pid, when in filt.closing if now - when >= SHUTDOWN_TIMEOUT]
    if not due:
        return
    filt.closing = [(pid, when) for pid, when in filt.closing if pid not in due]
    mine = set(descendants(torchrun))
    for pid in due:
        if pid in mine:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def write_stopped(run_dir: Path, stopped_by: str, **extra: object) -> None:
    """``<run_dir>/stopped.json`` (what stopped the run, when, whether ``summary.json`` was
    written); nothing when the directory cannot take it (a full or read-only disk)."""
    with contextlib.suppress(OSError):
        (run_dir / "stopped.json").write_text(json.dumps(
            {"stopped_by": stopped_by, "time": time.time(),
             "summary_written": (run_dir / "summary.json").is_file(), **extra}) + "\n")


def run_torchrun(cmd: list[str], env: dict[str, str], run_dir: Path, method: str = "ps",
                 out: TextIO | None = None) -> int:
    """Run ``cmd`` (torchrun) as described in the module docstring; return the exit status."""

    out = out if out is not None else sys.stderr
    log_path = run_dir / "launch.log"
    env = {**env, "DIST_QUANT_PARENT": str(os.getpid()), "DIST_QUANT_RUN_DIR": str(run_dir)}
    with contextlib.suppress(AttributeError, ValueError):
        if out.isatty():
            env["DIST_QUANT_TTY"] = "1"
    filt = StderrFilter(out, method)
    log_failed: list[OSError] = []
    tail = bytearray()   # the end of torchrun's stderr, for the report when the log failed
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab", buffering=0)  # noqa: SIM115 (closed below)
    except OSError as err:
        filt._write(f"dist_quant: cannot write {log_path} ({err.strerror or err}); nothing "
                    "was started\n")
        return 1
    with log:
        start = log.seek(0, os.SEEK_END)
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, start_new_session=True)

        def pump() -> None:
            while chunk := os.read(proc.stderr.fileno(), 65536):
                if not log_failed:
                    try:
                        write_all(log.fileno(), chunk)
                    except OSError as err:   # a full disk: the terminal still gets it all
                        log_failed.append(err)
                tail.extend(chunk)
                del tail[:-TAIL_BYTES]
                filt.feed(chunk)
            filt.close()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        stopped: list[int] = []

        def forward(signum, frame) -> None:
            if not stopped:
                stopped.append(signum)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)

        old = {}
        if threading.current_thread() is threading.main_thread():
            old = {s: signal.signal(s, forward)
                   for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            deadline = None
            while proc.poll() is None:
                if stopped and deadline is None:
                    deadline = time.monotonic() + STOP_GRACE
                if deadline is not None and time.monotonic() > deadline:
                    for pid in [proc.pid, *descendants(proc.pid)]:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                _enforce_shutdown(filt, proc.pid)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.1)
            for pid in descendants(proc.pid):   # anything torchrun left behind
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        reader.join(timeout=5)
    code = proc.returncode
    if stopped:
        name = signal.Signals(stopped[0]).name
        write_stopped(run_dir, name)
        filt._write(f"dist_quant: stopped by {name}; the run did not finish "
                    f"(run directory {run_dir})\n")
        return 128 + stopped[0]
    if code != 0:
        text = bytes(tail).decode("utf-8", errors="replace")
        if not log_failed:
            with open(log_path, "rb") as fh:
                fh.seek(start)
                text = fh.read().decode("utf-8", errors="replace")
        for line in failure_report(text, method, filt.errors, filt.closed):
            filt._write(line + "\n")
        where = (f"full log: {log_path}" if not log_failed else
                 f"{log_path} is incomplete ({log_failed[0].strerror or log_failed[0]})")
        filt._write(f"dist_quant: the run failed (exit status {code}); {where}\n")
    elif log_failed:
        filt._write(f"dist_quant: {log_path} is incomplete "
                    f"({log_failed[0].strerror or log_failed[0]})\n")
    return code


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, which subprocesses
    inherit) to ``path`` for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(path, "ab") as fh:
            os.dup2(fh.fileno(), 1)
            os.dup2(fh.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])


def stopped_by(code: int | None, run_dir: Path) -> int | None:
    """The signal that stopped a job :func:`run_torchrun` ran (``128 + signal``, with its
    ``stopped.json`` written), or None when it ended by itself."""
    stops = {128 + s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    if code in stops and (Path(run_dir) / "stopped.json").is_file():
        return int(code) - 128
    return None
