"""A run directory that cannot take a write: a full disk during metrics and checkpoint
writes, a read-only one, and preflight's refusals (real tmpfs mounts where the tests run as
root, ``/dev/full`` everywhere)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from disks import fill, tmpfs

from dist_quant.ps.worker import RunAborted
from dist_quant.runtime.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dist_quant.runtime.diskfault import DiskFault, disk_write
from dist_quant.runtime.metrics import RunRecorder, read_metrics

TIMES = {"compute": 0.0}


def record_until_full(rec: RunRecorder, limit: int = 100_000) -> DiskFault:
    for step in range(1, limit):
        try:
            rec.step(step, 1.0, 10, 20, TIMES, extra={"pad": "x" * 97})
        except DiskFault as fault:
            return fault
    raise AssertionError("the disk never filled")


def test_full_disk_keeps_metrics_on_whole_lines(tmp_path):
    with tmpfs(tmp_path / "fs", 64) as fs:
        rec = RunRecorder(fs / "run", {"workers": 2})
        fault = record_until_full(rec)
        rec.close()
        text = (fs / "run" / "metrics.jsonl").read_text()
        lines = read_metrics(fs / "run")
    assert isinstance(fault, RunAborted) and fault.errno == errno.ENOSPC
    assert fault.path == fs / "run" / "metrics.jsonl" and fault.step == len(lines) + 1
    assert text.endswith("\n") and [r["step"] for r in lines] == list(range(1, len(lines) + 1))
    assert "no checkpoint was written" in str(fault) and "\n" not in str(fault)


def small_state(size: int) -> dict:
    return {"format": 1, "step": 0, "config": {}, "server": {}, "workers": [],
            "blob": torch.zeros(size, dtype=torch.uint8)}


def test_full_disk_during_a_checkpoint_leaves_the_previous_one_current(tmp_path):
    with tmpfs(tmp_path / "fs", 256) as fs:
        run = fs / "run"
        first = save_checkpoint(run, 10, small_state(50_000))
        with pytest.raises(DiskFault) as info:
            save_checkpoint(run, 20, small_state(400_000))
        left = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert latest_checkpoint(run) == first
        assert load_checkpoint(first)["blob"].numel() == 50_000
    fault = info.value
    assert fault.step == 20 and fault.path == run / "checkpoints" / "step_20.pt"
    assert left == ["latest", "step_10.pt"]   # no .tmp
    message = str(fault)
    assert f"the newest complete checkpoint is {first}" in message
    assert f"--resume {run}" in message


def test_a_read_only_run_directory_is_a_disk_fault(tmp_path):
    with tmpfs(tmp_path / "ro", 64, read_only=True) as ro, pytest.raises(DiskFault) as info:
        RunRecorder(ro / "run", {})
    assert info.value.errno == errno.EROFS and info.value.step == 0


def test_dev_full_is_a_disk_fault_everywhere(tmp_path):
    """No mount needed: ``/dev/full`` answers every write with ENOSPC."""
    run = tmp_path / "run"
    rec = RunRecorder(run, {})
    rec.step(1, 1.0, 1, 1, TIMES)
    (run / "summary.json.tmp").symlink_to("/dev/full")
    with pytest.raises(DiskFault) as info:
        rec.summary(steps=1)
    assert info.value.path == run / "summary.json" and info.value.step == 1
    assert not (run / "summary.json.tmp").is_symlink()   # removed after the failed write
    assert not (run / "summary.json").exists()
    ckpt = run / "checkpoints"
    ckpt.mkdir()
    (ckpt / "step_5.pt.tmp").symlink_to("/dev/full")
    with pytest.raises(DiskFault):
        save_checkpoint(run, 5, small_state(10))
    assert list(ckpt.iterdir()) == []


def test_other_errors_pass_through(tmp_path):
    with pytest.raises(IsADirectoryError), disk_write(tmp_path, 0, tmp_path):
        open(tmp_path, "wb")   # noqa: SIM115 (raises)
    calls = []
    with pytest.raises(DiskFault), disk_write(tmp_path, 3, tmp_path,
                                              undo=lambda: calls.append(1)):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert calls == [1]


def train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_quant", "train", *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_preflight_refuses_a_read_only_run_directory(tmp_path):
    with tmpfs(tmp_path / "ro", 64, read_only=True) as ro:
        done = train("--run-dir", str(ro / "run"))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("Error: --run-dir: cannot write in") and \
        "Read-only file system" in done.stderr


def test_preflight_refuses_too_little_space_for_the_checkpoints(tmp_path):
    with tmpfs(tmp_path / "fs", 1500) as fs:
        done = train("--run-dir", str(fs / "run"), "--checkpoint-every", "50")
        assert not (fs / "run").exists()
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()]
    assert "--keep-checkpoints 3" in done.stderr and "free" in done.stderr


def test_fill_takes_every_byte(tmp_path):
    with tmpfs(tmp_path / "fs", 64) as fs:
        fill(fs)
        with pytest.raises(OSError) as info:
            (fs / "x").write_bytes(b"y" * 4096)
    assert info.value.errno == errno.ENOSPC


def test_summary_is_whole_json_after_a_fault(tmp_path):
    """What was written before a fault stays valid: config.json is whole JSON."""
    with tmpfs(tmp_path / "fs", 64) as fs:
        rec = RunRecorder(fs / "run", {"workers": 3})
        record_until_full(rec)
        rec.close()
        saved = json.loads((fs / "run" / "config.json").read_text())
    assert saved["config"] == {"workers": 3}
