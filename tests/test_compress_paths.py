"""Every encode path gives the same bytes: the pure-torch path, the compiled kernels at every ISA
level this CPU runs (DIST_QUANT_ISA) and the Triton kernels (under the interpreter here);
a payload made by any path decodes identically on any other; each passes the statistical
tests (unbiasedness, the variance formula) on its own."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from compress_stats import assert_total_variance, assert_unbiased, per_coordinate, slack
from compress_stats import two_point_moments as moments

from dist_quant.compress import draws, fast, get_compressor, kernels_c
from dist_quant.compress.sign import tree_sum

CPU_LEVELS = [lvl for lvl in kernels_c.LEVELS if kernels_c.cpu_runs(lvl)]
COMPILED = os.environ.get("DIST_QUANT_KERNELS") != "torch"
C_PATHS = [("c", lvl) for lvl in CPU_LEVELS] if COMPILED else []


def _triton_interpreter() -> bool:
    """Triton is installed; its interpreter runs the kernels on CPU tensors (set before the
    kernels are first imported, which only this module does on a machine without CUDA)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported
    return os.environ.get("TRITON_INTERPRET") == "1"


TRITON = _triton_interpreter()
needs_triton = pytest.mark.skipif(not TRITON, reason="triton not installed")
PATHS = [("torch", None), *C_PATHS] + ([("triton", None)] if TRITON else [])

CASES = [
    ("onebit", dict(bucket_size=0)),
    ("onebit", dict(bucket_size=512)),
    ("onebit", dict(bucket_size=100, header_dtype="fp16")),
    ("kbit", dict(bits=2, bucket_size=24)),
    ("kbit", dict(bits=3, bucket_size=7)),
    ("kbit", dict(bits=4, bucket_size=40, header_dtype="bf16")),
    ("kbit", dict(bits=5, bucket_size=0, header_dtype="bf16")),
    ("kbit", dict(bits=8, bucket_size=1)),
    ("sign", dict(bucket_size=0)),
    ("sign", dict(bucket_size=512)),
    ("sign", dict(bucket_size=2048)),
    ("sign", dict(bucket_size=33, header_dtype="fp16")),
]


def grad(n, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=gen) * torch.rand(n, generator=gen).exp()).to(dtype)


def encode(path, level, comp, x, seed=0):
    with fast.use(path, level):
        return comp.encode(x, generator=torch.Generator().manual_seed(seed)).to_tensor()


def decodes(path, level, comp, data, rows):
    with fast.use(path, level):
        return (comp.decode(data), comp.decode(data, out=torch.empty(data_n(comp, data))),
                comp.decode_mean(rows))


def data_n(comp, data):
    return comp.check(data)


def paths_for(name):
    # sign has no Triton kernels: CUDA tensors take its torch path
    return [p for p in PATHS if not (name == "sign" and p[0] == "triton")]


@pytest.mark.parametrize("name,options", CASES)
@pytest.mark.parametrize("n", [13, 3001, 40_007])
def test_payload_bytes_identical_and_decodable_everywhere(name, options, n):
    comp = get_compressor(name, **options)
    x = grad(n, seed=n)
    paths = paths_for(name)
    if n > 5000:  # the interpreter is slow: small tensors only
        paths = [p for p in paths if p[0] != "triton"]
    payloads = {p: encode(*p, comp, x, seed=7) for p in paths}
    reference = payloads[("torch", None)]
    assert reference.numel() == comp.payload_nbytes(n)
    for p, data in payloads.items():
        assert torch.equal(data, reference), f"{p} encodes different bytes"
    # payloads of two seeds from two different paths: every decoder gives the same values
    other = encode(*paths[-1], comp, x, seed=8)
    rows = torch.stack([reference, other, reference])
    expected = decodes("torch", None, comp, other, rows)
    for p in paths:
        for got, want in zip(decodes(*p, comp, other, rows), expected, strict=True):
            assert torch.equal(got, want), f"{p} decodes differently"


def test_signed_zeros_give_the_same_headers():
    """Buckets whose extremes are zeros of both signs: the vectorised reductions may meet -0
    or +0 first; the headers count a zero extreme as +0 on every path."""
    x = torch.zeros(4096)
    x[1::3] = -0.0
    x[2048:] = grad(2048).abs()
    x[2048::5] = -0.0
    for options in (dict(bits=1, bucket_size=64), dict(bits=2, bucket_size=0)):
        comp = get_compressor("kbit", **options)
        reference = encode("torch", None, comp, x)
        for p in PATHS:
            assert torch.equal(encode(*p, comp, x), reference), p


