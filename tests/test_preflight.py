"""Every bad input is refused before any process starts: exit 2, one line naming the option or
the file, no run directory written, no subprocess and no in-process run started.

One case per row of the bad-input table (options out of range, dataset files, conflicting
options, device, run directories and checkpoints), through the real command
(``dist-quant train``) in this process. ``subprocess.Popen`` and the in-process runner are
replaced by sentinels that fail the test if they are reached: that is what "no process
started" means here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dist_quant.train as train_module
from dist_quant.config import TrainConfig
from dist_quant.train import run_in_process, train_command

TINY = ["--hidden", "7,5", "--train-size", "120", "--test-size", "30", "--batch-size", "4",
        "--no-progress", "--workers", "2"]


@pytest.fixture
def no_start(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a process was started: {args[:1]}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(train_module, "run_in_process", refuse)


def refused(argv: list[str]) -> str:
    """Run the command; assert exit 2 and one line; return that line."""
    result = CliRunner().invoke(train_command, argv)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def npz(path, **change):
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(300, 8)), "y": rng.integers(0, 3, 300)}
    arrays.update(x_test=arrays["x"][:50], y_test=arrays["y"][:50])
    arrays.update(change)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return str(path)


def bad_dataset(tmp_path, kind: str) -> str:
    path = tmp_path / f"{kind}.npz"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "npy":
        np.save(tmp_path / "a.npy", np.zeros((300, 8)))
        (tmp_path / "a.npy").rename(path)
    elif kind == "object":
        npz(path, x=np.array([None] * 300, dtype=object).reshape(300, 1))
    elif kind == "label":
        y = np.random.default_rng(0).integers(0, 3, 300)
        y[7] = 100000
        npz(path, y=y)
    elif kind == "nonfinite":
        x = np.random.default_rng(0).normal(size=(300, 8))
        x[3, 2] = np.inf
        npz(path, x=x)
    elif kind == "key":
        npz(path, y_test=None)
    elif kind == "shape":
        npz(path, y=np.zeros(299, dtype=np.int64))
    elif kind == "float_labels":
        npz(path, y=np.zeros(300))
    return str(path)


@pytest.mark.parametrize("kind, expected", [
    ("empty", "empty (0 bytes)"),
    ("npy", "not an .npz archive"),
    ("object", "object dtype"),
    ("label", "100001-class"),
    ("nonfinite", "non-finite"),
    ("key", "missing key 'y_test'"),
    ("shape", "must have shape [300]"),
    ("float_labels", "integer class labels"),
])
def test_bad_dataset_files(tmp_path, no_start, kind, expected):
    path = bad_dataset(tmp_path, kind)
    line = refused(["--dataset", path, "--workers", "2", "--batch-size", "4",
                    "--run-dir", str(tmp_path / "r")])
    assert "--dataset" in line and path in line and expected in line
    assert not (tmp_path / "r").exists()


def test_shard_smaller_than_the_batch_suggests_the_largest_batch(tmp_path, no_start):
    line = refused(["--dataset", npz(tmp_path / "ok.npz"), "--workers", "4",
                    "--run-dir", str(tmp_path / "r")])
    assert "--batch-size" in line and "512 exceeds the 75 examples" in line
    assert "use --batch-size 75 or less" in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv, option", [
    (["--seed", "-1"], "--seed"),
    (["--timeout", "inf"], "--timeout"),
    (["--timeout", "nan"], "--timeout"),
    (["--lr", "inf"], "--lr"),
    (["--weight-decay", "inf"], "--weight-decay"),
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--momentum", "nan"], "--momentum"),
    (["--keep-checkpoints", "-1"], "--keep-checkpoints"),
    (["--max-restarts", "-1"], "--max-restarts"),
    (["--dataset", "mnist"], "--data-dir"),
    (["--dataset", "mnist", "--simulate"], "--data-dir"),
    (["--method", "ddp", "--compressor", "onebit"], "--compressor"),
    (["--method", "ddp", "--downlink", "sign"], "--downlink"),
    (["--method", "ddp", "--checkpoint-every", "5"], "--checkpoint-every"),
    (["--ddp-hook", "fp16"], "--ddp-hook"),
    (["--simulate", "--max-restarts", "1"], "--max-restarts"),
])
def test_bad_options(tmp_path, no_start, argv, option):
    line = refused([*TINY, *argv, "--run-dir", str(tmp_path / "r")])
    assert line.startswith(f"Error: {option}:"), line
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
@pytest.mark.parametrize("extra", [[], ["--simulate"]], ids=["torchrun", "simulate"])
def test_cuda_without_a_gpu(tmp_path, no_start, extra):
    line = refused([*TINY, "--device", "cuda", *extra, "--run-dir", str(tmp_path / "r")])
    assert line.startswith("Error: --device:") and "no" in line and "CUDA" in line
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "done"
    cfg = TrainConfig(hidden="7,5", train_size=120, test_size=30, batch_size=4, workers=2,
                      steps=4, progress=False, run_dir=str(run), simulate=True)
    assert run_in_process(cfg) == 0
    return run


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_an_existing_run_directory_is_never_overwritten(finished_run, no_start):
    before = (finished_run / "metrics.jsonl").read_text()
    line = refused([*TINY, "--steps", "4", "--run-dir", str(finished_run)])
    assert "--run-dir" in line and f"--resume {finished_run}" in line
    assert (finished_run / "metrics.jsonl").read_text() == before


def _checkpoint(run):
    path = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    return path, torch.load(path, weights_only=True)


@pytest.mark.parametrize("damage, expected", [
    ("no_server", "no 'server' entry"),
    ("reshaped", "has shape (5, 7), the configured model needs (7, 40)"),
    ("workers", "holds 1 worker states"),
    ("config_json", "config.json is corrupt"),
    ("latest_escapes", "not the name of a checkpoint file"),
    ("truncated", "cannot read checkpoint"),
])
def test_damaged_run_directories_are_refused(finished_run, tmp_path, no_start, damage,
                                             expected):
    run = copy_run(finished_run, tmp_path / "run")
    path, state = _checkpoint(run)
    if damage == "no_server":
        del state["server"]
        torch.save(state, path)
    elif damage == "reshaped":
        name = next(k for k, v in state["server"]["model"].items() if v.dim() == 2)
        state["server"]["model"][name] = state["server"]["model"][name].reshape(5, 7, -1)[..., 0]
        torch.save(state, path)
    elif damage == "workers":
        state["workers"] = state["workers"][:1]
        torch.save(state, path)
    elif damage == "config_json":
        (run / "config.json").write_text('{"config": {"lr": 0.')
    elif damage == "latest_escapes":
        other = copy_run(finished_run, tmp_path / "other")
        (run / "checkpoints" / "latest").write_text(
            f"../../{other.name}/checkpoints/{path.name}\n")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    line = refused(["--resume", str(run), "--steps", "8"])
    assert "--resume" in line and expected in line, line


def test_bad_input_from_the_console_script_is_one_line(tmp_path):
    """The real entry point, as a user runs it: one line on stderr, nothing on stdout."""
    out = subprocess.run([sys.executable, "-m", "dist_quant", "train", "--lr", "nan",
                          "--run-dir", str(tmp_path / "r")], capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == ["Error: --lr: must be a finite number; got nan"]
    assert not (tmp_path / "r").exists()


def test_a_resumed_run_needs_a_valid_config_json(tmp_path, no_start):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": [1, 2]}))
    line = refused(["--resume", str(run)])
    assert "--resume" in line and "corrupt" in line
