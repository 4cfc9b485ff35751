"""Directed rounding into a narrower float type (MATH 4e).

``round_down(x, dtype)`` is the largest value of ``dtype`` that is ``<= x``; ``round_up`` the
smallest that is ``>= x``. Casting rounds to nearest, which can move an offset ``b`` above the
minimum or a top level ``a + b`` below the maximum, and then some ``p_i`` leave [0, 1] and the
decode is biased. One cast plus one ``nextafter`` step where the cast went the wrong way.
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
