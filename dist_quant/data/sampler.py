"""Per-worker minibatch order with an explicit position, for checkpoint and resume.

Epoch ``e`` of worker ``r`` visits its shard in the order ``randperm(n)`` drawn from a
``torch.Generator`` seeded with ``SeedSequence([seed, r, e, STREAM])``: each worker and each
epoch has its own reshuffle, none touches the global RNG, and the stream tag keeps these draws
apart from any other generator seeded from ``(seed, r)`` (the quantiser's). Batches are
consecutive slices of ``batch_size`` indices; the last ``n mod batch_size`` indices of an
epoch are dropped (every batch has full size and distinct indices; the next epoch reshuffles,
so no example is left out for good). The whole state is ``(epoch, position)``.
"""

from __future__ import annotations

import numpy as np
import torch

from dist_quant.errors import ConfigError

STREAM = 0xBA7C4  # tag of the batch-order stream


def stream_seed(seed: int, worker_index: int, epoch: int) -> int:
    """A 63-bit seed for epoch ``epoch`` of worker ``worker_index``'s batch order."""
    state = np.random.SeedSequence([seed, worker_index, epoch, STREAM]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


class BatchSampler:
    def __init__(self, n: int, batch_size: int, seed: int, worker_index: int):
        if batch_size < 1:
            raise ConfigError("--batch-size", f"must be >= 1; got {batch_size}")
        if batch_size > n:
            raise ConfigError("--batch-size", f"{batch_size} exceeds the {n} examples of worker "
                              f"{worker_index}'s shard")
        self.n, self.batch_size = int(n), int(batch_size)
        self.seed, self.worker_index = int(seed), int(worker_index)
        self.epoch, self.position = 0, 0
        self._order: torch.Tensor | None = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            g = torch.Generator().manual_seed(stream_seed(self.seed, self.worker_index,
                                                          self.epoch))
            self._order = torch.randperm(self.n, generator=g)
        return self._order

    def next(self) -> torch.Tensor:
        """Indices (int64, into the shard) of the next minibatch."""
        if self.position + self.batch_size > self.n:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        batch = self._epoch_order()[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return batch.clone()

    __next__ = next

    def __iter__(self) -> BatchSampler:
        return self

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.n:
            raise ValueError(f"sampler state {state} is outside this shard of {self.n} examples")
        self.epoch, self.position, self._order = epoch, position, None


def worker_batches(n: int, batch_size: int, seed: int, worker_index: int) -> BatchSampler:
    """The minibatch sampler of worker ``worker_index`` over a shard of ``n`` examples."""
    return BatchSampler(n, batch_size, seed, worker_index)
