"""Random-k sparsification, rescaled to be unbiased (Stich et al. 2018; Wangni et al. 2018).

The worker draws ``k = min(n, max(1, round(ratio n)))`` distinct coordinates uniformly at random
(``torch.randperm`` on the caller's generator) and sends ``(n / k) g_i`` for each; the others
decode to 0. Every coordinate is kept with probability ``k / n``, so
``E[C(g)_i] = (k / n) (n / k) g_i = g_i``: **unbiased**. Variance per coordinate
``V_i = (n / k - 1) g_i^2``, in total ``(n / k - 1) ||g||^2`` (99 ||g||^2 at ratio 0.01:
the price of unbiasedness without a shared scale; top-k with error feedback pays it as delay).

Wire: :mod:`dist_quant.compress.sparse` (k int32 indices, k float32 values, ``8 k`` bytes). The
indices travel: a shared-seed variant could regenerate them at the server and send ``4 k``
bytes, at the cost of coupling the server to each worker's generator.
"""

from __future__ import annotations

import torch

from dist_quant.compress.base import ratio_label
from dist_quant.compress.sparse import SparseCompressor, kept


class RandKCompressor(SparseCompressor):
    name = kind = "randk"
    wire_id = 8
    unbiased = True

    def omega(self, n: int) -> float:
        """``n / k - 1``."""
        return n / max(kept(n, self.ratio), 1) - 1.0 if n else 0.0

    @property
    def label(self) -> str:
        return f"rand-{ratio_label(self.ratio)}"

    def _select(self, x, k, generator):
        n = x.numel()
        idx = torch.randperm(n, generator=generator, device=x.device)[:k].sort().values
        scale = n / k
        return idx, (x[idx].double() * scale).float()
