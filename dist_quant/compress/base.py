"""The compressor interface shared by every wire format.

A compressor is stateless: ``encode(flat_tensor, generator) -> Payload`` and
``decode(payload) -> float32 tensor``. The payload is the exact bytes that travel (see
:mod:`dist_quant.compress.wire`); its size is known before encoding (``payload_nbytes``), so a
server can post fixed-size receives. Subclasses supply the body: ``_body_nbytes``, ``_encode_body``,
``_decode_body``, and optionally ``_check_body`` (validation of the per-bucket reals) and a
faster ``decode_mean``.

A compressor also says what it is, and every caller asks it rather than its name. With ``C`` the
decode of the encode and ``x`` any input:

- ``unbiased``: ``E[C(x)] = x`` over the encoder's draws;
- ``contractive``: ``||C(x) - x||^2 <= (1 - delta) ||x||^2`` for some ``delta > 0``, for every
  draw (deterministic compressors and exact ones);
- ``omega(n)``: for an unbiased compressor on ``n`` coordinates, a bound on its variance factor,
  ``E ||C(x) - x||^2 <= omega ||x||^2`` (None where no bound is known); shifted compression takes
  its safe rate ``1 / (1 + omega)`` from it (:mod:`dist_quant.compress.shift`);
- ``feedback_stable``: whether its error may be carried into the next step (error feedback, the
  downlink's replica error) without growing; the contractive compressors are;
- ``floating``: the payload holds the values themselves in a float type (no buckets, no
  per-bucket reals, no draws);
- ``slice_aligned``: a tensor cut into slices on multiples of ``bucket_size`` encodes, slice by
  slice, to the buckets of the whole tensor (the DDP hook then cuts there);
- ``kind`` and ``wire_id``: the wire format's name and its id in the fixed header (a class
  that sets ``wire_id`` registers the pair with :mod:`dist_quant.compress.wire`);
- ``label``: the short name of a figure's legend (``"onebit b128"``, ``"QSGD s4 b128"``);
- ``bits`` and ``payload_nbytes(n)``: the header's bits field and the exact bytes that travel.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dist_quant.compress import wire
from dist_quant.errors import NonFiniteGradientError, PayloadError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def count_nonfinite(x: torch.Tensor) -> int:
    """How many NaN/Inf ``x`` holds. A NaN or an Inf makes the plain sum non-finite, so a
    finite sum proves the usual case (none) in one fast reduction; otherwise (a non-finite
    value, or finite values whose sum overflows) the elementwise test counts them."""
    if math.isfinite(x.sum().item()):
        return 0
    return int(x.numel() - torch.isfinite(x).sum().item())


def bucket_label(bucket_size: int) -> str:
    """``"whole"`` for one bucket over the tensor (``bucket_size`` 0), else ``"b<d>"``."""
    return "whole" if bucket_size == 0 else f"b{bucket_size}"


def ratio_label(ratio: float) -> str:
    """A sparsity ratio as a percentage: ``0.01 -> "1%"``."""
    return f"{100 * ratio:g}%"


class Compressor:
    """Base class; see the module docstring. ``kind``, ``bits``, ``bucket_size`` and
    ``header_dtype`` are recorded in every payload's header."""

    name: str = ""
    kind: str = ""  # the wire format's name; wire_id is its id in the fixed header
    wire_id: int = -1
    bits: int = 32
    bucket_size: int = 0  # 0 = the whole tensor
    header_dtype: str = "fp32"
    uses_header_dtype: bool = False
    # what the compressor is (module docstring); the defaults claim nothing
    unbiased: bool = False
    contractive: bool = False
    floating: bool = False
    slice_aligned: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "wire_id" in cls.__dict__:
            wire.register_compressor_id(cls.kind, cls.wire_id)

    # ---- what it is --------------------------------------------------------------------------
    def omega(self, n: int) -> float | None:
        """A bound on the variance factor on ``n`` coordinates,
        ``E ||C(x) - x||^2 <= omega ||x||^2`` for every ``x``; None where none is known (a biased
        compressor has none)."""
        return None

    @property
    def feedback_stable(self) -> bool:
        """Whether the compression error may be carried into the next step without growing
        (error feedback; the downlink's replica error): true for the contractive ones."""
        return self.contractive

    @property
    def label(self) -> str:
        """The compressor's short name in a figure's legend."""
        return self.name

    def bucket_coords(self, n: int) -> int:
        """Coordinates of the largest bucket of a tensor of ``n`` (1 for an empty tensor)."""
        return min(self.bucket_size or n, n) if n else 1

    # ---- sizes -------------------------------------------------------------------------------
    def num_buckets(self, n: int) -> int:
        if n == 0:
            return 0
        d = self.bucket_size or n
        return -(-n // d)

    def payload_nbytes(self, n: int) -> int:
        """Exact bytes of the payload of ``n`` coordinates (fixed header included)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return wire.FIXED_NBYTES + self._body_nbytes(n)

    def _body_nbytes(self, n: int) -> int:
        raise NotImplementedError

    # ---- header ------------------------------------------------------------------------------
    def _header(self, n: int, nonfinite_count: int = 0) -> wire.Header:
        return wire.Header(
            version=wire.VERSION,
            compressor_id=self.wire_id,
            flags=wire.FLAG_NONFINITE if nonfinite_count else 0,
            bits=self.bits,
            header_dtype=wire.HEADER_DTYPE_CODES[self.header_dtype] if self.uses_header_dtype
            else 0,
            n=n,
            bucket_size=self.bucket_size,
            nonfinite_count=nonfinite_count,
        )

    def _fixed(self, n: int) -> tuple[bytes, int]:
        """The packed fixed header of a finite payload of ``n`` coordinates and the payload's
        length; kept for the last ``n`` asked (a run encodes and decodes one size each step)."""
        cached = self.__dict__.get("_fixed_cache")
        if cached is None or cached[0] != n:
            cached = self._fixed_cache = (n, self._header(n).pack(), self.payload_nbytes(n))
        return cached[1], cached[2]

    # ---- encode ------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> wire.Payload:
        """Encode a tensor (flattened; fp16/bf16/fp32/fp64) into its payload on x's device.

        Raises :class:`NonFiniteGradientError` if ``x`` holds NaN or Inf (nothing is encoded).
        """
        flat = self._check_input(x)
        raw, nbytes = self._fixed(flat.numel())
        out = wire.new_payload(raw, nbytes, flat.device, zero_body=False)
        self._encode_body(flat, out[wire.FIXED_NBYTES:], generator)
        return wire.Payload(out)

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"encode expects a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"encode expects a float16/bfloat16/float32/float64 tensor, "
                             f"got {x.dtype}")
        return x if x.dim() == 1 else x.reshape(-1)

    def _encode_body(self, x: torch.Tensor, body: torch.Tensor,
                     generator: torch.Generator | None) -> None:
        raise NotImplementedError

    def nonfinite_payload(self, n: int, count: int) -> wire.Payload:
        """A payload of exactly ``payload_nbytes(n)`` bytes that tells the receiver the worker's
        gradient held ``count`` non-finite values; decoding it raises NonFiniteGradientError."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        out = wire.new_payload(self._header(n, count), self.payload_nbytes(n),
                               torch.device("cpu"))
        return wire.Payload(out)

    # ---- decode ------------------------------------------------------------------------------
    def validate(self, data: torch.Tensor) -> wire.Header:
        """Check a payload's header and length against this compressor; return the header."""
        return self._check_header(wire.read_header(data), data.numel())

    def _valid_n(self, raw: bytes, nbytes: int) -> int:
        """:meth:`validate` of a raw fixed header and the payload's length, returning ``n``.
        The header of a finite payload is valid exactly when it equals the one this compressor
        writes for its ``n`` (every field is then what the checks want), so the usual case is
        one comparison of 32 bytes; anything else is parsed and checked field by field, which
        raises the error that names the problem."""
        if len(raw) == wire.FIXED_NBYTES:
            n = wire.header_n(raw)
            if (raw, nbytes) == self._fixed(n):
                return n
        return self._check_header(wire.Header.unpack(raw), nbytes).n

    def _check_header(self, h: wire.Header, nbytes: int) -> wire.Header:
        """:meth:`validate` of a parsed header and the payload's length in bytes."""
        if h.version != wire.VERSION:
            raise PayloadError(f"unknown payload version {h.version} (this decoder reads "
                               f"version {wire.VERSION})")
        if h.compressor_id not in wire.COMPRESSOR_NAMES:
            raise PayloadError(f"unknown compressor id {h.compressor_id}")
        if h.compressor_id != self.wire_id:
            raise PayloadError(f"payload was encoded by compressor "
                               f"{wire.COMPRESSOR_NAMES[h.compressor_id]!r}, this decoder is "
                               f"{self.kind!r}")
        if h.flags & ~wire.KNOWN_FLAGS:
            raise PayloadError(f"unknown flag bits {h.flags:#04x}")
        expected = self._header(h.n, h.nonfinite_count)
        for field in ("bits", "header_dtype", "bucket_size"):
            got, want = getattr(h, field), getattr(expected, field)
            if got != want:
                raise PayloadError(f"payload {field} is {got}, this decoder expects {want}")
        if not h.nonfinite and h.nonfinite_count:
            raise PayloadError(f"non-finite count {h.nonfinite_count} without the flag")
        want_len = self.payload_nbytes(h.n)
        if nbytes != want_len:
            raise PayloadError(f"wrong payload length: {nbytes} bytes, but n={h.n} needs "
                               f"{want_len}")
        if h.nonfinite:
            raise NonFiniteGradientError(h.nonfinite_count, h.n)
        return h

    def check(self, payload: wire.Payload | torch.Tensor) -> int:
        """Validate one payload exactly as :meth:`decode` does, without decoding it; return its
        ``n``. Raises PayloadError (or NonFiniteGradientError for a non-finite payload)."""
        data = wire.as_bytes(payload)
        n = self._valid_n(wire.read_fixed(data), data.numel())
        self._check_body(data[wire.FIXED_NBYTES:], n)
        return n

    def decode(self, payload: wire.Payload | torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Validate and decode one payload into a flat float32 tensor on its device.

        ``out`` (optional, contiguous float32 of length n) receives the result instead of a new
        tensor: a caller that decodes every step reuses one buffer and saves the allocation.
        """
        data = wire.as_bytes(payload)
        n = self._valid_n(wire.read_fixed(data), data.numel())
        body = data[wire.FIXED_NBYTES:]
        if not self._decode_validates(body):
            self._check_body(body, n)
        if out is None:
            return self._decode_body(body, n)
        out = _result(out, n, data.device)
        return self._decode_into(body, n, out)

    def _decode_into(self, body: torch.Tensor, n: int, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self._decode_body(body, n))

    def _check_body(self, body: torch.Tensor, n: int) -> None:
        """Validate the per-bucket reals of a body (subclasses with headers override)."""

    def _decode_validates(self, body: torch.Tensor) -> bool:
        """Whether decoding this body (or batch) validates its per-bucket reals as it converts
        them (the compiled k-bit path), so that the decoders need not call ``_check_body``
        first; :meth:`check` always calls it."""
        return False

    def _decode_body(self, body: torch.Tensor, n: int) -> torch.Tensor:
        raise NotImplementedError

    def _validate_rows(self, batch: torch.Tensor) -> int:
        """Validate every row of a ``[W, nbytes]`` batch; the errors name the row. Returns n."""
        if batch.dtype != torch.uint8 or batch.dim() != 2 or batch.shape[0] < 1:
            raise PayloadError(f"decode_mean expects a [W, nbytes] uint8 tensor with W >= 1, "
                               f"got dtype {batch.dtype} shape {tuple(batch.shape)}")
        same = batch.shape[1] >= wire.FIXED_NBYTES
        if same:
            heads = wire.fixed_headers(batch)
            same = all(head == heads[0] for head in heads)
        n = None
        for row in (0,) if same else range(batch.shape[0]):  # identical fixed headers: row 0
            try:                                              # speaks for all
                if same:
                    row_n = self._valid_n(heads[0], batch.shape[1])
                else:
                    row_n = self.validate(batch[row]).n
                    if not self._decode_validates(batch):
                        self._check_body(batch[row, wire.FIXED_NBYTES:], row_n)
            except NonFiniteGradientError as err:
                err.row = row
                err.args = (f"row {row}: {err.args[0]}",)
                raise
            except PayloadError as err:
                raise PayloadError(f"row {row}: {err}") from None
            if n is None:
                n = row_n
            elif row_n != n:
                raise PayloadError(f"row {row}: n={row_n} differs from row 0's n={n}")
        if same:  # the bodies, all rows at once where the compressor can
            self._check_rows(batch, n)
        return n

    def _check_rows(self, batch: torch.Tensor, n: int) -> None:
        """Validate the bodies of a ``[W, nbytes]`` batch whose fixed headers are valid (as
        ``_check_body`` does each); the error names the first bad row. Subclasses may check all
        rows at once."""
        for row in range(batch.shape[0]):
            try:
                self._check_body(batch[row, wire.FIXED_NBYTES:], n)
            except PayloadError as err:
                raise PayloadError(f"row {row}: {err}") from None

    def decode_mean(self, batch: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of the decodes of the W rows of a ``[W, nbytes]`` uint8 tensor (float32).

        ``out`` (optional, float32 of length n) is reused instead of allocating the result.
        """
        n = self._validate_rows(batch)
        return self._mean_of_rows(batch, n, _result(out, n, batch.device))

    def _mean_of_rows(self, batch: torch.Tensor, n: int, out: torch.Tensor) -> torch.Tensor:
        """``out`` = the mean of the decodes of the (validated) rows, one row at a time."""
        out.zero_()
        for row in range(batch.shape[0]):
            out.add_(self._decode_body(batch[row, wire.FIXED_NBYTES:], n))
        return out.div_(batch.shape[0])


def _result(out: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(n, dtype=torch.float32, device=device)
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of {n} elements, got "
                         f"{out.dtype} with {out.numel()}")
    if out.numel() != n:  # a payload of another size than the receiver expects
        raise PayloadError(f"payload holds n={n} coordinates, out has {out.numel()}: out must "
                           f"be a contiguous float32 tensor of {n} elements")
    return out if out.dim() == 1 else out.view(-1)


class ScaledBuckets:
    """Body layout of a compressor with one scale per bucket in ``header_dtype`` followed by
    ``bits`` packed bits per coordinate (sign, QSGD, TernGrad): sizes and the split into
    ``(scales, bits)`` views. Mixed into a :class:`Compressor` that sets ``hdtype`` and
    ``hbytes``."""

    def _body_nbytes(self, n: int) -> int:
        return self.num_buckets(n) * self.hbytes + wire.packed_nbytes(n, self.bits)

    def _split(self, body: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        nb = self.num_buckets(n)
        return wire.view_as(body, 0, nb, self.hdtype), body[nb * self.hbytes:]

    def _check_scales(self, body: torch.Tensor, n: int) -> torch.Tensor:
        """The body's scales, refused (``PayloadError``) when one is non-finite or negative;
        returns the packed bits."""
        s, bits = self._split(body, n)
        if not torch.isfinite(s).all():
            raise PayloadError(f"non-finite scale in {int((~torch.isfinite(s)).sum())} "
                               f"bucket(s)")
        if (s < 0).any():
            raise PayloadError(f"negative scale in {int((s < 0).sum())} bucket(s)")
        return bits



class Wrapper:
    """A compressor around another one (``self.inner``): error feedback, shifts, worker
    momentum. What travels is the inner compressor's payload, so its size and its non-finite
    marker are the inner one's; a wrapper changes only what is encoded."""

    inner: Any

    def payload_nbytes(self, n: int) -> int:
        return self.inner.payload_nbytes(n)

    def nonfinite_payload(self, n: int, count: int):
        return self.inner.nonfinite_payload(n, count)
