"""Checks of MATH 1: moments of a pre-activation, symmetry, ReLU, He initialisation in depth.

Monte Carlo over ``N`` independent (weights, input) draws: a mean is compared with its
prediction within 5 standard errors (estimated from the same sample), a variance within 5
standard errors of the sample variance, ``sqrt((m4 - var^2) / N)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dist_quant.core.model import INIT_VARIANCE, build_mlp
from dist_quant.verify.fixtures import dataset
from dist_quant.verify.report import Context, Row, within

N = 100_000  # draws of (w, x)
FAN_IN = 64
V = 0.03  # Var[w_i]
X_MEAN = 0.7  # x_i ~ Exponential with this mean: E[x] = 0.7, E[x^2] = 2 * 0.7^2
CHI = 2 * X_MEAN**2
Z = 5.0


def _draws(ctx: Context, law: str) -> torch.Tensor:
    """``N`` pre-activations ``a = w^T x``, ``w`` i.i.d. zero mean variance V, x >= 0."""
    def make() -> torch.Tensor:
        g = ctx.generator(10 if law == "uniform" else 11)
        x = torch.empty(N, FAN_IN, dtype=torch.float64).exponential_(1 / X_MEAN, generator=g)
        if law == "uniform":  # symmetric, variance (2h)^2/12 = V
            half = math.sqrt(3 * V)
            w = (torch.rand(N, FAN_IN, generator=g, dtype=torch.float64) * 2 - 1) * half
        else:  # centred exponential: zero mean, variance V, skewed (E[w^3] = 2 V^1.5)
            w = torch.empty(N, FAN_IN, dtype=torch.float64).exponential_(
                1 / math.sqrt(V), generator=g) - math.sqrt(V)
        return (w * x).sum(dim=1)
    return ctx.cached("a_" + law, make)


def _se_var(a: torch.Tensor) -> float:
    c = a - a.mean()
    var = c.pow(2).mean()
    return math.sqrt((c.pow(4).mean() - var**2).item() / a.numel())


def claim_1a(ctx: Context) -> list[Row]:
    a = _draws(ctx, "uniform")
    var = FAN_IN * V * CHI
    return [
        within("1a", "E[a] = 0 (E[w] = 0, inputs x >= 0 with mean 0.7)", 0.0, a.mean().item(),
               Z * math.sqrt(var / N)),
        within("1a", "V[a] = n v chi (n=64, v=0.03, chi=0.98)", var, a.var().item(),
               Z * _se_var(a)),
    ]


def _skewness(a: torch.Tensor) -> tuple[float, float]:
    z3 = ((a - a.mean()) / a.std()).pow(3)
    return z3.mean().item(), z3.std().item() / math.sqrt(a.numel())


def claim_1b(ctx: Context) -> list[Row]:
    sym, sym_se = _skewness(_draws(ctx, "uniform"))
    a = _draws(ctx, "uniform")
    frac_pos = (a > 0).double().mean().item()
    skew, skew_se = _skewness(_draws(ctx, "skewed"))
    # third cumulant of a sum of n i.i.d. w_i x_i with E[w] = 0: n E[w^3] E[x^3]
    predicted = FAN_IN * 2 * V**1.5 * 6 * X_MEAN**3 / (FAN_IN * V * CHI) ** 1.5
    return [
        within("1b", "symmetric w law => a symmetric: skewness of a", 0.0, sym, Z * sym_se),
        within("1b", "symmetric w law => P(a > 0) = 1/2", 0.5, frac_pos,
               Z * math.sqrt(0.25 / N)),
        within("1b", "contrast, skewed zero-mean w: skewness n E[w^3] E[x^3] / V[a]^1.5",
               predicted, skew, Z * skew_se),
    ]


def claim_1c(ctx: Context) -> list[Row]:
    y2 = torch.relu(_draws(ctx, "uniform")).pow(2)
    return [within("1c", "E[relu(a)^2] = V[a] / 2 (a symmetric, not Gaussian)",
                   FAN_IN * V * CHI / 2, y2.mean().item(), Z * y2.std().item() / math.sqrt(N))]


DEPTH, WIDTH, NETWORKS, BATCH = 32, 256, 4, 512


def _second_moments(model: nn.Sequential, x: torch.Tensor) -> list[float]:
    """E[a_k^2] of every hidden Linear's output."""
    out = []
    with torch.no_grad():
        for module in model[:-1]:
            x = module(x)
            if isinstance(module, nn.Linear):
                out.append(x.pow(2).mean().item())
    return out


def claim_1d(ctx: Context) -> list[Row]:
    """alpha_k = (1/2) n v alpha_{k-1}: log2 alpha changes by log2(c / 2) per layer.

    Each of ``NETWORKS`` random networks (width 256, 32 ReLU layers, BN off) is fed 512 MNIST-1D
    inputs. The per-layer increments of log2 alpha fluctuate with sd ``s`` (finite width),
    estimated from the increments themselves; the end-to-end change averaged over the networks
    then has standard error ``s sqrt(DEPTH - 1) / sqrt(NETWORKS)``. The three inits share their
    random draws (network k of each is the same normal draw, scaled), so they differ only by c.
    """
    x = dataset(ctx).x_train[:BATCH]
    logs = {}
    for init in INIT_VARIANCE:
        runs = []
        for k in range(NETWORKS):
            model = build_mlp(x.shape[1], (WIDTH,) * DEPTH, 1, batchnorm=False, init=init,
                              generator=ctx.generator(100 + k))
            runs.append(torch.tensor(_second_moments(model, x), dtype=torch.float64).log2())
        logs[init] = torch.stack(runs)  # [NETWORKS, DEPTH]
    residual = torch.cat([
        (logs[i].diff(dim=1) - math.log2(INIT_VARIANCE[i] / 2)).reshape(-1) for i in logs])
    s = residual.std().item()
    tol = Z * s * math.sqrt(DEPTH - 1) / math.sqrt(NETWORKS)
    names = {"he": "He 2/n", "lecun": "1/n", "double": "4/n"}
    rows = []
    for init, c in INIT_VARIANCE.items():
        measured = (logs[init][:, -1] - logs[init][:, 0]).mean().item()
        rows.append(within("1d", f"{names[init]} init: log2(alpha_{DEPTH} / alpha_1)",
                           (DEPTH - 1) * math.log2(c / 2), measured, tol))
    mean_alpha = {i: (2 ** logs[i].mean(dim=0)).tolist() for i in logs}
    ctx.data["1d_second_moment_per_layer"] = mean_alpha
    chi0 = x.pow(2).mean().item()
    lines = [f"1d: second moment E[a_k^2] of layer k's pre-activations; {DEPTH} ReLU layers of "
             f"width {WIDTH}, BN off, {BATCH} MNIST-1D inputs (E[x^2] = {chi0:.3g}), geometric "
             f"mean of {NETWORKS} networks. Predicted: alpha_k = c (c/2)^(k-1) E[x^2] for "
             "Var[w] = c / fan_in (He: c = 2, constant).",
             f"{'layer':>5} {'He 2/n':>12} {'1/n':>12} {'4/n':>12}"]
    for k in range(DEPTH):
        lines.append(f"{k + 1:>5} " + " ".join(f"{mean_alpha[i][k]:>12.4g}" for i in logs))
    ctx.details["1d"] = "\n".join(lines)
    return rows


CLAIMS = [claim_1a, claim_1b, claim_1c, claim_1d]
