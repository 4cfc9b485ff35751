"""The decoder fuzzer shared by the bounded test (``tests/test_compress_fuzz.py``) and the long
runs (``benchmarks/fuzz_decoders.py``).

Every example starts from a real payload (a tensor of some size encoded by one of the
configurations below, with its bucket size and header dtype), then mutates its bytes: bit
flips, byte overwrites, truncation, extension, the fixed header (or a prefix) of another
compressor's payload spliced in, header fields set to edge values (0, 1, huge, "negative" as
two's complement, off by one), the per-bucket reals set to NaN, Inf, negative, the largest or
the smallest values of their type, the sparse indices set out of range or out of order. The
mutated bytes then go to every entry point a receiver uses:

- ``wire.read_header`` / ``Payload`` (the fixed header parser);
- ``check``, ``decode``, ``decode(out=...)`` of the payload, aligned and at an odd address;
- ``decode_mean`` of a batch of rows (the mutated one among good ones), with and without
  ``out``;

each on the pure-torch path and on the compiled C kernels. The contract (:func:`run_example`):
a call either returns a float32 tensor of the header's ``n`` coordinates, all finite, or raises
the project's own error (:class:`PayloadError`, :class:`WireRangeError`, or
:class:`NonFiniteGradientError` for a payload flagged non-finite); ``check`` raises exactly
when ``decode`` does; ``decode_mean`` raises exactly when one of its rows would, and otherwise
equals the rows' decodes summed in row order from zero and divided by W (so a mean can
overflow only where that sum of finite rows does); an unmutated payload decodes as before.
Anything else (another exception, a non-finite or wrongly sized result) fails the example.
Crashes, hangs and out-of-bounds accesses are caught outside: by the process dying, by
``faulthandler``'s timer, and by AddressSanitizer (``benchmarks/fuzz_decoders.py --asan``).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from hypothesis import strategies as st

from dist_quant.compress import fast, get_compressor, wire
from dist_quant.errors import NonFiniteGradientError, PayloadError, WireRangeError

PROJECT_ERRORS = (PayloadError, WireRangeError, NonFiniteGradientError)

# decoder name -> the configurations (compressor name, options) fuzzed under it
DECODERS: dict[str, list[tuple[str, dict]]] = {
    "none": [("none", {})],
    "fp16": [("fp16", {})],
    "bf16": [("bf16", {})],
    "onebit": [("onebit", {}), ("onebit", dict(bucket_size=16)),
               ("onebit", dict(bucket_size=7, header_dtype="fp16")),
               ("onebit", dict(bucket_size=512, header_dtype="bf16")),
               ("onebit", dict(bucket_size=64, header_dtype="bf16"))],
    "kbit": [("kbit", dict(bits=2, bucket_size=64)), ("kbit", dict(bits=3, bucket_size=10)),
             ("kbit", dict(bits=4, bucket_size=16, header_dtype="bf16")),
             ("kbit", dict(bits=5, header_dtype="fp16")), ("kbit", dict(bits=8)),
             ("kbit", dict(bits=8, bucket_size=32, header_dtype="bf16"))],
    "sign": [("sign", {}), ("sign", dict(bucket_size=33)),
             ("sign", dict(bucket_size=16, header_dtype="fp16")),
             ("sign", dict(bucket_size=128, header_dtype="bf16"))],
    "qsgd": [("qsgd", {}), ("qsgd", dict(levels=1, bucket_size=16)),
             ("qsgd", dict(levels=255, bucket_size=50, header_dtype="fp16")),
             ("qsgd", dict(levels=3, bucket_size=8, header_dtype="bf16")),
             ("qsgd", dict(levels=32767))],
    "terngrad": [("terngrad", {}), ("terngrad", dict(bucket_size=10, header_dtype="fp16")),
                 ("terngrad", dict(bucket_size=64, header_dtype="bf16"))],
    "topk": [("topk", dict(ratio=0.1)), ("topk", dict(ratio=1.0)), ("topk", {})],
    "randk": [("randk", dict(ratio=0.25)), ("randk", dict(ratio=0.5)), ("randk", {})],
    "header": [],  # the fixed header parser alone (every configuration's payloads)
}
CONFIGS = [config for configs in DECODERS.values() for config in configs]
PATHS = ("torch", "c")

U64 = (1 << 64) - 1
EDGE_INTS = [0, 1, 2, 7, 8, 15, 16, 17, 31, 32, 33, 255, 256, 65535, (1 << 31) - 1, 1 << 31,
             (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63, U64 - 1, U64]
# fixed header fields: name -> (byte offset, byte size)
FIELDS = {"version": (0, 1), "compressor": (1, 1), "flags": (2, 1), "bits": (3, 1),
          "header_dtype": (4, 1), "reserved": (5, 3), "n": (8, 8), "bucket": (16, 8),
          "nonfinite": (24, 8)}
F32_EDGES = [math.nan, math.inf, -math.inf, -1.0, -0.0, 0.0, 3.4028234663852886e38, 1e38,
             -3.4028234663852886e38, 1.401298464324817e-45, 1.1754943508222875e-38, 65504.0,
             1e30, 2.0**100, -2.0**-130]
SIZES = [0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 50, 63, 64, 65, 100, 127, 129, 255, 256, 257,
         511, 512, 513, 1000, 1025, 4096, 4099]
BIG_SIZES = [1 << 17, (1 << 17) + 13]  # split across threads by the compiled path


@dataclass
class Example:
    """One fuzz example: a configuration, the original payload, the mutated bytes and the
    recipe (for the corpus)."""

    config: tuple[str, dict]
    n: int
    original: bytes
    mutated: bytes
    recipe: list
    rows: list[bytes]  # good payloads of the same n, the batch decode_mean gets beside it
    slot: int  # the mutated payload's row in that batch


# ---- real payloads ----------------------------------------------------------------------------
def real_payload(config, n: int, seed: int, scale_exp: int) -> bytes:
    """The payload of a gaussian tensor of n coordinates scaled by 10**scale_exp (a smaller
    scale where the header type cannot hold it)."""
    comp = get_compressor(config[0], **config[1])
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen)
    for exp in (scale_exp, 0):
        try:
            data = comp.encode(x * 10.0 ** exp, generator=gen).to_tensor()
            return bytes(data.numpy().tobytes())
        except WireRangeError:
            continue
    raise AssertionError("a unit gaussian encodes")


# ---- mutations -----------------------------------------------------------------------------
def _put_int(data: bytearray, offset: int, size: int, value: int) -> None:
    if offset + size <= len(data):
        data[offset:offset + size] = (value % (1 << (8 * size))).to_bytes(size, "little")


def _real_size(config, original: bytes) -> tuple[int, str]:
    """The per-bucket reals' size and struct code of a payload (0 when it has none)."""
    if len(original) < wire.FIXED_NBYTES or config[0] in ("none", "fp16", "bf16", "topk",
                                                          "randk"):
        return 0, ""
    code = original[4]
    return (4, "<f") if code == 0 else (2, "<e" if code == 1 else "bf16")


