"""MATH 5 as properties over random hyperparameters and gradient sequences (float64)."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dist_quant.core.optim import DecoupledMomentumSGD, coupled_equivalent, coupled_sgd

torch.set_num_threads(1)
STEPS = 60

hyper = st.tuples(
    st.floats(1e-3, 0.5),  # lr
    st.floats(0.0, 0.99),  # momentum
    st.floats(0.0, 0.5),  # weight decay
    st.integers(0, 2**31 - 1),  # seed of the gradient sequence
).filter(lambda h: h[0] * h[2] < 0.9)


def run(make_opt, theta0, grads, lr_at=None, momentum_at=None):
    p = nn.Parameter(theta0.clone())
    opt = make_opt([p])
    path = []
    for t, g in enumerate(grads):
        if lr_at is not None:
            opt.param_groups[0]["lr"] = lr_at(t)
        if momentum_at is not None:
            opt.param_groups[0]["momentum"] = momentum_at(t)
        p.grad = g.clone()
        opt.step()
        path.append(p.detach().clone())
    return torch.stack(path)


def sequence(seed, n=5):
    gen = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(n, generator=gen, dtype=torch.float64)
    grads = torch.randn(STEPS, n, generator=gen, dtype=torch.float64)
    return theta0, grads


def scale(theta0, grads, lr):
    return 1.0 + theta0.abs().max().item() + lr * STEPS * grads.abs().max().item()


def decoupled_minus_coupled(h, seed_buffers):
    """The decoupled path minus the coupled one under the same (lr, mu, lambda) and sequence."""
    lr, mu, lam, seed = h
    theta0, grads = sequence(seed)
    dec = run(lambda ps: DecoupledMomentumSGD(ps, lr, mu, lam), theta0, grads)
    cpl = run(lambda ps: coupled_sgd(ps, lr, mu, lam, seed_buffers=seed_buffers), theta0, grads)
    return dec - cpl, theta0, grads


@settings(max_examples=40, deadline=None)
@given(hyper)
def test_coupled_equivalent_with_seeded_buffer(h):
    diff, theta0, grads = decoupled_minus_coupled(h, seed_buffers=True)
    assert diff.abs().max() <= 1e-12 * scale(theta0, grads, h[0]) * STEPS


@settings(max_examples=40, deadline=None)
@given(hyper)
def test_zero_buffer_transient_has_roots_mu_and_one_minus_lr_lambda(h):
    lr, mu, lam, _ = h
    diff, theta0, grads = decoupled_minus_coupled(h, seed_buffers=False)
    r1, r2 = 1 - lr * lam, mu
    # f_t = (r1^t - r2^t) / (r1 - r2) = sum_j r1^j r2^(t-1-j), summed stably (also r1 = r2)
    factor, f = [], 0.0
    for t in range(1, STEPS + 1):
        f = r1 * f + r2 ** (t - 1)
        factor.append(f)
    predicted = -lr * lam * mu * theta0 * torch.tensor(factor, dtype=torch.float64).unsqueeze(1)
    assert (diff - predicted).abs().max() <= 1e-11 * scale(theta0, grads, lr) * STEPS


@settings(max_examples=30, deadline=None)
@given(hyper, st.lists(st.floats(1e-3, 0.5), min_size=2, max_size=6))
def test_schedule_needs_momentum_that_follows_it(h, lrs):
    _, mu, lam, seed = h
    lam = min(lam, 0.9 / max(lrs))
    theta0, grads = sequence(seed)

    def lr_at(t):
        return lrs[t * len(lrs) // STEPS]

    def mu_at(t):
        return mu * (1 - lr_at(max(t - 1, 0)) * lam)

    dec = run(lambda ps: DecoupledMomentumSGD(ps, lrs[0], mu, lam), theta0, grads, lr_at)
    following = run(lambda ps: coupled_sgd(ps, lrs[0], mu, lam), theta0, grads, lr_at, mu_at)
    assert (dec - following).abs().max() <= 1e-11 * scale(theta0, grads, max(lrs)) * STEPS


def test_schedule_breaks_fixed_coupled_settings():
    lrs = [0.2, 0.05, 0.3]
    theta0, grads = sequence(3)
    lr_at = lambda t: lrs[t * len(lrs) // STEPS]  # noqa: E731
    dec = run(lambda ps: DecoupledMomentumSGD(ps, lrs[0], 0.9, 0.1), theta0, grads, lr_at)
    fixed = run(lambda ps: coupled_sgd(ps, lrs[0], 0.9, 0.1), theta0, grads, lr_at)
    assert (dec - fixed).abs().max() > 1e-4


@settings(max_examples=30, deadline=None)
@given(hyper)
def test_ewma_buffer_is_decoupled_rule_with_rescaled_settings(h):
    lr, mu, lam, seed = h
    theta0, grads = sequence(seed)
    theta, m, path = theta0.clone(), torch.zeros_like(theta0), []
    for g in grads:
        m = mu * m + (1 - mu) * g
        theta = theta - lr * (m + lam * theta)
        path.append(theta)
    dec = run(lambda ps: DecoupledMomentumSGD(ps, lr * (1 - mu), mu, lam / (1 - mu)), theta0,
              grads)
    assert (dec - torch.stack(path)).abs().max() <= 1e-11 * scale(theta0, grads, lr) * STEPS


def test_coupled_settings_recurrence_coefficients_match():
    """The theta recurrences of MATH 5c have equal coefficients under the mapping."""
    for lr, mu, lam in [(0.1, 0.9, 0.01), (0.5, 0.5, 1.0), (0.01, 0.0, 3.0)]:
        s = coupled_equivalent(lr, mu, lam)
        assert math.isclose(1 + mu - lr * lam, 1 + s.momentum - s.lr * s.weight_decay)
        assert math.isclose(mu * (1 - lr * lam), s.momentum)
