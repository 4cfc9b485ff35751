"""Scaled sign: a biased 1-bit baseline (signSGD with a per-bucket scale).

Per bucket of ``d`` coordinates the worker sends ``s = mean |g_i|`` (in the header type, rounded
to nearest; the sum in float64 along a fixed binary tree, :func:`tree_sum`, so that every path
sends the same bits) and one bit per coordinate, ``1`` for ``g_i >= 0``; the server reconstructs
``s sign(g_i)`` (``+s`` for a set bit, ``-s`` otherwise). For a fixed sign pattern this ``s``
minimises ``||g - s sign(g)||^2``. The decode is biased (``E = s sign(g_i) != g_i`` in general):
use it with error feedback, or as the baseline that shows what unbiasedness buys.

Contractive: ``||g - s sign(g)||^2 = ||g||^2 - ||g||_1^2 / d <= (1 - 1 / d) ||g||^2`` per bucket.
Slice aligned (buckets are consecutive coordinates).
"""

from __future__ import annotations

import torch

from dist_quant.compress import fast, wire
from dist_quant.compress.base import Compressor, ScaledBuckets, _result, count_nonfinite
from dist_quant.compress.quantize import _bucketed
from dist_quant.errors import NonFiniteGradientError


class SignCompressor(ScaledBuckets, Compressor):
    name = kind = "sign"
    wire_id = 4
    bits = 1
    uses_header_dtype = True
    contractive = True
    slice_aligned = True

    def __init__(self, bucket_size: int = 0, header_dtype: str = "fp32"):
        self.bucket_size = bucket_size
        self.header_dtype = header_dtype
        self.hdtype = wire.HEADER_DTYPES[header_dtype]
        self.hbytes = self.hdtype.itemsize

    def __repr__(self) -> str:
        return f"SignCompressor(bucket_size={self.bucket_size}, header_dtype={self.header_dtype!r})"

    def _encode_body(self, x, body, generator):
        n = x.numel()
        if n == 0:
            return
        if fast.usable(x):
            count = fast.sign_encode(x, body, self)
            if count:
                raise NonFiniteGradientError(count, n)
            return
        count = count_nonfinite(x)
        if count:
            raise NonFiniteGradientError(count, n)
        d = self.bucket_size or n
        nb = self.num_buckets(n)
        sizes = torch.full((nb,), float(d), dtype=torch.float64, device=x.device)
        sizes[-1] = n - (nb - 1) * d
        s = (tree_sum(_bucketed(x.double().abs(), d, nb)) / sizes).to(self.hdtype)
        if not torch.isfinite(s).all():
            raise wire.WireRangeError(f"mean |g| of a bucket exceeds header_dtype "
                                      f"{self.header_dtype}")
        s_out, bits_out = self._split(body, n)
        s_out.copy_(s)
        bits_out.copy_(wire.pack_bits(x >= 0, 1))

    def _check_body(self, body, n):
        self._check_scales(body, n)

    def _decode_into(self, body, n, out):
        return self._decode_body(body, n, out)

    def _decode_body(self, body, n, out=None):
        if n == 0:
            return torch.empty(0, dtype=torch.float32, device=body.device)
        if fast.usable(body):
            target = fast.new_output(n) if out is None else _result(out, n, body.device)
            return fast.sign_decode(body, n, self, target, streaming=out is not None)
        s, bits = self._split(body, n)
        d = self.bucket_size or n
        nb = self.num_buckets(n)
        t = _bucketed(wire.unpack_bits(bits, n, 1).float(), d, nb)
        s = s.float().unsqueeze(1)
        values = (s * (2 * t - 1)).reshape(-1)[:n]
        return values if out is None else out.copy_(values)

    def decode_mean(self, batch, out=None):
        n = self._validate_rows(batch)
        if not fast.usable(batch) or n == 0:
            return self._mean_of_rows(batch, n, _result(out, n, batch.device))
        streaming = out is not None
        out = fast.new_output(n) if out is None else _result(out, n, batch.device)
        return fast.sign_decode_mean(batch, n, self, out, streaming=streaming)


def tree_sum(v: torch.Tensor) -> torch.Tensor:
    """Row sums of ``[nb, d]`` float64 along the complete binary tree of ``2^P >= d`` leaves
    (zeros past ``d``), adjacent pairs first: a fixed order of additions, the compiled kernels'
    order, where ``Tensor.sum`` leaves the order to the implementation."""
    while v.shape[1] > 1:
        if v.shape[1] % 2:
            v = torch.cat([v, v.new_zeros(v.shape[0], 1)], 1)
        v = v[:, 0::2] + v[:, 1::2]
    return v[:, 0]
