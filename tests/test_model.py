"""The MLP builder, KeepDropout and insert_batchnorm (MATH 1, 2, 3)."""

import math

import pytest
import torch
from torch import nn

from dist_quant.core.model import KeepDropout, build_mlp, insert_batchnorm, linear_positions
from dist_quant.errors import ConfigError

torch.set_num_threads(1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hidden_second_moments(model: nn.Sequential, x: torch.Tensor) -> list[float]:
    """E[a_k^2] of the output of every hidden Linear (pre-activations)."""
    moments = []
    with torch.no_grad():
        for module in model:
            x = module(x)
            if isinstance(module, nn.Linear):
                moments.append(x.pow(2).mean().item())
    return moments[:-1]


def test_architecture_with_and_without_batchnorm():
    model = build_mlp(10, (8, 6), 3, keep_prob=0.8, batchnorm=True, generator=gen(0))
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "KeepDropout",
                     "Linear", "BatchNorm1d", "ReLU", "KeepDropout", "Linear"]
    assert model[0].bias is None and model[4].bias is None and model[8].bias is not None
    plain = build_mlp(10, (8,), 3, keep_prob=1.0, batchnorm=False, generator=gen(0))
    assert [type(m).__name__ for m in plain] == ["Linear", "ReLU", "Linear"]
    assert plain[0].bias is not None and torch.all(plain[0].bias == 0)


def test_initialisation_is_deterministic_per_seed():
    a = build_mlp(12, (16, 16), 4, generator=gen(7))
    b = build_mlp(12, (16, 16), 4, generator=gen(7))
    c = build_mlp(12, (16, 16), 4, generator=gen(8))
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb)
        if pa.ndim == 2:
            assert not torch.equal(pa, pc)


@pytest.mark.parametrize("init,factor", [("he", 2.0), ("lecun", 1.0), ("double", 4.0)])
def test_weight_variance_is_factor_over_fan_in(init, factor):
    n_in, n_out = 400, 500
    model = build_mlp(n_in, (n_out,), 2, batchnorm=True, init=init, gain=1.5, generator=gen(1))
    w = model[0].weight
    expected = 1.5**2 * factor / n_in
    # sample variance of N = n_in * n_out normals: relative std sqrt(2 / N)
    rel_se = math.sqrt(2.0 / w.numel())
    assert abs(w.var().item() / expected - 1.0) < 5 * rel_se


@pytest.mark.parametrize("init,c", [("he", 2.0), ("lecun", 1.0), ("double", 4.0)])
def test_second_moment_through_depth(init, c):
    """MATH 1d: alpha_k = c (c/2)^(k-1) for N(0,1) inputs; He keeps it constant."""
    width, depth = 256, 30
    model = build_mlp(width, (width,) * depth, 1, batchnorm=False, init=init, generator=gen(2))
    x = torch.randn(512, width, generator=gen(3))
    measured = hidden_second_moments(model, x)
    for k, alpha in enumerate(measured):
        predicted = c * (c / 2.0) ** k
        # one finite-width network: the per-layer gain fluctuates by ~sqrt(2 / (width)) in log;
        # after k layers by ~sqrt(k) times that; allow 5 of those
        tol = 5 * math.sqrt(2.0 * (k + 1) / width)
        assert abs(math.log(alpha / predicted)) < tol, (k, alpha, predicted)
    if init == "he":
        assert 0.5 < measured[-1] / measured[0] < 2.0
    else:
        assert abs(math.log2(measured[-1] / measured[0]) - (depth - 1) * math.log2(c / 2)) < 3


def test_keep_dropout_mean_and_values():
    p, n = 0.7, 200_000
    drop = KeepDropout(p, generator=gen(4))
    x = torch.ones(n)
    out = drop(x)
    values = torch.unique(out)
    assert len(values) == 2 and values[0] == 0 and values[1] == pytest.approx(1 / p)
    # Z in {0, 1/p}: E[Z] = 1, V[Z] = (1 - p) / p
    se = math.sqrt((1 - p) / p / n)
    assert abs(out.mean().item() - 1.0) < 5 * se
    kept = (out != 0).float().mean().item()
    assert abs(kept - p) < 5 * math.sqrt(p * (1 - p) / n)
    drop.eval()
    assert torch.equal(drop(x), x)


