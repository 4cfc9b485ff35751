"""Point-to-point links between ranks, and how a lost peer is named.

:class:`Transport` holds the primitives the parameter-server job moves its messages with
(:mod:`dist_quant.ps.fabric` builds every message of a step on them): ``isend``/``irecv``
of flat tensors whose sizes both ends know from the config, on a process group whose timeout
``T`` bounds every wait. Nothing on the training path is pickled; states at checkpoints and on
resume travel as ``weights_only`` blobs (:func:`blob_from`, :func:`blob_to`).

A peer that dies or stops answering makes the waiting side raise :class:`PeerLostError`
naming the peer and the message, after at most ``T``; so does a link found closed when a send
or receive is posted (gloo sends at once, and raises there). Who is blamed must be the peer that
stopped: the others wait for the leader (``server_rank`` here) ``T + SERVER_GRACE`` seconds, so
the leader's own wait on a hung rank ends first, and a leader that loses rank ``j`` tells every
other rank through a separate gloo group (:meth:`Transport.notify_lost`, the notice
``LOST + j``; :meth:`Transport.watch_notices` waits for it in a thread), so every rank reports
the same lost peer. A run that ends normally sends ``DONE``.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from dist_quant.errors import PeerLostError  # noqa: F401 (re-exported)

# message tags (gloo matches on (peer, tag); nccl orders per peer and ignores them)
TAG_PAYLOAD, TAG_TELEMETRY, TAG_STATS, TAG_CONTROL, TAG_DOWN, TAG_SIZE, TAG_BLOB = range(1, 8)

# control codes the leader sends every rank after each step
CONTINUE, LAST, ABORT = 0, 1, 2
DONE, LOST = 0, 1 << 20  # notices: the run ended; LOST + r: the leader lost rank r
TAG_NOTICE, TAG_REPORT = 8, 9  # on the notice group: server -> others; others -> server
SERVER_GRACE = 3.0  # seconds a worker waits for the server beyond the timeout
NOTIFY_S = 2.0  # seconds the server spends telling the other workers which rank was lost


def _cause(err: BaseException) -> str:
    """The first line of a backend error, without the C++ source location."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". This is typically")[0]  # gloo's advice to read the logs


@contextlib.contextmanager
def collective(doing: str) -> Iterator[None]:
    """A backend error inside becomes a :class:`PeerLostError` saying what failed (the peer is
    unknown: start-up collectives such as ``all_gather``, ``broadcast``, ``barrier``)."""
    try:
        yield
    except PeerLostError:
        raise
    except RuntimeError as err:
        raise PeerLostError(f"lost contact with a peer while {doing} ({_cause(err)})") from err


