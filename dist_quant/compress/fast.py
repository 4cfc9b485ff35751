"""Compiled CPU path of the k-bit and sign compressors: build, load, dispatch.

The kernels (``kernels.c``, see :mod:`dist_quant.compress.kernels_c`) are compiled on first use
with the system C compiler (``$CC``, else ``cc``; no Python or torch headers)
into ``$DIST_QUANT_CACHE`` (default ``$XDG_CACHE_HOME/dist_quant`` or ``~/.cache/dist_quant``),
one shared library per source, flags and (for ``native``) CPU model, written atomically so that
processes starting together may all build. Later processes load the cached library. Calls go
through ctypes, which releases the GIL, so threads split a tensor.

``DIST_QUANT_KERNELS`` selects the path: ``auto`` (default: compiled if it builds, else pure
torch, with one RuntimeWarning), ``torch`` (always the pure-torch path), ``c`` (compiled or
raise), ``triton`` (the Triton kernels of :mod:`dist_quant.compress.gpu` for every tensor: CUDA
tensors take them under ``auto`` too; CPU tensors only under ``TRITON_INTERPRET=1``, for tests).
``DIST_QUANT_ISA`` (``native`` default, ``avx512``, ``avx2``, ``generic``) selects the level the
kernels are compiled for, so that every level can be tested and measured on one machine. The
compiled path serves CPU tensors of fp32/fp16/bf16 below 2^31 coordinates; fp64 tensors take
the pure-torch path. Every path produces the same payload bytes (same draws, same arithmetic).

What makes it fast: one pass per bucket where the bucket size is a multiple of 16 (min/max,
headers, draws and packing while the bucket sits in L1, in a loop with no bucket or tail logic;
the same for decoding and for the sign compressor's sum and bits), else per chunk of whole
buckets (while the chunk sits in L2); groups of 16 coordinates in native-width vectors at every
level; the bits of k = 1, 2 collected by movemask on x86; no
full-size float intermediates; fresh decode outputs advised onto transparent huge pages
(mapping fresh memory otherwise costs more than decoding into it); streaming stores into reused
buffers where ``NONTEMPORAL_BYTES`` enables them.

Threads: ``torch.get_num_threads()`` (the training processes set 1).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import os
import platform
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from dist_quant.compress import gpu, kernels_c, wire
from dist_quant.compress.draws import keys as draw_keys
from dist_quant.compress.kernels_c import SOURCE
from dist_quant.compress.rounding import header_values

# -funroll-loops: faster encoders (benchmarks/compress-2026-12-01.md), same arithmetic
CFLAGS = ["-O3", "-funroll-loops", "-fopenmp-simd", "-ffp-contract=off", "-fno-math-errno",
          "-Wno-psabi", "-shared", "-fPIC", "-std=gnu11"]
FUSED_TARGET = 32768  # coordinates per fused chunk (128 KiB of fp32: stays in L2)
MAX_BUCKETS_PER_CHUNK = 8192  # size of the kernel's stack arrays
MIN_PER_THREAD = 1 << 16
MAX_N = 1 << 31
# Decoded outputs this large bypass the caches (streaming stores through a block in L1), and
# only into buffers the caller reuses (never into fresh, not yet mapped pages). Off by default;
# a CPU where streaming pays can lower it.
NONTEMPORAL_BYTES = int(os.environ.get("DIST_QUANT_STREAMING_BYTES", 1 << 62))
# New outputs this large are advised onto transparent huge pages before the first write: the
# operating system then maps 2 MiB at a time instead of 4 KiB.
HUGE_PAGE_BYTES = 4 << 20
MODES = ("auto", "torch", "c", "triton")

_state: dict = {}  # path and level selected with use()
_loaded: dict = {}  # the libraries (per level) and the thread pool, once per process


def mode() -> str:
    value = _state.get("mode") or os.environ.get("DIST_QUANT_KERNELS", "auto")
    value = value.strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"DIST_QUANT_KERNELS must be one of {', '.join(MODES)}; got {value!r}")
    return value


def isa() -> str:
    """The ISA level the kernels are compiled for (``DIST_QUANT_ISA``, default native)."""
    value = _state.get("isa") or os.environ.get("DIST_QUANT_ISA", "native")
    value = value.strip().lower() or "native"
    kernels_c.level_flags(value)  # validates
    return value


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def cache_dir() -> Path:
    root = os.environ.get("DIST_QUANT_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dist_quant"


def build(force: bool = False, level: str | None = None,
          extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile the kernels for ``level`` (default :func:`isa`) or find them in the cache;
    returns the shared library's path. ``extra_flags`` go after the level's flags."""
    level = level or isa()
    cc = os.environ.get("CC", "cc")
    flags = [*CFLAGS, *kernels_c.level_flags(level), *extra_flags]
    machine = _cpu_id() if level == "native" else platform.machine()
    key = hashlib.sha256("\0".join([SOURCE, cc, *flags, machine]).encode()).hexdigest()[:16]
    target = cache_dir() / f"kernels-{level}-{key}.so"
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "kernels.c"
        src.write_text(SOURCE)
        out = Path(tmp) / "kernels.so"
        try:
            proc = subprocess.run([cc, *flags, str(src), "-o", str(out)], capture_output=True,
                                  text=True)
        except OSError as err:
            raise RuntimeError(f"no C compiler {cc!r} to build the kernels ({err})") from None
        if proc.returncode != 0:
            raise RuntimeError(f"compiling the k-bit kernels with {cc} failed:\n{proc.stderr}")
        os.replace(out, target)
    return target


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    i64, u32, i32, ptr = ctypes.c_int64, ctypes.c_uint32, ctypes.c_int, ctypes.c_void_p
    lib.dq_minmax.argtypes = [ptr, i64, i64, ptr]
    lib.dq_minmax.restype = i64
    lib.dq_quantize.argtypes = [ptr, i64, i32, ptr, ptr, u32, u32, ptr, i64, i64]
    lib.dq_quantize.restype = None
    lib.dq_encode_fused.argtypes = [ptr, i64, i64, i32, i32, u32, u32, ptr, ptr, ptr, i64, i64,
                                    i64]
    lib.dq_encode_fused.restype = i64
    lib.dq_decode.argtypes = [ptr, i64, i32, ptr, ptr, ptr, i64, i64, i32]
    lib.dq_decode.restype = None
    lib.dq_decode_mean.argtypes = [ptr, i64, i64, i64, i64, i32, ptr, ptr, ptr, i64, i64, i32]
    lib.dq_decode_mean.restype = None
    lib.dq_headers.argtypes = [ptr, ptr, i64, i64, i64, i32, i32, ptr, ptr]
    lib.dq_headers.restype = i64
    lib.dq_advise_huge.argtypes = [ptr, i64]
    lib.dq_advise_huge.restype = i32
    lib.dq_sign_encode.argtypes = [ptr, i64, i64, i32, ptr, ptr, i64, i64]
    lib.dq_sign_encode.restype = i64
    lib.dq_draws.argtypes = [u32, u32, i64, i64, ptr]
    lib.dq_draws.restype = None
    return lib


