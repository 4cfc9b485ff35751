"""Fuzzed decoders (bounded run): every decoder and the fixed header parser fed mutated real
payloads refuse them with the project's own error or decode them to a finite tensor of the
declared size (the contract of :mod:`decoder_fuzz`); and the regressions the fuzzer found.

The run is derandomized (a fixed seed, no example database), so it cannot flake; the long runs
with their corpus are ``benchmarks/fuzz_decoders.py``.
"""

from __future__ import annotations

import json
import math
import struct
import tarfile
from pathlib import Path

import decoder_fuzz
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dist_quant.compress import fast, get_compressor, wire
from dist_quant.errors import PayloadError

FLT_MAX = torch.finfo(torch.float32).max
CORPUS = Path(__file__).resolve().parent.parent / "benchmarks" / "fuzz-2026-12-07" / \
    "corpus.tar.xz"
PATHS = ["torch", "c"]


def _paths():
    return ["torch"] if fast.mode() == "torch" else PATHS


@pytest.mark.parametrize("decoder", sorted(decoder_fuzz.DECODERS))
def test_mutated_payloads_are_refused_or_decode_finite(decoder):
    configs = decoder_fuzz.DECODERS[decoder] or None

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much])
    @given(ex=decoder_fuzz.examples(configs=configs, big=False), path=st.sampled_from(_paths()))
    def fuzz(ex, path):
        decoder_fuzz.run(decoder, ex, path)

    fuzz()


def test_the_recorded_corpus_replays(tmp_path):
    """One payload per distinct outcome of the long runs (benchmarks/fuzz-2026-12-07.md)."""
    with tarfile.open(CORPUS) as tar:
        tar.extractall(tmp_path, filter="data")
    stored = decoder_fuzz.entries(tmp_path)
    assert len(stored) > 100
    for meta in stored:
        if json.loads(meta.read_text())["path"] in _paths():
            decoder_fuzz.replay_entry(meta)


def _payload(name, n=50, **options):
    comp = get_compressor(name, **options)
    gen = torch.Generator().manual_seed(0)
    return comp, comp.encode(torch.randn(n, generator=gen), generator=gen).to_tensor().clone()


def _put(data, offset, raw):
    data = data.clone()
    data[offset:offset + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return data


@pytest.mark.parametrize("name", ["none", "fp16", "bf16"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_float_bodies_holding_nan_or_inf_are_refused(name, path, value):
    comp, data = _payload(name)
    raw = struct.pack("<f", value)
    raw = raw if name == "none" else (struct.pack("<e", value) if name == "fp16" else raw[2:])
    bad = _put(data, 32 + 3 * len(raw), raw)
    kept = torch.zeros(50)
    with fast.use(path):
        for call in (lambda: comp.decode(bad), lambda: comp.decode(bad, out=kept),
                     lambda: comp.check(bad)):
            with pytest.raises(PayloadError, match="1 non-finite value"):
                call()
        assert not kept.any()  # a refused payload leaves the caller's buffer as it was
        with pytest.raises(PayloadError, match="row 1: 1 non-finite value"):
            comp.decode_mean(torch.stack([data, bad, data]))
        assert torch.equal(comp.decode_mean(torch.stack([data, data])), comp.decode(data))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("header_dtype,value", [("fp32", 1e38), ("fp32", FLT_MAX),
                                                ("bf16", 3e38)])
def test_kbit_top_level_that_overflows_float32_is_refused(path, header_dtype, value):
    """Finite, non-negative a and finite b whose top level a L + b is Inf in float32."""
    comp, data = _payload("kbit", bits=3, bucket_size=10, header_dtype=header_dtype)
    raw = struct.pack("<f", value)
    bad = _put(data, 32, raw if header_dtype == "fp32" else raw[2:])
    with fast.use(path):
        with pytest.raises(PayloadError, match="top level a L \\+ b overflows"):
            comp.decode(bad)
        with pytest.raises(PayloadError, match="top level"):
            comp.check(bad)
        with pytest.raises(PayloadError, match="row 1: the top level"):
            comp.decode_mean(torch.stack([data, bad]))


def test_qsgd_top_level_that_overflows_float32_is_refused():
    """s / L * L rounds above the largest float32 for s = FLT_MAX and L = 32767."""
    comp, data = _payload("qsgd", levels=32767)
    bad = _put(data, 32, struct.pack("<f", FLT_MAX))
    for call in (comp.decode, comp.check, lambda p: comp.decode_mean(p.unsqueeze(0))):
        with pytest.raises(PayloadError, match="top level overflows"):
            call(bad)


def test_check_refuses_what_the_compiled_decode_refuses():
    """check() validates the per-bucket reals on the compiled path too (its decode validates
    them while converting, so check used to skip them)."""
    comp, data = _payload("onebit", bucket_size=16)
    bad = _put(data, 32, struct.pack("<f", -1.0))
    for path in PATHS:
        with fast.use(path), pytest.raises(PayloadError, match="negative scale"):
            comp.check(bad)


@pytest.mark.parametrize("name,options", [("none", {}), ("onebit", dict(bucket_size=16)),
                                          ("sign", {}), ("topk", dict(ratio=0.5))])
def test_a_payload_of_another_size_than_out_is_a_payload_error(name, options):
    comp, data = _payload(name, n=40, **options)
    with pytest.raises(PayloadError, match="n=40"):
        comp.decode(data, out=torch.empty(41))
    with pytest.raises(PayloadError, match="n=40"):
        comp.decode_mean(data.unsqueeze(0), out=torch.empty(39))
    with pytest.raises(ValueError, match="contiguous float32"):  # the caller's mistake
        comp.decode(data, out=torch.empty(40, dtype=torch.float64))


def test_decode_mean_of_empty_bucketed_payloads_on_the_torch_path():
    comp, data = _payload("onebit", n=0, bucket_size=16)
    with fast.use("torch"):
        assert comp.decode_mean(torch.stack([data, data])).numel() == 0


@pytest.mark.parametrize("header_dtype", ["fp16", "bf16"])
def test_sign_decode_mean_of_one_row_of_odd_length(header_dtype):
    """A [1, odd] batch: the scales are copied before being viewed as 16-bit values."""
    comp, data = _payload("sign", n=257, bucket_size=16, header_dtype=header_dtype)
    assert data.numel() % 2 == 1
    for path in _paths():
        with fast.use(path):
            assert torch.equal(comp.decode_mean(data.unsqueeze(0)), comp.decode(data))


def test_header_parser_round_trips_or_refuses():
    comp, data = _payload("kbit", bits=2, bucket_size=64)
    raw = bytes(data.numpy().tobytes())
    assert wire.read_header(data).pack() == raw[:32]
    for cut in (0, 1, 31):
        with pytest.raises(PayloadError, match="shorter than"):
            wire.read_header(decoder_fuzz.as_tensor(raw[:cut]))