def _pack_real(value: float, code: str) -> bytes:
    """``value`` in the real type ``code`` (a value beyond its range becomes +-Inf)."""
    try:
        raw = struct.pack("<f" if code == "bf16" else code, value)
    except OverflowError:
        raw = struct.pack("<f" if code == "bf16" else code, math.copysign(math.inf, value))
    return raw[2:] if code == "bf16" else raw


def apply(recipe: list, config, original: bytes, donors: list[bytes]) -> bytes:
    """Apply a recipe of mutations (see :func:`mutations`) to the original bytes."""
    data = bytearray(original)
    for op, *args in recipe:
        if op == "flip":
            pos, bit = args
            if data:
                data[pos % len(data)] ^= 1 << bit
        elif op == "byte":
            pos, value = args
            if data:
                data[pos % len(data)] = value
        elif op == "truncate":
            del data[args[0] % (len(data) + 1):]
        elif op == "extend":
            data.extend(args[0])
        elif op == "splice":
            donor, count = donors[args[0] % len(donors)], args[1]
            data[:count] = donor[:count]
        elif op == "field":
            name, value = args
            offset, size = FIELDS[name]
            _put_int(data, offset, size, value)
        elif op == "real":
            size, code = _real_size(config, original)
            index, value = args
            count = (len(data) - wire.FIXED_NBYTES) // size if size else 0
            if count:
                at = wire.FIXED_NBYTES + size * (index % min(count, 64))
                data[at:at + size] = _pack_real(value, code)
        elif op == "index":  # the sparse formats: the i-th int32 index
            index, value = args
            count = (len(data) - wire.FIXED_NBYTES) // 8
            if count:
                at = wire.FIXED_NBYTES + 4 * (index % count)
                data[at:at + 4] = (value % (1 << 32)).to_bytes(4, "little")
        elif op == "value":  # the sparse formats: the i-th float32 value
            index, value = args
            count = (len(data) - wire.FIXED_NBYTES) // 8
            if count:
                at = wire.FIXED_NBYTES + 4 * count + 4 * (index % count)
                data[at:at + 4] = _pack_real(value, "<f")
        else:
            raise ValueError(op)
    return bytes(data)


