"""The baselines: QSGD, TernGrad, top-k and random-k. Exact sizes, unbiasedness and variance
against their formulas (explicit z bounds from the predicted moments), top-k's error-feedback
invariant, and malformed payloads rejected."""

from __future__ import annotations

import math

import pytest
import torch
from compress_stats import assert_total_variance, assert_unbiased, two_point_moments
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_quant.compress import ErrorFeedback, get_compressor, wire
from dist_quant.compress.sparse import kept
from dist_quant.errors import ConfigError, NonFiniteGradientError, PayloadError

N_DRAWS = 2000
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def gradient(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, generator=gen) * 0.3 + 0.05
    g[::13] *= 6  # a heavy tail
    g[5] = 0.0
    return g


def expected_nbytes(name: str, n: int, bucket: int = 0, levels: int = 4, ratio: float = 0.01,
                    hbytes: int = 4) -> int:
    """The payload size written out from the wire docstring, independently of the code."""
    nb = 0 if n == 0 else -(-n // (bucket or n))
    if name in ("qsgd", "terngrad"):
        w = 1 + (levels if name == "qsgd" else 1).bit_length()
        return 32 + nb * hbytes + math.ceil(n * w / 8)
    k = 0 if n == 0 else min(n, max(1, round(ratio * n)))
    return 32 + 8 * k


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 3000), bucket=st.sampled_from([0, 1, 7, 64, 512]),
       levels=st.sampled_from([1, 2, 3, 4, 15, 16, 255, 1000]),
       ratio=st.sampled_from([0.001, 0.01, 0.1, 0.3333, 1.0]),
       dtype=st.sampled_from(DTYPES), header=st.sampled_from(["fp32", "fp16"]))
def test_payload_size_is_exact_for_any_n_and_dtype(n, bucket, levels, ratio, dtype, header):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    gen = torch.Generator().manual_seed(1)
    hbytes = 2 if header == "fp16" else 4
    for name, options in [("qsgd", dict(levels=levels, bucket_size=bucket, header_dtype=header)),
                          ("terngrad", dict(bucket_size=bucket, header_dtype=header)),
                          ("topk", dict(ratio=ratio)), ("randk", dict(ratio=ratio))]:
        comp = get_compressor(name, **options)
        want = expected_nbytes(name, n, bucket, levels, ratio, hbytes)
        payload = comp.encode(x, generator=gen)
        assert comp.payload_nbytes(n) == payload.nbytes == want, name
        assert comp.decode(payload).shape == (n,)


