"""``--overlap``: each shard's uplink leaves as soon as backward has produced its gradients,
and the next forward starts on the first layers as soon as their downlink has arrived.

Uplink.

Backward runs from the last layer to the first, so the shards that hold the last layers are
complete first. A hook on every parameter (``register_post_accumulate_grad_hook``) copies its
gradient into the flat gradient ``g`` and counts down the parameters each shard still waits
for; when a shard's count reaches zero its payload is encoded (with that shard's own encoder
and generator) and handed to the fabric, whose send is asynchronous, so its transfer runs while
backward goes on through the first layers. Shards whose parameters got no gradient are zero,
as in :func:`~dist_quant.ps.common.flat_grads`, and leave after backward.

The values are those of the sequential step, bit for bit: ``g`` holds the same gradients, and
each shard draws only from its own generator, so the order in which shards are encoded changes
no payload (``--simulate`` and ``--resume`` equality hold, and a run with ``--overlap`` equals
one without it). ``--inject-nonfinite`` marks coordinate 0 just before shard 0 is encoded.

What was hidden: the worker reports ``overlap``, the seconds from the first shard's hand-over
to the end of backward: uplink transfer time that ran alongside computation (at most that
much of the uplink was hidden; the leader records the slowest worker's in ``metrics.jsonl``
as ``time_overlap``). With one shard (the star) nothing leaves before backward ends.

Downlink. The ranks post their downlink receives at the end of a step and go on without
waiting for them (:meth:`~dist_quant.ps.worker.Worker.receive_downlink`); the sends are
waited for after the next step's uplink has left. A forward pre-hook on every module that holds
parameters (:func:`apply_before_use`) waits for, and decodes into the replica, the shards
those parameters lie in, the first time the module runs: the first layers compute while the
shards of the last layers are still on the wire. Every shard's decode is the one of the
sequential step, so the replica, and everything after it, is the same bit for bit. The worker
reports ``overlap_down``: the seconds from posting its receives to the arrival of its last
shard, less the seconds the forward waited (at most that much downlink time ran beside other
work; ``time_overlap_down`` in ``metrics.jsonl``, the slowest worker's). How much this hides
depends on where the shards lie: a shard's transfer shares each link with the others, so the
first layers' shard arrives early only when the first layers are a small part of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from dist_quant.runtime.phasetime import Clocks, now


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
        """(g, loss, payloads per shard, time spent encoding (wall and this thread's CPU,
        :class:`~dist_quant.runtime.phasetime.Clocks`), overlap seconds)."""
        self.left = list(self.count)
        self.payloads: list[torch.Tensor | None] = [None] * len(self.count)
        self.ship, self.encode, self.first = ship, Clocks(), None
        self.g.zero_()
        start = time.perf_counter()
        loss = self.w.forward_loss()
        self.active = True
        try:
            loss.backward()
        finally:
            self.active = False
        end = time.perf_counter()
        self.w.straggle(end - start - self.encode.wall)
        overlap = end - self.first if self.first is not None else 0.0
        for s, payload in enumerate(self.payloads):
            if payload is None:
                self._ship(s)
        return self.g, float(loss.detach()), self.payloads, self.encode, overlap

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
        t0 = now()
        if s == 0:
            self.w._inject(self.g)
        data = self.w.encode(self.g, s)
        self.payloads[s] = data
        self.encode += now() - t0
        if self.ship is not None:
            self.ship(s, data)
        if self.first is None:
            self.first = time.perf_counter()


def apply_before_use(worker: Any) -> None:
    """Register on every module of ``worker.model`` that holds parameters a forward pre-hook
    that decodes the pending downlink of the shards those parameters lie in."""
    where, offset = {}, 0
    for p in worker.model.parameters():
        where[id(p)] = (offset, offset + p.numel())
        offset += p.numel()
    for module in worker.model.modules():
        spans = [where[id(p)] for p in module.parameters(recurse=False)]
        shards = sorted({s for lo, hi in spans for s, (a, b) in enumerate(worker.bounds)
                         if lo < b and hi > a})
        if shards:
            module.register_forward_pre_hook(partial(_before, worker, shards))


def _before(worker: Any, shards: list[int], module: Any, args: Any) -> None:
    worker.apply_pending(shards)