def test_special_buckets_identical():
    """Buckets of a multiple of 16 (the compiled encoder's bucket-by-bucket loop) next to the
    ones it leaves to the general loop: a range so small that 1 / a overflows (divisions), a
    constant bucket, a zero bucket and a short last bucket; and their decodes."""
    x = grad(32 * 9 + 7)
    x[32:64] = torch.linspace(0, 1, 32) * 1e-44  # denormal scale: 1 / a is infinite
    x[64:96] = 3.0
    x[96:128] = 0.0
    for bits in (1, 2, 8):
        comp = get_compressor("kbit", bits=bits, bucket_size=32)
        reference = encode("torch", None, comp, x)
        rows = torch.stack([reference, encode("torch", None, comp, x, seed=1)])
        expected = decodes("torch", None, comp, reference, rows)
        for p in PATHS:
            assert torch.equal(encode(*p, comp, x), reference), (p, bits)
            for got, want in zip(decodes(*p, comp, reference, rows), expected, strict=True):
                assert torch.equal(got, want), (p, bits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_identical(dtype):
    comp = get_compressor("kbit", bits=2, bucket_size=64)
    x = grad(2000, dtype=dtype)
    reference = encode("torch", None, comp, x)
    for p in PATHS:
        assert torch.equal(encode(*p, comp, x), reference), p


STAT_CASES = [dict(bits=1, bucket_size=0), dict(bits=1, bucket_size=16),
              dict(bits=2, bucket_size=64), dict(bits=8, bucket_size=320)]


@pytest.mark.parametrize("path,level", PATHS)
@pytest.mark.parametrize("options", STAT_CASES)
def test_unbiased_and_variance_on_every_path(path, level, options):
    """N decodes as one encode of N tiled copies (the draws are counter-based: every copy gets
    its own); mean within the bound, total variance equal to the formula."""
    if path == "triton" and options["bits"] == 8:
        pytest.skip("one k-bit case less under the slow interpreter")
    comp = get_compressor("kbit", **options)
    g = grad(320, seed=9)
    n_draws = 400 if path == "triton" else 2000
    x = g.repeat(n_draws)
    with fast.use(path, level):
        payload = comp.encode(x, generator=torch.Generator().manual_seed(1))
        samples = comp.decode(payload).view(n_draws, -1)
    low, up, p, a = (v[:320] for v in per_coordinate(comp, x, payload))
    var, m4 = moments(a, p)
    assert_unbiased(samples, g, var, slack(low, up, a))
    assert_total_variance(samples, g, var, m4)


@pytest.mark.skipif(not COMPILED, reason="pure-torch path forced")
def test_counter_draws_are_the_compiled_draws():
    """The torch formula of the draws (draws.counter_draws) equals the C kernels' stream,
    including past 2^32 coordinates (the counter wraps mod 2^32)."""
    key = torch.tensor([123456789, 2 * 987654321 + 1])
    with fast.use("c"):
        for start in (0, 1000, (1 << 32) - 5):
            got = draws.counter_draws(key, 4096, torch.device("cpu"), start=start)
            c0 = start % (1 << 32)
            if c0 + 4096 <= 1 << 32:
                assert torch.equal(got, fast.draws(*key.tolist(), c0, c0 + 4096))
            assert int(got.max()) < 1 << 24
    wrapped = draws.counter_draws(key, 10, torch.device("cpu"), start=1 << 32)
    assert torch.equal(wrapped, draws.counter_draws(key, 10, torch.device("cpu")))


def test_tree_sum_is_the_padded_pairwise_tree():
    v = torch.rand(3, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    padded = torch.cat([v, v.new_zeros(3, 64 - 37)], 1)
    while padded.shape[1] > 1:
        padded = padded.view(3, -1, 2).sum(2)  # two terms: one addition, no order to choose
    assert torch.equal(tree_sum(v), padded[:, 0])
    torch.testing.assert_close(tree_sum(v), v.sum(1), rtol=1e-15, atol=0)


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the NaN lanes
def test_triton_reports_nonfinite_through_the_payload():
    """No exception on the device side: the payload becomes the non-finite payload (flag,
    count, zero body), and decoding it raises as for any non-finite payload."""
    from dist_quant.errors import NonFiniteGradientError

    comp = get_compressor("onebit", bucket_size=16)
    x = grad(100)
    x[5], x[70] = float("nan"), float("-inf")
    data = encode("triton", None, comp, x)
    assert torch.equal(data, comp.nonfinite_payload(100, 2).to_tensor())
    with pytest.raises(NonFiniteGradientError):
        comp.decode(data)


def test_isa_levels_are_validated(monkeypatch):
    monkeypatch.setenv("DIST_QUANT_ISA", "avx9")
    with pytest.raises(ValueError, match="DIST_QUANT_ISA must be one of"):
        fast.isa()
    if kernels_c.is_x86():
        monkeypatch.setattr(kernels_c, "cpu_flags", lambda: {"sse2"})
        assert not kernels_c.cpu_runs("avx2") and not kernels_c.cpu_runs("avx512")
        monkeypatch.setitem(fast._loaded, "libs", {})
        with pytest.raises(RuntimeError, match="cannot run DIST_QUANT_ISA=avx2"):
            fast.load("avx2")


def test_draws_uniform_and_pairwise_independent():
    """The draw stream itself, for keys drawn as in training (fixed seeds): each of the 24 bits
    is 1 half the time (within 6 standard deviations), and the top 4 bits of draws at lags 1,
    2, 16 and 512 fill the 16 x 16 table of pairs evenly (chi-square with 255 degrees of
    freedom below 255 + 6 sqrt(510) = 391). The first round of lowbias32 alone (one multiply
    per coordinate) fails the second check here, and by far for some keys: the draws keep
    both rounds."""
    n = 1 << 18
    for seed in range(4):
        key = draws.keys(torch.Generator().manual_seed(seed))
        r = draws.counter_draws(key, n, torch.device("cpu"), start=seed * 12345)
        bits = (r[:, None] >> torch.arange(draws.DRAW_BITS)) & 1
        assert ((bits.double().mean(0) - 0.5).abs() <= 6 * 0.5 / n ** 0.5).all(), seed
        top = r >> (draws.DRAW_BITS - 4)
        for lag in (1, 2, 16, 512):
            table = torch.bincount(top[:-lag] * 16 + top[lag:], minlength=256).double()
            expected = (n - lag) / 256
            chi2 = ((table - expected) ** 2 / expected).sum().item()
            assert chi2 < 255 + 6 * 510 ** 0.5, (seed, lag, chi2)
