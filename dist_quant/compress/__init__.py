"""Gradient compressors and their registry.

>>> from dist_quant.compress import get_compressor
>>> comp = get_compressor("onebit", bucket_size=512)
>>> payload = comp.encode(grad, generator=gen)          # doctest: +SKIP
>>> comp.decode(payload.to_tensor())                    # doctest: +SKIP

Names: ``none`` (fp32), ``fp16``, ``bf16``, ``onebit`` (the unbiased 1-bit rule, per bucket),
``kbit`` (``bits`` in 1..8), ``sign`` (scaled sign, biased), and the baselines ``qsgd`` (norm
scaling, ``levels`` s; unbiased), ``terngrad`` (ternary, max scaling; unbiased), ``topk`` (the
``ratio`` n largest coordinates; biased, meant for error feedback) and ``randk`` (``ratio`` n
random coordinates rescaled by n / k; unbiased). Options, all keyword:

- ``bucket_size`` (onebit, kbit, sign, qsgd, terngrad): coordinates per header; ``None`` or 0 =
  whole tensor.
- ``bits`` (kbit): 1..8; ``onebit`` is ``kbit`` with ``bits=1`` (same code, same payload).
- ``header_dtype`` (onebit, kbit, sign, qsgd, terngrad): ``fp32`` (default), ``fp16`` or
  ``bf16``.
- ``levels`` (qsgd): s in 1..32767 (default 4).
- ``ratio`` (topk, randk): fraction of coordinates sent, in (0, 1] (default 0.01).
- ``error_feedback`` (all): wrap in :class:`ErrorFeedback`.

Options a compressor does not use are ignored, so a caller may pass one configuration's worth to
any name; unknown option names and out-of-range values raise :class:`ConfigError` naming them.
Wire layout: :mod:`dist_quant.compress.wire`; mathematics: :mod:`dist_quant.compress.quantize`.

What a compressor is (unbiased, contractive, its variance factor, its wire id, its label, whether
the DDP hook may slice it): properties of its class, :mod:`dist_quant.compress.base`. A new
compressor is its module (a :class:`Compressor` subclass with its ``wire_id``) and one line in
``_REGISTRY`` below, or one call of :func:`register_compressor`::

    register_compressor("int8", lambda **o: Int8Compressor(o.get("bucket_size") or 0))
"""

from __future__ import annotations

from collections.abc import Callable

from dist_quant.compress.base import Compressor
from dist_quant.compress.error_feedback import ErrorFeedback
from dist_quant.compress.floats import BF16Compressor, FP16Compressor, NoneCompressor
from dist_quant.compress.qsgd import MAX_LEVELS, QSGDCompressor
from dist_quant.compress.quantize import KBitCompressor, OneBitCompressor
from dist_quant.compress.randk import RandKCompressor
from dist_quant.compress.sign import SignCompressor
from dist_quant.compress.terngrad import TernGradCompressor
from dist_quant.compress.topk import TopKCompressor
from dist_quant.compress.wire import HEADER_DTYPES, Payload
from dist_quant.errors import ConfigError, WireRangeError

OPTIONS = ("bucket_size", "bits", "header_dtype", "error_feedback", "levels", "ratio")
DEFAULT_LEVELS = 4
DEFAULT_RATIO = 0.01


def _bucket(bucket_size: int | None) -> int:
    if bucket_size is None:
        return 0
    if isinstance(bucket_size, bool) or not isinstance(bucket_size, int) or bucket_size < 0:
        raise ConfigError("bucket_size", f"must be an integer >= 0 (0 or None = whole tensor); "
                          f"got {bucket_size!r}")
    return bucket_size


def _header(header_dtype: str | None) -> str:
    if header_dtype is None:
        return "fp32"
    if header_dtype not in HEADER_DTYPES:
        raise ConfigError("header_dtype", f"must be one of {', '.join(HEADER_DTYPES)}; "
                          f"got {header_dtype!r}")
    return header_dtype


def _bits(bits: int | None) -> int:
    if bits is None:
        raise ConfigError("bits", "kbit needs bits in 1..8")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ConfigError("bits", f"must be an integer in 1..8; got {bits!r}")
    return bits


def _levels(levels: int | None) -> int:
    if levels is None:
        return DEFAULT_LEVELS
    if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= MAX_LEVELS:
        raise ConfigError("levels", f"must be an integer in 1..{MAX_LEVELS}; got {levels!r}")
    return levels


def _ratio(ratio: float | None) -> float:
    if ratio is None:
        return DEFAULT_RATIO
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ConfigError("ratio", f"must be a fraction in (0, 1]; got {ratio!r}")
    return float(ratio)


_REGISTRY: dict[str, Callable[..., Compressor]] = {
    "none": lambda **o: NoneCompressor(),
    "fp16": lambda **o: FP16Compressor(),
    "bf16": lambda **o: BF16Compressor(),
    "onebit": lambda **o: OneBitCompressor(_bucket(o.get("bucket_size")),
                                           _header(o.get("header_dtype"))),
    "kbit": lambda **o: KBitCompressor(_bits(o.get("bits")), _bucket(o.get("bucket_size")),
                                       _header(o.get("header_dtype"))),
    "sign": lambda **o: SignCompressor(_bucket(o.get("bucket_size")),
                                       _header(o.get("header_dtype"))),
    "qsgd": lambda **o: QSGDCompressor(_levels(o.get("levels")), _bucket(o.get("bucket_size")),
                                       _header(o.get("header_dtype"))),
    "terngrad": lambda **o: TernGradCompressor(_bucket(o.get("bucket_size")),
                                               _header(o.get("header_dtype"))),
    "topk": lambda **o: TopKCompressor(_ratio(o.get("ratio"))),
    "randk": lambda **o: RandKCompressor(_ratio(o.get("ratio"))),
}


def register_compressor(name: str, factory: Callable[..., Compressor]) -> None:
    """Make ``factory(**options)`` the compressor called ``name`` (the options of the module
    docstring, all keyword, those it does not use ignored). A name already taken is refused
    (``ValueError``)."""
    if not name or name in _REGISTRY:
        raise ValueError(f"compressor name {name!r} is empty or taken")
    _REGISTRY[name] = factory


def unregister_compressor(name: str) -> None:
    """Forget a compressor added with :func:`register_compressor`."""
    _REGISTRY.pop(name, None)


def available_compressors() -> tuple[str, ...]:
    """Registered compressor names."""
    return tuple(_REGISTRY)


def get_compressor(name: str, **options) -> Compressor | ErrorFeedback:
    """A compressor by name; see the module docstring for the options."""
    if name not in _REGISTRY:
        raise ConfigError("compressor", f"must be one of {', '.join(_REGISTRY)}; got {name!r}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(unknown[0], f"unknown compressor option (known: {', '.join(OPTIONS)})")
    compressor = _REGISTRY[name](**options)
    return ErrorFeedback(compressor) if options.get("error_feedback") else compressor


__all__ = [
    "Compressor",
    "ErrorFeedback",
    "Payload",
    "WireRangeError",
    "available_compressors",
    "get_compressor",
    "register_compressor",
    "unregister_compressor",
]
