"""How payloads travel between the parameter server and its W workers.

Every message is a flat tensor whose size both ends know from the config before it is sent,
moved with point-to-point ``isend``/``irecv`` between the server and each worker (one link per
worker and direction, so the bytes of each link are what that link carried). Nothing on the
training path is pickled.

Messages of one synchronous step ``t`` (``n`` = parameter count, ``k`` = BatchNorm running
statistics count, ``up``/``down`` = the compressors' ``payload_nbytes(n)``):

======================  ==========================  ===============================  =========
message                 direction                   tensor                           counted
======================  ==========================  ===============================  =========
gradient payload        worker i -> server          ``uint8[up]``                    up
telemetry               worker i -> server          ``float64[4]``: loss, decode s,   no
                                                    compute s, encode s
BN running statistics   worker i -> server          ``float32[k]`` (evaluation        up
                                                    steps only)
control                 server -> worker i          ``int64[1]``: continue / last /   no
                                                    abort
parameters payload      server -> worker i          ``uint8[down]``                  down
worker state            worker i -> server (or      ``int64[1]`` size, then           no
                        back, on resume)            ``uint8[size]`` (checkpoints
                                                    only)
======================  ==========================  ===============================  =========

Byte counting. ``bytes_up`` and ``bytes_down`` add the size of every counted tensor handed to
this transport: on the server, the uplink tensors it receives and the downlink tensors it
sends (the sizes are fixed, so this equals what the workers handed to theirs). Per step that
is exactly ``W * up`` bytes up (plus ``W * 4k`` at evaluation steps) and ``W * down`` bytes
down. Telemetry, control and checkpoint traffic are bookkeeping, not training payload, and
are left out (a few dozen bytes per step; a link-level measurement sees them).

A peer that dies or stops answering makes the waiting side raise :class:`PeerLostError`
naming the peer and the message, after at most the process-group timeout ``T``. Who is
blamed must be the peer that stopped: a worker waits for the server ``T + SERVER_GRACE``
seconds (the server's own wait on a hung worker starts after the healthy workers' waits and
ends at ``T``), and a server that loses worker ``j`` tells the others with the control code
``LOST + j's rank`` (:meth:`Transport.notify_lost`) before it ends, so every rank reports
the same lost peer; the workers still waiting for the server raise :class:`PeerLostError`
naming that rank. For that message to reach a worker whose own sends the server has stopped
receiving (gloo completes a send only once the peer receives it), a worker's sends are
completed lazily: :meth:`Transport.send_to_server` posts the send, and the next
:meth:`Transport.recv_from_server` waits for its message first and for the posted sends after
(:meth:`Transport.flush` at the end of the run). The tensors stay referenced until then.
"""

from __future__ import annotations

import datetime
import io
import re
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

# message tags (gloo matches on (peer, tag); nccl orders per peer and ignores them)
TAG_PAYLOAD, TAG_TELEMETRY, TAG_STATS, TAG_CONTROL, TAG_DOWN, TAG_SIZE, TAG_BLOB = range(1, 8)

# control codes sent to every worker after each step
CONTINUE, LAST, ABORT = 0, 1, 2
DONE, LOST = 0, 1 << 20  # notices: the run ended; LOST + r: the server lost rank r
TAG_NOTICE = 8
SERVER_GRACE = 3.0  # seconds a worker waits for the server beyond the timeout
NOTIFY_S = 2.0  # seconds the server spends telling the other workers which rank was lost

TELEMETRY = ("loss", "decode", "compute", "encode")  # worker -> server, per step


class PeerLostError(RuntimeError):
    """A peer died or did not answer within the process-group timeout; ``rank`` is its global
    rank (None when unknown)."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


def _cause(err: BaseException) -> str:
    """The first line of a backend error, without the C++ source location."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". This is typically")[0]  # gloo's advice to read the logs