def load(level: str) -> ctypes.CDLL:
    """The kernels compiled for ``level``, built if needed (raises if the CPU cannot run them
    or the build fails)."""
    libs = _loaded.setdefault("libs", {})
    if level not in libs:
        if not kernels_c.cpu_runs(level):
            raise RuntimeError(f"this CPU cannot run DIST_QUANT_ISA={level}")
        libs[level] = _bind(build(level=level))
    return libs[level]


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None when the pure-torch path is selected or the build failed."""
    selected = mode()
    if selected in ("torch", "triton"):
        return None
    level = isa()
    key = ("lib", level)
    lib = _loaded.get(key)
    if lib is not None:
        return lib
    if key not in _loaded:
        try:
            _loaded[key] = load(level)
        except Exception as err:  # no compiler, read-only cache, ...: fall back, loudly
            _loaded[key] = None
            _loaded["error"] = err
            if selected != "c":
                warnings.warn(f"dist_quant: compiled k-bit kernels unavailable, using the "
                              f"pure-torch path ({err})", RuntimeWarning, stacklevel=2)
    if _loaded[key] is None and selected == "c":
        raise RuntimeError(f"DIST_QUANT_KERNELS=c but the kernels did not build: "
                           f"{_loaded.get('error')}")
    return _loaded[key]


def reset() -> None:
    """Forget the loaded libraries, the thread pool and any path selected with :func:`use`."""
    _state.clear()
    pool = _loaded.pop("pool", None)
    if pool is not None:
        pool.shutdown(wait=True)
    _loaded.clear()


@contextlib.contextmanager
def use(path: str, level: str | None = None):
    """Within the block, select a path as DIST_QUANT_KERNELS would (``torch``, ``c``, ``auto``,
    ``triton``) and optionally an ISA level as DIST_QUANT_ISA would; for tests and benchmarks
    that compare them."""
    saved = dict(_state)
    _state["mode"] = path
    if level is not None:
        _state["isa"] = level
    try:
        mode()  # validate
        isa()
        yield
    finally:
        _state.clear()
        _state.update(saved)


def triton_selected(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels serve this tensor: CUDA tensors unless the torch path is
    forced (and Triton is installed), any tensor under ``DIST_QUANT_KERNELS=triton``."""
    selected = mode()
    if selected == "triton":
        return True
    if tensor.device.type != "cuda" or selected == "torch":
        return False
    return gpu.available()


