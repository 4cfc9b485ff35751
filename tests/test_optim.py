"""DecoupledMomentumSGD, decay groups and the coupled equivalent in torch SGD (MATH 5)."""

import copy

import pytest
import torch
from torch import nn

from dist_quant.core.model import build_mlp
from dist_quant.core.optim import (
    DecoupledMomentumSGD,
    coupled_equivalent,
    coupled_sgd,
    decay_param_groups,
)
from dist_quant.errors import ConfigError

torch.set_num_threads(1)
LR, MU, LAM = 0.05, 0.9, 0.02


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def problem(seed: int = 0):
    """Generated classification data (a random teacher) and a float64 MLP without BN."""
    g = gen(seed)
    x = torch.randn(640, 20, generator=g, dtype=torch.float64)
    teacher = torch.randn(20, 5, generator=g, dtype=torch.float64)
    y = (x @ teacher + 0.3 * torch.randn(640, 5, generator=g, dtype=torch.float64)).argmax(1)
    model = build_mlp(20, (32, 32), 5, batchnorm=False, generator=gen(seed + 1)).double()
    return model, x, y


def batch(x, y, step, size=32):
    i = (step * size) % x.shape[0]
    return x[i:i + size], y[i:i + size]


def set_grads(model, x, y):
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_matches_hand_written_recurrence():
    g = gen(1)
    theta = torch.randn(7, generator=g, dtype=torch.float64)
    p = nn.Parameter(theta.clone())
    opt = DecoupledMomentumSGD([p], lr=LR, momentum=MU, weight_decay=LAM)
    m = torch.zeros_like(theta)
    for _ in range(50):
        grad = torch.randn(7, generator=g, dtype=torch.float64)
        p.grad = grad.clone()
        opt.step()
        m = MU * m + grad
        theta = theta - LR * (m + LAM * theta)
        assert torch.allclose(p.detach(), theta, rtol=0, atol=1e-13)


def test_zero_momentum_and_zero_decay_is_plain_sgd():
    model, x, y = problem()
    ref = copy.deepcopy(model)
    opt = DecoupledMomentumSGD(model.parameters(), lr=LR)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
    for t in range(20):
        for m in (model, ref):
            set_grads(m, *batch(x, y, t))
        opt.step()
        ref_opt.step()
    assert torch.allclose(flat(model), flat(ref), rtol=0, atol=1e-12)


def test_decay_param_groups_exclude_biases_and_batchnorm():
    model = build_mlp(6, (5, 4), 3, batchnorm=True, generator=gen(0))
    groups = {g["name"]: g for g in decay_param_groups(model, 0.1)}
    decayed = {id(p) for p in groups["decay"]["params"]}
    assert decayed == {id(model[0].weight), id(model[3].weight), id(model[6].weight)}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert len(groups["no_decay"]["params"]) == 2 + 2 + 1  # two BN (scale, shift), final bias
    (only,) = decay_param_groups(model, 0.1, decay_all=True)
    assert len(only["params"]) == len(list(model.parameters()))


def test_per_group_weight_decay_is_applied():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = DecoupledMomentumSGD([{"params": [a], "weight_decay": 0.5}, {"params": [b]}],
                               lr=0.1, momentum=0.5, weight_decay=0.0)
    a.grad, b.grad = torch.zeros(3), torch.zeros(3)
    opt.step()
    assert torch.allclose(a, torch.full((3,), 0.95)) and torch.equal(b, torch.ones(3))


def test_state_dict_round_trip():
    model, x, y = problem()
    opt = DecoupledMomentumSGD(decay_param_groups(model, LAM), lr=LR, momentum=MU)
    for t in range(10):
        set_grads(model, *batch(x, y, t))
        opt.step()
    clone = copy.deepcopy(model)
    clone_opt = DecoupledMomentumSGD(decay_param_groups(clone, LAM), lr=LR, momentum=MU)
    clone_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for t in range(10, 20):
        for m, o in ((model, opt), (clone, clone_opt)):
            set_grads(m, *batch(x, y, t))
            o.step()
    assert torch.equal(flat(model), flat(clone))


@pytest.mark.parametrize("kwargs,option", [
    ({"lr": 0.0}, "--lr"), ({"lr": -1.0}, "--lr"),
    ({"momentum": 1.0}, "--momentum"), ({"momentum": -0.1}, "--momentum"),
    ({"weight_decay": -1e-4}, "--weight-decay"),
])
def test_nonsense_settings_raise(kwargs, option):
    settings = {"lr": LR, "momentum": MU, "weight_decay": LAM, **kwargs}
    with pytest.raises(ConfigError, match=option):
        DecoupledMomentumSGD([nn.Parameter(torch.ones(1))], **settings)
    with pytest.raises(ValueError, match=option):
        coupled_equivalent(**settings)