def mutations() -> st.SearchStrategy:
    """One mutation (a list: the corpus stores recipes as JSON)."""
    pos = st.integers(0, 1 << 20)
    edge_or_any = st.one_of(st.sampled_from(EDGE_INTS), st.integers(0, U64))
    return st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(0, 7)),
        st.tuples(st.just("flip"), st.integers(0, 40), st.integers(0, 7)),  # the header
        st.tuples(st.just("byte"), pos, st.integers(0, 255)),
        st.tuples(st.just("truncate"), pos),
        st.tuples(st.just("extend"), st.binary(min_size=1, max_size=40)),
        st.tuples(st.just("splice"), st.integers(0, 64), st.sampled_from([8, 16, 24, 32, 48])),
        st.tuples(st.just("field"), st.sampled_from(sorted(FIELDS)), edge_or_any),
        st.tuples(st.just("real"), st.integers(0, 63), st.one_of(
            st.sampled_from(F32_EDGES), st.floats(allow_nan=True, allow_infinity=True))),
        st.tuples(st.just("index"), st.integers(0, 1 << 16), st.one_of(
            st.sampled_from([-1, 0, 1, 1 << 31, (1 << 31) - 1, 1 << 16]),
            st.integers(-(1 << 31), (1 << 32) - 1))),
        st.tuples(st.just("value"), st.integers(0, 1 << 16), st.sampled_from(F32_EDGES)),
    ).map(list)


@st.composite
def examples(draw, configs=None, big: bool = True) -> Example:
    """A configuration, a real payload of it and a mutated copy (see the module docstring)."""
    config = draw(st.sampled_from(configs or CONFIGS))
    sizes = SIZES + BIG_SIZES if big else SIZES
    n = draw(st.sampled_from(sizes) | st.integers(0, 600))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([0, 0, -20, -40, 4, 30, 37]))
    original = real_payload(config, n, seed, scale)
    donor_configs = draw(st.lists(st.sampled_from(CONFIGS), min_size=1, max_size=2))
    donors = [real_payload(c, draw(st.sampled_from(SIZES)), seed + 1, 0) for c in donor_configs]
    recipe = draw(st.lists(mutations(), min_size=0, max_size=4))
    mutated = apply(recipe, config, original, donors)
    w = draw(st.integers(1, 3))
    rows = [real_payload(config, n, seed + 2 + i, scale) for i in range(w)]
    slot = draw(st.integers(0, w - 1))
    return Example(config, n, original, mutated, recipe, rows, slot)


