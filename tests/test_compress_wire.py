"""Payload sizes, the wire layout, validation of malformed payloads, non-finite handling."""

from __future__ import annotations

import struct

import pytest
import torch

from dist_quant.compress import available_compressors, fast, get_compressor, wire
from dist_quant.errors import ConfigError, NonFiniteGradientError, PayloadError

ALL = [
    ("none", {}),
    ("fp16", {}),
    ("bf16", {}),
    ("onebit", {}),
    ("onebit", dict(bucket_size=512)),
    ("onebit", dict(bucket_size=100, header_dtype="fp16")),
    ("kbit", dict(bits=2, bucket_size=64)),
    ("kbit", dict(bits=3, bucket_size=10)),
    ("kbit", dict(bits=8)),
    ("sign", dict(bucket_size=33)),
]


def expected_nbytes(name, options, n):
    """The documented formula, written out independently of the code."""
    if name == "none":
        return 32 + 4 * n
    if name in ("fp16", "bf16"):
        return 32 + 2 * n
    d = options.get("bucket_size") or n
    nb = -(-n // d) if n else 0
    h = 2 if options.get("header_dtype") == "fp16" else 4
    k = 1 if name in ("onebit", "sign") else options["bits"]
    headers = nb * h * (1 if name == "sign" else 2)
    return 32 + headers + -(-n * k // 8)


def test_registry_names():
    assert set(available_compressors()) == {"none", "fp16", "bf16", "onebit", "kbit", "sign",
                                            "qsgd", "terngrad", "topk", "randk"}


@pytest.mark.parametrize("name,options", ALL)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 100, 1001])
def test_exact_payload_sizes(name, options, n):
    comp = get_compressor(name, **options)
    assert comp.payload_nbytes(n) == expected_nbytes(name, options, n)
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    p = comp.encode(x, generator=torch.Generator().manual_seed(1))
    assert p.nbytes == comp.payload_nbytes(n) == p.to_tensor().numel()
    assert p.to_tensor().dtype == torch.uint8
    y = comp.decode(p.to_tensor().clone())
    assert y.dtype == torch.float32 and y.shape == (n,)
    assert torch.equal(y, comp.decode(p))


def test_onebit_is_ceil_n_over_8_plus_headers():
    """MATH 4i: 1 bit per coordinate packed 8 per byte, plus the headers."""
    comp = get_compressor("onebit")
    for n in (1, 8, 9, 1000, 12345):
        assert comp.payload_nbytes(n) == 32 + 8 + -(-n // 8)


def test_layout_matches_docstring():
    comp = get_compressor("kbit", bits=2, bucket_size=4)
    g = torch.tensor([0.0, 1.0, 2.0, 3.0, -1.0, -1.0])
    data = comp.encode(g, generator=torch.Generator().manual_seed(0)).to_tensor()
    version, cid, flags, bits, hdt, n, d, count = struct.unpack("<BBBBB3xQQQ",
                                                               bytes(data[:32].tolist()))
    assert (version, cid, flags, bits, hdt, n, d, count) == (1, 3, 0, 2, 0, 6, 4, 0)
    a = torch.frombuffer(bytearray(bytes(data[32:40].tolist())), dtype=torch.float32)
    b = torch.frombuffer(bytearray(bytes(data[40:48].tolist())), dtype=torch.float32)
    assert a.tolist() == [1.0, 0.0] and b.tolist() == [0.0, -1.0]
    # levels are exact, so the draws cannot move them: t = 0, 1, 2, 3, 0, 0 (2 bits, LSB first)
    assert data[48:].tolist() == [0b11100100, 0b0000]


def test_pack_unpack_roundtrip_every_width():
    gen = torch.Generator().manual_seed(0)
    for k in range(1, 9):
        for n in (1, 5, 8, 13, 64):
            v = torch.randint(0, 1 << k, (n,), generator=gen)
            packed = wire.pack_bits(v, k)
            assert packed.numel() == -(-n * k // 8)
            assert torch.equal(wire.unpack_bits(packed, n, k).long(), v)


def test_unknown_name_and_bad_options_name_the_option():
    with pytest.raises(ConfigError, match="compressor"):
        get_compressor("twobit")
    with pytest.raises(ConfigError, match="bits"):
        get_compressor("kbit", bits=9)
    with pytest.raises(ConfigError, match="bucket_size"):
        get_compressor("onebit", bucket_size=-1)
    with pytest.raises(ConfigError, match="header_dtype"):
        get_compressor("onebit", header_dtype="fp8")
    with pytest.raises(ConfigError, match="bucketsize"):
        get_compressor("onebit", bucketsize=3)


def good_payload(name="onebit", **options):
    comp = get_compressor(name, **options)
    x = torch.randn(50, generator=torch.Generator().manual_seed(0))
    return comp, comp.encode(x, generator=torch.Generator().manual_seed(0)).to_tensor().clone()


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d[:-1], "wrong payload length"),
    (lambda d: torch.cat([d, d[:1]]), "wrong payload length"),
    (lambda d: d[:10], "shorter than"),
    (lambda d: d.index_fill(0, torch.tensor([0]), 9), "unknown payload version 9"),
    (lambda d: d.index_fill(0, torch.tensor([1]), 77), "unknown compressor id 77"),
    (lambda d: d.index_fill(0, torch.tensor([1]), 0), "encoded by compressor 'none'"),
    (lambda d: d.index_fill(0, torch.tensor([2]), 0x80), "unknown flag"),
    (lambda d: d.index_fill(0, torch.tensor([3]), 2), "bits is 2"),
    (lambda d: d.index_fill(0, torch.tensor([6]), 1), "reserved"),
    (lambda d: d.index_fill(0, torch.tensor([8]), 200), "wrong payload length"),
])
def test_malformed_payloads_rejected(mutate, message):
    comp, data = good_payload(bucket_size=16)
    with pytest.raises(PayloadError, match=message):
        comp.decode(mutate(data))


