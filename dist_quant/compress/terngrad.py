"""TernGrad: ternary stochastic gradients (Wen et al., NeurIPS 2017).

Per bucket of ``d`` coordinates (the paper scales per layer; ``d = n`` is one scale for the
whole gradient) the worker sends ``sigma = max_i |g_i|`` (rounded *up* to the header type) and
for every coordinate ``t_i in {-1, 0, +1}``: ``t_i = sign(g_i)`` with probability
``|g_i| / sigma``, else 0. The server reconstructs ``sigma t_i``.

Unbiased: ``E[sigma t_i] = sigma sign(g_i) |g_i| / sigma = g_i``. Variance per coordinate
``V_i = |g_i| (sigma - |g_i|) <= sigma^2 / 4``, in total ``sigma ||g||_1 - ||g||_2^2``.

This is the level rule of :mod:`dist_quant.compress.qsgd` with ``s = 1`` and the maximum in place
of the L2 norm (the maximum is the smallest scale that keeps every probability at most 1, so
it gives the least variance of all such ternary rules): same wire layout, 2-bit codes
``level << 1 | sign``, ``nb h + ceil(n / 4)`` body bytes. The paper's gradient clipping
(``|g_i| <= 2.5 std``) is not applied: it is a separate, biased step.
"""

from __future__ import annotations

import math

from dist_quant.compress.base import bucket_label
from dist_quant.compress.qsgd import LevelCompressor


class TernGradCompressor(LevelCompressor):
    name = kind = "terngrad"
    wire_id = 6

    def __init__(self, bucket_size: int = 0, header_dtype: str = "fp32"):
        super().__init__(1, bucket_size, header_dtype)

    def __repr__(self) -> str:
        return (f"TernGradCompressor(bucket_size={self.bucket_size}, "
                f"header_dtype={self.header_dtype!r})")

    def omega(self, n: int) -> float:
        """``sum_i |x_i| (M - |x_i|) <= (sqrt(d) - 1) ||x||^2`` with ``M = max |x_i|``."""
        return max(math.sqrt(self.bucket_coords(n)) - 1.0, 0.0)

    @property
    def label(self) -> str:
        return f"TernGrad {bucket_label(self.bucket_size)}"

    def _scales(self, xb):
        return xb.abs().amax(dim=1)
