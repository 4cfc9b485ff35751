"""Checks of MATH 2 (batch normalisation) and MATH 3 (dropout by keep probability).

Deterministic identities are checked in float64 to rounding (1e-12 relative to O(1) values);
where torch's ``eps`` inside the square root spoils an identity the tolerance is derived from it:
scaling ``W`` by ``c`` turns ``(a - mu) / sqrt(var + eps)`` into ``(a - mu) / sqrt(var + eps/c^2)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dist_quant.core.model import KeepDropout, insert_batchnorm
from dist_quant.core.optim import DecoupledMomentumSGD
from dist_quant.verify.fixtures import dataset, float64_mlp, minibatch, set_grads
from dist_quant.verify.report import Context, Row, at_most, within

ROUNDING = 1e-12
BATCH, UNITS = 128, 32


def _layer(ctx: Context):
    g = ctx.generator(20)
    x = dataset(ctx).x_train[:BATCH].double()
    w = torch.randn(UNITS, x.shape[1], generator=g, dtype=torch.float64) / math.sqrt(x.shape[1])
    b = torch.randn(UNITS, generator=g, dtype=torch.float64)
    return x, w, b


def _bn(a: torch.Tensor, eps: float) -> torch.Tensor:
    return nn.BatchNorm1d(a.shape[1], eps=eps, dtype=torch.float64).train()(a)


def claim_2a(ctx: Context) -> list[Row]:
    x, w, b = _layer(ctx)
    eps, c = 1e-5, 10.0
    with torch.no_grad():
        ref = _bn(x @ w.T, eps)
        shifted = (_bn(x @ w.T + b, eps) - ref).abs().max().item()
        a = x @ w.T
        centred, var = a - a.mean(0), a.var(0, unbiased=False)
        # z_c - z = (a - mu) (1/sqrt(var + eps/c^2) - 1/sqrt(var + eps)): the eps effect
        effect = (centred * ((var + eps / c**2).rsqrt() - (var + eps).rsqrt())).abs().max()
        scaled = (_bn(c * a, eps) - ref).abs().max().item()
    linear = nn.Linear(x.shape[1], UNITS).double()
    head = nn.Linear(UNITS, 10).double()
    y = dataset(ctx).y_train[:BATCH]
    nn.functional.cross_entropy(head(torch.relu(_bn(linear(x), eps))), y).backward()
    return [
        within("2a", "BN output does not depend on the bias b (max |change|, b ~ N(0,1))",
               0.0, shifted, ROUNDING),
        within("2a", f"...nor on W -> {c:g} W (exact for eps=0): max |change| is torch's "
               f"eps={eps:g} effect", effect.item(), scaled, ROUNDING),
        within("2a", "bias before BN gets exactly zero gradient (max |dL/db|)", 0.0,
               linear.bias.grad.abs().max().item(), ROUNDING),
    ]


def claim_2b(ctx: Context) -> list[Row]:
    x, w, _ = _layer(ctx)
    eps = 1e-12
    worst_mean = worst_std = 0.0
    min_var = math.inf
    grads = {}
    for c in (0.01, 1.0, 100.0):
        wc = (c * w).requires_grad_(True)
        out = _bn(x @ wc.T, eps)
        worst_mean = max(worst_mean, out.mean(0).abs().max().item())
        worst_std = max(worst_std, (out.std(0, unbiased=False) - 1).abs().max().item())
        min_var = min(min_var, (x @ wc.T).var(0, unbiased=False).min().item())
        torch.relu(out).pow(2).mean().backward()  # any loss of the BN output
        grads[c] = wc.grad.norm().item()
    # std = sqrt(var / (var + eps)) = 1 - eps / (2 var) + ...
    return [
        within("2b", "scale 1, shift 0: batch mean 0 for W scaled by 0.01, 1, 100", 0.0,
               worst_mean, ROUNDING),
        within("2b", "...and batch std 1 (eps=1e-12): the init scale is invisible forward",
               1.0, 1.0 + worst_std, eps / (2 * min_var) + ROUNDING),
        within("2b", "but not in training: |dL/dW| scales as 1/c (c |grad_c| / |grad_1|, c=100)",
               1.0, 100 * grads[100.0] / grads[1.0], 1e-9),
    ]


def _trained_mlp(ctx: Context) -> nn.Sequential:
    model = float64_mlp(ctx, stream=21)
    opt = DecoupledMomentumSGD(model.parameters(), lr=0.05, momentum=0.9)
    for t in range(100):
        set_grads(model, *minibatch(ctx, t))
        opt.step()
    return model


def claim_2c(ctx: Context) -> list[Row]:
    model = _trained_mlp(ctx)
    x, _ = minibatch(ctx, 0, size=256)
    with torch.no_grad():
        before = model(x)
        new = insert_batchnorm(model, 1, x).eval()
        eval_change = (new(x) - before).abs().max().item()
        train_change = (new.train()(x) - before).abs().max().item()
    return [
        within("2c", "insert BN (scale = sqrt(var_B + eps), shift = mu_B): train-mode outputs "
               "unchanged", 0.0, train_change, 1e-10),
        within("2c", "...and eval mode (running stats = batch stats)", 0.0, eval_change, 1e-10),
    ]


DROP_N, KEEP = 1_000_000, 0.8


def claim_3(ctx: Context) -> list[Row]:
    ones = torch.ones(DROP_N)
    out = KeepDropout(KEEP, generator=ctx.generator(30))(ones)
    kept = out[out != 0]
    with torch.random.fork_rng():  # torch's Dropout draws from the global generator
        torch.manual_seed(ctx.seed)
        zero_frac = (nn.Dropout(1 - KEEP)(ones) == 0).double().mean().item()
    se = math.sqrt((1 - KEEP) / KEEP / DROP_N)
    return [
        within("3", f"E[Z] = a p = 1 with a = 1/p (keep p = {KEEP}): mean of KeepDropout(1)",
               1.0, out.mean().item(), 5 * se),
        at_most("3", "kept values are exactly a = 1/p", "0", (kept - 1 / KEEP).abs().max().item(),
                0.0),
        within("3", f"torch Dropout(q = 1 - p = {1 - KEEP:g}) zeroes a fraction 1 - p",
               1 - KEEP, zero_frac, 5 * math.sqrt(KEEP * (1 - KEEP) / DROP_N)),
    ]


CLAIMS = [claim_2a, claim_2b, claim_2c, claim_3]
