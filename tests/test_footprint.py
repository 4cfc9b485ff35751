"""The estimates preflight checks against: a checkpoint's size and the run directory's (real
checkpoints of in-process runs), and the job's memory (the measured peak RSS of every process
of real ``dist-quant train`` jobs, W = 2, 4 and 8)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_faults import TINY

from dist_quant.config import TrainConfig
from dist_quant.data import load_dataset
from dist_quant.runner.footprint import (
    SHARED_MB,
    checkpoint_nbytes,
    checkpoint_steps,
    job_memory_mb,
    measured_load,
    model_shape,
    rank_memory_mb,
    run_disk_nbytes,
)
from dist_quant.runner.launcher import descendants
from dist_quant.runner.preflight import preflight
from dist_quant.train import run_in_process


def shape_of(cfg: TrainConfig):
    data = load_dataset(cfg)
    return model_shape(cfg, data.in_features, data.num_classes)


@pytest.mark.parametrize("options", [
    {}, {"hidden": "64,64"}, {"compressor": "sign", "error_feedback": True},
    {"servers": 2}, {"colocate": True, "workers": 3}, {"workers": 4, "hidden": "40,30,20"},
], ids=["tiny", "wider", "error-feedback", "two-servers", "colocated", "three-layers"])
def test_checkpoint_estimate_bounds_the_file(tmp_path, options):
    cfg = TrainConfig(**{**TINY, **options}, steps=20, eval_every=10, checkpoint_every=10,
                      keep_checkpoints=0, simulate=True, run_dir=str(tmp_path / "run"))
    assert run_in_process(cfg) == 0
    files = sorted((tmp_path / "run" / "checkpoints").glob("step_*.pt"))
    assert len(files) == checkpoint_steps(cfg, 0) == 2
    size = max(p.stat().st_size for p in files)
    estimate = checkpoint_nbytes(cfg, shape_of(cfg))
    assert size <= estimate <= 1.5 * size, (size, estimate)
    used = sum(p.stat().st_size for p in (tmp_path / "run").rglob("*") if p.is_file())
    assert used <= run_disk_nbytes(cfg, shape_of(cfg))[0]


def test_checkpoint_count_follows_retention():
    cfg = TrainConfig(steps=1000, checkpoint_every=50, keep_checkpoints=3)
    assert checkpoint_steps(cfg, 0) == 20 and checkpoint_steps(cfg, 500) == 10
    assert checkpoint_steps(cfg.replace(steps=1010), 0) == 21   # and the last step
    assert checkpoint_steps(cfg.replace(checkpoint_every=0), 0) == 1
    shape = (1000, 4000, 4, 2)
    need, files, _ = run_disk_nbytes(cfg, shape)
    assert files == 4   # three kept, one being written
    assert run_disk_nbytes(cfg.replace(keep_checkpoints=0), shape)[1] == 20
    assert run_disk_nbytes(cfg, shape, start=950, existing=3)[1] == 1
    assert run_disk_nbytes(cfg, None)[1] == 0 and run_disk_nbytes(cfg, None)[0] < need


def test_measured_load_sees_a_transient_peak():
    def load():
        block = bytearray(64 << 20)   # 64 MiB touched, then freed
        block[::4096] = b"\1" * len(block[::4096])
        del block
        return 7

    result, peak, kept = measured_load(load)
    assert result == 7
    assert 60 <= peak <= 80 and kept < 16


def test_preflight_refuses_a_job_beyond_memory_and_force_overrides(tmp_path):
    """A DDP job (no checkpoints, so the disk check passes) of 4 x 10^8 parameters."""
    args = ["--method", "ddp", "--workers", "2", "--hidden", "20000,20000", "--steps", "1",
            "--run-dir", str(tmp_path / "run")]
    done = subprocess.run([sys.executable, "-m", "dist_quant", "train", *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    assert done.stderr.splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("Error: --workers: 2 workers need about ")
    assert "--force" in done.stderr and not (tmp_path / "run").exists()
    cfg = TrainConfig(method="ddp", workers=2, hidden="20000,20000", steps=1, force=True,
                      run_dir=str(tmp_path / "run"))
    assert preflight(cfg).force


def peaks(argv: list[str]) -> dict[str, float]:
    """Run ``dist-quant train`` and read every process's VmHWM (MiB) until it ends: the
    agent's as "agent", each rank's as its RANK."""
    launcher = subprocess.Popen([sys.executable, "-m", "dist_quant", "train", *argv],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    found: dict[str, float] = {}
    names: dict[int, str] = {}
    while launcher.poll() is None:
        for pid in descendants(launcher.pid):
            try:
                # a rank is read again until its RANK shows: between torchrun's fork and the
                # rank's exec it still holds the agent's environment
                if pid not in names:
                    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    rank = [e[5:].decode() for e in env if e.startswith(b"RANK=")]
                    if rank:
                        names[pid] = rank[0]
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    found[names.get(pid, "agent")] = int(line.split()[1]) / 1024
        time.sleep(0.1)
    assert launcher.wait() == 0, launcher.stderr.read()
    return found


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 4, 8])
def test_memory_estimate_within_30_percent_of_the_measured_peaks(tmp_path, workers):
    cfg = TrainConfig(workers=workers, batch_size=256, steps=20, eval_every=10,
                      progress=False, run_dir=str(tmp_path / "run"))
    measured = peaks(cfg.to_argv())
    data, peak, kept = measured_load(lambda: load_dataset(cfg))
    n = model_shape(cfg, data.in_features, data.num_classes)[0]
    units = data.in_features + sum(cfg.hidden_sizes) + data.num_classes
    ranks = rank_memory_mb(cfg, n, units, peak, kept)
    assert sorted(measured) == sorted([*map(str, range(workers + 1)), "agent"])
    for rank, estimate in enumerate(ranks):
        assert abs(estimate - measured[str(rank)]) <= 0.3 * measured[str(rank)], (
            rank, estimate, measured)
    total = job_memory_mb(ranks) + SHARED_MB * len(ranks)   # the RSS sum: shared pages in each
    assert abs(total - sum(measured.values())) <= 0.3 * sum(measured.values())
