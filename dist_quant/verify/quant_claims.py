"""Checks of MATH 4a-4e: the per-tensor one-bit rule on a real gradient, through the compressor API.

The gradient is that of the project's MLP on an MNIST-1D minibatch (``fixtures``). Mean errors
are judged coordinate by coordinate: the largest |z| over the n coordinates must stay below the
bound that n independent standard normals exceed with probability 1e-6. Variances are compared
summed over coordinates, within 5 standard errors (``quant_stats``).
"""

from __future__ import annotations

import math

import torch

from dist_quant.compress import WireRangeError, get_compressor
from dist_quant.errors import NonFiniteGradientError
from dist_quant.verify.fixtures import worker_gradients
from dist_quant.verify.quant_stats import (
    Z,
    bernoulli_moments,
    decode_moments,
    headers,
    se_total_var,
    two_point,
    ulp,
    z_scores,
)
from dist_quant.verify.report import Context, Row, at_least, at_most, equal, within, z_bound

DRAWS = 400


def gradient(ctx: Context) -> torch.Tensor:
    return worker_gradients(ctx, 1)[0]


def per_tensor_rule(ctx: Context):
    """Moments of the compressor's onebit decodes with bucket_size=0, and its (a, b)."""
    def make():
        g = gradient(ctx)
        comp = get_compressor("onebit", bucket_size=0)
        payload = comp.encode(g, generator=ctx.generator(40)).to_tensor()
        a, b = headers(payload, 1, torch.float32)
        return decode_moments(comp, g, DRAWS, ctx.generator(41)), a, b
    return ctx.cached("per_tensor_rule", make)


def decode_floor(g: torch.Tensor, a: float) -> float:
    """Rounding of one fp32 decode plus the draw's documented bias bound ``a 2^-24``."""
    return 2 * ulp(g.abs().max().item()) + a * 2.0**-24


def claim_4a(ctx: Context) -> list[Row]:
    g = gradient(ctx)
    m, a, b = per_tensor_rule(ctx)
    n = g.numel()
    var, _ = two_point(g, b.expand(n), (a + b).expand(n))
    z = z_scores(m, g, var, decode_floor(g, a.item())).abs().max().item()
    lo, hi = g.min().item(), g.max().item()
    header_err = max(abs(b.item() - lo), abs((a + b).item() - hi)) / ulp(max(abs(lo), abs(hi)))
    return [
        within("4a", f"header of the per-tensor rule: b = min g, a + b = max g (in ulps, n={n})",
               0.0, header_err, 1.0),
        at_most("4a", f"E[a t + b] = g: max |z| of the mean of {DRAWS} decodes over {n} "
                "coordinates", "|z| ~ N(0,1)", z, z_bound(n)),
        within("4a", "mean error, averaged over coordinates", 0.0, (m.mean - g).mean().item(),
               Z * math.sqrt(var.sum().item() / DRAWS) / n),
    ]


def widened(ctx: Context):
    """Our own draws of the rule with a wider (a, b): b = min - r/2, a + b = max + r/2."""
    def make():
        g = gradient(ctx)
        r = (g.max() - g.min()).item()
        lo = torch.full_like(g, g.min().item() - r / 2, dtype=torch.float64)
        hi = torch.full_like(g, g.max().item() + r / 2, dtype=torch.float64)
        return bernoulli_moments(g, lo, hi, DRAWS, ctx.generator(42)), lo, hi
    return ctx.cached("widened", make)


def claim_4b(ctx: Context) -> list[Row]:
    g = gradient(ctx)
    m, lo, hi = widened(ctx)
    var, mu4 = two_point(g, lo, hi)
    z = z_scores(m, g, var, 0.0).abs().max().item()
    return [
        at_most("4b", "not unique: b = min - r/2, a = 2r (r = max - min) is unbiased too, "
                "max |z|", "|z| ~ N(0,1)", z, z_bound(g.numel())),
        within("4b", "...with total variance sum (g - b)(a + b - g)", var.sum().item(),
               m.var.sum().item(), Z * se_total_var(var, mu4, DRAWS)),
    ]


def claim_4c(ctx: Context) -> list[Row]:
    g = gradient(ctx)
    n = g.numel()
    m, a, b = per_tensor_rule(ctx)
    var, mu4 = two_point(g, b.expand(n), (a + b).expand(n))
    total, se = var.sum().item(), se_total_var(var, mu4, DRAWS)
    wide_m, lo, hi = widened(ctx)
    wide_var, wide_mu4 = two_point(g, lo, hi)
    wide_total, wide_se = wide_var.sum().item(), se_total_var(wide_var, wide_mu4, DRAWS)
    ratio = wide_total / total
    ratio_se = ratio * math.hypot(se / total, wide_se / wide_total)
    r = (g.max() - g.min()).item()
    return [
        within("4c", "total variance = sum (g - min)(max - g) (per-tensor rule, measured)", total,
               m.var.sum().item(), Z * se),
        at_most("4c", "...at most n (max - min)^2 / 4", "<= bound", m.var.sum().item(),
                n * r * r / 4),
        within("4c", "min-variance choice: Var(wider (a, b) of 4b) / Var(b = min, a = max - min)",
               ratio, wide_m.var.sum().item() / m.var.sum().item(), Z * ratio_se),
    ]


