"""The C source of the fused CPU kernels and the compiler flags of each ISA level (compiled and
loaded by :mod:`dist_quant.compress.fast`).

The source, ``kernels.c`` next to this module (package data), is one file for every CPU: its hot
loops work on 16-lane GCC/Clang vector types, which the compiler maps onto one AVX-512 register,
two AVX2 registers or four SSE2/NEON registers; plain C does the rest. No intrinsics besides the
streaming stores of large outputs on x86; no Python or torch headers, so compiling takes about a
second. Every function works on a coordinate range so that callers can split a tensor across
threads; ranges start on a multiple of 8 coordinates (a byte boundary of the bit stream for
every k) and, for the fused encoder, on a bucket boundary.

The arithmetic mirrors the pure-torch path of :mod:`dist_quant.compress.quantize` operation by
operation (compiled with ``-ffp-contract=off``, so no fused multiply-adds) and the draws are
those of :mod:`dist_quant.compress.draws`: payloads and decodes are byte-identical to the torch
path's at every level.

Levels (``DIST_QUANT_ISA``): ``native`` (``-march=native``, the default), ``avx512``
(x86-64-v4), ``avx2`` (x86-64-v3), ``generic`` (the architecture's baseline: SSE2 on x86-64,
NEON on AArch64). A level the CPU cannot run is refused before loading.
"""

from __future__ import annotations

import platform
from pathlib import Path

SOURCE = (Path(__file__).with_name("kernels.c")).read_text()

LEVELS = ("native", "avx512", "avx2", "generic")
# the x86-64 levels' features (as /proc/cpuinfo names them) that the kernels may use
_X86_NEEDS = {
    "avx512": ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx2", "fma",
               "bmi2"),
    "avx2": ("avx2", "fma", "bmi2", "f16c", "movbe"),
}


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def level_flags(level: str) -> list[str]:
    """The -m flags of a level on this machine's architecture (ValueError if it has none)."""
    if level not in LEVELS:
        raise ValueError(f"DIST_QUANT_ISA must be one of {', '.join(LEVELS)}; got {level!r}")
    if level == "native":
        return ["-march=native"]
    if is_x86():
        return {"avx512": ["-march=x86-64-v4"], "avx2": ["-march=x86-64-v3"],
                "generic": ["-march=x86-64"]}[level]
    if level == "generic":
        return []  # the compiler's default target: NEON is part of every AArch64 baseline
    raise ValueError(f"DIST_QUANT_ISA={level} is an x86-64 level; this machine is "
                     f"{platform.machine()}")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_runs(level: str) -> bool:
    """Whether this CPU can run code compiled for ``level``."""
    if level in ("native", "generic"):
        return True
    return is_x86() and set(_X86_NEEDS[level]) <= cpu_flags()