def blob_from(obj: Any) -> torch.Tensor:
    """Serialise a state dict of tensors and plain values into a flat uint8 tensor."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def blob_to(tensor: torch.Tensor) -> Any:
    """Inverse of :func:`blob_from`; loads with ``weights_only=True``."""
    return torch.load(io.BytesIO(tensor.cpu().numpy().tobytes()), weights_only=True)


class Transport:
    """Point-to-point exchange between the server rank and the worker ranks.

    ``worker_ranks[i]`` is the global rank of worker ``i``. The server uses the ``*_workers``
    methods, a worker the ``*_server`` ones. ``group`` is the process group whose timeout
    bounds every wait (None = the default group).
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
        self.bytes_up = 0
        self.bytes_down = 0

    def _isend(self, tensor: torch.Tensor, peer: int, tag: int) -> Any:
        return dist.isend(tensor, dst=peer, group=self.group, tag=tag)

    def _irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> Any:
        return dist.irecv(tensor, src=peer, group=self.group, tag=tag)

    def _wait(self, works: list[Any], what: str, peers: list[int]) -> None:
        for work, peer in zip(works, peers, strict=True):
            try:
                if peer == self.server_rank and self.server_wait is not None:
                    work.wait(timeout=self.server_wait)
                else:
                    work.wait()
            except RuntimeError as err:  # DistBackendError and gloo/nccl errors derive from it
                raise PeerLostError(f"lost contact with {self.describe(peer)} while exchanging "
                                    f"the {what} ({_cause(err)})", peer) from err

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

    def lost_error(self, code: int) -> PeerLostError:
        """Worker: the error for the notice ``LOST + r`` the server sent."""
        rank = code - LOST
        return PeerLostError(f"{self.describe(rank)} stopped answering (reported by "
                             f"{self.describe(self.server_rank)})", rank)

    def describe(self, rank: int) -> str:
        if rank == self.server_rank:
            return f"rank {rank} (the server)"
        return f"rank {rank} (worker {self.worker_ranks.index(rank)})"

    @property
    def num_workers(self) -> int:
        return len(self.worker_ranks)

    # ---- server side ---------------------------------------------------------------------
    def recv_from_workers(self, numel: int, dtype: torch.dtype, tag: int, what: str,
                          counted: bool = False) -> torch.Tensor:
        """One ``[W, numel]`` tensor: row ``i`` comes from worker ``i``."""
        out = torch.empty(self.num_workers, numel, dtype=dtype, device=self.device)
        works = [self._irecv(out[i], r, tag) for i, r in enumerate(self.worker_ranks)]
        self._wait(works, what, self.worker_ranks)
        if counted:
            self.bytes_up += out.numel() * out.element_size()
        return out

    def send_to_workers(self, tensor: torch.Tensor, tag: int, what: str,
                        counted: bool = False) -> None:
        """The same flat tensor to every worker, one point-to-point send per link."""
        tensor = tensor.to(self.device).contiguous()
        works = [self._isend(tensor, r, tag) for r in self.worker_ranks]
        self._wait(works, what, self.worker_ranks)
        if counted:
            self.bytes_down += self.num_workers * tensor.numel() * tensor.element_size()

    def recv_blobs(self, what: str) -> list[Any]:
        sizes = self.recv_from_workers(1, torch.int64, TAG_SIZE, what)
        out = []
        for i, r in enumerate(self.worker_ranks):
            buf = torch.empty(int(sizes[i, 0]), dtype=torch.uint8, device=self.device)
            self._wait([self._irecv(buf, r, TAG_BLOB)], what, [r])
            out.append(blob_to(buf))
        return out

    def send_blobs(self, objs: list[Any], what: str) -> None:
        for r, obj in zip(self.worker_ranks, objs, strict=True):
            blob = blob_from(obj).to(self.device)
            size = torch.tensor([blob.numel()], dtype=torch.int64, device=self.device)
            works = [self._isend(size, r, TAG_SIZE), self._isend(blob, r, TAG_BLOB)]
            self._wait(works, what, [r, r])

    # ---- worker side ---------------------------------------------------------------------
    def send_to_server(self, tensor: torch.Tensor, tag: int, what: str,
                       counted: bool = False) -> None:
        tensor = tensor.to(self.device).contiguous()
        self._wait([self._isend(tensor, self.server_rank, tag)], what, [self.server_rank])
        if counted:
            self.bytes_up += tensor.numel() * tensor.element_size()

    def recv_from_server(self, numel: int, dtype: torch.dtype, tag: int, what: str,
                         counted: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        """One flat tensor from the server; into ``out`` (contiguous, ``numel`` values of
        ``dtype`` on this transport's device) when given, a new tensor otherwise."""
        if out is None:
            out = torch.empty(numel, dtype=dtype, device=self.device)
        elif (out.numel() != numel or out.dtype != dtype or out.device != self.device
              or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous {dtype} tensor of {numel} values on "
                             f"{self.device}, got {out.dtype} with {out.numel()} on {out.device}")
        self._wait([self._irecv(out, self.server_rank, tag)], what, [self.server_rank])
        if counted:
            self.bytes_down += out.numel() * out.element_size()
        return out

    def send_blob(self, obj: Any, what: str) -> None:
        blob = blob_from(obj).to(self.device)
        size = torch.tensor([blob.numel()], dtype=torch.int64, device=self.device)
        self.send_to_server(size, TAG_SIZE, what)
        self.send_to_server(blob, TAG_BLOB, what)

    def recv_blob(self, what: str) -> Any:
        size = int(self.recv_from_server(1, torch.int64, TAG_SIZE, what)[0])
        return blob_to(self.recv_from_server(size, torch.uint8, TAG_BLOB, what))