def claim_4d(ctx: Context) -> list[Row]:
    comp = get_compressor("onebit", bucket_size=0)
    gen = ctx.generator(43)
    const_err = 0.0
    for value in (0.37, -2.5e-3, 0.0, 1e-40):
        g = torch.full((1000,), value)
        for _ in range(10):
            const_err = max(const_err, (comp.decode(comp.encode(g, generator=gen)) - g)
                            .abs().max().item())
    bad = gradient(ctx).clone()
    bad[[3, 50, 700]] = math.nan
    bad[[10, 20]] = torch.tensor([math.inf, -math.inf])
    try:
        comp.encode(bad, generator=gen)
        counted = "not raised"
    except NonFiniteGradientError as err:
        counted = err.count
    try:
        comp.decode(comp.nonfinite_payload(bad.numel(), 5).to_tensor())
        flagged = "not raised"
    except NonFiniteGradientError as err:
        flagged = err.count
    g = gen
    awkward = {
        "denormal": torch.randn(997, generator=g) * 1e-42,
        "huge": torch.randn(997, generator=g) * 3e37,
        "offset": 1e4 + torch.rand(997, generator=g) * 1e-3,
        "tiny range at 1": 1 + torch.randint(0, 3, (997,), generator=g) * 2.0**-23,
    }
    outside = nonfinite = 0
    for x in awkward.values():
        lo, hi = x.min().item(), x.max().item()
        slack = ulp(max(abs(lo), abs(hi)))
        for _ in range(20):
            y = comp.decode(comp.encode(x, generator=gen))
            nonfinite += int((~torch.isfinite(y)).sum())
            outside += int(((y < lo - slack) | (y > hi + slack)).sum())
    try:
        comp.encode(torch.tensor([-3e38, 3e38]), generator=gen)
        refused = "sent"
    except WireRangeError:
        refused = "WireRangeError"
    return [
        within("4d", "a = 0 (constant vector, also 0 and denormal) decodes exactly to b",
               0.0, const_err, 0.0),
        equal("4d", "NaN/Inf refused loudly: NonFiniteGradientError.count (3 NaN, 2 Inf)",
              5, counted),
        equal("4d", "non-finite flag payload decodes to NonFiniteGradientError(count)", 5,
              flagged),
        equal("4d", "p clamped: decodes outside [min, max] +- 1 ulp, or non-finite (denormal, "
              "huge, offset, 1-ulp ranges)", 0, outside + nonfinite),
        equal("4d", "range above the header type (max - min > fp32 max) refused, never sent",
              "WireRangeError", refused),
    ]


def offset_vector(ctx: Context) -> torch.Tensor:
    """Values in [1000.3, 1003.7]: fp16 spacing there is 0.5, so header rounding matters."""
    u = torch.rand(2000, generator=ctx.generator(44))
    g = 1000.3 + 3.4 * u
    g[0], g[1] = 1000.3, 1003.7
    return g


def claim_4e(ctx: Context) -> list[Row]:
    g = offset_vector(ctx)
    n = g.numel()
    comp = get_compressor("onebit", bucket_size=0, header_dtype="fp16")
    a, b = headers(comp.encode(g, generator=ctx.generator(45)).to_tensor(), 1, torch.float16)
    m = decode_moments(comp, g, DRAWS, ctx.generator(46))
    var, _ = two_point(g, b.expand(n), (a + b).expand(n))
    z_out = z_scores(m, g, var, decode_floor(g, a.item())).abs().max().item()
    brackets = b.item() <= g.min().item() and (a + b).item() >= g.max().item()

    # naive: round min and max - min to nearest fp16, keep p from the fp32 values
    lo, hi = g.min().double(), g.max().double()
    b_n = lo.half().double()
    a_n = (hi - lo).half().double()
    p = (g.double() - lo) / (hi - lo)
    bias = a_n * p + b_n - g.double()
    naive = bernoulli_moments(g, b_n.expand(n), (a_n + b_n).expand(n), DRAWS, ctx.generator(47),
                              p=p)
    naive_var = a_n * a_n * p * (1 - p)
    z_naive = z_scores(naive, g.double() + bias, naive_var, 1e-9).abs().max().item()
    se_mean = math.sqrt(var.sum().item() / DRAWS) / n
    naive_se_mean = math.sqrt(naive_var.sum().item() / DRAWS) / n
    return [
        equal("4e", "fp16 headers rounded outward: b <= min, a + b >= max", True, brackets),
        at_most("4e", "...so the decode stays unbiased (values in [1000.3, 1003.7], fp16 "
                "spacing 0.5): max |z|", "|z| ~ N(0,1)", z_out, z_bound(n)),
        within("4e", "...mean error, averaged over coordinates", 0.0,
               (m.mean - g.double()).mean().item(), Z * se_mean),
        at_most("4e", "naive nearest rounding (own code): mean error follows a16 p + b16 - g, "
                "max |z|", "|z| ~ N(0,1)", z_naive, z_bound(n)),
        within("4e", "...its mean error, averaged over coordinates: biased",
               bias.mean().item(), (naive.mean - g.double()).mean().item(), Z * naive_se_mean),
        at_least("4e", "...a bias far outside the noise: |mean bias| / standard error", "> 0",
                 abs(bias.mean().item()) / naive_se_mean, Z),
    ]


CLAIMS = [claim_4a, claim_4b, claim_4c, claim_4d, claim_4e]