def test_keep_dropout_global_path_and_reproducible_generator():
    p = 0.25
    torch.manual_seed(0)
    out = KeepDropout(p)(torch.ones(100_000))
    assert abs(out.mean().item() - 1.0) < 5 * math.sqrt((1 - p) / p / 100_000)
    a = KeepDropout(p, generator=gen(5))(torch.ones(1000))
    b = KeepDropout(p, generator=gen(5))(torch.ones(1000))
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_bad_options_raise(bad):
    with pytest.raises(ConfigError, match="--keep-prob"):
        KeepDropout(bad)
    with pytest.raises(ConfigError, match="--keep-prob"):
        build_mlp(4, (4,), 2, keep_prob=bad)
    with pytest.raises(ConfigError, match="--init"):
        build_mlp(4, (4,), 2, init="xavier")
    with pytest.raises(ConfigError, match="--hidden"):
        build_mlp(4, (0,), 2)


def trained_plain_mlp() -> tuple[nn.Sequential, torch.Tensor]:
    g = gen(6)
    x = torch.randn(256, 12, generator=g, dtype=torch.float64)
    y = (x[:, :3].sum(dim=1) > 0).long() + (x[:, 3] > 1).long()
    model = build_mlp(12, (16, 16), 3, batchnorm=False, generator=gen(7)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x


@pytest.mark.parametrize("linear_index", [0, 1, 2])
def test_insert_batchnorm_keeps_outputs(linear_index):
    """MATH 2c: scale = sqrt(var_B + eps) (torch weight), shift = mu_B (torch bias)."""
    model, x = trained_plain_mlp()
    model.train()
    with torch.no_grad():
        before = model(x)
    new = insert_batchnorm(model, linear_index, x)
    pos = linear_positions(model)[linear_index]
    bn = new[pos + 1]
    assert isinstance(bn, nn.BatchNorm1d) and len(new) == len(model) + 1
    with torch.no_grad():
        a = model[: pos + 1](x)
        assert torch.allclose(bn.weight, torch.sqrt(a.var(0, unbiased=False) + bn.eps))
        assert torch.allclose(bn.bias, a.mean(0))
        new.eval()
        eval_out = new(x)
        new.train()
        train_out = new(x)
    assert torch.allclose(eval_out, before, rtol=0, atol=1e-10)
    assert torch.allclose(train_out, before, rtol=0, atol=1e-10)
    # the original is untouched
    assert len(model) == len(new) - 1 and not any(isinstance(m, nn.BatchNorm1d) for m in model)


def test_insert_batchnorm_actually_normalises():
    """Not a no-op by construction: another batch gets other statistics in train mode."""
    model, x = trained_plain_mlp()
    new = insert_batchnorm(model, 0, x[:128]).train()
    with torch.no_grad():
        assert not torch.allclose(new(x[128:]), model(x[128:]), atol=1e-6)
    with pytest.raises(ValueError, match="linear_index"):
        insert_batchnorm(model, 3, x)


def bn_output(w, b, x, eps):
    bn = nn.BatchNorm1d(w.shape[0], eps=eps, dtype=torch.float64).train()
    return bn(x @ w.T + b)


def test_batchnorm_ignores_bias_and_positive_weight_scale():
    """MATH 2a: exact for the bias; for the weight scale within the eps-derived bound (torch
    refuses eps = 0 in training mode)."""
    g = gen(8)
    x = torch.randn(64, 10, generator=g, dtype=torch.float64)
    w = torch.randn(6, 10, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    zero = torch.zeros(6, dtype=torch.float64)
    c = 7.5
    with torch.no_grad():
        ref = bn_output(w, zero, x, eps=1e-5)
        assert torch.allclose(bn_output(w, b, x, eps=1e-5), ref, atol=1e-12, rtol=0)
        a = x @ w.T
        centred, var = a - a.mean(0), a.var(0, unbiased=False)
        for eps in (1e-14, 1e-3):
            # z_c - z = (a - mu) (1/sqrt(var + eps/c^2) - 1/sqrt(var + eps))
            bound = centred.abs() * ((var + eps / c**2).rsqrt() - (var + eps).rsqrt()).abs()
            diff = (bn_output(c * w, b, x, eps) - bn_output(w, zero, x, eps)).abs()
            assert torch.all(diff <= bound + 1e-12)
        assert diff.max() > 0.1 * bound.max()  # at eps = 1e-3 the effect is real, bound tight


def test_bias_before_batchnorm_gets_zero_gradient():
    g = gen(9)
    x = torch.randn(32, 5, generator=g, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()
    target = torch.randn(32, 2, generator=g, dtype=torch.float64)
    nn.functional.mse_loss(model(x), target).backward()
    assert model[0].bias.grad.abs().max() < 1e-14
    assert model[0].weight.grad.abs().max() > 1e-3
