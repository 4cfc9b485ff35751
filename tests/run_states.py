"""Comparing what runs leave behind: the final checkpoint's state, compared bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch

from dist_quant.runtime.checkpoint import latest_checkpoint, load_checkpoint


def final(run_dir: Path | str) -> dict:
    """The latest checkpoint of a run directory, without its config (which names the run)."""
    state = load_checkpoint(latest_checkpoint(run_dir))
    state.pop("config")
    return state


def assert_equal(x, y, where: str = "") -> None:
    """Nested dicts, lists and tensors equal exactly; ``where`` names the first difference."""
    if isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            assert_equal(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, list | tuple):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            assert_equal(u, v, f"{where}[{i}]")
    elif isinstance(x, torch.Tensor):
        assert torch.equal(x, y), where
    else:
        assert x == y, where
