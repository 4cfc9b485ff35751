"""Checks of MATH 5: decoupled momentum SGD against hand-written recurrences and torch's SGD.

Everything runs in float64 on a real model (the project's MLP without BN, MNIST-1D minibatches),
200 steps. Identities hold to rounding: 1e-12 for one rule against its own recurrence, 1e-10
for two rules whose arithmetic differs (the figure the project promises).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dist_quant.core.optim import DecoupledMomentumSGD, coupled_equivalent, coupled_sgd
from dist_quant.verify.fixtures import float64_mlp, minibatch, set_grads
from dist_quant.verify.report import Context, Row, at_least, within

STEPS, LR, MU, LAM = 200, 0.05, 0.9, 0.01
SAME_RULE, OTHER_RULE = 1e-12, 1e-10


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def copy_grads(src: nn.Module, dst: nn.Module) -> None:
    for p, q in zip(src.parameters(), dst.parameters(), strict=True):
        q.grad = p.grad.clone()


def claim_5a(ctx: Context) -> list[Row]:
    model = float64_mlp(ctx, stream=70)
    ewma_model = copy.deepcopy(model)
    opt = DecoupledMomentumSGD(model.parameters(), lr=LR, momentum=MU, weight_decay=LAM)
    # exponentially weighted buffer = (5a) with eta (1 - mu) and lambda / (1 - mu)
    ewma_opt = DecoupledMomentumSGD(ewma_model.parameters(), lr=LR * (1 - MU), momentum=MU,
                                    weight_decay=LAM / (1 - MU))
    theta, m = flat(model), torch.zeros_like(flat(model))
    ewma_theta, ewma_m = theta.clone(), torch.zeros_like(theta)
    worst = worst_ewma = 0.0
    for t in range(STEPS):
        set_grads(model, *minibatch(ctx, t))
        g = flat_grad(model)
        copy_grads(model, ewma_model)
        opt.step()
        ewma_opt.step()
        m = MU * m + g
        theta = theta - LR * (m + LAM * theta)
        ewma_m = MU * ewma_m + (1 - MU) * g
        ewma_theta = ewma_theta - LR * (ewma_m + LAM * ewma_theta)
        worst = max(worst, (flat(model) - theta).abs().max().item())
        worst_ewma = max(worst_ewma, (flat(ewma_model) - ewma_theta).abs().max().item())
    return [
        within("5a", "DecoupledMomentumSGD = m <- mu m + g; theta -= eta (m + lambda theta) "
               f"(max |diff|, {STEPS} steps)", 0.0, worst, SAME_RULE),
        within("5a", "EWMA buffer m <- mu m + (1 - mu) g = (5a) with eta (1 - mu), "
               "lambda / (1 - mu)", 0.0, worst_ewma, OTHER_RULE),
    ]


def claim_5b(ctx: Context) -> list[Row]:
    s = coupled_equivalent(LR, MU, LAM)
    model = float64_mlp(ctx, stream=71)
    sgd = torch.optim.SGD(model.parameters(), **s.sgd_options())
    theta, v = flat(model), torch.zeros_like(flat(model))
    worst = 0.0
    for t in range(STEPS):
        set_grads(model, *minibatch(ctx, t))
        g = flat_grad(model)
        sgd.step()
        v = s.momentum * v + g + s.weight_decay * theta
        theta = theta - s.lr * v
        worst = max(worst, (flat(model) - theta).abs().max().item())
    return [within("5b", "torch SGD(mu', lambda') = v <- mu' v + g + lambda' theta; "
                   "theta -= eta' v", 0.0, worst, SAME_RULE)]


def claim_5c(ctx: Context) -> list[Row]:
    model = float64_mlp(ctx, stream=72)
    twin, zero = copy.deepcopy(model), copy.deepcopy(model)
    theta0 = flat(model)
    opt = DecoupledMomentumSGD(model.parameters(), lr=LR, momentum=MU, weight_decay=LAM)
    seeded = coupled_sgd(twin.parameters(), lr=LR, momentum=MU, weight_decay=LAM)
    unseeded = coupled_sgd(zero.parameters(), lr=LR, momentum=MU, weight_decay=LAM,
                           seed_buffers=False)
    r1, r2 = 1 - LR * LAM, MU
    e1 = -LR * LAM * MU * theta0
    worst_seeded = worst_transient = 0.0
    gaps = {}
    for t in range(1, STEPS + 1):
        set_grads(model, *minibatch(ctx, t))
        set_grads(twin, *minibatch(ctx, t))  # its own gradient, at its own parameters
        copy_grads(model, zero)  # identical gradients: the gap is the buffer's alone
        for o in (opt, seeded, unseeded):
            o.step()
        worst_seeded = max(worst_seeded, (flat(model) - flat(twin)).abs().max().item())
        gap = flat(model) - flat(zero)
        predicted = e1 * (r1**t - r2**t) / (r1 - r2)
        worst_transient = max(worst_transient, (gap - predicted).abs().max().item())
        gaps[t] = gap.abs().max().item()
    ctx.data["5c_zero_buffer_gap"] = {str(t): gaps[t] for t in (1, 10, 50, 100, 200)}
    return [
        within("5c", f"coupled_equivalent + v_init = lambda theta0 / (1 - eta lambda): torch SGD "
               f"= decoupled, {STEPS} steps of a real MLP", 0.0, worst_seeded, OTHER_RULE),
        within("5c", "zero buffer: gap = e1 ((1 - eta lambda)^t - mu^t) / (1 - eta lambda - mu), "
               "e1 = -eta lambda mu theta0", 0.0, worst_transient, SAME_RULE),
        at_least("5c", f"...a real gap: max |gap| at t={STEPS}", "> 0", gaps[STEPS], 1e-6),
    ]


def scheduled(t: int) -> float:
    """A step schedule: eta, then eta / 5 from step 100."""
    return LR if t < STEPS // 2 else LR / 5


def claim_5d(ctx: Context) -> list[Row]:
    model = float64_mlp(ctx, stream=73)
    fixed, following = copy.deepcopy(model), copy.deepcopy(model)
    opt = DecoupledMomentumSGD(model.parameters(), lr=LR, momentum=MU, weight_decay=LAM)
    fixed_opt = coupled_sgd(fixed.parameters(), lr=LR, momentum=MU, weight_decay=LAM)
    following_opt = coupled_sgd(following.parameters(), lr=LR, momentum=MU, weight_decay=LAM)
    for t in range(STEPS):
        for o in (opt, fixed_opt, following_opt):
            o.param_groups[0]["lr"] = scheduled(t)
        following_opt.param_groups[0]["momentum"] = MU * (1 - scheduled(max(t - 1, 0)) * LAM)
        set_grads(model, *minibatch(ctx, t))
        copy_grads(model, fixed)
        copy_grads(model, following)
        for o in (opt, fixed_opt, following_opt):
            o.step()
    return [
        at_least("5d", "LR schedule (eta / 5 from step 100): no fixed coupled setting "
                 "reproduces it (max |diff|, same gradients)", "!= 0",
                 (flat(model) - flat(fixed)).abs().max().item(), 1e3 * OTHER_RULE),
        within("5d", "...it needs mu'_t = mu (1 - eta_{t-1} lambda), changing with eta", 0.0,
               (flat(model) - flat(following)).abs().max().item(), OTHER_RULE),
    ]


CLAIMS = [claim_5a, claim_5b, claim_5c, claim_5d]
