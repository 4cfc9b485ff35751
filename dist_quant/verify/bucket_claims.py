"""Checks of MATH 4f-4i: buckets, k bits, several workers, bytes on the wire.

Same statistics as :mod:`dist_quant.verify.quant_claims`; payload sizes are compared exactly with
the documented layout (32-byte fixed header, ``2 nb h`` header bytes, ``ceil(n k / 8)`` bit bytes).
"""

from __future__ import annotations

import math

import torch

from dist_quant.compress import get_compressor, wire
from dist_quant.verify.fixtures import worker_gradients
from dist_quant.verify.quant_claims import DRAWS, decode_floor, gradient, per_tensor_rule
from dist_quant.verify.quant_stats import (
    Z,
    accumulate,
    decode_moments,
    headers,
    levels,
    se_total_var,
    two_point,
    z_scores,
)
from dist_quant.verify.report import Context, Row, at_most, equal, within, z_bound

HEADER_BITS = {"fp32": 32, "fp16": 16}


def bucket_rule(ctx: Context, d: int, bits: int = 1):
    """Moments of kbit decodes of the real gradient with bucket size d, and predicted var, mu4."""
    def make():
        g = gradient(ctx)
        comp = get_compressor("kbit", bits=bits, bucket_size=d)
        nb = comp.num_buckets(g.numel())
        a, b = headers(comp.encode(g, generator=ctx.generator(50)).to_tensor(), nb,
                       torch.float32)
        lo, hi = levels(g, a, b, d, (1 << bits) - 1)
        var, mu4 = two_point(g, lo, hi)
        m = decode_moments(comp, g, DRAWS, ctx.generator(51 + 10 * d + bits))
        return m, var, mu4, a.max().item()
    return ctx.cached(f"bucket{d}k{bits}", make)


def claim_4f(ctx: Context) -> list[Row]:
    g = gradient(ctx)
    n = g.numel()
    whole, a, b = per_tensor_rule(ctx)
    tensor_var, tensor_mu4 = two_point(g, b.expand(n), (a + b).expand(n))
    rows = []
    for d in (512, 64):
        m, var, mu4, a_max = bucket_rule(ctx, d)
        z = z_scores(m, g, var, decode_floor(g, a_max)).abs().max().item()
        rows.append(at_most("4f", f"buckets d={d} (n={n}: last bucket {n % d}) unbiased, max |z|",
                            "|z| ~ N(0,1)", z, z_bound(n)))
        rows.append(within("4f", f"d={d}: total variance = sum over buckets (g - min_B)(max_B - g)",
                           var.sum().item(), m.var.sum().item(), Z * se_total_var(var, mu4, DRAWS)))
    ratio = tensor_var.sum().item() / var.sum().item()
    se = ratio * math.hypot(se_total_var(tensor_var, tensor_mu4, DRAWS) / tensor_var.sum().item(),
                            se_total_var(var, mu4, DRAWS) / var.sum().item())
    rows.append(within("4f", "variance reduction, per-tensor rule (d = n) / d=64", ratio,
                       whole.var.sum().item() / m.var.sum().item(), Z * se))
    comp = get_compressor("onebit", bucket_size=64)
    bits = 8 * comp.payload_nbytes(n) / n
    predicted = 1 + 2 * 32 / 64
    rows.append(within("4f", "bits per coordinate at d=64, fp32 headers: 1 + 2 h / d "
                       "(+ fixed header, ceil)", predicted, bits, (8 * wire.FIXED_NBYTES + 8 + 64)
                       / n))
    ctx.data["4f_total_variance"] = {"d=n": tensor_var.sum().item(), "d=512":
                                     bucket_rule(ctx, 512)[1].sum().item(),
                                     "d=64": var.sum().item()}
    return rows


def claim_4g(ctx: Context) -> list[Row]:
    g = gradient(ctx)
    n = g.numel()
    rows = []
    for k in (2, 4):
        m, var, mu4, a_max = bucket_rule(ctx, 0, bits=k)
        z = z_scores(m, g, var, decode_floor(g, a_max)).abs().max().item()
        rows.append(at_most("4g", f"k={k}: 2^k levels, stochastic rounding unbiased, max |z|",
                            "|z| ~ N(0,1)", z, z_bound(n)))
        rows.append(within("4g", f"k={k}: total variance sum (g - l)(u - g)", var.sum().item(),
                           m.var.sum().item(), Z * se_total_var(var, mu4, DRAWS)))
    one = get_compressor("onebit", bucket_size=128).encode(g, generator=ctx.generator(52))
    k1 = get_compressor("kbit", bits=1, bucket_size=128).encode(g, generator=ctx.generator(52))
    rows.append(equal("4g", "onebit is kbit with k=1: identical payload bytes, same generator",
                      True, torch.equal(one.to_tensor(), k1.to_tensor())))
    return rows


