"""Directed rounding into a narrower float type (MATH 4e).

``round_down(x, dtype)`` is the largest value of ``dtype`` that is ``<= x``; ``round_up`` the
smallest that is ``>= x``. Casting rounds to nearest, which can move an offset ``b`` above the
minimum or a top level ``a + b`` below the maximum, and then some ``p_i`` leave [0, 1] and the
decode is biased. One cast plus one ``nextafter`` step where the cast went the wrong way.

``header_values`` applies them to the k-bit rule's per-bucket ``(a, b)``
(:mod:`dist_quant.compress.quantize`), the one place every encoding path (pure torch, the
compiled kernels' large-bucket pass) takes them from.
"""

from __future__ import annotations

import torch


def round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = x.to(dtype)
    wrong = y.to(x.dtype) > x
    if wrong.any():
        y = torch.where(wrong, torch.nextafter(y, torch.full_like(y, -float("inf"))), y)
    return y


def round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = x.to(dtype)
    wrong = y.to(x.dtype) < x
    if wrong.any():
        y = torch.where(wrong, torch.nextafter(y, torch.full_like(y, float("inf"))), y)
    return y


def header_values(lo: torch.Tensor, hi: torch.Tensor, levels: int,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` in the header type from per-bucket min/max: ``b`` rounded down, ``a`` up.
    A zero min or max counts as +0 (``+ 0.0``), whichever zero the reduction returned."""
    lo, hi = lo.double() + 0.0, hi.double() + 0.0
    b = round_down(lo, dtype)
    a = round_up((hi - b.double()) / levels, dtype)
    # (hi - b) / L can round down in float64 when b is far larger than hi - b; step a up
    # until the top level covers the maximum (one step suffices: a grows by one ulp)
    short = b.double() + levels * a.double() < hi.double()
    if short.any():
        a = torch.where(short, torch.nextafter(a, torch.full_like(a, float("inf"))), a)
    return a, b
