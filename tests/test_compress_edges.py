"""Encode/decode edge cases under hypothesis: any n, any bucket size, every input dtype,
constant vectors, denormal and huge magnitudes, fp16 headers."""

from __future__ import annotations

import pytest
import torch
from compress_stats import headers
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dist_quant.compress import get_compressor

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
EPS32 = torch.finfo(torch.float32).eps
TINY32 = torch.finfo(torch.float32).smallest_normal * EPS32  # smallest fp32 denormal


@st.composite
def gradients(draw):
    n = draw(st.integers(1, 300))
    dtype = draw(st.sampled_from(DTYPES))
    exponent = draw(st.sampled_from([-42, -30, -3, 0, 5, 30, 37]))
    if dtype in (torch.float16,):
        exponent = min(max(exponent, -6), 3)
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64) * 10.0**exponent
    shape = draw(st.sampled_from(["random", "constant", "constant_runs"]))
    if shape == "constant":
        x = torch.full_like(x, x[0].item())
    elif shape == "constant_runs":
        x = x[torch.arange(n) // 5 * 5]
    return x.to(dtype)


@settings(max_examples=150, deadline=None)
@given(x=gradients(), bits=st.integers(1, 8), bucket=st.integers(0, 70),
       header=st.sampled_from(["fp32", "fp16"]), seed=st.integers(0, 1000))
def test_kbit_decode_lands_on_a_neighbouring_level(x, bits, bucket, header, seed):
    n = x.numel()
    comp = get_compressor("kbit", bits=bits, bucket_size=bucket, header_dtype=header)
    x32 = x.double()
    # beyond fp16 headers' range: covered by test_fp16_overflow_is_loud
    assume(not (header == "fp16" and x32.abs().max() * 2 > 65504 / 2))
    payload = comp.encode(x, generator=torch.Generator().manual_seed(seed))
    assert payload.nbytes == comp.payload_nbytes(n)
    y = comp.decode(payload)
    assert y.dtype == torch.float32 and y.shape == (n,) and torch.isfinite(y).all()
    a, b = headers(comp, payload)
    assert (a >= 0).all()
    idx = torch.arange(n) // (bucket or n)
    a_i, b_i = a[idx], b[idx]
    levels = (1 << bits) - 1
    g = x.float().double()  # what the quantiser sees
    # outward rounding (MATH 4e): the levels cover every coordinate of the bucket
    assert (b_i <= x32).all() and (b_i + levels * a_i >= g - 1e-7 * g.abs() - TINY32).all()
    # the decode is a level adjacent to g: within one spacing, plus float32 rounding
    tol = a_i * (1 + 1e-6) + 4 * EPS32 * (g.abs() + b_i.abs() + levels * a_i) + TINY32
    assert ((y.double() - g).abs() <= tol).all()
    # and it is a level: b + t a for an integer t in 0..L (up to float32 rounding)
    rounding = 4 * EPS32 * (b_i.abs() + levels * a_i) + TINY32
    dev = y.double() - b_i
    assert (dev >= -rounding).all() and (dev <= levels * a_i + rounding).all()
    t = torch.where(a_i > 0, dev / torch.where(a_i > 0, a_i, 1), 0)
    assert ((t - t.round()).abs() * a_i <= rounding).all()


@settings(max_examples=60, deadline=None)
@given(value=st.floats(allow_nan=False, allow_infinity=False, width=32), n=st.integers(1, 100),
       bits=st.integers(1, 8), bucket=st.integers(0, 40))
def test_constant_vector_decodes_exactly(value, n, bits, bucket):
    """MATH 4d: a = 0 sends no information and the decode is exactly b (= the value)."""
    comp = get_compressor("kbit", bits=bits, bucket_size=bucket)
    x = torch.full((n,), value, dtype=torch.float32)
    payload = comp.encode(x, generator=torch.Generator().manual_seed(0))
    a, _ = headers(comp, payload)
    assert (a == 0).all()
    assert torch.equal(comp.decode(payload), x)


@settings(max_examples=60, deadline=None)
@given(x=gradients(), name=st.sampled_from(["none", "fp16", "bf16", "sign"]),
       bucket=st.integers(0, 70))
def test_other_compressors_any_input(x, name, bucket):
    comp = get_compressor(name, bucket_size=bucket)
    assume(not (name == "fp16" and x.double().abs().max() > 6e4))  # beyond fp16's range
    payload = comp.encode(x, generator=torch.Generator().manual_seed(0))
    assert payload.nbytes == comp.payload_nbytes(x.numel())
    y = comp.decode(payload)
    assert y.dtype == torch.float32 and y.shape == x.shape
    if name == "none":
        assert torch.equal(y, x.float())
    elif name in ("fp16", "bf16"):
        dtype = torch.float16 if name == "fp16" else torch.bfloat16
        assert torch.equal(y, x.to(dtype).float())
    else:
        assert ((y >= 0) == (x >= 0)).all()


def test_fp16_header_rounds_outward():
    """MATH 4e: b rounded down, a + b rounded up, the draws use the values actually sent."""
    comp = get_compressor("onebit", header_dtype="fp16")
    x = torch.tensor([0.1, 0.3, 0.7], dtype=torch.float32)
    payload = comp.encode(x, generator=torch.Generator().manual_seed(0))
    a, b = headers(comp, payload)
    assert b.item() < 0.1 and b.item() == torch.tensor(0.1).half().double().item()  # 0.1 -> down
    assert b.item() + a.item() >= 0.7
    assert a.item() == pytest.approx(0.6, rel=2e-3)
    nearest = get_compressor("onebit")
    exact = nearest.encode(x, generator=torch.Generator().manual_seed(0))
    assert headers(nearest, exact)[1].item() == torch.tensor(0.1).item()


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_input_dtype_gives_float32_on_same_device(dtype):
    x = torch.linspace(-1, 1, 29, dtype=dtype)
    for name in ("none", "fp16", "bf16", "onebit", "kbit", "sign"):
        comp = get_compressor(name, bits=3, bucket_size=8)
        payload = comp.encode(x, generator=torch.Generator().manual_seed(0))
        assert payload.to_tensor().device == x.device
        y = comp.decode(payload)
        assert y.dtype == torch.float32 and y.device == x.device


def test_non_float_input_rejected():
    with pytest.raises(ValueError, match="int64"):
        get_compressor("onebit").encode(torch.arange(5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_stay_on_the_gpu():
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1000, device="cuda")
    for name in ("none", "fp16", "bf16", "onebit", "kbit", "sign"):
        comp = get_compressor(name, bits=2, bucket_size=64)
        payload = comp.encode(x, generator=gen)
        assert payload.to_tensor().is_cuda
        assert comp.decode(payload).is_cuda
        assert comp.decode_mean(torch.stack([payload.to_tensor()] * 3)).is_cuda
