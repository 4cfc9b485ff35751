"""The baseline compressors in the parameter-server job: chosen with --compressor and their
options, exact uplink bytes per step, a real distributed run equal to the simulator, top-k's
error-feedback residual carried through a resume, and bad options exiting 2 naming them."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner
from test_train import TINY, assert_same_state, distributed, final, model_for, simulated, tiny

from dist_quant.compress import get_compressor
from dist_quant.runtime.checkpoint import load_checkpoint
from dist_quant.runtime.metrics import read_metrics
from dist_quant.train import run_in_process, train_command

pytestmark = pytest.mark.slow

JOBS = {
    "qsgd": dict(compressor="qsgd", qsgd_levels=3),
    "terngrad": dict(compressor="terngrad"),
    "topk-ef": dict(compressor="topk", sparsity_ratio=0.05, error_feedback=True),
    "randk": dict(compressor="randk", sparsity_ratio=0.5),
}


@pytest.mark.parametrize("name", JOBS)
def test_simulated_job_sends_exact_bytes_and_stays_finite(name, tmp_path):
    cfg = tiny(tmp_path, name, workers=2, steps=6, checkpoint_every=3, **JOBS[name])
    run = simulated(cfg)
    n = sum(p.numel() for p in model_for(cfg).parameters())
    k = sum(2 * m.num_features for m in model_for(cfg).modules()
            if isinstance(m, torch.nn.BatchNorm1d))
    up = get_compressor(cfg.compressor, bucket_size=cfg.bucket_size, levels=cfg.qsgd_levels,
                        ratio=cfg.sparsity_ratio)
    steps = [r for r in read_metrics(run) if r["kind"] == "step"]
    assert len(steps) == cfg.steps
    for r in steps:
        is_eval = r["step"] % cfg.eval_every == 0 or r["step"] == cfg.steps
        assert r["bytes_up"] == cfg.workers * (up.payload_nbytes(n) + 4 * k * is_eval)
        assert r["loss"] == r["loss"] and r["skipped"] == 0
    state = final(run)
    assert state["step"] == cfg.steps
    residuals = [w["compressor"] for w in state["workers"]]
    if cfg.error_feedback:  # the top-k residual is real state, carried in checkpoints
        assert all(r["residual"].abs().sum() > 0 for r in residuals)


def test_topk_error_feedback_distributed_equals_simulate_and_resumes(tmp_path):
    cfg = tiny(tmp_path, "dist", workers=2, steps=6, checkpoint_every=3, **JOBS["topk-ef"])
    dist_run = distributed(cfg)
    sim_run = simulated(cfg.replace(run_dir=str(tmp_path / "sim")))
    a, b = final(dist_run), final(sim_run)
    assert_same_state(a, b)
    # resume the simulated run from step 3 (as if it had died after it): the same end,
    # the top-k residuals included
    assert all(w["compressor"]["residual"].abs().sum() > 0 for w in load_checkpoint(
        sim_run / "checkpoints" / "step_3.pt")["workers"])
    copy = tmp_path / "resumed"
    shutil.copytree(sim_run, copy)
    (copy / "checkpoints" / "latest").write_text("step_3.pt\n")
    assert run_in_process(cfg.replace(simulate=True, run_dir=str(copy), resume=str(copy))) == 0
    assert_same_state(final(copy), b)


@pytest.mark.parametrize("argv, option", [
    (["--compressor", "qsgd", "--qsgd-levels", "0"], "--qsgd-levels"),
    (["--compressor", "topk", "--sparsity-ratio", "0"], "--sparsity-ratio"),
    (["--compressor", "randk", "--sparsity-ratio", "1.5"], "--sparsity-ratio"),
    (["--downlink", "qsgd"], "--downlink"),
    (["--downlink", "terngrad"], "--downlink"),
    (["--downlink", "randk"], "--downlink"),
])
def test_bad_value_exits_2_naming_the_option(argv, option, tmp_path):
    tiny_argv = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "progress"]
    result = CliRunner().invoke(train_command, [*tiny_argv, "--no-progress", *argv,
                                                "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert option in result.output
    assert not (tmp_path / "r").exists()
