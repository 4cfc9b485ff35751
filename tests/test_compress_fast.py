"""The compiled CPU path against the pure-torch path: same headers, draws and decodes, the
documented 2^-24 rule exactly, determinism, and the statistics of the stream."""

from __future__ import annotations

import os

import pytest
import torch
from compress_stats import (
    assert_total_variance,
    assert_unbiased,
    headers,
    per_coordinate,
    slack,
    two_point_moments,
)

from dist_quant.compress import draws, fast, get_compressor, kernels_c, wire
from dist_quant.compress.quantize import scaled_offsets

pytestmark = pytest.mark.skipif(os.environ.get("DIST_QUANT_KERNELS") == "torch",
                                reason="pure-torch path forced")

CASES = [
    dict(bits=1, bucket_size=0),
    dict(bits=1, bucket_size=512),
    dict(bits=1, bucket_size=100, header_dtype="fp16"),
    dict(bits=2, bucket_size=24),
    dict(bits=3, bucket_size=7),
    dict(bits=5, bucket_size=0, header_dtype="bf16"),
    dict(bits=8, bucket_size=1),
    dict(bits=4, bucket_size=40, header_dtype="fp16"),
    dict(bits=4, bucket_size=300_000),  # larger than a fused chunk: the two-pass route
]


def test_compiled_path_builds():
    """A fresh machine with a C compiler gets the compiled path (README install)."""
    with fast.use("c"):
        assert fast.library() is not None


def grad(n, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=gen) * torch.rand(n, generator=gen).exp()).to(dtype)


def encode(path, comp, x, seed):
    with fast.use(path):
        return comp.encode(x, generator=torch.Generator().manual_seed(seed)).to_tensor()


@pytest.mark.parametrize("options", CASES)
@pytest.mark.parametrize("n", [1, 13, 1000, 20_001])
def test_same_headers_and_bit_identical_decodes(options, n):
    comp = get_compressor("kbit", **options)
    x = grad(n, seed=n)
    data_c, data_t = encode("c", comp, x, 0), encode("torch", comp, x, 0)
    assert data_c.numel() == data_t.numel() == comp.payload_nbytes(n)
    assert torch.equal(data_c[:32], data_t[:32])
    for u, v in zip(headers(comp, data_c), headers(comp, data_t), strict=True):
        assert torch.equal(u, v)
    for data in (data_c, data_t):
        with fast.use("c"):
            y_c = comp.decode(data)
            m_c = comp.decode_mean(torch.stack([data, data_c]))
        with fast.use("torch"):
            y_t = comp.decode(data)
            m_t = comp.decode_mean(torch.stack([data, data_c]))
        assert torch.equal(y_c, y_t) and torch.equal(m_c, m_t)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_take_the_compiled_path(dtype):
    comp = get_compressor("onebit", bucket_size=64)
    x = grad(1000, dtype=dtype)
    assert torch.equal(encode("c", comp, x, 0)[: 32 + 8 * 16], encode("torch", comp, x, 0)[:160])


@pytest.mark.parametrize("options", CASES[:8])
def test_bits_follow_the_24_bit_rule_exactly(options):
    """t_i = (floor(y_i 2^24) + r_i) >> 24 with r_i the documented stream: so
    P(up) = floor(y 2^24) / 2^24 and the bias is below a 2^-24 (quantize docstring)."""
    comp = get_compressor("kbit", **options)
    n = 5000
    x = grad(n, seed=3)
    with fast.use("c"):
        data = comp.encode(x, generator=torch.Generator().manual_seed(11)).to_tensor()
    s, m = torch.randint(0, 1 << 32, (2,), generator=torch.Generator().manual_seed(11)).tolist()
    r = fast.draws(s, m | 1, 0, n)
    t = wire.unpack_bits(data[32 + 2 * comp.num_buckets(n) * comp.hbytes:], n, comp.bits)
    expected = expected_levels(comp, x, data, r)
    assert torch.equal(t.long(), expected)


