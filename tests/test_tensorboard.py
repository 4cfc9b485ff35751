"""--tensorboard: the event files hold the numbers of metrics.jsonl (step and evaluation
lines), DIST_QUANT_TENSORBOARD=1 does the same, and without the package the option is refused
in one line (exit 2) before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_train import simulated, tiny

from dist_quant.runtime.metrics import read_metrics
from dist_quant.runtime.tensorboard import ENV, read_scalars, step_scalars

pytest.importorskip("tensorboard")


def _assert_same(run_dir) -> None:
    scalars = read_scalars(run_dir)
    lines = read_metrics(run_dir)
    assert {r["kind"] for r in lines} == {"step", "eval"}
    for rec in lines:
        for tag, value in step_scalars(rec).items():
            assert scalars[tag][rec["step"]] == pytest.approx(value, rel=1e-6, abs=1e-12), tag
    steps = [r["step"] for r in lines if r["kind"] == "step"]
    assert sorted(scalars["train/loss"]) == steps
    assert sorted(scalars["test/accuracy"]) == [r["step"] for r in lines if r["kind"] == "eval"]
    assert "time/compute" in scalars and "bytes/up" in scalars and "train/lr" in scalars


def test_event_files_hold_the_numbers_of_metrics_jsonl(tmp_path):
    run = simulated(tiny(tmp_path, "tb", workers=2, steps=6, tensorboard=True))
    assert any(p.name.startswith("events.out.tfevents") for p in run.iterdir())
    _assert_same(run)


def test_the_environment_variable_asks_for_them_too(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "1")
    run = simulated(tiny(tmp_path, "tb-env", workers=2, steps=3, lr_schedule="cosine"))
    _assert_same(run)


def test_without_the_package_the_option_is_refused_in_one_line(tmp_path):
    code = ("import sys; sys.modules['tensorboard'] = None; "
            "from dist_quant.cli import main; sys.argv = ['dist-quant', 'train', "
            "'--tensorboard', '--simulate', '--run-dir', sys.argv[1]]; main()")
    env = {k: v for k, v in os.environ.items() if k != ENV}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--tensorboard" in lines[0] and "tensorboard package" in lines[0]
    assert not (tmp_path / "run").exists()
