"""Top-k sparsification: send the k coordinates of largest magnitude (Aji and Heafield 2017;
Stich et al., NeurIPS 2018, "Sparsified SGD with Memory"). Meant for use with error feedback.

``C(g)_i = g_i`` for the ``k = min(n, max(1, round(ratio n)))`` coordinates of largest ``|g_i|``
(ties broken by torch.topk), 0 elsewhere. Deterministic and **biased**: ``E[C(g)] = C(g) != g``.
It is contractive, ``||C(g) - g||^2 <= (1 - k / n) ||g||^2`` (the dropped coordinates are the
smallest), which is what error feedback needs: wrapped in :class:`ErrorFeedback` the dropped
mass is carried to the next step, and over T steps the sum of what was sent plus the current
residual equals the sum of the gradients. No variance: the decode is a function of ``g``.

Wire: :mod:`dist_quant.compress.sparse` (k int32 indices, k float32 values, ``8 k`` bytes):
``64 ratio`` bits per coordinate, so ratio 0.01 is 0.64 bits. The generator is not used.
"""

from __future__ import annotations

import torch

from dist_quant.compress.base import ratio_label
from dist_quant.compress.sparse import SparseCompressor


class TopKCompressor(SparseCompressor):
    name = kind = "topk"
    wire_id = 7
    contractive = True

    @property
    def label(self) -> str:
        return f"top-{ratio_label(self.ratio)}"

    def _select(self, x, k, generator):
        idx = torch.topk(x.abs(), k, sorted=False).indices.sort().values
        return idx, x[idx].float()