def level_moments(comp, g, payload):
    """Step a, up-probability p and lower magnitude of a QSGD/TernGrad decode (float64)."""
    g = g.double()
    n = g.numel()
    sigma, _ = comp._split(payload.to_tensor()[wire.FIXED_NBYTES:], n)
    d = comp.bucket_size or n
    step = sigma.double()[torch.arange(n) // d] / comp.levels
    r = torch.where(step > 0, g.abs() / torch.where(step > 0, step, 1.0), 0.0)
    low = torch.floor(r).clamp(max=comp.levels - 1)
    return step, r - low, low * step


@pytest.mark.parametrize("name,options", [
    ("qsgd", dict(levels=1, bucket_size=0)),
    ("qsgd", dict(levels=4, bucket_size=32)),
    ("qsgd", dict(levels=5, bucket_size=50, header_dtype="fp16")),
    ("terngrad", dict(bucket_size=0)),
    ("terngrad", dict(bucket_size=40, header_dtype="fp16")),
])
def test_level_compressors_unbiased_with_their_variance(name, options):
    comp = get_compressor(name, **options)
    g = gradient(200)
    gen = torch.Generator().manual_seed(3)
    payloads = [comp.encode(g, generator=gen) for _ in range(N_DRAWS)]
    samples = torch.stack([comp.decode(p) for p in payloads])
    a, p, low = level_moments(comp, g, payloads[0])
    var, m4 = two_point_moments(a, p)
    # the formulas of the docstrings: QSGD (|g| - lo)(lo + sigma/s - |g|), TernGrad
    # |g| (sigma - |g|)
    torch.testing.assert_close(var, (g.double().abs() - low) * (low + a - g.double().abs()),
                               rtol=1e-9, atol=1e-15)
    if name == "terngrad":
        sigma = a * comp.levels
        torch.testing.assert_close(var, g.double().abs() * (sigma - g.double().abs()),
                                   rtol=1e-9, atol=1e-15)
    eps = torch.finfo(torch.float32).eps
    assert_unbiased(samples, g, var, slack=4 * eps * (g.double().abs() + a), z=6.0)
    assert_total_variance(samples, g, var, m4, z=6.0)


def test_qsgd_scale_is_the_norm_and_terngrad_the_maximum():
    g = gradient(256)
    q = get_compressor("qsgd", levels=4, bucket_size=64)
    t = get_compressor("terngrad", bucket_size=64)
    gen = torch.Generator().manual_seed(0)
    sq, _ = q._split(q.encode(g, generator=gen).to_tensor()[32:], 256)
    st_, _ = t._split(t.encode(g, generator=gen).to_tensor()[32:], 256)
    torch.testing.assert_close(sq, g.view(4, 64).double().norm(dim=1).float())
    torch.testing.assert_close(st_, g.view(4, 64).abs().amax(dim=1))
    # total QSGD variance within Alistarh et al.'s bound min(d/s^2, sqrt(d)/s) ||g||^2
    a, p, _ = level_moments(q, g, q.encode(g, generator=gen))
    var, _ = two_point_moments(a, p)
    bound = min(64 / 16, 8 / 4) * g.double().square().sum()
    assert var.sum() <= bound


def test_randk_unbiased_with_its_variance():
    comp = get_compressor("randk", ratio=0.25)
    g = gradient(120)
    gen = torch.Generator().manual_seed(5)
    samples = torch.stack([comp.decode(comp.encode(g, generator=gen)) for _ in range(N_DRAWS)])
    n, k = 120, kept(120, 0.25)
    # a two-point law: (n / k) g with probability k / n, else 0
    var, m4 = two_point_moments((n / k) * g.double(), torch.full((n,), k / n, dtype=torch.float64))
    torch.testing.assert_close(var, (n / k - 1) * g.double() ** 2)
    eps = torch.finfo(torch.float32).eps
    assert_unbiased(samples, g, var, slack=eps * (n / k) * g.double().abs(), z=6.0)
    assert_total_variance(samples, g, var, m4, z=6.0)
    # each draw keeps exactly k distinct coordinates
    assert ((samples != 0).sum(1) <= k).all()


def test_randk_draws_come_from_the_generator_passed_in():
    comp = get_compressor("randk", ratio=0.1)
    g = gradient(300)
    one = comp.encode(g, generator=torch.Generator().manual_seed(9)).to_tensor()
    two = comp.encode(g, generator=torch.Generator().manual_seed(9)).to_tensor()
    other = comp.encode(g, generator=torch.Generator().manual_seed(10)).to_tensor()
    assert torch.equal(one, two) and not torch.equal(one, other)


def test_topk_keeps_the_largest_and_is_contractive():
    comp = get_compressor("topk", ratio=0.1)
    g = gradient(500)
    out = comp.decode(comp.encode(g))
    k = kept(500, 0.1)
    idx = g.abs().topk(k).indices
    assert torch.equal(out[idx], g[idx]) and int((out != 0).sum()) == k
    assert (out - g).square().sum() <= (1 - k / 500) * g.square().sum()


def test_topk_with_error_feedback_sent_plus_residual_is_the_sum_of_gradients():
    comp = get_compressor("topk", ratio=0.02, error_feedback=True)
    assert isinstance(comp, ErrorFeedback)
    gen = torch.Generator().manual_seed(0)
    sent = torch.zeros(1000, dtype=torch.float64)
    total = torch.zeros(1000, dtype=torch.float64)
    for _ in range(200):
        g = torch.randn(1000, generator=gen)
        total += g.double()
        sent += comp.decode(comp.encode(g)).double()
        # the algebraic invariant, up to the float32 rounding of g + e at every step
        err = (sent + comp.residual.double() - total).abs().max().item()
        assert err <= 1e-4, err
    # the residual stays bounded: error feedback does not lose mass nor let it grow unboundedly
    assert comp.residual.norm() < 50 * math.sqrt(1000)


@pytest.mark.parametrize("name", ["qsgd", "terngrad", "topk", "randk"])
def test_non_finite_input_is_refused(name):
    comp = get_compressor(name)
    g = gradient(64)
    g[3] = float("nan")
    g[9] = float("inf")
    with pytest.raises(NonFiniteGradientError) as info:
        comp.encode(g, generator=torch.Generator())
    assert info.value.count == 2
    bad = comp.nonfinite_payload(64, 2)
    assert bad.nbytes == comp.payload_nbytes(64)
    with pytest.raises(NonFiniteGradientError):
        comp.decode(bad)


def test_bad_options_name_the_option():
    with pytest.raises(ConfigError, match="levels"):
        get_compressor("qsgd", levels=0)
    with pytest.raises(ConfigError, match="levels"):
        get_compressor("qsgd", levels=1 << 15)
    with pytest.raises(ConfigError, match="ratio"):
        get_compressor("topk", ratio=0.0)
    with pytest.raises(ConfigError, match="ratio"):
        get_compressor("randk", ratio=1.5)


def _payload(name, **options):
    comp = get_compressor(name, **options)
    data = comp.encode(gradient(100), generator=torch.Generator().manual_seed(0))
    return comp, data.to_tensor().clone()


def _put(data: torch.Tensor, offset: int, value, dtype) -> torch.Tensor:
    data = data.clone()
    raw = torch.tensor([value], dtype=dtype).view(torch.uint8)
    data[offset:offset + raw.numel()] = raw
    return data


@pytest.mark.parametrize("name,options,mutate,message", [
    ("qsgd", {}, lambda d: d[:-1], "wrong payload length"),
    ("qsgd", dict(bucket_size=50), lambda d: _put(d, 32, -1.0, torch.float32), "negative scale"),
    ("qsgd", dict(bucket_size=50), lambda d: _put(d, 36, float("nan"), torch.float32),
     "non-finite scale"),
    # levels 3: 3-bit codes; code 0b110 = level 3 is fine, but with s = 3 encoded payload
    # read by s = 2 (also 3-bit codes) a level 3 > 2 is rejected
    ("qsgd", dict(levels=2), lambda d: _put(d, 36, 0xFF, torch.uint8), "level exceeds"),
    ("terngrad", {}, lambda d: _put(d, 1, 5, torch.uint8), "encoded by compressor 'qsgd'"),
    ("topk", dict(ratio=0.1), lambda d: _put(d, 32, 100, torch.int32), "outside"),
    ("topk", dict(ratio=0.1), lambda d: _put(d, 32, -1, torch.int32), "outside"),
    ("randk", dict(ratio=0.1), lambda d: _put(d, 36, 0, torch.int32), "strictly increasing"),
    ("randk", dict(ratio=0.1), lambda d: _put(d, 32 + 40, float("inf"), torch.float32),
     "non-finite value"),
    ("topk", dict(ratio=0.1), lambda d: torch.cat([d, d[-8:]]), "wrong payload length"),
])
def test_malformed_payloads_rejected(name, options, mutate, message):
    comp, data = _payload(name, **options)
    with pytest.raises(PayloadError, match=message):
        comp.decode(mutate(data))
    with pytest.raises(PayloadError, match=message):
        comp.decode_mean(torch.stack([data, mutate(data)]) if mutate(data).numel() ==
                         data.numel() else mutate(data).unsqueeze(0))


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_a_16_bit_mean_across_its_widening_chunks_is_the_rows_summed_in_order(name):
    """Above MIXED_ADD_MAX decode_mean widens 16-bit rows MEAN_CHUNK coordinates at a time: bit
    for bit the rows decoded, summed in row order and divided by W, across chunk edges and on
    unaligned rows."""
    from dist_quant.compress.floats import MEAN_CHUNK, MIXED_ADD_MAX

    comp = get_compressor(name)
    n = MIXED_ADD_MAX + MEAN_CHUNK + 3
    gen = torch.Generator().manual_seed(5)
    rows = torch.stack([comp.encode(torch.randn(n, generator=gen) * 10 ** w).to_tensor()
                        for w in range(3)])
    want = torch.zeros(n)
    for r in rows:
        want += comp.decode(r)
    want /= 3
    assert torch.equal(comp.decode_mean(rows), want)
    odd = torch.zeros(3, rows.shape[1] + 1, dtype=torch.uint8)[:, 1:]   # rows at odd offsets
    odd.copy_(rows)
    assert torch.equal(comp.decode_mean(odd), want)


def test_decode_mean_is_the_mean_of_decodes():
    for name in ("qsgd", "terngrad", "topk", "randk"):
        comp = get_compressor(name, ratio=0.2, bucket_size=16)
        gen = torch.Generator().manual_seed(2)
        rows = torch.stack([comp.encode(gradient(90, s), generator=gen).to_tensor()
                            for s in range(3)])
        want = torch.stack([comp.decode(r) for r in rows]).mean(0)
        torch.testing.assert_close(comp.decode_mean(rows), want, rtol=0, atol=1e-6)
