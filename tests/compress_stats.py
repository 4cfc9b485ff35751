"""Predicted moments of the k-bit decode, and the statistical checks the compressor tests share.

Not a test module: imported by ``test_compress_*.py``. Everything here is computed in float64
from the header values actually sent, so the predictions are exact for the rule as implemented.
"""

from __future__ import annotations

import torch

from dist_quant.compress import wire


def headers(comp, payload) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-bucket (a, b) of a k-bit payload, float64."""
    data = payload.to_tensor() if isinstance(payload, wire.Payload) else payload
    n = wire.read_header(data).n
    a, b, _ = comp._split(data[wire.FIXED_NBYTES:], n)
    return a.double(), b.double()


def per_coordinate(comp, g: torch.Tensor, payload):
    """Lower level l, upper level u and up-probability p of every coordinate (float64)."""
    g = g.double().reshape(-1)
    n = g.numel()
    a, b = headers(comp, payload)
    d = comp.bucket_size or n
    idx = torch.arange(n) // d
    a_i, b_i = a[idx], b[idx]
    y = torch.where(a_i > 0, (g - b_i) / torch.where(a_i > 0, a_i, 1.0), 0.0)
    y = y.clamp(0, comp.levels)
    lower = torch.floor(y).clamp(max=max(comp.levels - 1, 0))
    p = y - lower
    low = b_i + lower * a_i
    return low, low + a_i, p, a_i


def two_point_moments(a: torch.Tensor, p: torch.Tensor):
    """Variance and 4th central moment of a t + const with t ~ Bernoulli(p), float64."""
    var = a**2 * p * (1 - p)
    m4 = a**4 * p * (1 - p) * ((1 - p) ** 3 + p**3)
    return var, m4


def assert_unbiased(samples: torch.Tensor, g: torch.Tensor, var: torch.Tensor,
                    slack: torch.Tensor | float = 0.0, z: float = 6.0) -> None:
    """Mean of N samples (rows) within ``z`` standard errors of g, coordinate by coordinate,
    plus ``slack`` (the documented deterministic bias bound and float32 rounding); and the sum
    of squared z-scores within 6 standard deviations of its chi-square mean."""
    n_draws = samples.shape[0]
    mean = samples.double().mean(0)
    err = mean - g.double()
    se = (var / n_draws).sqrt()
    tol = z * se + slack
    worst = (err.abs() - tol).max().item()
    assert worst <= 0, f"mean off by more than {z} standard errors: excess {worst:.3g}"
    live = var > 0
    if live.any():
        zz = (err[live].abs() - torch.as_tensor(slack).expand_as(err)[live]).clamp(min=0)
        zz = (zz / se[live]) ** 2
        k = int(live.sum())
        bound = k + 6 * (2 * k) ** 0.5
        assert zz.sum().item() <= bound, f"chi-square {zz.sum().item():.1f} > {bound:.1f} (k={k})"


def assert_total_variance(samples: torch.Tensor, g: torch.Tensor, var: torch.Tensor,
                          m4: torch.Tensor, z: float = 6.0) -> None:
    """Mean over draws of ||decode - g||^2 equals sum(var) within z standard errors."""
    n_draws = samples.shape[0]
    sq = ((samples.double() - g.double()) ** 2).sum(1)
    predicted = var.sum().item()
    se = ((m4 - var**2).sum().item() / n_draws) ** 0.5
    got = sq.mean().item()
    assert abs(got - predicted) <= z * se + 1e-9 * predicted, (
        f"total variance {got:.6g} vs predicted {predicted:.6g} (se {se:.3g})")


def slack(low: torch.Tensor, up: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Deterministic bias allowed per coordinate (quantize docstring): the 24-bit draw
    (a 2^-24), float32 rounding of y = (g - b) / a (2^-22 |g - b| <= 2^-22 (|low| + |up| + a))
    and of the decode a t + b (an ulp of the levels' magnitude)."""
    eps = torch.finfo(torch.float32).eps
    return a * 2.0**-24 + 4 * eps * (low.abs() + up.abs() + a)
