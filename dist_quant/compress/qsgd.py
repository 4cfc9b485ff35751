"""QSGD: stochastic rounding of ``|g_i| / ||g||`` to ``s`` levels (Alistarh et al., NeurIPS 2017).

The rule, per bucket of ``d`` coordinates (``d = n``: the whole tensor). The worker sends the
bucket's scale ``sigma = ||g||_2`` and, for every coordinate, its sign and a level
``l_i in 0..s``; the server reconstructs ``sigma / s * l_i * sign(g_i)``.

1. ``sigma`` is computed in float64 and rounded *up* to the header type (like kbit's ``a``,
   MATH 4e: the encoder draws with the value the decoder will use; rounding up keeps
   ``|g_i| <= sigma``).
2. ``r_i = s |g_i| / sigma`` in float64, clamped to ``[0, s]``; ``r_i = 0`` when ``sigma = 0``.
3. ``l_i = floor(r_i) + 1`` with probability ``frac(r_i)``, else ``floor(r_i)``, independently
   (``u_i`` uniform in [0, 1) from the caller's generator, ``l_i = floor(r_i) + [u_i < frac])``.

Unbiased: ``E[sigma / s * l_i] = sigma / s * r_i = |g_i|``, so ``E[decode_i] = g_i``.
Variance, coordinate by coordinate (a two-point law between the neighbouring levels
``lo_i = sigma floor(r_i) / s`` and ``lo_i + sigma / s``)::

    V_i = (|g_i| - lo_i) (lo_i + sigma / s - |g_i|)  <=  sigma^2 / (4 s^2)

and in total (Alistarh et al., Lemma 3.1) ``sum_i V_i <= min(d / s^2, sqrt(d) / s) ||g||^2``
per bucket. Bits per coordinate: ``w = 1 + bit_length(s)`` (sign, level) plus ``h / d`` for the
scale: ``s = 1`` is 2 bits, ``s = 4`` is 4 bits, ``s = 255`` is 9 bits. The paper's Elias
coding of the levels is not used: the code width is fixed, so the payload size is known before
encoding (fixed-size receives).

Wire: ``nb`` scales in the header type, then ``n`` codes ``l_i << 1 | (g_i < 0)`` of ``w`` bits
each in the packed stream of :mod:`dist_quant.compress.wire`. ``s`` does not travel (both ends
take it from the configuration); the header's ``bits`` field is ``w`` and a decoded level above
``s`` is rejected.

:class:`LevelCompressor` is the mechanism for any scale; QSGD takes the L2 norm, TernGrad
(:mod:`dist_quant.compress.terngrad`) the maximum with ``s = 1``.
"""

from __future__ import annotations

import math

import torch

from dist_quant.compress import wire
from dist_quant.compress.base import Compressor, ScaledBuckets, bucket_label, count_nonfinite
from dist_quant.compress.quantize import _bucketed
from dist_quant.compress.rounding import round_up
from dist_quant.errors import NonFiniteGradientError, PayloadError

MAX_LEVELS = (1 << 15) - 1


def code_bits(levels: int) -> int:
    """Bits of one code: the sign and a level in ``0..levels``."""
    return 1 + levels.bit_length()


class LevelCompressor(ScaledBuckets, Compressor):
    """Sign and stochastic level of ``|g_i| / sigma`` on ``levels`` steps; subclasses say what
    ``sigma`` is (``_scales``). See the module docstring."""

    uses_header_dtype = True
    unbiased = True

    def __init__(self, levels: int, bucket_size: int = 0, header_dtype: str = "fp32"):
        self.levels = levels
        self.bits = code_bits(levels)
        self.bucket_size = bucket_size
        self.header_dtype = header_dtype
        self.hdtype = wire.HEADER_DTYPES[header_dtype]
        self.hbytes = self.hdtype.itemsize

    def _scales(self, xb: torch.Tensor) -> torch.Tensor:
        """The float64 scale of every bucket of the zero-padded ``[nb, d]`` float64 view."""
        raise NotImplementedError

    def _encode_body(self, x, body, generator):
        n = x.numel()
        if n == 0:
            return
        count = count_nonfinite(x)
        if count:
            raise NonFiniteGradientError(count, n)
        d = self.bucket_size or n
        nb = self.num_buckets(n)
        xb = _bucketed(x.double(), d, nb)
        sigma = round_up(self._scales(xb), self.hdtype)
        if not torch.isfinite(sigma).all():
            raise wire.WireRangeError(f"a bucket's scale exceeds header_dtype {self.header_dtype}")
        s64 = sigma.double().unsqueeze(1)
        r = torch.where(s64 > 0, xb.abs() * self.levels / torch.where(s64 > 0, s64, 1.0), 0.0)
        r = r.clamp_(0, self.levels).reshape(-1)[:n]
        low = torch.floor(r)
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=x.device)
        level = (low + (u < r - low).double()).clamp_(max=self.levels).to(torch.int32)
        codes = (level << 1) | (x < 0).to(torch.int32)
        s_out, bits_out = self._split(body, n)
        s_out.copy_(sigma)
        bits_out.copy_(wire.pack_bits(codes, self.bits))

    def _check_body(self, body, n):
        bits = self._check_scales(body, n)
        s, _ = self._split(body, n)
        top = s.float() / self.levels * self.levels  # the top level, as the decode rounds it
        if not torch.isfinite(top).all():
            raise PayloadError(f"the top level overflows float32 in "
                               f"{int((~torch.isfinite(top)).sum())} bucket(s)")
        if n and (wire.unpack_bits(bits, n, self.bits).int() >> 1).max() > self.levels:
            raise PayloadError(f"a level exceeds s = {self.levels}")

    def _decode_body(self, body, n):
        if n == 0:
            return torch.empty(0, dtype=torch.float32, device=body.device)
        s, bits = self._split(body, n)
        codes = wire.unpack_bits(bits, n, self.bits).to(torch.int32)
        level = (codes >> 1).float()
        sign = 1.0 - 2.0 * (codes & 1).float()
        d = self.bucket_size or n
        nb = self.num_buckets(n)
        step = (s.float() / self.levels).unsqueeze(1)
        return (_bucketed(level * sign, d, nb) * step).reshape(-1)[:n]


class QSGDCompressor(LevelCompressor):
    """QSGD with ``levels = s`` and the bucket's L2 norm as scale (unbiased)."""

    name = kind = "qsgd"
    wire_id = 5

    def __repr__(self) -> str:
        return (f"QSGDCompressor(levels={self.levels}, bucket_size={self.bucket_size}, "
                f"header_dtype={self.header_dtype!r})")

    def omega(self, n: int) -> float:
        """``min(d / s^2, sqrt(d) / s)`` (Alistarh et al. 2017, Lemma 3.1)."""
        d = self.bucket_coords(n)
        return min(d / self.levels ** 2, math.sqrt(d) / self.levels)

    @property
    def label(self) -> str:
        return f"QSGD s{self.levels} {bucket_label(self.bucket_size)}"

    def _scales(self, xb):
        return torch.linalg.vector_norm(xb, dim=1)