def test_coupled_equivalent_needs_lr_times_decay_below_one():
    with pytest.raises(ValueError, match="lr \\* weight_decay"):
        coupled_equivalent(lr=0.5, momentum=0.9, weight_decay=2.0)
    s = coupled_equivalent(LR, MU, LAM)
    assert s.lr == LR
    assert s.momentum == pytest.approx(MU * (1 - LR * LAM))
    assert s.weight_decay == pytest.approx(LAM * (1 - MU))
    theta = torch.tensor([2.0], dtype=torch.float64)
    assert s.initial_buffer(theta).item() == pytest.approx(LAM * 2.0 / (1 - LR * LAM))


def test_coupled_equivalent_reproduces_decoupled_over_200_steps():
    """MATH 5c: a real MLP trained on generated batches, both sides compute their own gradient."""
    model, x, y = problem()
    twin = copy.deepcopy(model)
    opt = DecoupledMomentumSGD(decay_param_groups(model, LAM), lr=LR, momentum=MU)
    ref = coupled_sgd(decay_param_groups(twin, LAM), lr=LR, momentum=MU)
    start = flat(model)
    for t in range(200):
        for m, o in ((model, opt), (twin, ref)):
            set_grads(m, *batch(x, y, t))
            o.step()
    assert (flat(model) - start).abs().max() > 0.1  # it did train
    assert (flat(model) - flat(twin)).abs().max() < 1e-10


def test_zero_buffer_gives_the_predicted_transient():
    """From a zero coupled buffer the gap e_t obeys the homogeneous recurrence: roots mu and
    1 - eta lambda, e_0 = 0, e_1 = -eta lambda mu theta_0 (identical gradients applied)."""
    model, x, y = problem()
    twin = copy.deepcopy(model)
    groups = decay_param_groups(model, LAM)
    opt = DecoupledMomentumSGD(groups, lr=LR, momentum=MU)
    ref = coupled_sgd(decay_param_groups(twin, LAM), lr=LR, momentum=MU, seed_buffers=False)
    theta0 = [p.detach().clone() for p in model.parameters()]
    lam = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    lams = [lam[id(p)] for p in model.parameters()]
    r1, r2 = 1 - LR * LAM, MU
    for t in range(1, 201):
        set_grads(model, *batch(x, y, t))
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        factor = (r1**t - r2**t) / (r1 - r2)
        for p, q, th, lm in zip(model.parameters(), twin.parameters(), theta0, lams,
                                strict=True):
            predicted = -LR * lm * MU * th * factor
            assert torch.allclose(p - q, predicted, rtol=0, atol=1e-12)
        if t == 1:
            first_gap = (flat(model) - flat(twin)).abs().max().item()
    last_gap = (flat(model) - flat(twin)).abs().max().item()
    assert first_gap > 1e-5 and last_gap > 1e-5  # a real, slowly decaying gap


def scheduled_lr(t: int) -> float:
    return LR * (1.0 if t < 100 else 0.2)


def test_lr_schedule_breaks_fixed_equivalence_and_varying_momentum_restores_it():
    """MATH 5d: fixed coupled settings fail under a schedule; mu'_t = mu (1 - eta_{t-1} lambda)
    (a momentum that follows the schedule) reproduces the decoupled rule again."""
    model, x, y = problem()
    fixed, varying = copy.deepcopy(model), copy.deepcopy(model)
    opt = DecoupledMomentumSGD(model.parameters(), lr=LR, momentum=MU, weight_decay=LAM)
    fixed_opt = coupled_sgd(fixed.parameters(), lr=LR, momentum=MU, weight_decay=LAM)
    varying_opt = coupled_sgd(varying.parameters(), lr=LR, momentum=MU, weight_decay=LAM)
    for t in range(200):
        lr, prev_lr = scheduled_lr(t), scheduled_lr(max(t - 1, 0))
        for o in (opt, fixed_opt, varying_opt):
            o.param_groups[0]["lr"] = lr
        varying_opt.param_groups[0]["momentum"] = MU * (1 - prev_lr * LAM)
        for m, o in ((model, opt), (fixed, fixed_opt), (varying, varying_opt)):
            set_grads(m, *batch(x, y, t))
            o.step()
    assert (flat(model) - flat(varying)).abs().max() < 1e-10
    assert (flat(model) - flat(fixed)).abs().max() > 1e-6
