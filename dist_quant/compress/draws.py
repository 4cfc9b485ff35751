"""The random draws of the k-bit compressor: one function of (keys, position) on every path.

``r_i = mix32(i m + s mod 2^32) >> 8`` for coordinate ``i`` (its index in the flattened tensor,
taken mod 2^32), with ``mix32`` the "lowbias32" integer hash (C. Wellons, hash-prospector), a
bijection of 32-bit words::

    x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16   (mod 2^32)

The keys are two words drawn from the caller's ``torch.Generator`` (``s`` uniform, ``m`` odd).
For a uniform ``s`` every ``r_i`` is exactly uniform on ``0..2^24 - 1`` (a bijection of a uniform
word is uniform), which is all that unbiasedness needs; independence between coordinates rests
on the hash's avalanche (tested, with a chi-square test of pairs at several lags; the first
round alone, one multiply per coordinate, fails it, so both rounds stay). The compiled CPU
kernels (every ISA level), this pure-torch version and the Triton kernels compute the same
words, so a payload does not depend on the path or the machine that encodes it, nor on how the
work is split across threads or blocks.
"""

from __future__ import annotations

import torch

DRAW_BITS = 24
MIX_A = 0x7FEB352D
MIX_B = 0x846CA68B
MASK32 = 0xFFFFFFFF


def keys(generator: torch.Generator | None) -> torch.Tensor:
    """The keys ``(s, m)`` as an int64 tensor of two words on the generator's device (two
    draws of the generator; no host synchronisation)."""
    device = generator.device if generator is not None else torch.device("cpu")
    k = torch.randint(0, 1 << 32, (2,), generator=generator, dtype=torch.int64, device=device)
    return k | torch.tensor([0, 1], dtype=torch.int64, device=device)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The hash on int64 tensors holding 32-bit words (products wrap in int64; the low 32
    bits, all that is kept, are exact)."""
    x = x ^ (x >> 16)
    x = (x * MIX_A) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX_B) & MASK32
    return x ^ (x >> 16)


def counter_draws(key: torch.Tensor, n: int, device: torch.device, start: int = 0
                  ) -> torch.Tensor:
    """``r_i`` for coordinates ``start .. start + n - 1`` as int64 on ``device``."""
    key = key.to(device)
    i = torch.arange(start, start + n, dtype=torch.int64, device=device) & MASK32
    return mix32((i * key[1] + key[0]) & MASK32) >> (32 - DRAW_BITS)
