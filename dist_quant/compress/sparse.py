"""The wire format shared by the sparsifiers ``topk`` and ``randk``: k coordinates and values.

Body: ``k`` int32 indices in ascending order, then ``k`` float32 values, ``8 k`` bytes, with
``k = min(n, max(1, round(ratio n)))`` (``k = 0`` for ``n = 0``). The coordinates left out are
zero in the decode. The ratio does not travel: both ends take it from the configuration, and a
payload written with another ratio has another length, which is rejected. Indices that are out
of range or not strictly increasing, and non-finite values, are rejected too.

Subclasses choose the coordinates and their values (``_select``).
"""

from __future__ import annotations

import torch

from dist_quant.compress import wire
from dist_quant.compress.base import Compressor, count_nonfinite
from dist_quant.errors import NonFiniteGradientError, PayloadError

MAX_N = (1 << 31) - 1  # int32 indices


def kept(n: int, ratio: float) -> int:
    """Coordinates sent out of ``n``: ``min(n, max(1, round(ratio n)))``, 0 for ``n = 0``."""
    return 0 if n == 0 else min(n, max(1, round(ratio * n)))


class SparseCompressor(Compressor):
    bits = 32  # per value sent

    def __init__(self, ratio: float):
        self.ratio = ratio

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio})"

    def _body_nbytes(self, n: int) -> int:
        return 8 * kept(n, self.ratio)

    def _select(self, x: torch.Tensor, k: int,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(int64 indices, float32 values) of the k coordinates to send, indices ascending."""
        raise NotImplementedError

    def _encode_body(self, x, body, generator):
        n = x.numel()
        if n == 0:
            return
        if n > MAX_N:
            raise wire.WireRangeError(f"{n} coordinates exceed the int32 indices of {self.name}")
        count = count_nonfinite(x)
        if count:
            raise NonFiniteGradientError(count, n)
        k = kept(n, self.ratio)
        idx, values = self._select(x, k, generator)
        if count_nonfinite(values):  # a rescaled value beyond float32
            raise wire.WireRangeError(f"a rescaled {self.name} value exceeds float32")
        body[:4 * k].view(torch.int32).copy_(idx)
        body[4 * k:].view(torch.float32).copy_(values)

    def _split(self, body: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = kept(n, self.ratio)
        return (wire.view_as(body, 0, k, torch.int32),
                wire.view_as(body, 4 * k, k, torch.float32))

    def _check_body(self, body, n):
        if n == 0:
            return
        idx, values = self._split(body, n)
        if idx.min() < 0 or idx.max() >= n:
            raise PayloadError(f"an index is outside 0..{n - 1}")
        if (idx[1:] <= idx[:-1]).any():
            raise PayloadError("indices are not strictly increasing")
        if count_nonfinite(values):
            raise PayloadError(f"{count_nonfinite(values)} non-finite value(s)")

    def _decode_body(self, body, n):
        out = torch.zeros(n, dtype=torch.float32, device=body.device)
        if n:
            idx, values = self._split(body, n)
            out[idx.long()] = values
        return out
