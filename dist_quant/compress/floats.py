"""Float compressors: ``none`` (fp32, 32 bits/coordinate), ``fp16`` and ``bf16`` (16 bits).

``none`` is the identity on fp32 values (fp16/bf16 inputs are widened exactly, fp64 inputs rounded
to nearest fp32), so training with it equals the uncompressed reference. ``fp16``/``bf16`` round
to nearest: deterministic and biased by at most half an ulp per coordinate. A finite value beyond
the type's range would become Inf on the wire; encode raises :class:`WireRangeError` instead.
"""

from __future__ import annotations

import torch

from dist_quant.compress import wire
from dist_quant.compress.base import Compressor, count_nonfinite
from dist_quant.errors import NonFiniteGradientError, PayloadError

MEAN_CHUNK = 1 << 18  # coordinates widened at a time by a 16-bit decode_mean (1 MiB of fp32)
MIXED_ADD_MAX = 1 << 21  # up to here a 16-bit decode_mean adds its rows by torch's mixed add


class FloatCompressor(Compressor):
    """The values themselves in ``dtype``: deterministic, so contractive (rounding to nearest
    moves each value by at most half an ulp)."""

    kind = ""
    dtype = torch.float32
    contractive = True
    floating = True

    def _body_nbytes(self, n: int) -> int:
        return n * self.bits // 8

    def _encode_body(self, x, body, generator):
        cast = body.view(self.dtype)
        cast.copy_(x)  # rounds to nearest; checked below, where it lies (no temporary)
        bad = count_nonfinite(cast)
        if bad:
            count = count_nonfinite(x)
            if count:
                raise NonFiniteGradientError(count, x.numel())
            raise wire.WireRangeError(f"{bad} finite value(s) exceed the {self.name} range "
                                      f"(largest |x| = {x.abs().max().item():.4g})")

    # A finite encoder never sends NaN or Inf (it sends a payload flagged non-finite instead),
    # so a body that holds one is corrupt: the decodes check what they converted (one pass
    # over the result; for decode_mean over the mean, which is finite only if every row is).
    def _check_body(self, body, n):
        bad = count_nonfinite(wire.view_as(body, 0, n, self.dtype))
        if bad:
            raise PayloadError(f"{bad} non-finite value(s) in the body")

    def _decode_validates(self, body):
        return True

    def _checked(self, values: torch.Tensor) -> torch.Tensor:
        bad = count_nonfinite(values)
        if bad:
            raise PayloadError(f"{bad} non-finite value(s) in the body")
        return values

    def _decode_body(self, body, n):
        return self._checked(wire.view_as(body, 0, n, self.dtype).to(torch.float32, copy=True))

    def _decode_into(self, body, n, out):
        # the body is exactly n values (validated); viewed in place where it is aligned, and
        # checked before out (a caller's buffer) is written
        values = body.view(self.dtype) if body.storage_offset() % self.dtype.itemsize == 0 \
            else wire.view_as(body, 0, n, self.dtype)
        return out.copy_(self._checked(values))

    def _check_rows(self, batch, n):
        pass  # _mean_of_rows checks the mean

    def _mean_of_rows(self, batch, n, out):
        out.zero_()
        rows = []
        for row in range(batch.shape[0]):
            body = batch[row, wire.FIXED_NBYTES:]
            aligned = body.storage_offset() % self.dtype.itemsize == 0
            rows.append(body.view(self.dtype) if aligned else wire.view_as(body, 0, n, self.dtype))
        if self.dtype == torch.float32 or out.device.type != "cpu" or n <= MIXED_ADD_MAX:
            for values in rows:
                out.add_(values)
        else:
            # On the CPU torch's mixed add (fp32 += fp16/bf16) slows down past a few million
            # coordinates (16M, W = 4: 157 ms against 28 ms widened in chunks, AVX-512;
            # benchmarks/finite_check_cost.py; below 2M it is the faster), so larger rows are
            # widened a chunk at a time into one small buffer. The same arithmetic in the same
            # order (exact widening, then each row added in row order): the same bits.
            buf = torch.empty(min(n, MEAN_CHUNK), dtype=torch.float32)
            for start in range(0, n, MEAN_CHUNK):
                stop = min(n, start + MEAN_CHUNK)
                acc, wide = out[start:stop], buf[:stop - start]
                for values in rows:
                    acc.add_(wide.copy_(values[start:stop]))
        out.div_(batch.shape[0])
        if count_nonfinite(out):  # a non-finite row, or finite rows whose sum overflows
            for row in range(batch.shape[0]):
                try:
                    self._check_body(batch[row, wire.FIXED_NBYTES:], n)
                except PayloadError as err:
                    raise PayloadError(f"row {row}: {err}") from None
        return out


class NoneCompressor(FloatCompressor):
    """fp32: the identity on fp32 values, so also unbiased with ``omega = 0``."""

    name = kind = "none"
    wire_id = 0
    dtype = torch.float32
    bits = 32
    unbiased = True

    def omega(self, n: int) -> float:
        return 0.0

    @property
    def label(self) -> str:
        return "fp32"

    def payload_buffer(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A reusable payload of ``n`` coordinates and its body as ``n`` float32 values (a view:
        the header is 32 bytes, so the body is aligned). A caller that keeps its vector in the
        body sends the buffer as the payload after :meth:`seal`, with no copy."""
        raw, nbytes = self._fixed(n)
        data = wire.new_payload(raw, nbytes, torch.device(device), zero_body=False)
        return data, data[wire.FIXED_NBYTES:].view(torch.float32)

    def seal(self, data: torch.Tensor) -> wire.Payload:
        """The payload of a :meth:`payload_buffer` whose body holds the values to send: what
        :meth:`encode` of those values returns, made in place (the header is rewritten, the
        values are checked: raises NonFiniteGradientError if any is NaN or Inf)."""
        n = (data.numel() - wire.FIXED_NBYTES) // 4
        raw, nbytes = self._fixed(n)
        if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != nbytes:
            raise ValueError(f"seal expects a flat uint8 payload buffer of {nbytes} bytes, got "
                             f"{data.dtype} with shape {tuple(data.shape)}")
        values = data[wire.FIXED_NBYTES:].view(torch.float32)
        if count_nonfinite(values):
            raise NonFiniteGradientError(count_nonfinite(values), n)
        if wire.read_fixed(data) != raw:
            data[:wire.FIXED_NBYTES].copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        return wire.Payload(data)


class FP16Compressor(FloatCompressor):
    name = kind = "fp16"
    wire_id = 1
    dtype = torch.float16
    bits = 16


class BF16Compressor(FloatCompressor):
    name = kind = "bf16"
    wire_id = 2
    dtype = torch.bfloat16
    bits = 16
