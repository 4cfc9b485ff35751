"""How the messages of a step move between the ranks of a :class:`Placement`.

``send(src, dst, tag, tensor)`` and ``recv(src, dst, tag, ...)`` name both ends, so the same
calls serve one process holding every rank (:class:`LocalFabric`, the ``--simulate``
reference) and a torch.distributed rank holding one (:class:`RemoteFabric`). A message whose
two ends are on the same rank is handed over in memory in both. Every message has a size both
ends know from the config; nothing on the training path is pickled (states at checkpoints and
on resume travel as blobs, as in :mod:`dist_quant.core.transport`). The messages are those of
:mod:`dist_quant.core.transport` (gradient payload, telemetry, BN statistics, control, parameters
payload, state blobs; same tags) plus two from each server to the leader: its step's status
(``float64[11]``, see ``protocol.STATUS``) and, at evaluation steps, its shard of ``theta``.

Remote sends are posted (``isend``) and waited for only at :meth:`RemoteFabric.flush`, at the
end of the step: every rank posts all its sends of a phase before it blocks in a receive, so
the all-to-all of the colocated job cannot deadlock on a link whose peer is itself sending. A
sent tensor must not change until the flush (the roles hand over fresh payloads, or buffers
they next write after the step). With ``--overlap`` the downlink's sends are held out of that
flush (:meth:`RemoteFabric.hold`) and waited for in the next step, and its receives are
posted without waiting (:meth:`RemoteFabric.recv_later`). The pieces of a lagged evaluation's
parameter gather are sent aside (:meth:`RemoteFabric.send_aside`): no step's flush waits for
them; they travel beside the following steps and are waited for at the end of the run
(:meth:`RemoteFabric.wait_aside`). A peer that dies or stops answering raises
:class:`~dist_quant.core.transport.PeerLostError` naming it, within the process-group timeout.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

import torch

from dist_quant.core.transport import (  # noqa: F401 (the tags are this module's vocabulary too)
    TAG_BLOB,
    TAG_CONTROL,
    TAG_DOWN,
    TAG_PAYLOAD,
    TAG_SIZE,
    TAG_STATS,
    TAG_TELEMETRY,
    Transport,
    blob_from,
    blob_to,
)
from dist_quant.ps.placement import Placement

TAG_UP = TAG_PAYLOAD
TAG_STATUS, TAG_THETA = 8, 9   # server -> leader: its step's status; its shard, to evaluate
TAG_COMMAND = 10               # leader -> the other servers (asynchronous runs)


class LocalFabric:
    """Every rank in this process: a message is queued by its (src, dst, tag)."""

    def __init__(self, placement: Placement):
        self.placement = placement
        self.queues: dict[tuple[int, int, int], deque] = defaultdict(deque)

    def send(self, src: int, dst: int, tag: int, obj: Any, what: str) -> None:
        self.queues[(src, dst, tag)].append(obj)

    def recv(self, src: int, dst: int, tag: int, what: str, numel: int = 0,
             dtype: torch.dtype = torch.uint8, out: torch.Tensor | None = None) -> Any:
        queue = self.queues[(src, dst, tag)]
        if not queue:
            raise RuntimeError(f"{self.placement.describe(dst)} waits for the {what} from "
                               f"{self.placement.describe(src)}, which was never sent")
        got = queue.popleft()
        if out is not None:
            return out.copy_(got)
        return got

    def gather(self, srcs: list[int], dst: int, tag: int, numel: int, dtype: torch.dtype,
               what: str, device: torch.device) -> torch.Tensor:
        """One ``[len(srcs), numel]`` tensor, row ``k`` from ``srcs[k]``."""
        return torch.stack([self.recv(s, dst, tag, what).reshape(-1) for s in srcs])

    def has(self, src: int, dst: int, tag: int) -> bool:
        """Whether a message from ``src`` to ``dst`` with ``tag`` waits in this process."""
        return bool(self.queues.get((src, dst, tag)))

    def reap(self) -> None:
        """Forget the sends that have completed (nothing to do in memory)."""

    def forget(self, rank: int) -> None:
        """A lost peer: drop what is queued from it or to it."""
        for key in [k for k in self.queues if rank in k[:2]]:
            del self.queues[key]

    def send_blob(self, src: int, dst: int, obj: Any, what: str) -> None:
        LocalFabric.send(self, src, dst, TAG_BLOB, obj, what)

    def recv_blob(self, src: int, dst: int, what: str) -> Any:
        return self.recv(src, dst, TAG_BLOB, what)

    def recv_later(self, src: int, dst: int, tag: int, what: str, numel: int = 0,
                   dtype: torch.dtype = torch.uint8, out: torch.Tensor | None = None,
                   ) -> Callable[[], Any]:
        """Post a receive; the returned function waits for the message and returns it."""
        got = LocalFabric.recv(self, src, dst, tag, what, out=out)
        return lambda: got

    def send_aside(self, src: int, dst: int, tag: int, obj: Any, what: str) -> None:
        """Send ``obj``, which no step's :meth:`flush` waits for (see :meth:`wait_aside`)."""
        LocalFabric.send(self, src, dst, tag, obj, what)

    def wait_aside(self) -> None:
        """Wait for every send made by :meth:`send_aside` (nothing to do in memory)."""

    def flush(self) -> None:
        pass

    def hold(self) -> None:
        """Keep the sends posted so far out of the next :meth:`flush`."""

    def flush_held(self) -> None:
        """Wait for the sends put aside by :meth:`hold`."""