# ---- the contract -------------------------------------------------------------------------------
def as_tensor(raw: bytes, offset: int = 0) -> torch.Tensor:
    """The bytes in a tensor of their own (so that a sanitizer sees its exact end), starting at
    byte ``offset`` of its storage (an unaligned payload for odd offsets)."""
    buf = torch.empty(offset + len(raw), dtype=torch.uint8)
    if raw:
        buf[offset:].copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    return buf[offset:]


def batch_of(rows: list[bytes]) -> torch.Tensor:
    out = torch.empty(len(rows), len(rows[0]), dtype=torch.uint8)
    for i, raw in enumerate(rows):
        if raw:
            out[i].copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    return out


def outcome(fn):
    """``("ok", result)`` or ``("error", exception)`` for the project's errors; anything else
    propagates (a failure of the example)."""
    try:
        return "ok", fn()
    except PROJECT_ERRORS as err:
        return "error", err


class ContractError(AssertionError):
    pass


def _expect_finite(result, n: int, what: str) -> None:
    if not isinstance(result, torch.Tensor) or result.dtype != torch.float32:
        raise ContractError(f"{what}: returned {type(result).__name__} "
                            f"{getattr(result, 'dtype', '')}, not a float32 tensor")
    if result.numel() != n:
        raise ContractError(f"{what}: {result.numel()} coordinates, the header says n={n}")
    if not bool(torch.isfinite(result).all()):
        raise ContractError(f"{what}: non-finite value(s) in the decode")


def check_header(raw: bytes) -> wire.Header | None:
    """The fixed header parser on arbitrary bytes: a Header or PayloadError."""
    kind, header = outcome(lambda: wire.read_header(as_tensor(raw)))
    if kind == "ok":
        if header.pack() != raw[:wire.FIXED_NBYTES]:
            raise ContractError("the parsed header does not pack to the bytes it was read from")
        repr(wire.Payload(as_tensor(raw)))
        return header
    return None


def run_header_example(ex: Example, path: str) -> None:
    """The fixed header parser on the mutated bytes and on every prefix length around 32, and
    the decoder the header names (if any) refusing or decoding them."""
    header = check_header(ex.mutated)
    for cut in (0, 1, 31, 32, 33):
        check_header(ex.mutated[:cut])
    if header is not None and header.compressor_id in wire.COMPRESSOR_NAMES:
        for name, options in CONFIGS:
            comp = get_compressor(name, **options)
            if comp.wire_id == header.compressor_id:
                with fast.use(path):
                    kind, result = outcome(lambda comp=comp: comp.decode(as_tensor(ex.mutated)))
                if kind == "ok":
                    _expect_finite(result, header.n, f"{name} decode")


def run(decoder: str, ex: Example, path: str) -> None:
    """One example of ``decoder`` (a key of DECODERS) on ``path``."""
    if decoder == "header":
        run_header_example(ex, path)
    else:
        run_example(ex, path)


def run_example(ex: Example, path: str) -> None:
    """Every entry point on the mutated bytes (see the module docstring); raises ContractError
    (or whatever escaped) when the contract is broken."""
    name, options = ex.config
    comp = get_compressor(name, **options)
    check_header(ex.mutated)
    with fast.use(path):
        expected = comp.decode(as_tensor(ex.original))
        kind, result = outcome(lambda: comp.decode(as_tensor(ex.mutated)))
        checked, n = outcome(lambda: comp.check(as_tensor(ex.mutated)))
        if checked != kind:
            raise ContractError(f"check {checked} but decode {kind}")
        if kind == "ok":
            _expect_finite(result, n, "decode")
            if ex.mutated == ex.original and not torch.equal(result, expected):
                raise ContractError("the unmutated payload decodes differently")
            for offset in (1, 3):  # an unaligned payload decodes the same
                again = comp.decode(as_tensor(ex.mutated, offset))
                if not torch.equal(again, result):
                    raise ContractError(f"decode at byte offset {offset} differs")
        if kind == "ok":
            into = torch.full((n,), math.nan)
            k2, r2 = outcome(lambda: comp.decode(as_tensor(ex.mutated), out=into))
            if k2 != "ok" or not torch.equal(r2, result):
                raise ContractError("decode(out=...) differs from decode")
        size = (n if kind == "ok" else ex.n) + 1
        k3, _ = outcome(lambda: comp.decode(as_tensor(ex.mutated), out=torch.empty(size)))
        if k3 == "ok":
            raise ContractError(f"decode into an output of {size} coordinates succeeded")
        _check_mean(comp, ex, kind, result)


