"""Compressed collectives: payloads between the W ranks of a group, with exact byte counts.

The two moves of the colocated exchange (every rank serves one slice of a flat vector):

- :func:`all_to_all`: rank ``r`` hands payload ``send[s]`` to rank ``s`` and receives one
  payload from every rank; with the payloads of slice ``s`` sent to ``s``, rank ``r`` ends with
  the W payloads of its own slice, in rank order (its own included: ``[W, nbytes]`` rows for
  ``Compressor.decode_mean``).
- :func:`all_gather`: every rank hands one payload to every other; every rank ends with all W.

Both are one ``torch.distributed.all_to_all_single`` of flat ``uint8`` tensors with uneven
splits (gloo on CPU, nccl on CUDA: device-agnostic). The receiver knows every size beforehand,
since a compressor's payload size depends only on the coordinate count (``payload_nbytes``), so
nothing but payload bytes travels. A rank's own row is copied locally by the collective and is
not counted; an empty payload (a slice of no coordinates) is a split of 0 bytes.

Bytes. :class:`Transfer` counts what this rank handed to the transport (``sent``) and received
(``received``), from the payload sizes; summed over ranks the two agree. The per-message
headers of the transport are not payload.

:func:`slice_bounds` cuts ``n`` coordinates into W contiguous slices on compressor-bucket
boundaries, balanced by bucket count, so that no bucket's ``(a, b)`` straddles two owners.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


def slice_bounds(n: int, parts: int, bucket_size: int = 0) -> list[int]:
    """``parts + 1`` offsets cutting ``n`` coordinates into ``parts`` contiguous slices.

    With ``bucket_size = d > 0`` the ``nb = ceil(n / d)`` compressor buckets are dealt out,
    slice ``s`` taking buckets ``[floor(s nb / W), floor((s + 1) nb / W))`` (the last bucket may
    be short): slices differ by at most one bucket, and a bucket never straddles two slices.
    With fewer buckets than slices, some slices are empty. With ``d = 0`` (no buckets: fp32,
    fp16, the whole-tensor rule) the coordinates themselves are dealt out the same way.
    """
    if n < 0 or parts < 1 or bucket_size < 0:
        raise ValueError(f"slice_bounds needs n >= 0, parts >= 1, bucket_size >= 0; got "
                         f"n={n}, parts={parts}, bucket_size={bucket_size}")
    d = bucket_size or 1
    nb = -(-n // d)
    return [min(n, (s * nb // parts) * d) for s in range(parts + 1)]


@dataclass
class Transfer:
    """One collective in flight or done: the received bytes and what was counted."""

    work: dist.Work | None
    buffer: torch.Tensor  # flat uint8: the received payloads, source rank order
    nbytes: list[int]     # bytes from each source rank (own row included)
    sent: int             # bytes this rank handed to the transport (own row excluded)
    received: int         # bytes it received from the other ranks

    def wait(self) -> Transfer:
        if self.work is not None:
            self.work.wait()
        return self

    def rows(self) -> list[torch.Tensor]:
        """The received payloads, one flat uint8 view per source rank."""
        return list(self.buffer.split(self.nbytes))

    def future(self) -> torch.futures.Future:
        """A future completed with this transfer once the bytes have arrived."""
        if self.work is None:
            done: torch.futures.Future = torch.futures.Future()
            done.set_result(self)
            return done
        return self.work.get_future().then(lambda fut: (fut.wait(), self)[1])


def _exchange(send: Sequence[torch.Tensor], recv_nbytes: Sequence[int],
              group: dist.ProcessGroup | None, device: torch.device,
              async_op: bool) -> Transfer:
    rank = dist.get_rank(group)
    world = len(send)
    send_nbytes = [int(p.numel()) for p in send]
    recv_nbytes = [int(k) for k in recv_nbytes]
    if len(recv_nbytes) != world:
        raise ValueError(f"{world} payloads to send but {len(recv_nbytes)} sizes to receive")
    flat_in = torch.cat(list(send)) if world else torch.empty(0, dtype=torch.uint8)
    flat_in = flat_in.to(device=device, dtype=torch.uint8)
    out = torch.empty(sum(recv_nbytes), dtype=torch.uint8, device=device)
    work = dist.all_to_all_single(out, flat_in, recv_nbytes, send_nbytes, group=group,
                                  async_op=async_op)
    sent = sum(send_nbytes) - send_nbytes[rank]
    received = sum(recv_nbytes) - recv_nbytes[rank]
    return Transfer(work if async_op else None, out, recv_nbytes, sent, received)


def all_to_all(send: Sequence[torch.Tensor], recv_nbytes: Sequence[int],
               group: dist.ProcessGroup | None = None, async_op: bool = False) -> Transfer:
    """Hand ``send[s]`` (flat uint8) to rank ``s`` and receive ``recv_nbytes[s]`` bytes from
    each rank ``s``; ``send[rank]`` stays local (copied into its row, not counted). Every rank
    must call it with matching sizes: ``recv_nbytes[s]`` on rank ``r`` is ``send[r]``'s size on
    rank ``s``."""
    device = next((p.device for p in send), torch.device("cpu"))
    return _exchange(send, recv_nbytes, group, device, async_op)


def all_gather(payload: torch.Tensor, nbytes: Sequence[int],
               group: dist.ProcessGroup | None = None, async_op: bool = False) -> Transfer:
    """Hand ``payload`` (flat uint8) to every other rank and receive rank ``s``'s payload of
    ``nbytes[s]`` bytes from each; this rank's own is ``nbytes[rank]`` long (checked). Uneven
    sizes are allowed, so no padding travels."""
    world = len(nbytes)
    rank = dist.get_rank(group)
    if payload.numel() != nbytes[rank]:
        raise ValueError(f"rank {rank}'s payload holds {payload.numel()} bytes, the sizes say "
                         f"{nbytes[rank]}")
    return _exchange([payload] * world, nbytes, group, payload.device, async_op)