def blob_from(obj: Any) -> torch.Tensor:
    """Serialise a state dict of tensors and plain values into a flat uint8 tensor."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def blob_to(tensor: torch.Tensor) -> Any:
    """Inverse of :func:`blob_from`; loads with ``weights_only=True``."""
    return torch.load(io.BytesIO(tensor.cpu().numpy().tobytes()), weights_only=True)


class Transport:
    """Point-to-point primitives between ``server_rank`` (the rank that names lost peers) and
    the ``worker_ranks`` (the others). ``group`` is the process group whose timeout bounds every
    wait (None = the default group); ``timeout`` adds ``SERVER_GRACE`` to the waits on the
    server; ``notice_group`` carries the lost-peer notices (None: no notices).
    """

    def __init__(self, server_rank: int, worker_ranks: list[int], device: torch.device,
                 group: Any = None, timeout: float | None = None, notice_group: Any = None):
        self.group = group
        self.notice_group = notice_group
        # waits on the server get SERVER_GRACE more than the group's timeout (module docstring)
        self.server_wait = (None if timeout is None
                            else datetime.timedelta(seconds=timeout + SERVER_GRACE))
        self.server_rank = int(server_rank)
        self.worker_ranks = [int(r) for r in worker_ranks]
        self.device = torch.device(device)

    def _isend(self, tensor: torch.Tensor, peer: int, tag: int) -> Any:
        try:
            return dist.isend(tensor, dst=peer, group=self.group, tag=tag)
        except RuntimeError as err:  # gloo sends at once: a closed link raises here
            raise self.lost(peer, "sending to it", err) from err

    def _irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> Any:
        try:
            return dist.irecv(tensor, src=peer, group=self.group, tag=tag)
        except RuntimeError as err:  # a link already closed raises when the receive is posted
            raise self.lost(peer, "receiving from it", err) from err

    def lost(self, peer: int, doing: str, err: BaseException) -> PeerLostError:
        """The error naming ``peer``, lost while ``doing`` (``err``: the backend's, whose first
        line follows in parentheses without its source location)."""
        return PeerLostError(f"lost contact with {self.describe(peer)} while {doing} "
                             f"({_cause(err)})", peer)

    def _wait(self, works: list[Any], what: str, peers: list[int]) -> None:
        for work, peer in zip(works, peers, strict=True):
            try:
                if peer == self.server_rank and self.server_wait is not None:
                    work.wait(timeout=self.server_wait)
                else:
                    work.wait()
            except RuntimeError as err:  # DistBackendError and gloo/nccl errors derive from it
                raise self.lost(peer, f"exchanging the {what}", err) from err

    def _notify(self, code: int, skip: int | None = None) -> None:
        """Server: send the notice ``code`` to every worker but ``skip`` (best effort, at most
        ``NOTIFY_S`` seconds each; a worker that is gone is skipped)."""
        if self.notice_group is None:
            return
        tensor = torch.tensor([code], dtype=torch.int64)
        for r in self.worker_ranks:
            if r == skip:
                continue
            try:
                dist.isend(tensor, dst=r, group=self.notice_group, tag=TAG_NOTICE).wait(
                    timeout=datetime.timedelta(seconds=NOTIFY_S))
            except RuntimeError:
                continue

    def notify_lost(self, lost: int | None) -> None:
        """Server: tell the other workers that rank ``lost`` stopped answering."""
        if lost is not None:
            self._notify(LOST + int(lost), skip=lost)

    def notify_done(self) -> None:
        """Server: the run ended normally; the workers' notice threads end."""
        self._notify(DONE)

    def watch_notices(self, on_lost: Callable[[PeerLostError], None]) -> threading.Thread | None:
        """Worker: a thread waiting for the server's notice; ``on_lost(error)`` runs in it when
        the server reports a lost rank (it should end the process). Join it after the run."""
        if self.notice_group is None:
            return None
        buf = torch.zeros(1, dtype=torch.int64)

        def wait() -> None:
            try:
                dist.irecv(buf, src=self.server_rank, group=self.notice_group,
                           tag=TAG_NOTICE).wait()
            except RuntimeError:   # the server is gone: the main thread reports it
                return
            if int(buf[0]) >= LOST:
                on_lost(self.lost_error(int(buf[0])))

        thread = threading.Thread(target=wait, name="dist_quant-notices", daemon=True)
        thread.start()
        return thread

    def lost_error(self, code: int, reporter: int | None = None) -> PeerLostError:
        """The error for the notice ``LOST + r`` that ``reporter`` (default the server) sent."""
        rank = code - LOST
        by = self.server_rank if reporter is None else reporter
        return PeerLostError(f"{self.describe(rank)} stopped answering (reported by "
                             f"{self.describe(by)})", rank)

    def _report(self, code: int) -> None:
        if self.notice_group is None:
            return
        with contextlib.suppress(RuntimeError):  # best effort: the server may be gone
            dist.isend(torch.tensor([code], dtype=torch.int64), dst=self.server_rank,
                       group=self.notice_group, tag=TAG_REPORT).wait(
                timeout=datetime.timedelta(seconds=NOTIFY_S))

    def report_lost(self, lost: int | None) -> None:
        """Worker: tell the server that rank ``lost`` stopped answering (best effort). The
        server may be waiting on this worker meanwhile, and would otherwise blame it."""
        if lost is not None and lost != self.server_rank:
            self._report(LOST + int(lost))

    def report_done(self) -> None:
        """Worker: this rank finished the run; the server's report thread counts it."""
        self._report(DONE)

    def watch_reports(self, on_lost: Callable[[PeerLostError], None]) -> threading.Thread | None:
        """Server: a thread receiving the workers' reports (from any rank). On ``LOST + r`` it
        tells every other rank (:meth:`notify_lost`) and runs ``on_lost(error)`` (which should
        end the process); it ends once every worker has reported ``DONE``."""
        if self.notice_group is None:
            return None

        def wait() -> None:
            done = 0
            while done < len(self.worker_ranks):
                buf = torch.zeros(1, dtype=torch.int64)
                try:  # from any rank; returns the sender's global rank
                    reporter = dist.recv(buf, src=None, group=self.notice_group, tag=TAG_REPORT)
                except RuntimeError:   # a worker is gone: the main thread reports it
                    return
                code = int(buf[0])
                if code < LOST:
                    done += 1
                    continue
                err = self.lost_error(code, reporter)
                self.notify_lost(err.rank)
                on_lost(err)
                return

        thread = threading.Thread(target=wait, name="dist_quant-reports", daemon=True)
        thread.start()
        return thread

    def describe(self, rank: int) -> str:
        if rank == self.server_rank:
            return f"rank {rank} (the server)"
        return f"rank {rank} (worker {self.worker_ranks.index(rank)})"
