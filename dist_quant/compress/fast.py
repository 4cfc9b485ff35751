"""Compiled CPU kernels for the k-bit compressor (placeholder: not built yet)."""

from __future__ import annotations


def usable(tensor, compressor) -> bool:
    return False