def _set_scale(data, value, offset=32):
    data = data.clone()
    raw = torch.frombuffer(bytearray(struct.pack("<f", value)), dtype=torch.uint8)
    data[offset:offset + 4] = raw
    return data


@pytest.mark.parametrize("value,message", [
    (float("nan"), "non-finite scale"), (float("inf"), "non-finite scale"),
    (-1.0, "negative scale"),
])
def test_bad_scale_rejected(value, message):
    comp, data = good_payload(bucket_size=16)
    with pytest.raises(PayloadError, match=message):
        comp.decode(_set_scale(data, value))
    comp, data = good_payload("sign", bucket_size=16)
    with pytest.raises(PayloadError, match=message):
        comp.decode(_set_scale(data, value))


def test_bad_offset_rejected():
    comp, data = good_payload(bucket_size=16)  # 4 buckets: b starts at 32 + 16
    with pytest.raises(PayloadError, match="non-finite offset"):
        comp.decode(_set_scale(data, float("nan"), offset=48))


def test_wrong_type_rejected():
    comp, data = good_payload()
    with pytest.raises(PayloadError, match="uint8"):
        comp.decode(data.float())


@pytest.mark.parametrize("name,options", ALL)
def test_nonfinite_encode_raises_with_count(name, options):
    comp = get_compressor(name, **options)
    x = torch.randn(40)
    x[[3, 7, 30]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    with pytest.raises(NonFiniteGradientError, match="3 non-finite") as info:
        comp.encode(x, generator=torch.Generator().manual_seed(0))
    assert (info.value.count, info.value.numel) == (3, 40)


@pytest.mark.parametrize("name,options", ALL)
def test_nonfinite_payload(name, options):
    comp = get_compressor(name, **options)
    p = comp.nonfinite_payload(123, 5)
    assert p.nbytes == comp.payload_nbytes(123)
    with pytest.raises(NonFiniteGradientError) as info:
        comp.decode(p)
    assert (info.value.count, info.value.numel) == (5, 123)


def test_decode_mean_matches_mean_of_decodes_and_names_bad_rows():
    comp = get_compressor("kbit", bits=2, bucket_size=16)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(100, generator=gen) for _ in range(5)]
    rows = torch.stack([comp.encode(x, generator=gen).to_tensor() for x in xs])
    expected = torch.stack([comp.decode(r) for r in rows]).mean(0)
    torch.testing.assert_close(comp.decode_mean(rows), expected, rtol=1e-6, atol=1e-6)
    out = torch.empty(100)
    assert comp.decode_mean(rows, out=out).data_ptr() == out.data_ptr()
    bad = rows.clone()
    bad[3, 0] = 2
    with pytest.raises(PayloadError, match="row 3: unknown payload version"):
        comp.decode_mean(bad)
    bad = rows.clone()
    bad[2] = comp.nonfinite_payload(100, 4).to_tensor()
    with pytest.raises(NonFiniteGradientError, match="row 2") as info:
        comp.decode_mean(bad)
    assert info.value.count == 4


@pytest.mark.parametrize("name,options", ALL)
def test_decode_mean_every_compressor(name, options):
    comp = get_compressor(name, **options)
    gen = torch.Generator().manual_seed(0)
    rows = torch.stack([comp.encode(torch.randn(37, generator=gen), generator=gen).to_tensor()
                        for _ in range(3)])
    expected = torch.stack([comp.decode(r) for r in rows]).mean(0)
    torch.testing.assert_close(comp.decode_mean(rows), expected, rtol=1e-6, atol=1e-6)


def test_fp16_overflow_is_loud():
    with pytest.raises(wire.WireRangeError, match="fp16"):
        get_compressor("fp16").encode(torch.tensor([1e5, 1.0]))
    with pytest.raises(wire.WireRangeError, match="header_dtype fp16"):
        get_compressor("onebit", header_dtype="fp16").encode(torch.tensor([-7e4, 7e4]))


@pytest.mark.parametrize("name,options", ALL)
def test_decode_into_a_reused_buffer(name, options):
    comp = get_compressor(name, **options)
    x = torch.randn(77, generator=torch.Generator().manual_seed(0))
    payload = comp.encode(x, generator=torch.Generator().manual_seed(1))
    out = torch.full((77,), float("nan"))
    y = comp.decode(payload, out=out)
    assert y.data_ptr() == out.data_ptr() and torch.equal(out, comp.decode(payload))
    with pytest.raises(ValueError, match="77 elements"):
        comp.decode(payload, out=torch.empty(76))


@pytest.mark.parametrize("path", ["torch", "c"])
def test_decode_mean_names_the_row_with_a_bad_scale(path):
    """Rows with identical fixed headers are validated once, their scales row by row."""
    if path == "c" and fast.mode() == "torch":
        pytest.skip("pure-torch path forced")
    comp = get_compressor("onebit", bucket_size=16)
    gen = torch.Generator().manual_seed(0)
    rows = torch.stack([comp.encode(torch.randn(50, generator=gen), generator=gen).to_tensor()
                        for _ in range(4)])
    rows[2] = _set_scale(rows[2], float("nan"))
    with fast.use(path), pytest.raises(PayloadError, match="row 2: non-finite scale"):
        comp.decode_mean(rows)
