"""Triton kernels of the k-bit compressor for CUDA tensors (``pip install dist-quant[gpu]``).

Same wire format, same arithmetic and the same draws as the CPU paths
(:mod:`dist_quant.compress.draws`), so a payload encoded on a GPU is byte-identical to the one the
CPU would make from the same gradient and keys, and any path decodes it:

- encode: per-bucket min/max and the outward-rounded headers ``(a, b)`` with torch operations
  that never wait for the device (no ``.item()``, no data-dependent branch), then one kernel
  that draws, quantises and packs a block of coordinates per program. A non-finite gradient is
  reported through the payload: the kernel-side count goes into the fixed header
  (``flags`` bit 0 and the non-finite count) and the body is zeroed, exactly the layout of
  :meth:`Compressor.nonfinite_payload`, so the receiver's decode raises
  NonFiniteGradientError; a header that overflows its type stays in the payload as Inf or NaN
  and the decoder rejects it (PayloadError), where the CPU encoder raises WireRangeError.
- decode and decode_mean: one kernel each (decode_mean sums the W rows in order from zero and
  divides by W, the CPU order). The decoders' validation of the fixed header and of the header
  values reads them on the host, as on the CPU; the kernels themselves do not synchronise.

Floating point: launched with ``enable_fp_fusion=False`` (no fused multiply-adds, like the C
kernels' ``-ffp-contract=off``) and with round-to-nearest divisions, so decodes are bit-identical
to the CPU's. Tested without a GPU under Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors;
``DIST_QUANT_KERNELS=triton`` routes CPU tensors here).
"""

from __future__ import annotations

import os

import torch

from dist_quant.compress import draws, wire

BLOCK = 1024  # coordinates per program (a multiple of 8: whole bytes of the stream)


def available() -> bool:
    """Whether the Triton kernels can run: Triton importable, and a CUDA device or the
    interpreter."""
    try:  # inside: Triton is an optional dependency (the gpu extra)
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _kernels():
    # inside: the kernels' module imports Triton, an optional dependency (the gpu extra)
    from dist_quant.compress import triton_kernels as tk

    return tk.encode_kernel, tk.decode_kernel, tk.decode_mean_kernel


def _launch(kernel, n, *args, **constants):
    grid = (triton_cdiv(n, BLOCK),)
    kernel[grid](*args, BLOCK=BLOCK, enable_fp_fusion=False, **constants)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """Directed rounding of float64 into ``dtype`` (rounding.round_up/round_down without the
    host-side test: the step is taken where needed, elementwise)."""
    y = x.to(dtype)
    wrong = y.double() < x if up else y.double() > x
    step = torch.nextafter(y, torch.full_like(y, float("inf") if up else -float("inf")))
    return torch.where(wrong, step, y)


def _bucket_minmax(x: torch.Tensor, d: int, nb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bucket min and max, with the short last bucket padded by its own first value (no
    effect on either)."""
    n = x.numel()
    pad = nb * d - n
    if pad:
        x = torch.cat([x, x[(nb - 1) * d:(nb - 1) * d + 1].expand(pad)])
    return torch.aminmax(x.view(nb, d), dim=1)


def kbit_encode(x: torch.Tensor, body: torch.Tensor, comp,
                generator: torch.Generator | None) -> None:
    """Encode ``x`` into ``body``, the body of a payload made by ``Compressor.encode`` (its
    fixed header, the 32 bytes before the body, is updated on the device when x holds
    non-finite values). No host synchronisation."""
    encode_kernel, _, _ = _kernels()
    n = x.numel()
    d = comp.bucket_size or n
    nb = comp.num_buckets(n)
    keys = draws.keys(generator).to(x.device, non_blocking=True)
    xf = x if x.is_contiguous() else x.contiguous()
    lo, hi = _bucket_minmax(xf.float(), d, nb)
    bad = (~torch.isfinite(xf)).sum()
    lo, hi = lo.double() + 0.0, hi.double() + 0.0  # a zero extreme as +0 (quantize)
    b = _round(lo, comp.hdtype, up=False)
    a = _round((hi - b.double()) / comp.levels, comp.hdtype, up=True)
    short = b.double() + comp.levels * a.double() < hi.double()
    a = torch.where(short, torch.nextafter(a, torch.full_like(a, float("inf"))), a)
    payload = body.as_strided((body.numel() + wire.FIXED_NBYTES,), (1,),
                              body.storage_offset() - wire.FIXED_NBYTES)
    a_out, b_out, bits = comp._split(body, n)
    a_out.copy_(a)
    b_out.copy_(b)
    a32, b32 = a.float().contiguous(), b.float().contiguous()
    _launch(encode_kernel, n, xf, a32, b32, keys, bits, n, d, K=comp.bits,
            KP=1 << (comp.bits - 1).bit_length())
    _report_nonfinite(payload, body, bad)


def _report_nonfinite(payload: torch.Tensor, body: torch.Tensor, bad: torch.Tensor) -> None:
    """Where ``bad > 0`` (a device scalar), turn the payload into the non-finite payload:
    flag bit, count, zero body; otherwise leave it unchanged. No host synchronisation."""
    hit = bad > 0
    payload[2:3].copy_(torch.where(hit, payload[2:3] | wire.FLAG_NONFINITE, payload[2:3]))
    payload[24:32].copy_(bad.to(torch.int64).reshape(1).view(torch.uint8))
    body.masked_fill_(hit, 0)


def kbit_decode(body: torch.Tensor, n: int, comp, out: torch.Tensor) -> torch.Tensor:
    _, decode_kernel, _ = _kernels()
    a, b, bits = comp._split(body, n)
    d = comp.bucket_size or n
    _launch(decode_kernel, n, bits, a.float().contiguous(), b.float().contiguous(), out, n, d,
            K=comp.bits)
    return out


def kbit_decode_mean(batch: torch.Tensor, n: int, comp, out: torch.Tensor,
                     start: int = wire.FIXED_NBYTES) -> torch.Tensor:
    _, _, mean_kernel = _kernels()
    if batch.stride(1) != 1:
        batch = batch.contiguous()
    nb = comp.num_buckets(n)
    hb = comp.hbytes
    heads = batch[:, start:start + 2 * nb * hb].contiguous().view(comp.hdtype).float()
    a32, b32 = heads[:, :nb].contiguous(), heads[:, nb:].contiguous()
    bits = batch[:, start + 2 * nb * hb:]
    d = comp.bucket_size or n
    _launch(mean_kernel, n, bits, batch.stride(0), a32, b32, out, n, d, nb, batch.shape[0],
            K=comp.bits)
    return out
