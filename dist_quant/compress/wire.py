"""The bytes that travel: the payload layout, its validation, and bit packing.

A payload is one flat ``torch.uint8`` tensor: exactly what is handed to the transport, and
exactly what ``payload.nbytes`` counts. What does not travel: the tensor's shape and dtype (the
receiver knows the flattened parameter layout; decodes are always float32) and the compressor's
options beyond those recorded below. All multi-byte fields are little-endian.

Fixed header, 32 bytes::

    offset  size  field
    0       1     version            (1)
    1       1     compressor id      0 none (fp32), 1 fp16, 2 bf16, 3 kbit (onebit = kbit, k=1),
                                     4 sign, 5 qsgd, 6 terngrad, 7 topk, 8 randk (each class
                                     declares its id: ``Compressor.wire_id``)
    2       1     flags              bit 0: non-finite gradient (no usable body; see below)
    3       1     bits per value     none 32, fp16/bf16 16, kbit k in 1..8, sign 1, qsgd
                                     1 + bit_length(s), terngrad 2, topk/randk 32
    4       1     header dtype       0 fp32, 1 fp16, 2 bf16 (of the per-bucket reals); 0 when
                                     the compressor has none
    5       3     reserved           zero
    8       8     n                  coordinates (uint64)
    16      8     bucket size d      coordinates per bucket, 0 = the whole tensor (uint64)
    24      8     non-finite count   how many NaN/Inf the worker saw; 0 unless flag bit 0

Body, by compressor (``nb = ceil(n / d)`` buckets, ``nb = 1`` when ``d = 0`` and ``n > 0``)::

    none        n float32 values                                      4 n bytes
    fp16, bf16  n 16-bit values                                       2 n bytes
    kbit        nb scales a, then nb offsets b (header dtype),        2 nb h + ceil(n k / 8)
                then the n level indices t, k bits each
    sign        nb scales s (header dtype), then n sign bits          nb h + ceil(n / 8)
    qsgd        nb norms (header dtype, rounded up), then n codes     nb h + ceil(n w / 8)
                of w = 1 + bit_length(s) bits: level << 1 | sign
    terngrad    the qsgd layout with s = 1 and max |g| as the scale   nb h + ceil(n 2 / 8)
    topk, randk k int32 indices (ascending), then k float32 values    8 k

``h`` is the header dtype's size (4 or 2 bytes); ``k = min(n, max(1, round(r n)))`` for
sparsity ratio ``r`` (0 when ``n = 0``). The levels ``s`` of qsgd and the ratio ``r`` do not
travel: both ends take them from the configuration, as they take the shape; a mismatch shows as
a wrong ``bits`` field or payload length, or as a level above ``s``, all rejected.

Packed values form one bit stream over the whole tensor (buckets are not padded): value ``i``
occupies stream bits ``[i k, (i + 1) k)``, least significant bit first, and stream bit ``j`` is bit
``j % 8`` of byte ``j // 8``. Padding bits of the last byte are zero. So a 1-bit payload of n
coordinates carries ``ceil(n / 8)`` bytes of bits plus its headers (MATH 4i).

What a decoder refuses (:class:`~dist_quant.errors.PayloadError`, checked before anything is
decoded, so a decode is always a finite float32 tensor of the header's ``n``): a fixed header
that differs from the one the decoder's compressor writes for that ``n`` (version, id, flags,
bits, header dtype, bucket size, reserved bytes), a length other than the one ``n`` needs, an
``n`` other than the one an ``out`` buffer holds; a NaN or Inf value of a float body; a
non-finite or negative scale, a non-finite offset, or a top level (``a L + b`` of kbit, ``s /
L * L`` of qsgd, in the decode's float32 arithmetic) that overflows float32; a qsgd level above
``s``; a sparse index out of range or out of order. A mean of rows that each decode finite can
still overflow float32 where their sum does.

A non-finite payload (``Compressor.nonfinite_payload``) has the usual length for its ``n`` so
that fixed-size collectives still line up; its body is zero and decoding it raises
:class:`~dist_quant.errors.NonFiniteGradientError` with the recorded count.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

import torch

from dist_quant.errors import PayloadError, WireRangeError  # noqa: F401 (wire.WireRangeError)

VERSION = 1
FIXED_HEADER = struct.Struct("<BBBBB3xQQQ")
FIXED_NBYTES = FIXED_HEADER.size  # 32
assert FIXED_NBYTES == 32

# wire format name <-> compressor id; each compressor class declares its own (``wire_id``, see
# dist_quant.compress.base), which registers it here when the class is defined
COMPRESSOR_IDS: dict[str, int] = {}
COMPRESSOR_NAMES: dict[int, str] = {}

HEADER_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HEADER_DTYPE_CODES = {"fp32": 0, "fp16": 1, "bf16": 2}

FLAG_NONFINITE = 1
KNOWN_FLAGS = FLAG_NONFINITE


def register_compressor_id(kind: str, compressor_id: int) -> None:
    """Record that payloads with ``compressor_id`` in their header were written by the wire
    format ``kind``. An id is one byte; an id or a name already taken by another is refused
    (``ValueError``)."""
    if isinstance(compressor_id, bool) or not isinstance(compressor_id, int) \
            or not 0 <= compressor_id <= 255:
        raise ValueError(f"compressor id of {kind!r} must be an integer in 0..255; got "
                         f"{compressor_id!r}")
    if not kind:
        raise ValueError(f"compressor id {compressor_id} needs the wire format's name (kind)")
    taken = COMPRESSOR_NAMES.get(compressor_id, kind)
    if taken != kind:
        raise ValueError(f"compressor id {compressor_id} is taken by {taken!r}")
    if COMPRESSOR_IDS.get(kind, compressor_id) != compressor_id:
        raise ValueError(f"wire format {kind!r} already has id {COMPRESSOR_IDS[kind]}")
    COMPRESSOR_IDS[kind] = compressor_id
    COMPRESSOR_NAMES[compressor_id] = kind


@dataclass(frozen=True)
class Header:
    """The fixed 32-byte header, parsed."""

    version: int
    compressor_id: int
    flags: int
    bits: int
    header_dtype: int
    n: int
    bucket_size: int
    nonfinite_count: int

    def pack(self) -> bytes:
        return FIXED_HEADER.pack(self.version, self.compressor_id, self.flags, self.bits,
                                 self.header_dtype, self.n, self.bucket_size,
                                 self.nonfinite_count)

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        if len(raw) < FIXED_NBYTES:
            raise PayloadError(f"payload holds {len(raw)} bytes, shorter than the "
                               f"{FIXED_NBYTES}-byte fixed header")
        if raw[5:8] != b"\0\0\0":
            raise PayloadError("reserved header bytes 5..7 are not zero")
        return cls(*FIXED_HEADER.unpack(raw[:FIXED_NBYTES]))

    @property
    def nonfinite(self) -> bool:
        return bool(self.flags & FLAG_NONFINITE)


class Payload:
    """The exact bytes of one encoded tensor (a flat uint8 tensor on the encoder's device)."""

    __slots__ = ("_data",)

    def __init__(self, data: torch.Tensor):
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise PayloadError(f"a payload is a flat uint8 tensor; got dtype {data.dtype} "
                               f"with shape {tuple(data.shape)}")
        self._data = data

    @property
    def nbytes(self) -> int:
        """Bytes handed to the transport for this payload."""
        return self._data.numel()

    def to_tensor(self) -> torch.Tensor:
        """The payload as a flat uint8 tensor of length ``nbytes`` (no copy)."""
        return self._data

    @property
    def header(self) -> Header:
        return read_header(self._data)

    def __repr__(self) -> str:
        h = self.header
        name = COMPRESSOR_NAMES.get(h.compressor_id, f"id {h.compressor_id}")
        return f"Payload({name}, n={h.n}, bits={h.bits}, nbytes={self.nbytes})"


def as_bytes(payload: Payload | torch.Tensor) -> torch.Tensor:
    """The flat uint8 tensor behind a payload or a uint8 tensor (validated for type)."""
    if isinstance(payload, Payload):
        return payload.to_tensor()
    if isinstance(payload, torch.Tensor):
        if payload.dtype != torch.uint8:
            raise PayloadError(f"payload tensor must be uint8, got {payload.dtype}")
        return payload if payload.dim() == 1 else payload.reshape(-1)
    raise PayloadError(f"expected a Payload or a uint8 tensor, got {type(payload).__name__}")


def read_header(data: torch.Tensor) -> Header:
    """Parse the fixed header of a payload tensor (copies 32 bytes to the host)."""
    return Header.unpack(read_fixed(data))


def read_fixed(data: torch.Tensor) -> bytes:
    """The raw fixed header of a payload tensor, unparsed (fewer bytes if it is shorter)."""
    count = min(data.numel(), FIXED_NBYTES)
    if data.device.type == "cpu" and data.is_contiguous():
        return ctypes.string_at(data.data_ptr(), count) if count else b""
    return bytes(data[:count].cpu().numpy().tobytes())


def header_n(raw: bytes) -> int:
    """The coordinate count ``n`` of a raw fixed header (at least 32 bytes)."""
    return int.from_bytes(raw[8:16], "little")


def fixed_headers(batch: torch.Tensor) -> list[bytes]:
    """The raw fixed headers of the rows of a ``[W, nbytes]`` uint8 batch, ``nbytes >= 32``
    (read in place on the CPU; one copy of the header columns to the host otherwise)."""
    if batch.device.type == "cpu" and batch.stride(1) == 1:
        base, stride = batch.data_ptr(), batch.stride(0)
        return [ctypes.string_at(base + row * stride, FIXED_NBYTES)
                for row in range(batch.shape[0])]
    return [row.tobytes() for row in batch[:, :FIXED_NBYTES].cpu().numpy()]


def new_payload(header: Header | bytes, nbytes: int, device: torch.device,
                zero_body: bool = True) -> torch.Tensor:
    """A uint8 buffer of ``nbytes`` bytes whose first 32 bytes hold ``header`` (parsed or
    packed); its body is zero, or left for the encoder to fill completely (``zero_body=False``)."""
    out = (torch.zeros if zero_body else torch.empty)(nbytes, dtype=torch.uint8, device=device)
    raw = header if isinstance(header, bytes) else header.pack()
    if out.device.type == "cpu":
        ctypes.memmove(out.data_ptr(), raw, FIXED_NBYTES)
    else:
        out[:FIXED_NBYTES].copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    return out


def view_as(data: torch.Tensor, start: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """``count`` values of ``dtype`` stored at byte ``start`` of ``data`` (copied if unaligned)."""
    size = dtype.itemsize
    chunk = data[start:start + count * size]
    if (chunk.storage_offset() % size) != 0:
        chunk = chunk.clone()
    return chunk.view(dtype)


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes of ``n`` values of ``bits`` bits each, packed into one stream: ``ceil(n bits / 8)``."""
    return (n * bits + 7) // 8


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers ``0 <= v < 2**bits`` into the stream described in the module docstring."""
    n = values.numel()
    v = values.reshape(-1).to(torch.uint8 if bits <= 8 else torch.int32)
    if bits == 1:
        stream = v
    else:
        shifts = torch.arange(bits, device=v.device, dtype=v.dtype)
        stream = ((v.unsqueeze(1) >> shifts) & 1).reshape(-1)
    nbytes = packed_nbytes(n, bits)
    pad = nbytes * 8 - stream.numel()
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=v.device)
    return (stream.reshape(nbytes, 8).to(torch.uint8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``n`` integers as uint8 (int32 if ``bits > 8``)."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(*packed.shape[:-1], -1)
    stream = stream[..., : n * bits]
    if bits == 1:
        return stream
    dtype = torch.uint8 if bits <= 8 else torch.int32
    weights = (torch.ones(bits, dtype=torch.int32, device=packed.device)
               << torch.arange(bits, device=packed.device, dtype=torch.int32))
    grouped = stream.reshape(*packed.shape[:-1], n, bits).to(torch.int32)
    return (grouped * weights).sum(-1).to(dtype)
