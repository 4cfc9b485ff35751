"""Atomic checkpoint files, weights-only loading, and the resume checks."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from dist_quant.config import TrainConfig
from dist_quant.errors import ConfigError
from dist_quant.runtime.checkpoint import (
    check_compatible,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


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


def _save_then_stall(run_dir: str, flag: str, where: str) -> None:
    """Save step 3, then save step 6 and stop for good at ``where``: in the fsync of the
    checkpoint's bytes (written, not yet renamed) or in the rename that moves ``latest``."""
    import dist_quant.runtime.checkpoint as ckpt

    save_checkpoint(run_dir, 3, state(3))
    real_replace = os.replace

    def stall(*args, **kwargs):
        Path(flag).touch()
        time.sleep(600)

    def replace(src, dst):
        if Path(dst).name == "latest":
            stall()
        real_replace(src, dst)

    if where == "write":
        ckpt.os.fsync = stall
    else:
        ckpt.os.replace = replace
    big = state(6)
    big["server"]["replica"] = torch.arange(1 << 18, dtype=torch.float32)
    save_checkpoint(run_dir, 6, big)


@pytest.mark.parametrize("where", ["write", "latest"])
def test_a_torn_write_leaves_the_previous_checkpoint_current(tmp_path, where):
    """A real process SIGKILLed in the middle of saving step 6 (its bytes written but not
    renamed; or renamed, with ``latest`` not yet moved): step 3 is still the checkpoint that
    loads, and nothing half-done is taken for a checkpoint."""
    flag = tmp_path / "stalled"
    child = multiprocessing.get_context("fork").Process(
        target=_save_then_stall, args=(str(tmp_path), str(flag), where))
    child.start()
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert child.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.join()
    directory = tmp_path / "checkpoints"
    if where == "write":
        assert (directory / "step_6.pt.tmp").stat().st_size > 4 * (1 << 18)
        assert not (directory / "step_6.pt").exists()
    else:
        assert (directory / "step_6.pt").exists() and (directory / "latest.tmp").exists()
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 3


def test_retention_keeps_the_newest_and_the_latest(tmp_path):
    for step in (1, 2, 3, 10, 11):
        save_checkpoint(tmp_path, step, state(step), keep=3)
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["latest", "step_10.pt", "step_11.pt", "step_3.pt"]
    assert latest_checkpoint(tmp_path).name == "step_11.pt"
    save_checkpoint(tmp_path, 12, state(12), keep=0)   # 0 keeps all
    assert len(list((tmp_path / "checkpoints").glob("step_*.pt"))) == 4


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
