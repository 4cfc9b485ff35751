"""``--overlap``: each shard's uplink leaves as soon as backward has produced its gradients.

Backward runs from the last layer to the first, so the shards that hold the last layers are
complete first. A hook on every parameter (``register_post_accumulate_grad_hook``) copies its
gradient into the flat gradient ``g`` and counts down the parameters each shard still waits
for; when a shard's count reaches zero its payload is encoded (with that shard's own encoder
and generator) and handed to the fabric, whose send is asynchronous, so its transfer runs while
backward goes on through the first layers. Shards whose parameters got no gradient are zero,
as in :func:`~dist_quant.roles.common.flat_grads`, and leave after backward.

The values are those of the sequential step, bit for bit: ``g`` holds the same gradients, and
each shard draws only from its own generator, so the order in which shards are encoded changes
no payload (``--simulate`` and ``--resume`` equality hold, and a run with ``--overlap`` equals
one without it). ``--inject-nonfinite`` marks coordinate 0 just before shard 0 is encoded.

What was hidden: the worker reports ``overlap``, the seconds from the first shard's hand-over
to the end of backward: uplink transfer time that ran alongside computation (at most that
much of the uplink was hidden; the leader records the slowest worker's in ``metrics.jsonl``
as ``time_overlap``). With one shard (the star) nothing leaves before backward ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch


class OverlappedBackward:
    """Backward of ``worker``'s model that ships every shard's payload when it is complete."""

    def __init__(self, worker: Any):
        self.w = worker
        self.g = torch.zeros(worker.n, dtype=torch.float32, device=worker.device)
        self.slices, self.shards_of = [], []
        self.count = [0] * len(worker.bounds)
        offset = 0
        for k, p in enumerate(worker.model.parameters()):
            lo, hi = offset, offset + p.numel()
            self.slices.append((lo, hi))
            shards = [s for s, (a, b) in enumerate(worker.bounds) if lo < b and hi > a]
            self.shards_of.append(shards)
            for s in shards:
                self.count[s] += 1
            p.register_post_accumulate_grad_hook(partial(self._ready, k))
            offset = hi
        self.active = False

    def compute(self, ship: Callable[[int, torch.Tensor], None] | None,
                ) -> tuple[torch.Tensor, float, list[torch.Tensor], float, float]:
        """(g, loss, payloads per shard, seconds spent encoding, overlap seconds)."""
        self.left = list(self.count)
        self.payloads: list[torch.Tensor | None] = [None] * len(self.count)
        self.ship, self.encode_s, self.first = ship, 0.0, None
        self.g.zero_()
        loss = self.w.forward_loss()
        self.active = True
        try:
            loss.backward()
        finally:
            self.active = False
        end = time.perf_counter()
        overlap = end - self.first if self.first is not None else 0.0
        for s, payload in enumerate(self.payloads):
            if payload is None:
                self._ship(s)
        return self.g, float(loss.detach()), self.payloads, self.encode_s, overlap

    def _ready(self, k: int, p: torch.Tensor) -> None:
        if not self.active:
            return
        lo, hi = self.slices[k]
        self.g[lo:hi].copy_(p.grad.reshape(-1))
        for s in self.shards_of[k]:
            self.left[s] -= 1
            if self.left[s] == 0:
                self._ship(s)

    def _ship(self, s: int) -> None:
        t0 = time.perf_counter()
        if s == 0:
            self.w._inject(self.g)
        data = self.w.encode(self.g, s)
        self.payloads[s] = data
        self.encode_s += time.perf_counter() - t0
        if self.ship is not None:
            self.ship(s, data)
        if self.first is None:
            self.first = time.perf_counter()