def expected_levels(comp, x, data, r):
    low, _, _, a = per_coordinate(comp, x, data)
    n = x.numel()
    d = comp.bucket_size or n
    b = headers(comp, data)[1][torch.arange(n) // d].float()
    y = scaled_offsets(x.float().unsqueeze(1), a.float().unsqueeze(1), b.unsqueeze(1))
    y = y.squeeze(1).clamp(0, comp.levels)
    q = (y * 2.0**24).long()
    # float64 reference: q is floor(y 2^24) of the fp32 y, so |q / 2^24 - y| < 2^-24
    assert ((q.double() / 2**24 - y.double()).abs() < 2.0**-24).all()
    return (q + r) >> 24


def test_pure_path_follows_the_same_rule():
    comp = get_compressor("kbit", bits=3, bucket_size=50)
    n = 3000
    x = grad(n, seed=4)
    with fast.use("torch"):
        data = comp.encode(x, generator=torch.Generator().manual_seed(2)).to_tensor()
    r = draws.counter_draws(draws.keys(torch.Generator().manual_seed(2)), n,
                            torch.device("cpu"))
    t = wire.unpack_bits(data[32 + 2 * comp.num_buckets(n) * 4:], n, 3)
    assert torch.equal(t.long(), expected_levels(comp, x, data, r))


def test_deterministic_given_generator_and_independent_of_threads():
    comp = get_compressor("onebit", bucket_size=512)
    x = grad(600_000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = encode("c", comp, x, 5)
        torch.set_num_threads(2)
        two = encode("c", comp, x, 5)
        whole = get_compressor("kbit", bits=2)
        whole_two = encode("c", whole, x, 5)
        torch.set_num_threads(1)
        whole_one = encode("c", whole, x, 5)
        y_one = whole.decode(whole_one)
        torch.set_num_threads(2)
        y_two = whole.decode(whole_one)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(whole_one, whole_two)
    assert torch.equal(y_one, y_two)
    assert not torch.equal(one, encode("c", comp, x, 6))


@pytest.mark.parametrize("options", [dict(bits=1, bucket_size=0), dict(bits=1, bucket_size=16),
                                     dict(bits=2, bucket_size=64)])
def test_unbiased_and_variance_on_the_compiled_path(options):
    """The foundation's statistical tests, on the compiled path (N decodes as N tiled copies)."""
    comp = get_compressor("kbit", **options)
    g = grad(320, seed=9)
    draws = 3000
    x = g.repeat(draws)
    with fast.use("c"):
        payload = comp.encode(x, generator=torch.Generator().manual_seed(1))
        samples = comp.decode(payload).view(draws, -1)
    low, up, p, a = (v[:320] for v in per_coordinate(comp, x, payload))
    var, m4 = two_point_moments(a, p)
    assert_unbiased(samples, g, var, slack(low, up, a))
    assert_total_variance(samples, g, var, m4)


def test_compiled_and_pure_paths_agree_statistically():
    """Two-sample check: per coordinate, the mean decodes of the two paths differ by less than
    6 standard errors of the difference (both have the predicted variance)."""
    comp = get_compressor("kbit", bits=2, bucket_size=32)
    g = grad(256, seed=2)
    draws = 2000
    x = g.repeat(draws)
    means = []
    for path in ("c", "torch"):
        with fast.use(path):
            payload = comp.encode(x, generator=torch.Generator().manual_seed(3))
            means.append(comp.decode(payload).view(draws, -1).double().mean(0))
    _, _, p, a = (v[:256] for v in per_coordinate(comp, x, payload))
    var, _ = two_point_moments(a, p)
    se = (2 * var / draws).sqrt()
    assert ((means[0] - means[1]).abs() <= 6 * se + 1e-6).all()


def test_stream_is_uniform_and_uncorrelated():
    """24-bit draws: chi-square of the top and bottom 8 bits over 2^20 draws (255 degrees of
    freedom, bound at mean + 6 sd), lag-1 and cross-seed correlations within 6 / sqrt(N)."""
    n = 1 << 20
    r = fast.draws(12345, 2 * 987654 + 1, 0, n)
    other = fast.draws(54321, 2 * 1234567 + 1, 0, n)
    for byte in (r >> 16, r & 255, other & 255):
        counts = torch.bincount(byte, minlength=256).double()
        chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum().item()
        assert chi2 < 255 + 6 * (2 * 255) ** 0.5
    u = (r.double() + 0.5) / 2**24 - 0.5
    v = (other.double() + 0.5) / 2**24 - 0.5
    bound = 6 / n**0.5
    for left, right in ((u[1:], u[:-1]), (u, v), (u[1:], v[:-1])):
        corr = (left * right).mean().item() / (1 / 12)
        assert abs(corr) < bound
    assert abs(u.mean().item()) < 6 * (1 / 12 / n) ** 0.5


@pytest.mark.parametrize("options", [dict(bits=1, bucket_size=100), dict(bits=3, bucket_size=64)])
def test_streaming_stores_into_reused_buffers(options, monkeypatch):
    """Large outputs decoded into a caller's buffer use streaming stores: same values."""
    monkeypatch.setattr(fast, "NONTEMPORAL_BYTES", 0)
    comp = get_compressor("kbit", **options)
    x = grad(10_003)
    rows = torch.stack([encode("c", comp, x, seed) for seed in range(3)])
    with fast.use("torch"):
        expected = comp.decode(rows[0])
        expected_mean = comp.decode_mean(rows)
    with fast.use("c"):
        assert torch.equal(comp.decode(rows[0], out=torch.empty(10_003)), expected)
        assert torch.equal(comp.decode_mean(rows, out=torch.empty(10_003)), expected_mean)


def test_fresh_outputs_on_huge_pages_decode_the_same(monkeypatch):
    monkeypatch.setattr(fast, "HUGE_PAGE_BYTES", 0)
    comp = get_compressor("onebit", bucket_size=64)
    rows = torch.stack([encode("c", comp, grad(5000), seed) for seed in range(2)])
    with fast.use("torch"):
        expected, expected_mean = comp.decode(rows[0]), comp.decode_mean(rows)
    with fast.use("c"):
        assert torch.equal(comp.decode(rows[0]), expected)
        assert torch.equal(comp.decode_mean(rows), expected_mean)


def test_every_isa_level_matches(monkeypatch):
    """Each ISA level this CPU runs (DIST_QUANT_ISA: native, avx512, avx2, generic) gives the
    same payloads and decodes as the default build, hence the same as the torch path."""
    x = grad(20_011, seed=8)
    levels = [lvl for lvl in kernels_c.LEVELS if kernels_c.cpu_runs(lvl)]
    assert "native" in levels and "generic" in levels
    for options in CASES:
        comp = get_compressor("kbit", **options)
        with fast.use("c"):
            data = comp.encode(x, generator=torch.Generator().manual_seed(4)).to_tensor()
            expected = comp.decode(data)
        for level in levels:
            with fast.use("c", level):
                again = comp.encode(x, generator=torch.Generator().manual_seed(4)).to_tensor()
                assert torch.equal(comp.decode(data), expected)
            assert torch.equal(again, data), level


def test_failed_build_falls_back_to_torch_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("DIST_QUANT_CACHE", str(tmp_path))
    saved = dict(fast._loaded)
    fast._loaded.clear()
    try:
        with fast.use("auto"), pytest.warns(RuntimeWarning, match="pure-torch path"):
            assert fast.library() is None
        comp = get_compressor("onebit", bucket_size=8)
        with fast.use("auto"):
            payload = comp.encode(grad(100), generator=torch.Generator().manual_seed(0))
            assert comp.decode(payload).shape == (100,)
        with fast.use("c"), pytest.raises(RuntimeError, match="did not build"):
            fast.library()
    finally:
        fast._loaded.clear()
        fast._loaded.update(saved)
