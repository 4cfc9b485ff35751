"""Shifted compression (DIANA / EF21, dist_quant.compress.shift): the estimate is unbiased with
an unbiased compressor, its variance goes to zero on a fixed gradient, the EF21 invariant holds,
the worker's shift and the server's copy agree bit for bit, and the rate is validated."""

from __future__ import annotations

import math

import pytest
import torch

from dist_quant.compress import get_compressor
from dist_quant.compress.shift import (
    ShiftedServer,
    ShiftedWorker,
    omega,
    parse_shift_rate,
    resolve_rate,
)
from dist_quant.config import TrainConfig
from dist_quant.errors import ConfigError, NonFiniteGradientError


def _pair(name: str, rate: float | None, **options):
    return (ShiftedWorker(get_compressor(name, **options), rate),
            ShiftedServer(get_compressor(name, **options), rate))


def test_unbiased_with_onebit_within_the_predicted_standard_error():
    """E[h + decode(C(g - h))] = g for a fixed shift h; per coordinate the variance of one draw
    is (x - min)(max - x) over the bucket of x = g - h (MATH 4c), so the mean of N draws lies
    within 5 predicted standard errors of g."""
    torch.manual_seed(0)
    n, d, draws = 48, 16, 1500
    g = torch.randn(n)
    h = 0.5 * torch.randn(n)
    x = (g - h).view(-1, d)
    var = ((x - x.min(1, keepdim=True).values) * (x.max(1, keepdim=True).values - x)).reshape(-1)
    gen = torch.Generator().manual_seed(1)
    total = torch.zeros(n, dtype=torch.float64)
    for _ in range(draws):
        _, server = _pair("onebit", 0.1, bucket_size=d)
        server.shifts = h.clone().unsqueeze(0)
        server.alpha = 0.1
        worker = ShiftedWorker(get_compressor("onebit", bucket_size=d), 0.1)
        worker.shift, worker.alpha = h.clone(), 0.1
        est, bad = server.aggregate(worker.encode(g, generator=gen).to_tensor().unsqueeze(0))
        assert not bad
        total += est.double()
    mean = total / draws
    se = (var.double() / draws).sqrt()
    moving = se > 0
    z = ((mean - g.double())[moving] / se[moving]).abs()
    assert z.max() < 5.0, float(z.max())
    # the bucket's min and max coordinates decode exactly
    assert torch.allclose(mean[~moving], g.double()[~moving], atol=1e-5)
    assert moving.sum() >= n - 2 * (n // d)


@pytest.mark.parametrize("name, options", [
    ("onebit", dict(bucket_size=16)),
    ("kbit", dict(bits=2, bucket_size=32)),
    ("qsgd", dict(levels=4, bucket_size=32)),
])
def test_shift_learns_a_fixed_gradient_and_the_variance_goes_to_zero(name, options):
    """On a fixed gradient at the auto rate 1 / (1 + omega), E||g - h||^2 contracts by
    omega / (1 + omega) per step: the shift reaches g and the estimate's error vanishes."""
    torch.manual_seed(2)
    n = 96
    g = torch.randn(n)
    worker, server = _pair(name, None, **options)
    gen = torch.Generator().manual_seed(3)
    first = None
    for step in range(600):
        est, _ = server.aggregate(worker.encode(g, generator=gen).to_tensor().unsqueeze(0))
        err = float((est - g).norm() / g.norm())
        first = err if step == 0 else first
    w = omega(get_compressor(name, **options), n)
    assert server.alpha == pytest.approx(1.0 / (1.0 + w))
    assert first > 1e-2            # the first estimate is noisy
    assert err < 1e-4, err         # the last one is g, up to float32 rounding
    assert float((worker.shift - g).norm() / g.norm()) < 1e-4
    assert torch.equal(worker.shift, server.shifts[0])


def test_ef21_with_sign_keeps_the_invariant_and_the_copies_agree():
    """alpha = 1 with sign (EF21): after every step the server's estimate is mean_i h_i, and
    every worker's shift equals the server's copy bit for bit, on gradients that change."""
    torch.manual_seed(4)
    workers, n = 3, 70
    pairs = [ShiftedWorker(get_compressor("sign", bucket_size=8), 1.0) for _ in range(workers)]
    server = ShiftedServer(get_compressor("sign", bucket_size=8), 1.0)
    base = torch.randn(workers, n)
    for step in range(25):
        g = base + 0.3 * torch.randn(workers, n) + 0.05 * step
        rows = torch.stack([w.encode(g[i]).to_tensor() for i, w in enumerate(pairs)])
        est, bad = server.aggregate(rows)
        assert not bad
        shifts = torch.stack([w.shift for w in pairs])
        assert torch.equal(shifts, server.shifts)
        assert torch.allclose(est, shifts.mean(0), rtol=0, atol=1e-6)
    # EF21's shift tracks the gradient: on a fixed one its error contracts
    g = base
    for _ in range(200):
        server.aggregate(torch.stack([w.encode(g[i]).to_tensor() for i, w in enumerate(pairs)]))
    assert float((server.shifts - g).norm() / g.norm()) < 1e-3


def test_a_row_left_out_leaves_its_shift_and_the_estimate_uses_the_others():
    worker, server = _pair("onebit", 0.5, bucket_size=8)
    other = ShiftedWorker(get_compressor("onebit", bucket_size=8), 0.5)
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(40)
    rows = torch.stack([worker.encode(g, generator=gen).to_tensor(),
                        other.encode(g, generator=gen).to_tensor()])
    server.aggregate(rows)
    before = server.shifts.clone()
    bad_g = g.clone()
    bad_g[3] = float("nan")
    with pytest.raises(NonFiniteGradientError):  # the worker refuses to encode: its shift stays
        other.encode(bad_g, generator=gen)
    marker = other.inner.nonfinite_payload(40, 1).to_tensor()
    est, bad = server.aggregate(torch.stack([worker.encode(g, generator=gen).to_tensor(),
                                             marker]))
    assert len(bad) == 1 and bad[0].startswith("worker 1")
    assert torch.equal(server.shifts[1], before[1])
    assert torch.equal(server.shifts[0], worker.shift)
    assert torch.equal(server.shifts[1], other.shift)
    assert est is not None and torch.isfinite(est).all()


def test_rates_and_variance_bounds():
    assert parse_shift_rate("auto") is None
    assert parse_shift_rate("0") == 0.0 and parse_shift_rate("0.25") == 0.25
    for bad in ("-0.1", "1.5", "nan", "fast"):
        with pytest.raises(ValueError):
            parse_shift_rate(bad)
    assert resolve_rate(None, get_compressor("sign", bucket_size=16), 100) == 1.0
    assert resolve_rate(None, get_compressor("topk"), 100) == 1.0
    assert omega(get_compressor("onebit", bucket_size=128), 1000) == 64.0
    assert omega(get_compressor("kbit", bits=2, bucket_size=128), 1000) == pytest.approx(64 / 9)
    assert omega(get_compressor("onebit", bucket_size=0), 10) == 5.0
    assert omega(get_compressor("randk", ratio=0.1), 1000) == pytest.approx(9.0)
    assert omega(get_compressor("terngrad", bucket_size=64), 1000) == pytest.approx(7.0)
    assert omega(get_compressor("qsgd", levels=4, bucket_size=64), 1000) == 2.0
    assert math.isclose(resolve_rate(0.3, get_compressor("onebit"), 10), 0.3)


@pytest.mark.parametrize("changes, option", [
    (dict(shift_rate="2"), "--shift-rate"),
    (dict(shift_rate="x"), "--shift-rate"),
    (dict(shift_rate="auto", error_feedback=True, compressor="sign"), "--shift-rate"),
    (dict(shift_rate="0.5", compressor="none"), "--shift-rate"),
])
def test_bad_shift_options_are_refused_naming_the_option(changes, option):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**changes).validate()
    assert option in str(err.value)
