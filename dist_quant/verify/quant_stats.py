"""Monte Carlo statistics of stochastic-rounding decodes, and the tolerances that go with them.

A decode of coordinate ``i`` takes one of two neighbouring levels ``l_i <= g_i <= u_i``; with
``s = u - l`` and ``p = (g - l) / s`` it is ``l + s B``, ``B ~ Bernoulli(p)``:

    mean g,   variance sigma^2 = s^2 p q = (g - l)(u - g),   4th central moment s^4 p q (1 - 3 p q)

(``q = 1 - p``). Over ``N`` draws the sample mean has standard error ``sqrt(sigma^2 / N)`` and the
sample variance ``sqrt((mu4 - sigma^4) / N)``; summed over independent coordinates, the
variances of these estimates add.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dist_quant.compress import wire

Z = 5.0  # standard errors allowed for one scalar comparison


@dataclass(frozen=True)
class Moments:
    """Per-coordinate Monte Carlo mean and variance of ``draws`` decodes (float64)."""

    mean: torch.Tensor
    var: torch.Tensor
    draws: int


def accumulate(samples, g: torch.Tensor) -> Moments:
    """Mean and unbiased variance of an iterable of decodes of ``g`` (centred at ``g`` first,
    so that no precision is lost)."""
    g = g.double()
    s = torch.zeros_like(g)
    s2 = torch.zeros_like(g)
    count = 0
    for x in samples:
        d = x.double() - g
        s += d
        s2 += d * d
        count += 1
    mean = s / count
    var = (s2 - count * mean * mean) / (count - 1)
    return Moments(g + mean, var, count)


def decode_moments(comp, g: torch.Tensor, draws: int, generator: torch.Generator) -> Moments:
    """Encode ``g`` ``draws`` times with one generator (its stream moves on), decode each."""
    return accumulate((comp.decode(comp.encode(g, generator=generator)) for _ in range(draws)), g)


def bernoulli_moments(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, draws: int,
                      generator: torch.Generator, p: torch.Tensor | None = None) -> Moments:
    """Our own draws, for rules the compressor does not offer: ``lo + (hi - lo) t`` with
    ``t ~ Bernoulli(p)``, by default ``p = (g - lo) / (hi - lo)`` (unbiased)."""
    g, lo, hi = g.double(), lo.double(), hi.double()
    if p is None:
        p = (g - lo) / (hi - lo)
    p = p.double().clamp(0, 1)

    def draw():
        t = (torch.rand(g.shape, generator=generator, dtype=torch.float64) < p).double()
        return lo + (hi - lo) * t
    return accumulate((draw() for _ in range(draws)), g)


def two_point(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Predicted per-coordinate variance and 4th central moment of the two-point decode."""
    g, lo, hi = g.double(), lo.double(), hi.double()
    s = hi - lo
    var = (g - lo) * (hi - g)
    pq = torch.where(s > 0, var / (s * s).clamp_min(1e-300), torch.zeros_like(s))
    mu4 = s.pow(4) * pq * (1 - 3 * pq)
    return var, mu4


def se_total_var(var: torch.Tensor, mu4: torch.Tensor, draws: int) -> float:
    """Standard error of the summed sample variances."""
    return math.sqrt(((mu4 - var * var).clamp_min(0).sum() / draws).item())


def z_scores(m: Moments, target: torch.Tensor, var: torch.Tensor,
             floor: float) -> torch.Tensor:
    """``(mean_i - target_i) / se_i`` with ``se_i = sqrt(var_i / N + floor^2)``; the floor is the
    float rounding of one decode, where the predicted variance is 0 (the extreme coordinates)."""
    se = (var.double() / m.draws + floor**2).sqrt()
    return (m.mean - target.double()) / se


def ulp(x: float, dtype: torch.dtype = torch.float32) -> float:
    """Spacing of ``dtype`` values at magnitude ``|x|``."""
    t = torch.tensor(abs(x), dtype=dtype)
    return (torch.nextafter(t, torch.tensor(math.inf, dtype=dtype)) - t).item()


def headers(payload: torch.Tensor, buckets: int, dtype: torch.dtype):
    """``(a, b)`` per bucket of a kbit payload, read from the documented layout: after the
    fixed header, ``buckets`` scales ``a`` then ``buckets`` offsets ``b`` in the header dtype."""
    size = torch.empty((), dtype=dtype).element_size()
    body = payload[wire.FIXED_NBYTES:]
    a = body[: buckets * size].view(dtype).double()
    b = body[buckets * size: 2 * buckets * size].view(dtype).double()
    return a, b


def levels(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bucket: int, top: int):
    """Lower and upper neighbouring levels ``b + a j`` of every coordinate (j in 0..top)."""
    n = g.numel()
    idx = torch.arange(n) // (bucket or n)
    a_i, b_i = a[idx], b[idx]
    j = torch.where(a_i > 0, ((g.double() - b_i) / a_i).floor().clamp(0, top - 1),
                    torch.zeros_like(a_i))
    return b_i + a_i * j, b_i + a_i * (j + 1)