class RemoteFabric(LocalFabric, Transport):
    """This rank's end of every link, over torch.distributed point-to-point with the
    :class:`~dist_quant.core.transport.Transport` primitives (``group`` gives the timeout; a lost
    peer is named by its place in the placement); messages to itself stay in memory."""

    def __init__(self, placement: Placement, rank: int, device: torch.device, group: Any = None,
                 timeout: float | None = None, notice_group: Any = None):
        LocalFabric.__init__(self, placement)
        # the leader plays the transport's server: its notices go to every other rank
        others = [r for r in placement.ranks if r != placement.leader]
        Transport.__init__(self, placement.leader, others, device, group, timeout=timeout,
                           notice_group=notice_group)
        self.rank = int(rank)
        self.pending: list[tuple[Any, int, str]] = []
        self.held: list[tuple[Any, int, str]] = []
        self.aside: list[tuple[Any, int, str, torch.Tensor]] = []  # the tensor kept alive

    def describe(self, rank: int) -> str:
        return self.placement.describe(rank)

    def _wait_all(self, works: list[tuple[Any, int, str]]) -> None:
        for work, peer, what in works:
            self._wait([work], what, [peer])

    def send(self, src: int, dst: int, tag: int, obj: Any, what: str) -> None:
        if dst == self.rank:
            return super().send(src, dst, tag, obj, what)
        tensor = obj.to(self.device).contiguous()
        self.pending.append((self._isend(tensor, dst, tag), dst, what))

    def send_aside(self, src: int, dst: int, tag: int, obj: Any, what: str) -> None:
        if dst == self.rank:
            return LocalFabric.send(self, src, dst, tag, obj, what)
        self.aside = [a for a in self.aside if not a[0].is_completed()]
        tensor = obj.to(self.device).contiguous()
        self.aside.append((self._isend(tensor, dst, tag), dst, what, tensor))

    def wait_aside(self) -> None:
        aside, self.aside = self.aside, []
        self._wait_all([a[:3] for a in aside])

    def recv(self, src: int, dst: int, tag: int, what: str, numel: int = 0,
             dtype: torch.dtype = torch.uint8, out: torch.Tensor | None = None) -> Any:
        if src == self.rank:
            return super().recv(src, dst, tag, what, out=out)
        if out is None:
            out = torch.empty(numel, dtype=dtype, device=self.device)
        self._wait([self._irecv(out, src, tag)], what, [src])
        return out

    def recv_later(self, src: int, dst: int, tag: int, what: str, numel: int = 0,
                   dtype: torch.dtype = torch.uint8, out: torch.Tensor | None = None,
                   ) -> Callable[[], Any]:
        if src == self.rank:
            return LocalFabric.recv_later(self, src, dst, tag, what, out=out)
        if out is None:
            out = torch.empty(numel, dtype=dtype, device=self.device)
        work, done = self._irecv(out, src, tag), []

        def wait() -> torch.Tensor:
            if not done:
                self._wait([work], what, [src])
                done.append(True)
            return out
        return wait

    def gather(self, srcs: list[int], dst: int, tag: int, numel: int, dtype: torch.dtype,
               what: str, device: torch.device) -> torch.Tensor:
        out = torch.empty(len(srcs), numel, dtype=dtype, device=self.device)
        works = [(self._irecv(out[k], s, tag), s, what) for k, s in enumerate(srcs)
                 if s != self.rank]
        for k, s in enumerate(srcs):
            if s == self.rank:
                out[k].copy_(super().recv(s, dst, tag, what).reshape(-1))
        self._wait_all(works)
        return out

    def send_blob(self, src: int, dst: int, obj: Any, what: str) -> None:
        if dst == self.rank:
            return super().send_blob(src, dst, obj, what)
        blob = blob_from(obj).to(self.device)
        self.send(src, dst, TAG_SIZE, torch.tensor([blob.numel()], dtype=torch.int64), what)
        self.send(src, dst, TAG_BLOB, blob, what)
        self.flush()

    def recv_blob(self, src: int, dst: int, what: str) -> Any:
        if src == self.rank:
            return super().recv(src, dst, TAG_BLOB, what)
        size = int(self.recv(src, dst, TAG_SIZE, what, 1, torch.int64)[0])
        return blob_to(self.recv(src, dst, TAG_BLOB, what, size, torch.uint8))

    def flush(self) -> None:
        """Wait for every posted send (the end of a step), held ones included."""
        pending, self.pending, self.held = self.held + self.pending, [], []
        self._wait_all(pending)

    def hold(self) -> None:
        self.held += self.pending
        self.pending = []

    def reap(self) -> None:
        """Forget the posted sends that have completed, without waiting for the others (an
        asynchronous server never waits for a slow link's send)."""
        self.pending = [p for p in self.pending if not p[0].is_completed()]

    def flush_held(self) -> None:
        held, self.held = self.held, []
        self._wait_all(held)

    def forget(self, rank: int) -> None:
        """A lost peer: never wait for the sends posted to it."""
        LocalFabric.forget(self, rank)
        self.pending = [p for p in self.pending if p[1] != rank]
        self.held = [p for p in self.held if p[1] != rank]
