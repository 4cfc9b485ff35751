"""The command line of ``dist-quant train``: bad values exit 2 naming the option before any
process starts; ``python -m dist_quant.train`` outside torchrun; the in-process reference's
options (--stop-accuracy, --resume checks)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dist_quant.config import EVAL_LAG, TrainConfig
from dist_quant.runtime.metrics import read_metrics, read_summary
from dist_quant.train import run_in_process, torchrun_command, train_command

TINY = ["--hidden", "7,5", "--train-size", "120", "--test-size", "30", "--batch-size", "4",
        "--no-progress"]


@pytest.mark.parametrize("argv, option", [
    (["--lr", "-1"], "--lr"),
    (["--workers", "0"], "--workers"),
    (["--keep-prob", "0"], "--keep-prob"),
    (["--compressor", "twobit"], "--compressor"),
    (["--downlink", "nope"], "--downlink"),
    (["--downlink", "onebit"], "--downlink"),
    (["--downlink", "kbit", "--bits", "1"], "--downlink"),
    (["--bits", "9"], "--bits"),
    (["--inject-nonfinite", "4:1"], "--inject-nonfinite"),
    (["--inject-nonfinite", "x"], "--inject-nonfinite"),
    (["--stop-accuracy", "70"], "--stop-accuracy"),
    (["--batch-size", "2000"], "--batch-size"),
    (["--timeout", "0"], "--timeout"),
    (["--method", "ddp", "--simulate"], "--simulate"),
    (["--resume", "/nonexistent/run"], "--resume"),
])
def test_bad_value_exits_2_naming_the_option(argv, option, tmp_path):
    result = CliRunner().invoke(train_command, [*argv, "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert option in result.output
    assert not (tmp_path / "r").exists()  # nothing started


def test_bad_value_from_the_console_script_exits_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dist_quant", "train", "--momentum", "1.5",
                          "--run-dir", str(tmp_path / "r")], capture_output=True, text=True)
    assert out.returncode == 2
    assert "--momentum" in out.stderr and "torch.distributed" not in out.stderr
    assert not (tmp_path / "r").exists()


def test_module_outside_torchrun_says_how_to_run():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-m", "dist_quant.train", *TINY],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 2
    assert "torchrun" in out.stderr


def test_torchrun_command_sizes_the_world():
    ps = torchrun_command(TrainConfig(workers=3))
    assert ps[1:5] == ["-m", "dist_quant.localrun", "--standalone", "--nproc-per-node"]
    assert ps[5] == "4" and ps[6:8] == ["--max-restarts", "0"]
    assert ps[10:12] == ["-m", "dist_quant.train"]
    assert torchrun_command(TrainConfig(workers=3, method="ddp"))[5] == "3"
    assert torchrun_command(TrainConfig(max_restarts=2))[6:8] == ["--max-restarts", "2"]
    argv = ps[12:]
    assert argv[argv.index("--workers") + 1] == "3" and "--batchnorm" in argv


def test_simulate_through_the_cli_and_stop_accuracy(tmp_path):
    run = tmp_path / "sim"
    result = CliRunner().invoke(train_command, [*TINY, "--simulate", "--workers", "2",
                                                "--steps", "20", "--eval-every", "4",
                                                "--stop-accuracy", "0.01",
                                                "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output and "of fp32" in result.output
    evals = [r for r in read_metrics(run) if r["kind"] == "eval"]
    first = next(r for r in evals if r["test_accuracy"] >= 0.01)
    summary = read_summary(run)
    # the decision travels --eval-lag steps behind its evaluation (EVAL_LAG = 8 by default)
    stop = first["step"] + EVAL_LAG
    assert summary["steps"] == stop < 20 and summary["stopped_early"]
    assert summary["stop_eval_step"] == first["step"] and summary["eval_lag"] == EVAL_LAG
    assert (f"stopped early at step {stop}: --stop-accuracy reached at the evaluation of step "
            f"{first['step']}") in result.output
    assert (run / "checkpoints" / f"step_{stop}.pt").is_file()
    # a target above every evaluation: the run goes on to --steps and says nothing of a stop
    best = max(r["test_accuracy"] for r in evals)
    assert best < 0.99
    result = CliRunner().invoke(train_command, [*TINY, "--simulate", "--workers", "2",
                                                "--steps", "20", "--eval-every", "4",
                                                "--stop-accuracy", "0.99",
                                                "--run-dir", str(tmp_path / "all")])
    assert result.exit_code == 0, result.output
    summary = read_summary(tmp_path / "all")
    assert summary["steps"] == 20 and not summary["stopped_early"]
    assert "stopped early" not in result.output


def test_resume_refuses_a_changed_trajectory(tmp_path):
    cfg = TrainConfig(hidden="7,5", train_size=120, test_size=30, batch_size=4, workers=2,
                      steps=4, progress=False, run_dir=str(tmp_path / "r"), simulate=True)
    assert run_in_process(cfg) == 0
    runner = CliRunner()
    result = runner.invoke(train_command, ["--resume", cfg.run_dir, "--steps", "6",
                                           "--compressor", "none"])
    assert result.exit_code == 2 and "--compressor" in result.output
    result = runner.invoke(train_command, ["--resume", cfg.run_dir])
    assert result.exit_code == 2 and "--steps" in result.output
    # the saved options are the base: only --steps is given, the rest comes from config.json
    result = runner.invoke(train_command, ["--resume", cfg.run_dir, "--steps", "6"])
    assert result.exit_code == 0, result.output
    assert read_summary(cfg.run_dir)["steps"] == 6


def test_divergence_ends_the_run_with_a_message(tmp_path, capfd):
    """A huge learning rate: every payload is non-finite, the run stops instead of idling."""
    cfg = TrainConfig(hidden="7,5", train_size=120, test_size=30, batch_size=4, workers=2,
                      steps=50, lr=1e12, progress=False, run_dir=str(tmp_path / "r"),
                      simulate=True)
    assert run_in_process(cfg) == 1
    err = capfd.readouterr().err
    assert "no valid payload for 10 consecutive steps" in err and "lower --lr" in err
    assert err.count("left out 2 of 2 payloads") == 10  # printed lines are bounded
    skipped = [r["skipped"] for r in read_metrics(cfg.run_dir) if r["kind"] == "step"]
    assert skipped[-9:] == [2] * 9 and len(skipped) < 50  # the 10th step ended the run
