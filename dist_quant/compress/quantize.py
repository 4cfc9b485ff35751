"""Unbiased k-bit stochastic quantisation; ``onebit`` is its ``k = 1`` case (MATH 4a-4g).

The rule, per bucket of ``d`` consecutive coordinates (``d = n``: the per-tensor rule).
With ``L = 2^k - 1``, the worker sends an offset ``b``, a level spacing ``a`` and, for every
coordinate, an integer ``t_i`` in ``0..L``; the server reconstructs ``a t_i + b``.

1. ``b`` = the bucket's minimum rounded *down* to the header type, ``a`` = ``(max - b) / L``
   (in float64) rounded *up*, one ulp more if ``b + L a`` still falls short of the maximum
   (MATH 4e: the encoder draws with the values the decoder will use, and ``b + L a >= max``).
   For ``k = 1`` these are the per-tensor rule's ``b = min g``, ``a = max g - min g``.
2. ``y_i = (g_i - b) / a``, clamped to ``[0, L]`` (rounding can push it out, MATH 4d); ``y_i = 0``
   when ``a = 0`` (a constant bucket decodes exactly to ``b``).
3. ``t_i = floor(y_i) + 1`` with probability ``frac(y_i)``, else ``floor(y_i)``: the two
   neighbouring levels of ``g_i``, independently across coordinates.

Unbiasedness (4a, 4g): ``E[a t_i + b] = a (floor(y_i) + frac(y_i)) + b = a y_i + b = g_i``.
Variance (4c, 4g): with lower/upper neighbouring levels ``l_i <= g_i <= u_i = l_i + a`` the decode
is a two-point law, ``V = (g_i - l_i)(u_i - g_i)``; for ``k = 1``, ``l = b`` and ``u = a + b``, so
``V = (g_i - b)(a + b - g_i)``. Every term shrinks as ``b`` rises and ``a + b`` falls, so the
minimum-variance unbiased choice is ``b = min``, ``a + b = max``: total variance
``sum_i (g_i - min)(max - g_i) <= n (max - min)^2 / 4``. Other ``(a, b)`` covering [min, max] are
unbiased too (4b), only noisier.

Buckets (4f): each bucket carries two header reals, ``2 h / d`` extra bits per coordinate for
``h``-bit headers (1/8 bit at d = 512 with fp32 headers), and the variance is summed over buckets
of their own (much smaller) ranges.

The random draw, exactly: ``y_i = (g_i - b) * fl(1 / a)`` in float32 (a true division where
``1 / a`` overflows, i.e. ``a`` denormal), ``q_i = floor(y_i 2^24)`` and
``t_i = (q_i + r_i) >> 24`` with ``r_i`` uniform on ``0..2^24 - 1``. Then
``P(t_i = floor(y_i) + 1) = frac(q_i / 2^24)``, which differs from ``frac(y_i)`` by less than
``2^-24``. Bias bound per coordinate: ``|E[decode_i] - g_i| < a 2^-24`` from the draw, plus the
float32 rounding of ``y_i`` (subtraction, reciprocal, product: below ``2^-22 |g_i - b|``) and of
the decoded level ``a t + b`` itself (half an ulp of the output, as any float32 result has).
Every path (pure torch, the compiled CPU kernels of :mod:`dist_quant.compress.fast` at every
ISA level, the Triton kernels) takes ``r_i`` from the same counter-based hash keyed by two draws
of the given generator (:mod:`dist_quant.compress.draws`) and does the same float32 arithmetic:
payloads are byte-identical whichever path encodes them.
"""

from __future__ import annotations

import torch

from dist_quant.compress import draws, fast, gpu, wire
from dist_quant.compress.base import Compressor, _result, bucket_label
from dist_quant.compress.rounding import header_values
from dist_quant.errors import NonFiniteGradientError, PayloadError

DRAW_BITS = 24