WORKERS, ROUNDS = 4, 200


def claim_4h(ctx: Context) -> list[Row]:
    """W workers encode their own gradients; the server averages with ``decode_mean``."""
    grads = [x[:2048] for x in worker_gradients(ctx, WORKERS)]
    comp = get_compressor("onebit", bucket_size=0)

    def server_means(generators, gs):
        for r in range(ROUNDS):
            gens = generators(r)
            rows = [comp.encode(x, generator=gen).to_tensor() for x, gen in
                    zip(gs, gens, strict=True)]
            yield comp.decode_mean(torch.stack(rows))

    def predicted(gs):
        """Variance and 4th central moment of the mean of independent two-point decodes."""
        parts = [two_point(x, x.min().expand_as(x), x.max().expand_as(x)) for x in gs]
        var = sum(v for v, _ in parts) / WORKERS**2
        mu4 = (sum(m4 for _, m4 in parts) + 3 * (sum(v for v, _ in parts) ** 2
               - sum(v * v for v, _ in parts))) / WORKERS**4
        return var, mu4

    own = [ctx.generator(1000 + rank) for rank in range(WORKERS)]
    target = sum(x.double() for x in grads) / WORKERS
    indep = accumulate(server_means(lambda r: own, grads), target)
    var, mu4 = predicted(grads)
    same = [grads[0]] * WORKERS
    shared = accumulate(server_means(
        lambda r: [ctx.generator(5000 + r) for _ in range(WORKERS)], same), grads[0])
    one_var, one_mu4 = two_point(grads[0], grads[0].min().expand_as(grads[0]),
                                 grads[0].max().expand_as(grads[0]))
    return [
        within("4h", f"W={WORKERS} independent generators: Var(mean) = sum_w Var_w / W^2",
               var.sum().item(), indep.var.sum().item(),
               Z * se_total_var(var, mu4, ROUNDS)),
        within("4h", "one shared seed, same g: Var(mean) = Var(one decode), nothing averages",
               one_var.sum().item(), shared.var.sum().item(),
               Z * se_total_var(one_var, one_mu4, ROUNDS)),
        within("4h", "...W times what independent seeds give on that g: Var / (Var_one / W)",
               float(WORKERS), shared.var.sum().item() / (one_var.sum().item() / WORKERS),
               Z * WORKERS * se_total_var(one_var, one_mu4, ROUNDS) / one_var.sum().item()),
    ]


def expected_nbytes(n: int, bits: int, bucket: int, header: str) -> int:
    buckets = 0 if n == 0 else -(-n // (bucket or n))
    return wire.FIXED_NBYTES + 2 * buckets * HEADER_BITS[header] // 8 + -(-n * bits // 8)


def claim_4i(ctx: Context) -> list[Row]:
    g = gradient(ctx)
    n = g.numel()
    rows = []
    for d in (0, 512):
        comp = get_compressor("onebit", bucket_size=d)
        sent = comp.encode(g, generator=ctx.generator(60)).to_tensor().numel()
        rows.append(equal("4i", f"bytes handed to the transport, n={n}, d={d}: 32 + 8 nb + "
                          "ceil(n/8)", expected_nbytes(n, 1, d, "fp32"), sent))
    checked = matched = 0
    gen = ctx.generator(61)
    for n in (1, 7, 8, 9, 1001):
        x = torch.randn(n, generator=gen)
        for d in (0, 3, 64, 1000):
            for header in ("fp32", "fp16"):
                for bits in (1, 3):
                    comp = get_compressor("kbit", bits=bits, bucket_size=d, header_dtype=header)
                    p = comp.encode(x, generator=gen)
                    want = expected_nbytes(n, bits, d, header)
                    checked += 1
                    matched += int(p.nbytes == want == p.to_tensor().numel()
                                   == comp.payload_nbytes(n))
    rows.append(equal("4i", "nbytes = len(to_tensor()) = payload_nbytes(n) = layout, for n in "
                      "{1,7,8,9,1001}, d in {0,3,64,1000}, fp32/fp16, k in {1,3} (matches)",
                      checked, matched))
    return rows


CLAIMS = [claim_4f, claim_4g, claim_4h, claim_4i]