def usable(tensor: torch.Tensor) -> bool:
    return (tensor.device.type == "cpu" and tensor.dtype != torch.float64
            and tensor.numel() < MAX_N and library() is not None)


# ---- dispatch ------------------------------------------------------------------------------
def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _ranges(n: int, step: int) -> list[tuple[int, int]]:
    """Split [0, n) into at most num_threads pieces on multiples of ``step``."""
    threads = max(1, torch.get_num_threads())
    pieces = max(1, min(threads, n // max(MIN_PER_THREAD, step)))
    per = _ceil_div(_ceil_div(n, pieces), step) * step
    return [(s, min(s + per, n)) for s in range(0, n, per)]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _run(fn, tasks):
    """``fn(*task)`` for every task, on up to num_threads threads (ctypes drops the GIL)."""
    if len(tasks) == 1:
        return [fn(*tasks[0])]
    workers = max(1, torch.get_num_threads())
    pool = _loaded.get("pool")
    if pool is None or _loaded.get("pool_workers") != workers:
        if pool is not None:
            pool.shutdown(wait=False)
        pool = _loaded["pool"] = ThreadPoolExecutor(workers, thread_name_prefix="dist_quant")
        _loaded["pool_workers"] = workers
    return list(pool.map(lambda task: fn(*task), tasks))


def _keys(generator: torch.Generator | None) -> tuple[int, int]:
    s, m = draw_keys(generator).tolist()
    return s, m


def fused_chunk(d: int) -> int | None:
    """Coordinates per fused chunk for bucket size d: whole buckets, a multiple of 8, about
    FUSED_TARGET; None when a bucket is too large to fuse (then two passes)."""
    step = d * 8 // math.gcd(d, 8)
    if step > 4 * FUSED_TARGET:
        return None
    count = max(1, min(FUSED_TARGET // step, MAX_BUCKETS_PER_CHUNK * d // step))
    return count * step


def kbit_encode(x: torch.Tensor, body: torch.Tensor, comp, generator) -> int:
    """Write the k-bit body of x into ``body``; returns the non-finite count (0 = written).
    Raises WireRangeError when a header does not fit its type."""
    lib = library()
    if x.dtype != torch.float32:
        x = x.float()
    elif not x.is_contiguous():
        x = x.contiguous()
    n = x.numel()
    d = comp.bucket_size or n
    nb = comp.num_buckets(n)
    s, m = _keys(generator)
    hcode = wire.HEADER_DTYPE_CODES[comp.header_dtype]
    chunk = fused_chunk(d)
    if chunk is not None:  # the kernel stores bytes: the body's a, b and bits by address
        if not body.is_contiguous():
            raise ValueError("kbit_encode writes into a contiguous body")
        a_ptr = body.data_ptr()
        b_ptr = a_ptr + nb * comp.hbytes
        bits_ptr = b_ptr + nb * comp.hbytes
        counts = _run(lambda c0, c1: lib.dq_encode_fused(
            _ptr(x), n, d, comp.bits, hcode, s, m, a_ptr, b_ptr, bits_ptr, c0, c1, chunk),
            _ranges(n, chunk))
        if any(c > 0 for c in counts):
            return sum(c for c in counts if c > 0)
        if any(c < 0 for c in counts):
            raise wire.WireRangeError(f"a bucket range does not fit header_dtype "
                                      f"{comp.header_dtype}")
        return 0
    # large buckets: pass 1 min/max per (bucket, thread piece), pass 2 quantise
    a_out, b_out, bits = comp._split(body, n)

    segments = [(j, j * d + p0, j * d + p1) for j in range(nb)
                for p0, p1 in _ranges(min(d, n - j * d), 8)]
    parts = torch.empty(len(segments), 2, dtype=torch.float32)
    counts = _run(lambda i, c0, c1: lib.dq_minmax(_ptr(x), c0, c1, _ptr(parts) + 8 * i),
                  [(i, c0, c1) for i, (_, c0, c1) in enumerate(segments)])
    if sum(counts):
        return sum(counts)
    owner = torch.tensor([j for j, _, _ in segments])
    lo = torch.full((nb,), math.inf).scatter_reduce(0, owner, parts[:, 0], "amin")
    hi = torch.full((nb,), -math.inf).scatter_reduce(0, owner, parts[:, 1], "amax")
    a, b = header_values(lo, hi, comp.levels, comp.hdtype)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise wire.WireRangeError(f"bucket range [{lo.min().item():.4g}, {hi.max().item():.4g}] "
                                  f"does not fit header_dtype {comp.header_dtype}")
    a_out.copy_(a)
    b_out.copy_(b)
    a32, b32 = a.float().contiguous(), b.float().contiguous()
    _run(lambda c0, c1: lib.dq_quantize(_ptr(x), d, comp.bits, _ptr(a32), _ptr(b32), s, m,
                                        _ptr(bits), c0, c1), _ranges(n, 8))
    return 0


def new_output(n: int) -> torch.Tensor:
    """A fresh float32 tensor for a decode, on huge pages where it is large enough."""
    out = torch.empty(n, dtype=torch.float32)
    lib = library()
    if lib is not None and n * 4 >= HUGE_PAGE_BYTES:
        lib.dq_advise_huge(out.data_ptr(), n * 4)
    return out


def _fp32_headers(comp, body: torch.Tensor, n: int, start: int = 0) -> torch.Tensor:
    """Header values of one payload body (1-D) or of the rows of a batch (2-D, contiguous rows,
    the body from byte ``start`` of each row) as one fp32 tensor, the ``[W, nb]`` scales ``a``
    then the ``[W, nb]`` offsets ``b``, validated; raises the compressor's PayloadError naming
    the row."""
    lib = library()
    one = body.dim() == 1
    w_count = 1 if one else body.shape[0]
    nb = comp.num_buckets(n)
    ab = torch.empty(2 * w_count * nb)
    a_ptr = ab.data_ptr()
    base = body.data_ptr() + start
    bad = lib.dq_headers(base, base + nb * comp.hbytes, 0 if one else body.stride(0), w_count,
                         nb, wire.HEADER_DTYPE_CODES[comp.header_dtype], comp.levels, a_ptr,
                         a_ptr + 4 * w_count * nb)
    if bad:
        for row in range(w_count):  # the torch check words the error
            try:
                comp._check_body_torch(body[start:] if one else body[row, start:], n)
            except wire.PayloadError as err:
                raise wire.PayloadError(f"row {row}: {err}" if w_count > 1 else str(err)) \
                    from None
    return ab


def kbit_decode(body: torch.Tensor, n: int, comp, out: torch.Tensor,
                streaming: bool = False) -> torch.Tensor:
    """Validate the headers and decode one body into ``out``."""
    lib = library()
    if not body.is_contiguous():
        body = body.contiguous()
    nb = comp.num_buckets(n)
    ab = _fp32_headers(comp, body, n)
    a_ptr = ab.data_ptr()
    bits_ptr = body.data_ptr() + 2 * nb * comp.hbytes
    d = comp.bucket_size or n
    nt = int(streaming and n * 4 >= NONTEMPORAL_BYTES)
    out_ptr = out.data_ptr()
    _run(lambda c0, c1: lib.dq_decode(bits_ptr, d, comp.bits, a_ptr, a_ptr + 4 * nb, out_ptr,
                                      c0, c1, nt), _ranges(n, 8))
    return out


def kbit_decode_mean(batch: torch.Tensor, n: int, comp, out: torch.Tensor,
                     streaming: bool = False, start: int = wire.FIXED_NBYTES) -> torch.Tensor:
    """Validate the headers and write the mean of the W decodes of the bodies of ``batch``
    (``[W, nbytes]``, each row's body from byte ``start``) into ``out``."""
    lib = library()
    if batch.stride(1) != 1:
        batch = batch.contiguous()
    w_count = batch.shape[0]
    nb = comp.num_buckets(n)
    ab = _fp32_headers(comp, batch, n, start)
    a_ptr = ab.data_ptr()
    bits_ptr = batch.data_ptr() + start + 2 * nb * comp.hbytes
    stride = batch.stride(0)
    d = comp.bucket_size or n
    nt = int(streaming and n * 4 >= NONTEMPORAL_BYTES)
    out_ptr = out.data_ptr()
    _run(lambda c0, c1: lib.dq_decode_mean(bits_ptr, stride, w_count, nb, d, comp.bits, a_ptr,
                                           a_ptr + 4 * w_count * nb, out_ptr, c0, c1, nt),
         _ranges(n, 8))
    return out


def draws(s: int, m: int, c0: int, c1: int) -> torch.Tensor:
    """The compiled path's draws r_i for coordinates [c0, c1) under keys (s, m) (for tests)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the compiled kernels are not loaded")
    out = torch.empty(c1 - c0, dtype=torch.int32)
    lib.dq_draws(s, m, c0, c1, _ptr(out))
    return out.long() & 0xFFFFFFFF


# ---- sign ----------------------------------------------------------------------------------
def sign_encode(x: torch.Tensor, body: torch.Tensor, comp) -> int:
    """Write the sign body of x into ``body``; returns the non-finite count (0 = written).
    Raises WireRangeError when a scale does not fit its type."""
    lib = library()
    if x.dtype != torch.float32:
        x = x.float()
    elif not x.is_contiguous():
        x = x.contiguous()
    if not body.is_contiguous():
        raise ValueError("sign_encode writes into a contiguous body")
    n = x.numel()
    d = comp.bucket_size or n
    step = d * 8 // math.gcd(d, 8)
    s_ptr = body.data_ptr()
    bits_ptr = s_ptr + comp.num_buckets(n) * comp.hbytes
    hcode = wire.HEADER_DTYPE_CODES[comp.header_dtype]
    counts = _run(lambda c0, c1: lib.dq_sign_encode(_ptr(x), n, d, hcode, s_ptr, bits_ptr, c0,
                                                    c1), _ranges(n, step))
    if any(c > 0 for c in counts):
        return sum(c for c in counts if c > 0)
    if any(c < 0 for c in counts):
        raise wire.WireRangeError(f"mean |g| of a bucket exceeds header_dtype "
                                  f"{comp.header_dtype}")
    return 0


def sign_decode(body: torch.Tensor, n: int, comp, out: torch.Tensor,
                streaming: bool = False) -> torch.Tensor:
    """Decode one (validated) sign body into ``out``: s (2 t - 1)."""
    lib = library()
    s, bits = comp._split(body, n)
    s32 = s.float().contiguous()
    bits = bits.contiguous()
    d = comp.bucket_size or n
    nt = int(streaming and n * 4 >= NONTEMPORAL_BYTES)
    out_ptr, bits_ptr = out.data_ptr(), bits.data_ptr()
    _run(lambda c0, c1: lib.dq_decode(bits_ptr, d, 1, _ptr(s32), None, out_ptr, c0, c1, nt),
         _ranges(n, 8))
    return out


def sign_decode_mean(batch: torch.Tensor, n: int, comp, out: torch.Tensor,
                     streaming: bool = False, start: int = wire.FIXED_NBYTES) -> torch.Tensor:
    """The mean of the W sign decodes of the (validated) rows of ``batch`` into ``out``."""
    lib = library()
    if batch.stride(1) != 1:
        batch = batch.contiguous()
    nb = comp.num_buckets(n)
    s32 = batch[:, start:start + nb * comp.hbytes].clone(
        memory_format=torch.contiguous_format).view(comp.hdtype).float()  # a fresh, aligned copy
    bits_ptr = batch.data_ptr() + start + nb * comp.hbytes
    d = comp.bucket_size or n
    nt = int(streaming and n * 4 >= NONTEMPORAL_BYTES)
    out_ptr = out.data_ptr()
    _run(lambda c0, c1: lib.dq_decode_mean(bits_ptr, batch.stride(0), batch.shape[0], nb, d, 1,
                                           _ptr(s32), None, out_ptr, c0, c1, nt),
         _ranges(n, 8))
    return out