def bucket_minmax(x: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bucket minimum and maximum of ``x`` (buckets of ``d``, the last one may be short)."""
    n = x.numel()
    full = n // d
    parts_lo, parts_hi = [], []
    if full:
        lo, hi = torch.aminmax(x[: full * d].view(full, d), dim=1)
        parts_lo.append(lo)
        parts_hi.append(hi)
    if n % d:
        lo, hi = torch.aminmax(x[full * d:])
        parts_lo.append(lo.reshape(1))
        parts_hi.append(hi.reshape(1))
    return torch.cat(parts_lo), torch.cat(parts_hi)


def scaled_offsets(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``y = (x - b) / a`` in float32 as the compiled kernels compute it: times the rounded
    reciprocal ``1 / a``; 0 where ``a = 0``; a true division where ``1 / a`` overflows (``a``
    denormal). ``x`` is ``[nb, d]``, ``a`` and ``b`` are ``[nb, 1]``."""
    inv = torch.where(a > 0, 1.0 / torch.where(a > 0, a, torch.ones_like(a)), torch.zeros_like(a))
    y = (x - b) * inv
    slow = torch.isinf(inv)
    if slow.any():
        y = torch.where(slow, (x - b) / a, y)
    return y


def _bucketed(x: torch.Tensor, d: int, nb: int, fill: float = 0.0) -> torch.Tensor:
    """``x`` padded to ``nb * d`` and viewed as ``[nb, d]``."""
    pad = nb * d - x.numel()
    if pad:
        x = torch.cat([x, x.new_full((pad,), fill)])
    return x.view(nb, d)


class KBitCompressor(Compressor):
    """k-bit unbiased stochastic rounding with per-bucket ``(a, b)``; see the module docstring.

    Unbiased, with ``omega <= d / (2 L^2)`` on buckets of ``d`` coordinates: the variance is at
    most ``d R^2 / (4 L^2)`` over a bucket's range ``R`` and ``||x||^2 >= R^2 / 2``. Slice
    aligned: buckets are consecutive coordinates, so a slice cut on a multiple of ``d`` encodes
    to the same buckets as the whole tensor.
    """

    kind = "kbit"
    wire_id = 3
    uses_header_dtype = True
    unbiased = True
    slice_aligned = True

    def __init__(self, bits: int = 1, bucket_size: int = 0, header_dtype: str = "fp32"):
        self.bits = bits
        self.bucket_size = bucket_size
        self.header_dtype = header_dtype
        self.name = "onebit" if bits == 1 else "kbit"
        self.levels = (1 << bits) - 1
        self.hdtype = wire.HEADER_DTYPES[header_dtype]
        self.hbytes = self.hdtype.itemsize

    def __repr__(self) -> str:
        return (f"KBitCompressor(bits={self.bits}, bucket_size={self.bucket_size}, "
                f"header_dtype={self.header_dtype!r})")

    def omega(self, n: int) -> float:
        return self.bucket_coords(n) / (2.0 * self.levels ** 2)

    @property
    def feedback_stable(self) -> bool:
        """From 2 bits on. At 1 bit the rounding to the two ends of a bucket's range leaves an
        error whose spread is about 2.4 times that of its input when the input is itself such an
        error, so a carried error grows geometrically."""
        return self.bits >= 2

    @property
    def label(self) -> str:
        return f"{self.bits}bit {bucket_label(self.bucket_size)}"

    def _body_nbytes(self, n: int) -> int:
        return 2 * self.num_buckets(n) * self.hbytes + wire.packed_nbytes(n, self.bits)

    def _split(self, body: torch.Tensor, n: int):
        nb = self.num_buckets(n)
        a = wire.view_as(body, 0, nb, self.hdtype)
        b = wire.view_as(body, nb * self.hbytes, nb, self.hdtype)
        bits = body[2 * nb * self.hbytes:]
        return a, b, bits

    # ---- encode ------------------------------------------------------------------------------
    def _encode_body(self, x, body, generator):
        n = x.numel()
        if n == 0:
            return
        if fast.triton_selected(x):
            return gpu.kbit_encode(x, body, self, generator)
        if fast.usable(x):
            count = fast.kbit_encode(x, body, self, generator)
            if count:
                raise NonFiniteGradientError(count, n)
            return
        self._encode_body_torch(x, body, generator)

    def _encode_body_torch(self, x, body, generator):
        n = x.numel()
        d = self.bucket_size or n
        nb = self.num_buckets(n)
        lo, hi = bucket_minmax(x, d)
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise NonFiniteGradientError(n - int(torch.isfinite(x).sum()), n)
        a, b = header_values(lo, hi, self.levels, self.hdtype)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise wire.WireRangeError(
                f"bucket range [{lo.min().item():.4g}, {hi.max().item():.4g}] does not fit "
                f"header_dtype {self.header_dtype}")
        a_out, b_out, bits_out = self._split(body, n)
        a_out.copy_(a)
        b_out.copy_(b)
        a32 = a.float().unsqueeze(1)
        b32 = b.float().unsqueeze(1)
        xb = _bucketed(x.float(), d, nb)
        y = scaled_offsets(xb, a32, b32).clamp_(0, self.levels)
        q = (y.reshape(-1)[:n] * float(1 << DRAW_BITS)).to(torch.int64)
        r = draws.counter_draws(draws.keys(generator), n, x.device)
        t = (q + r) >> DRAW_BITS
        bits_out.copy_(wire.pack_bits(t, self.bits))

    # ---- decode ------------------------------------------------------------------------------
    def _check_body(self, body, n):
        self._check_body_torch(body, n)

    def _decode_validates(self, body):
        return fast.usable(body)  # the compiled decode checks while converting

    def _check_rows(self, batch, n):
        nb = self.num_buckets(n)
        if fast.usable(batch) or nb == 0:  # the compiled decode checks while converting
            return
        start = wire.FIXED_NBYTES
        heads = batch[:, start:start + 2 * nb * self.hbytes].clone(
            memory_format=torch.contiguous_format).view(self.hdtype)  # a fresh, aligned copy
        a, b = heads[:, :nb].float(), heads[:, nb:].float()  # [W, nb] each
        if not (torch.isfinite(heads).all() and (a >= 0).all()
                and torch.isfinite(a * self.levels + b).all()):
            super()._check_rows(batch, n)  # finds and names the bad row

    def _check_body_torch(self, body, n):
        a, b, _ = self._split(body, n)
        if not torch.isfinite(a).all():
            raise PayloadError(f"non-finite scale a in {int((~torch.isfinite(a)).sum())} "
                               f"bucket(s)")
        if (a < 0).any():
            raise PayloadError(f"negative scale a in {int((a < 0).sum())} bucket(s)")
        if not torch.isfinite(b).all():
            raise PayloadError(f"non-finite offset b in {int((~torch.isfinite(b)).sum())} "
                               f"bucket(s)")
        top = a.float() * self.levels + b.float()  # the largest level, as the decode rounds it
        if not torch.isfinite(top).all():
            raise PayloadError(f"the top level a L + b overflows float32 in "
                               f"{int((~torch.isfinite(top)).sum())} bucket(s)")

    def _decode_into(self, body, n, out):
        return self._decode_body(body, n, out)

    def _decode_body(self, body, n, out=None):
        if n == 0:
            return torch.empty(0, dtype=torch.float32, device=body.device)
        if fast.triton_selected(body):
            return gpu.kbit_decode(body, n, self, _result(out, n, body.device))
        if fast.usable(body):
            # streaming stores only into a caller's (reused, already mapped) buffer
            target = fast.new_output(n) if out is None else _result(out, n, body.device)
            return fast.kbit_decode(body, n, self, target, streaming=out is not None)
        a, b, bits = self._split(body, n)
        d = self.bucket_size or n
        nb = self.num_buckets(n)
        t = _bucketed(wire.unpack_bits(bits, n, self.bits).float(), d, nb)
        values = (t * a.float().unsqueeze(1) + b.float().unsqueeze(1)).reshape(-1)[:n]
        if out is None:
            return values
        return out.copy_(values)

    def decode_mean(self, batch, out=None):
        n = self._validate_rows(batch)
        streaming = out is not None
        compiled = fast.usable(batch)
        if out is None and compiled:
            out = fast.new_output(n)
        out = _result(out, n, batch.device)
        if n == 0:
            return out
        if fast.triton_selected(batch):
            return gpu.kbit_decode_mean(batch, n, self, out)
        if compiled:
            return fast.kbit_decode_mean(batch, n, self, out, streaming=streaming)
        return self._mean_of_rows(batch, n, out)


class OneBitCompressor(KBitCompressor):
    """``onebit``: the k-bit rule with ``k = 1`` (same code, same payload), under its own name."""

    def __init__(self, bucket_size: int = 0, header_dtype: str = "fp32"):
        super().__init__(1, bucket_size, header_dtype)

    @property
    def label(self) -> str:
        return f"onebit {bucket_label(self.bucket_size)}"
