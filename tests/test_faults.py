"""Faults through the real launcher (``python -m dist_quant train``, torchrun, gloo on
loopback): a stop signal, a SIGKILLed launcher, a hung worker, killed ranks with elastic
restarts, and a run directory whose disk fills up.

Every rank is found as a process below the launcher (``/proc``) by the ``RANK`` and
``TORCHELASTIC_RESTART_COUNT`` of its environment. Times are measured from the fault to the
launcher's exit; the bounds are the ones the options promise (``--timeout`` + 5 s, 10 s for a
stop), far above what the mechanisms need.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from disks import fill, tmpfs
from rawtext import raw_escapes

from dist_quant.config import TrainConfig
from dist_quant.runner.launcher import descendants
from dist_quant.runtime.checkpoint import latest_checkpoint, load_checkpoint
from dist_quant.runtime.metrics import read_summary
from dist_quant.train import run_in_process

pytestmark = pytest.mark.slow

TINY = dict(hidden="7,5", train_size=120, test_size=30, batch_size=4, progress=False,
            bucket_size=5, workers=2)


def start(cfg: TrainConfig) -> subprocess.Popen:
    argv = [sys.executable, "-m", "dist_quant", "train", *cfg.to_argv()]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def rank_pid(launcher: subprocess.Popen, rank: int, attempt: int = 0) -> int | None:
    for pid in descendants(launcher.pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and \
                f"TORCHELASTIC_RESTART_COUNT={attempt}".encode() in env:
            return pid
    return None


def wait_for_steps(launcher: subprocess.Popen, run_dir: Path, lines: int) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= lines):
        assert launcher.poll() is None, launcher.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def finish(launcher: subprocess.Popen, pids: list[int]) -> None:
    """Clean up whatever a failed test left behind (only this test's processes)."""
    for pid in [launcher.pid, *pids]:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    launcher.wait()


def test_sigterm_to_the_launcher_ends_every_process_and_marks_the_run_stopped(tmp_path):
    cfg = TrainConfig(**TINY, steps=10**6, eval_every=10**6, run_dir=str(tmp_path / "run"))
    launcher = start(cfg)
    pids: list[int] = []
    try:
        wait_for_steps(launcher, tmp_path / "run", 3)
        pids = descendants(launcher.pid)
        assert len(pids) >= 4  # torchrun and its three ranks
        os.kill(launcher.pid, signal.SIGTERM)
        t0 = time.monotonic()
        _, err = launcher.communicate(timeout=30)
        while any(alive(p) for p in pids) and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        gone = time.monotonic() - t0
    finally:
        finish(launcher, pids)
    assert gone <= 10, gone
    assert not [p for p in pids if alive(p)]
    assert launcher.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in err
    assert not (tmp_path / "run" / "summary.json").exists()
    assert json.loads((tmp_path / "run" / "stopped.json").read_text())["stopped_by"] == "SIGTERM"


def test_sigkill_to_the_launcher_ends_every_process_of_the_job(tmp_path):
    """What an OOM killer or a scheduler does: nothing of the job is left 10 s later (torchrun
    gets SIGTERM when the launcher dies, the ranks die with torchrun), and torchrun's side
    writes stopped.json, as the launcher no longer can."""
    cfg = TrainConfig(**TINY, steps=10**6, eval_every=10**6, run_dir=str(tmp_path / "run"))
    launcher = start(cfg)
    pids: list[int] = []
    try:
        wait_for_steps(launcher, tmp_path / "run", 3)
        pids = descendants(launcher.pid)
        assert len(pids) >= 4  # torchrun and its three ranks
        os.kill(launcher.pid, signal.SIGKILL)
        t0 = time.monotonic()
        while any(alive(p) for p in pids) and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        gone = time.monotonic() - t0
    finally:
        finish(launcher, pids)
    assert gone <= 10, gone
    assert not [p for p in pids if alive(p)]
    stopped = json.loads((tmp_path / "run" / "stopped.json").read_text())
    assert stopped["stopped_by"] == "launcher died" and stopped["launcher_pid"] == launcher.pid
    assert not (tmp_path / "run" / "summary.json").exists()


def rank_pids(launcher: subprocess.Popen) -> list[int]:
    return [pid for r in range(3) if (pid := rank_pid(launcher, r)) is not None]


def test_a_hung_worker_ends_every_rank_within_the_timeout(tmp_path):
    """Worker 1 stopped (SIGSTOP): every rank is gone within --timeout + 5 s of it, the
    launcher returns soon after, and what the user reads names rank 2, once per message."""
    timeout = 5.0
    cfg = TrainConfig(**TINY, steps=10**6, eval_every=10**6, timeout=timeout,
                      run_dir=str(tmp_path / "run"))
    launcher = start(cfg)
    pids: list[int] = []
    try:
        wait_for_steps(launcher, tmp_path / "run", 3)
        pids = rank_pids(launcher)
        assert len(pids) == 3
        os.kill(rank_pid(launcher, 2), signal.SIGSTOP)
        t0 = time.monotonic()
        while any(alive(p) for p in pids) and time.monotonic() - t0 < timeout + 60:
            time.sleep(0.05)
        ranks_gone = time.monotonic() - t0
        _, err = launcher.communicate(timeout=60)
        launcher_gone = time.monotonic() - t0
    finally:
        finish(launcher, pids)
    assert ranks_gone <= timeout + 5, ranks_gone
    assert launcher_gone <= timeout + 20, launcher_gone   # torchrun's report, then the exit
    assert launcher.returncode == 1
    lines = err.strip().splitlines()
    shown = [line for line in lines if line.startswith("dist_quant rank")]
    assert shown and all("rank 2 (worker 1)" in line for line in shown), err
    assert len(shown) == len(set(shown))
    assert "Traceback" not in err and lines[-1].startswith("dist_quant: the run failed")
    assert raw_escapes(err) == [], err


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (the in-process reference equals the distributed run bit for
    bit: tests/test_train.py)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    cfg = restart_cfg(run).replace(simulate=True, max_restarts=0)
    assert run_in_process(cfg) == 0
    return load_checkpoint(latest_checkpoint(run)), read_summary(run)


def restart_cfg(run: Path) -> TrainConfig:
    return TrainConfig(**TINY, steps=600, eval_every=50, checkpoint_every=50, timeout=10.0,
                       max_restarts=2, run_dir=str(run))


@pytest.mark.parametrize("rank", [2, 0], ids=["worker", "server"])
def test_a_killed_rank_is_restarted_and_the_run_ends_bit_for_bit(tmp_path, reference, rank):
    cfg = restart_cfg(tmp_path / "run")
    launcher = start(cfg)
    pids: list[int] = []
    try:
        wait_for_steps(launcher, tmp_path / "run", 160)   # past step 140: checkpoints exist
        pids = descendants(launcher.pid)
        os.kill(rank_pid(launcher, rank), signal.SIGKILL)
        out, err = launcher.communicate(timeout=300)
    finally:
        finish(launcher, pids)
    assert launcher.returncode == 0, err
    who = "rank 0 (the server)" if rank == 0 else "rank 2 (worker 1)"
    # named by torchrun's report of the signal, or by the ranks that lost it (whichever
    # torchrun saw end first)
    assert f"{who} was killed by SIGKILL" in err or f"lost contact with {who}" in err, err
    assert "restart 1: continuing from the latest checkpoint" in err
    assert raw_escapes(err) == [], err   # gloo's words only after a sentence naming the rank
    final, summary = reference
    state = load_checkpoint(latest_checkpoint(cfg.run_dir))
    assert state["step"] == final["step"] == 600
    for key, value in final["server"]["model"].items():
        assert torch.equal(state["server"]["model"][key], value), key
    assert read_summary(cfg.run_dir)["test_loss"] == summary["test_loss"]
    assert "test accuracy" in out
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*.pt"))
    assert kept == ["step_500.pt", "step_550.pt", "step_600.pt"]   # --keep-checkpoints 3


def test_a_full_disk_ends_the_run_in_one_line_and_resume_elsewhere_ends_bit_for_bit(
        tmp_path, reference):
    """The run directory's file system fills after the first checkpoint: one line names the
    path, the step and the newest complete checkpoint; no .tmp is left; metrics.jsonl ends on
    a whole line; --resume from it with a roomier --run-dir ends equal to the uninterrupted
    run."""
    with tmpfs(tmp_path / "fs", 1200) as fs:
        run = fs / "run"
        cfg = restart_cfg(run).replace(max_restarts=0)
        launcher = start(cfg)
        pids: list[int] = []
        try:
            while not (run / "checkpoints" / "latest").exists():
                assert launcher.poll() is None, launcher.communicate()
                time.sleep(0.05)
            pids = descendants(launcher.pid)
            fill(fs)
            _, err = launcher.communicate(timeout=120)
        finally:
            finish(launcher, pids)
        leftovers = [p.name for p in run.rglob("*.tmp")]
        newest = latest_checkpoint(run)
        metrics = (run / "metrics.jsonl").read_text()
        # continue from the named checkpoint into a roomier directory
        # a longer --timeout (a change a resume allows): the resume's state exchange must not
        # race the machine's load; what is tested is where it continues from
        done = subprocess.run([sys.executable, "-m", "dist_quant", "train", "--resume",
                               str(run), "--run-dir", str(tmp_path / "roomy"),
                               "--timeout", "60"],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = err.strip().splitlines()
    assert launcher.returncode == 1, err
    assert len(lines) <= 4 and "Traceback" not in err, err
    assert raw_escapes(err) == [], err
    fault = [line for line in lines if "cannot write" in line]
    assert len(fault) == 1 and fault[0].startswith("dist_quant rank 0: run aborted: cannot "
                                                   f"write {run}/"), err
    assert f"the newest complete checkpoint is {newest}" in fault[0], err
    assert " at step " in fault[0] and f"--resume {run}" in fault[0]
    assert not leftovers
    assert metrics.endswith("\n") and all(json.loads(line) for line in metrics.splitlines())
    assert done.returncode == 0, done.stderr
    final, summary = reference
    state = load_checkpoint(latest_checkpoint(tmp_path / "roomy"))
    assert state["step"] == final["step"] == 600
    for key, value in final["server"]["model"].items():
        assert torch.equal(state["server"]["model"][key], value), key
    assert read_summary(tmp_path / "roomy")["test_loss"] == summary["test_loss"]