def _check_mean(comp, ex: Example, kind: str, result) -> None:
    rows = list(ex.rows)
    if len(ex.mutated) != len(rows[0]):  # a batch has rows of one length
        rows = [ex.mutated]
        slot = 0
    else:
        rows[ex.slot] = ex.mutated
        slot = ex.slot
    decodes = []
    for i, raw in enumerate(rows):
        if i == slot:
            decodes.append((kind, result))
        else:
            decodes.append(outcome(lambda raw=raw: comp.decode(as_tensor(raw))))
    batch = batch_of(rows)
    for use_out in (False, True):
        out = torch.full((ex.n,), math.nan) if use_out else None
        k, mean = outcome(lambda batch=batch, out=out: comp.decode_mean(batch, out=out))
        bad_rows = [i for i, (k_i, _) in enumerate(decodes) if k_i != "ok"]
        sizes = {d.numel() for k_i, d in decodes if k_i == "ok"}
        if use_out:
            sizes.add(ex.n)
        if k == "error":
            if not bad_rows and len(sizes) == 1:
                raise ContractError(f"decode_mean raised ({mean}) though every row decodes")
            continue
        if len(sizes) > 1:
            raise ContractError(f"decode_mean accepted rows of sizes {sorted(sizes)}")
        if bad_rows:
            raise ContractError(f"decode_mean accepted rows {bad_rows} that decode refuses")
        total = torch.zeros_like(decodes[0][1])
        for _, d in decodes:
            total.add_(d)
        want = total.div_(len(rows))
        if mean.numel() != want.numel() or not torch.equal(mean, want) and not (
                torch.isnan(mean).any() and torch.allclose(mean, want, equal_nan=True)):
            raise ContractError("decode_mean differs from the mean of the rows' decodes")
        if use_out and mean.data_ptr() != out.data_ptr():
            raise ContractError("decode_mean(out=...) did not write into out")


# ---- the corpus ------------------------------------------------------------------------------
def save_entry(folder: Path, stem: str, ex: Example, path: str, outcome_text: str) -> None:
    """One corpus (or failures) entry: ``<stem>.bin`` the mutated bytes, ``<stem>.json`` what
    replays it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.bin").write_bytes(ex.mutated)
    (folder / f"{stem}.json").write_text(json.dumps(
        {"config": ex.config, "n": ex.n, "path": path, "recipe": ex.recipe,
         "outcome": outcome_text, "original": ex.original.hex(),
         "rows": [r.hex() for r in ex.rows], "slot": ex.slot}, default=str))


def entries(folder: Path) -> list[Path]:
    """The entries under a corpus folder (``<decoder>/<stem>.json``)."""
    return sorted(p for p in folder.rglob("*.json") if not p.stem.endswith("-outcome"))


def replay_entry(meta: Path) -> None:
    """Run a stored entry again (its decoder is its folder's name); raises as run() does."""
    info = json.loads(meta.read_text())
    ex = Example(config=(info["config"][0], info["config"][1]), n=info["n"],
                 original=bytes.fromhex(info["original"]),
                 mutated=meta.with_suffix(".bin").read_bytes(), recipe=info["recipe"],
                 rows=[bytes.fromhex(r) for r in info["rows"]], slot=info["slot"])
    run(meta.parent.name, ex, info["path"])
