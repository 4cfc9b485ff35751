"""The k-bit rule's statistics (MATH 4a-4h): unbiased, variance as predicted, independent
across workers. Tolerances come from the predicted moments (see compress_stats.py)."""

from __future__ import annotations

import pytest
import torch
from compress_stats import (
    assert_total_variance,
    assert_unbiased,
    per_coordinate,
    slack,
    two_point_moments,
)

from dist_quant.compress import fast, get_compressor

N_DRAWS = 2000


def gradient(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, generator=gen) * 0.3 + 0.1
    g[::17] *= 8  # a heavy tail: the whole-tensor range is set by a few coordinates
    return g


def tiled_draws(comp, g, n_draws, seed):
    """N independent decodes of g as one encode of N tiled copies (buckets never straddle
    copies because the bucket size divides n, and the whole-tensor range is g's own)."""
    gen = torch.Generator().manual_seed(seed)
    x = g.repeat(n_draws)
    payload = comp.encode(x, generator=gen)
    low, up, p, a = per_coordinate(comp, x, payload)
    n = g.numel()
    return (comp.decode(payload).view(n_draws, n), low[:n], up[:n], p[:n], a[:n])


CASES = [
    ("onebit", dict(bucket_size=0)),
    ("onebit", dict(bucket_size=16)),
    ("onebit", dict(bucket_size=64, header_dtype="fp16")),
    ("kbit", dict(bits=2, bucket_size=64)),
    ("kbit", dict(bits=3, bucket_size=0)),
    ("kbit", dict(bits=4, bucket_size=32, header_dtype="fp16")),
    ("kbit", dict(bits=8, bucket_size=320)),
]


@pytest.mark.parametrize("path", ["torch", "c"])
@pytest.mark.parametrize("name,options", CASES)
def test_unbiased_and_variance_formula(name, options, path):
    """On both the pure-torch and the compiled path (DIST_QUANT_KERNELS)."""
    if path == "c" and fast.mode() == "torch":
        pytest.skip("pure-torch path forced")
    comp = get_compressor(name, **options)
    g = gradient(320)
    with fast.use(path):
        samples, low, up, p, a = tiled_draws(comp, g, N_DRAWS, seed=1)
    var, m4 = two_point_moments(a, p)
    # MATH 4c / 4g: the per-coordinate variance is (g - l)(u - g)
    torch.testing.assert_close(var, (g.double() - low) * (up - g.double()), rtol=1e-6,
                               atol=1e-12 * float(a.max() ** 2))
    assert_unbiased(samples, g, var, slack(low, up, a))
    assert_total_variance(samples, g, var, m4)


def test_onebit_whole_tensor_uses_min_and_range():
    """MATH 4c: b = min g, a = max g - min g (exact in fp32 headers for fp32 input)."""
    comp = get_compressor("onebit")
    g = gradient(320)
    payload = comp.encode(g, generator=torch.Generator().manual_seed(0))
    _, _, _, a = per_coordinate(comp, g, payload)
    low, *_ = per_coordinate(comp, g, payload)
    assert low.min().item() == g.min().item()
    assert a[0].item() == pytest.approx((g.max() - g.min()).item(), rel=2**-23)
    samples, low, up, p, a = tiled_draws(comp, g, 4, seed=0)
    predicted = ((g.double() - g.min()) * (g.max() - g.double())).sum()
    var, _ = two_point_moments(a, p)
    assert var.sum().item() == pytest.approx(predicted.item(), rel=1e-5)
    assert predicted <= g.numel() * (g.max() - g.min()).double() ** 2 / 4


def test_buckets_lower_the_variance_by_orders_of_magnitude():
    """MATH 4f: a small bucket's range is small; the cost is 2 h / d bits per coordinate."""
    # layers of very different gradient scales, as in a real network
    scales = torch.logspace(-3, 1, 16).repeat_interleave(256)
    g = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * scales
    whole = get_compressor("onebit")
    bucketed = get_compressor("onebit", bucket_size=64)
    gen = torch.Generator().manual_seed(0)
    variances = []
    for comp in (whole, bucketed):
        _, _, p, a = per_coordinate(comp, g, comp.encode(g, generator=gen))
        variances.append(two_point_moments(a, p)[0].sum().item())
    assert variances[1] < variances[0] / 10
    extra_bits = 8 * (bucketed.payload_nbytes(4096) - whole.payload_nbytes(4096))
    assert extra_bits == (4096 // 64 - 1) * 2 * 32


def test_bucket_not_dividing_n_is_unbiased_over_separate_encodes():
    """Separate encodes with one generator (the generator advances: fresh draws each call),
    n = 300 and d = 64 so the last bucket holds 44 coordinates."""
    comp = get_compressor("onebit", bucket_size=64)
    g = gradient(300, seed=3)
    gen = torch.Generator().manual_seed(5)
    payloads = [comp.encode(g, generator=gen) for _ in range(400)]
    samples = torch.stack([comp.decode(p) for p in payloads])
    low, up, p, a = per_coordinate(comp, g, payloads[0])
    var, m4 = two_point_moments(a, p)
    assert_unbiased(samples, g, var, slack(low, up, a))
    assert_total_variance(samples, g, var, m4)
    assert not torch.equal(payloads[0].to_tensor(), payloads[1].to_tensor())


def test_checks_catch_a_biased_decoder():
    """The tolerance is tight enough to see a bias of a tenth of a level spacing."""
    comp = get_compressor("onebit", bucket_size=16)
    g = gradient(320)
    samples, low, up, p, a = tiled_draws(comp, g, N_DRAWS, seed=1)
    var, m4 = two_point_moments(a, p)
    with pytest.raises(AssertionError):
        assert_unbiased(samples + 0.1 * a.float(), g, var, slack(low, up, a))
    with pytest.raises(AssertionError):
        assert_total_variance(samples * 1.05 - 0.05 * g, g, var, m4)


@pytest.mark.parametrize("name,options", [("onebit", {}), ("kbit", dict(bits=2, bucket_size=32))])
def test_independent_generators_average_out(name, options):
    """MATH 4h: W workers with rank-seeded generators: variance of the average = mean variance
    / W. Identical seeds give identical noise: the average is no better than one decode."""
    comp = get_compressor(name, **options)
    g = gradient(320)
    workers, draws = 8, 250
    for seeds, factor in (([100 + r for r in range(workers)], workers), ([7] * workers, 1)):
        decodes = [tiled_draws(comp, g, draws, seed) for seed in seeds]
        average = torch.stack([d[0] for d in decodes]).double().mean(0)
        _, _, p, a = decodes[0][1:]
        var, m4 = two_point_moments(a, p)
        # 4th central moment of a mean of W i.i.d. centred terms (W identical ones: m4)
        m4_avg = m4 if factor == 1 else (m4 + 3 * (workers - 1) * var**2) / workers**3
        assert_total_variance(average, g, var / factor, m4_avg)
