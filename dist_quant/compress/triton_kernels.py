"""The Triton kernels behind :mod:`dist_quant.compress.gpu` (imported only where Triton is
installed; the module docstring there gives the rules they follow)."""

import triton
import triton.language as tl


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)

@triton.jit
def encode_kernel(x_ptr, a_ptr, b_ptr, keys_ptr, bits_ptr, n, d,
                  K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    j = idx // d
    a = tl.load(a_ptr + j, mask=inside, other=1.0)
    b = tl.load(b_ptr + j, mask=inside, other=0.0)
    x = tl.load(x_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    levels: tl.constexpr = (1 << K) - 1
    pos = a > 0
    mul = tl.where(pos, tl.math.div_rn(tl.full(a.shape, 1.0, tl.float32),
                                       tl.where(pos, a, 1.0)), 0.0)
    slow = mul == float("inf")
    y = tl.where(slow, tl.math.div_rn(x - b, tl.where(pos, a, 1.0)), (x - b) * mul)
    y = tl.minimum(tl.maximum(y, 0.0), levels * 1.0)
    q = (y * 16777216.0).to(tl.uint32)
    s = tl.load(keys_ptr).to(tl.uint32)
    m = tl.load(keys_ptr + 1).to(tl.uint32)
    r = _mix32(idx.to(tl.uint32) * m + s) >> 8
    t = tl.where(inside, (q + r) >> 24, 0)
    # 8 values -> one word of 8K bits -> K bytes
    groups = tl.reshape(t.to(tl.uint64), (BLOCK // 8, 8))
    lane = tl.arange(0, 8).to(tl.uint64)
    words = tl.sum(groups << (lane * K)[None, :], axis=1)
    byte = tl.arange(0, KP)  # KP: K rounded up to a power of two (arange's rule)
    out = ((words[:, None] >> (byte.to(tl.uint64) * 8)[None, :]) & 255).to(tl.uint8)
    first = pid.to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    offs = first[:, None] * K + byte[None, :]
    nbytes = (n * K + 7) // 8
    tl.store(bits_ptr + offs, out, mask=(byte[None, :] < K) & (offs < nbytes))

@triton.jit
def _levels(bits_ptr, idx, inside, K: tl.constexpr):
    bit = idx * K
    lo = tl.load(bits_ptr + (bit >> 3), mask=inside, other=0).to(tl.uint32)
    if (K == 1) or (K == 2) or (K == 4) or (K == 8):
        w = lo
    else:  # a value may straddle two bytes
        straddle = inside & (((bit & 7) + K) > 8)
        hi = tl.load(bits_ptr + (bit >> 3) + 1, mask=straddle, other=0).to(tl.uint32)
        w = lo | (hi << 8)
    return ((w >> (bit & 7).to(tl.uint32)) & ((1 << K) - 1)).to(tl.float32)

@triton.jit
def decode_kernel(bits_ptr, a_ptr, b_ptr, out_ptr, n, d, K: tl.constexpr,
                  BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    j = idx // d
    a = tl.load(a_ptr + j, mask=inside, other=0.0)
    b = tl.load(b_ptr + j, mask=inside, other=0.0)
    t = _levels(bits_ptr, idx, inside, K)
    tl.store(out_ptr + idx, t * a + b, mask=inside)

@triton.jit
def decode_mean_kernel(bits_ptr, row_stride, a_ptr, b_ptr, out_ptr, n, d, nb, w_count,
                       K: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    j = idx // d
    acc = tl.zeros((BLOCK,), tl.float32)
    for w in range(w_count):
        a = tl.load(a_ptr + w * nb + j, mask=inside, other=0.0)
        b = tl.load(b_ptr + w * nb + j, mask=inside, other=0.0)
        t = _levels(bits_ptr + w * row_stride, idx, inside, K)
        acc = acc + (t * a + b)
    if w_count > 1:
        acc = tl.math.div_rn(acc, tl.full(acc.shape, w_count, tl.float32))
    tl.store(out_ptr + idx, acc, mask=inside)
