"""Atomic checkpoint files, weights-only loading, and the resume checks."""

from __future__ import annotations

import pytest
import torch

from dist_quant.checkpoint import (
    check_compatible,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from dist_quant.config import TrainConfig
from dist_quant.errors import ConfigError


def state(step: int) -> dict:
    return {"format": 1, "step": step, "config": TrainConfig().to_dict(),
            "server": {"replica": torch.full((3,), float(step))}, "workers": []}


def test_save_is_atomic_and_latest_follows(tmp_path):
    save_checkpoint(tmp_path, 3, state(3))
    save_checkpoint(tmp_path, 6, state(6))
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["latest", "step_3.pt", "step_6.pt"]  # no temporary files left
    assert latest_checkpoint(tmp_path).name == "step_6.pt"
    loaded = load_checkpoint(latest_checkpoint(tmp_path))
    assert loaded["step"] == 6 and torch.equal(loaded["server"]["replica"], torch.full((3,), 6.0))


def test_a_torn_write_leaves_the_previous_checkpoint_current(tmp_path):
    save_checkpoint(tmp_path, 3, state(3))
    (tmp_path / "checkpoints" / "step_6.pt.tmp").write_bytes(b"half a file")
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 3


def test_missing_or_foreign_checkpoints_name_resume(tmp_path):
    with pytest.raises(ConfigError, match="--resume"):
        latest_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_9.pt\n")
    with pytest.raises(ConfigError, match="step_9.pt"):
        latest_checkpoint(tmp_path)
    torch.save({"something": 1}, tmp_path / "checkpoints" / "step_9.pt")
    with pytest.raises(ConfigError, match="not a dist_quant checkpoint"):
        load_checkpoint(latest_checkpoint(tmp_path))


def test_loading_refuses_pickled_objects(tmp_path):
    torch.save({"format": 1, "evil": ValueError("x")}, tmp_path / "x.pt")
    with pytest.raises(ConfigError, match="cannot read"):
        load_checkpoint(tmp_path / "x.pt")


def test_compatibility():
    saved = TrainConfig(steps=10).to_dict()
    check_compatible(saved, TrainConfig(steps=20, eval_every=7, timeout=5.0), step=10)
    with pytest.raises(ConfigError, match="--lr"):
        check_compatible(saved, TrainConfig(steps=20, lr=0.5), step=10)
    with pytest.raises(ConfigError, match="--steps"):
        check_compatible(saved, TrainConfig(steps=10), step=10)
