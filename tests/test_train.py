"""The parameter-server job, run for real: torchrun over gloo on loopback, tiny models.

Each distributed job runs once per module (fixtures) and several tests read its run
directory. The references are computed independently: plain single-process training on the
union of the workers' batches (compressor ``none``), and the ``--simulate`` reference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from run_states import assert_equal

from dist_quant.compress import get_compressor
from dist_quant.config import TrainConfig
from dist_quant.core.optim import DecoupledMomentumSGD, decay_param_groups
from dist_quant.data import load_dataset, worker_batches
from dist_quant.ps import common
from dist_quant.ps.worker import replica_of
from dist_quant.runtime.checkpoint import latest_checkpoint, load_checkpoint
from dist_quant.runtime.metrics import read_metrics, read_summary
from dist_quant.train import launch, run_in_process

pytestmark = pytest.mark.slow

# 40 -> 7 -> 5 -> 10 with BatchNorm: 399 parameters (odd), 24 BN statistics; buckets of 5
# do not divide it, so every layout has a short last bucket.
TINY = dict(hidden="7,5", train_size=120, test_size=30, batch_size=4, eval_every=3,
            progress=False, timeout=60.0, bucket_size=5, lr=0.05)


def tiny(tmp: Path, name: str, **changes) -> TrainConfig:
    return TrainConfig(**{**TINY, "run_dir": str(tmp / name), **changes}).validate()


def distributed(cfg: TrainConfig) -> Path:
    assert launch(cfg) == 0
    return Path(cfg.run_dir)


def simulated(cfg: TrainConfig) -> Path:
    assert run_in_process(cfg.replace(simulate=True)) == 0
    return Path(cfg.run_dir)


def final(run_dir: Path) -> dict:
    return load_checkpoint(latest_checkpoint(run_dir))


def assert_same_state(a: dict, b: dict) -> None:
    """Server parameters, buffers, momentum, replica and every worker state, bit for bit."""
    assert a["step"] == b["step"]
    for key in ("model", "optimizer", "replica", "generator"):
        assert_equal(a["server"][key], b["server"][key], f"server.{key}")
    assert len(a["workers"]) == len(b["workers"])
    for i, (wa, wb) in enumerate(zip(a["workers"], b["workers"], strict=True)):
        assert_equal(wa, wb, f"worker {i}")


def model_for(cfg: TrainConfig) -> torch.nn.Module:
    data = load_dataset(cfg)
    return common.build_model(cfg, data.in_features, data.num_classes, torch.device("cpu"))


# ---- the jobs ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def none_w3(runs):
    cfg = tiny(runs, "none_w3", workers=3, compressor="none", batchnorm=False, keep_prob=1.0,
               steps=8, checkpoint_every=4, lr=0.1, weight_decay=0.01)
    return cfg, distributed(cfg)


@pytest.fixture(scope="module")
def onebit_w2(runs):
    """W = 2, 1-bit with error feedback (its residuals are part of the checkpoints)."""
    cfg = tiny(runs, "onebit_w2", workers=2, compressor="onebit", error_feedback=True,
               keep_prob=0.8, steps=9, checkpoint_every=3)
    return cfg, distributed(cfg), simulated(cfg.replace(run_dir=str(runs / "onebit_w2_sim")))


@pytest.fixture(scope="module")
def w4_downlink(runs):
    """W = 4, 1-bit both ways (sign downlink), worker 1's gradient NaN at step 2."""
    cfg = tiny(runs, "w4", workers=4, compressor="onebit", downlink="sign",
               downlink_bucket_size=7, inject_nonfinite="1:2", steps=6, keep_prob=0.8)
    return cfg, distributed(cfg), simulated(cfg.replace(run_dir=str(runs / "w4_sim")))


# ---- correctness -------------------------------------------------------------------------
def test_none_equals_single_process_training_on_the_union_of_batches(none_w3):
    """fp32 payloads: the server's mean of W per-worker gradients is the gradient of the mean
    loss over the union of the W minibatches (equal sizes), so the run is plain SGD."""
    cfg, run_dir = none_w3
    data = load_dataset(cfg)
    model = common.build_model(cfg, data.in_features, data.num_classes, torch.device("cpu"))
    opt = DecoupledMomentumSGD(decay_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                               momentum=cfg.momentum)
    shards = [data.shard(i, cfg.workers) for i in range(cfg.workers)]
    samplers = [worker_batches(len(s.y_train), cfg.batch_size, cfg.seed, i)
                for i, s in enumerate(shards)]
    for _ in range(cfg.steps):
        idx = [smp.next() for smp in samplers]
        x = torch.cat([s.x_train[i] for s, i in zip(shards, idx, strict=True)])
        y = torch.cat([s.y_train[i] for s, i in zip(shards, idx, strict=True)])
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    got = final(run_dir)["server"]["model"]
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.detach(), rtol=0, atol=1e-5)
    assert not torch.equal(got["0.weight"], model_for(cfg).state_dict()["0.weight"])


def test_onebit_distributed_equals_simulate(onebit_w2):
    _, dist_dir, sim_dir = onebit_w2
    assert_same_state(final(dist_dir), final(sim_dir))
    dist_steps = [r for r in read_metrics(dist_dir) if r["kind"] == "step"]
    sim_steps = [r for r in read_metrics(sim_dir) if r["kind"] == "step"]
    assert [r["loss"] for r in dist_steps] == [r["loss"] for r in sim_steps]


def test_w4_with_downlink_and_nonfinite_equals_simulate(w4_downlink):
    _, dist_dir, sim_dir = w4_downlink
    assert_same_state(final(dist_dir), final(sim_dir))


def test_w1(runs):
    cfg = tiny(runs, "w1", workers=1, compressor="kbit", bits=3, steps=4)
    assert_same_state(final(distributed(cfg)),
                      final(simulated(cfg.replace(run_dir=str(runs / "w1_sim")))))


# ---- bytes -------------------------------------------------------------------------------
@pytest.mark.parametrize("job", ["none_w3", "onebit_w2", "w4_downlink"])
def test_bytes_per_step_are_exact(job, request):
    """Uplink = W x payload_nbytes(n) (+ W x 4 x BN statistics at evaluation steps);
    downlink = W x the downlink compressor's payload_nbytes(n)."""
    cfg, run_dir = request.getfixturevalue(job)[:2]
    model = model_for(cfg)
    n = sum(p.numel() for p in model.parameters())
    k = sum(2 * m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d))
    up = get_compressor(cfg.compressor, bucket_size=cfg.bucket_size, bits=cfg.bits)
    down = get_compressor(cfg.downlink, bucket_size=cfg.downlink_bucket_size, bits=cfg.bits)
    steps = [r for r in read_metrics(run_dir) if r["kind"] == "step"]
    assert len(steps) == cfg.steps
    evals = 0
    for r in steps:
        is_eval = r["step"] % cfg.eval_every == 0 or r["step"] == cfg.steps
        evals += is_eval
        assert r["bytes_up"] == cfg.workers * (up.payload_nbytes(n) + 4 * k * is_eval)
        assert r["bytes_down"] == cfg.workers * down.payload_nbytes(n)
    summary = read_summary(run_dir)
    fp32 = get_compressor("none").payload_nbytes(n)
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in steps)
    assert summary["bytes_down"] == sum(r["bytes_down"] for r in steps)
    assert summary["fp32_bytes_up"] == cfg.workers * (cfg.steps * fp32 + evals * 4 * k)
    assert summary["fp32_bytes_down"] == cfg.workers * cfg.steps * fp32
    assert summary["params"] == n and summary["params"] % 2 == 1


# ---- faults, downlink, resume ------------------------------------------------------------
def test_nonfinite_gradient_is_skipped_and_counted(w4_downlink):
    cfg, run_dir, _ = w4_downlink
    skipped = {r["step"]: r["skipped"] for r in read_metrics(run_dir) if r["kind"] == "step"}
    assert skipped == {s: int(s == 2) for s in range(1, cfg.steps + 1)}
    assert read_summary(run_dir)["skipped_payloads"] == 1


def test_downlink_compression_keeps_replicas_identical(w4_downlink):
    """Every worker's replica equals the server's tracked copy bit for bit, and differs from
    the server's parameters by the compression error still to be sent."""
    cfg, run_dir, _ = w4_downlink
    state = final(run_dir)
    model = model_for(cfg)
    replica = state["server"]["replica"]
    for w in state["workers"]:
        assert torch.equal(replica_of(model, w), replica)
    params = torch.cat([state["server"]["model"][name].reshape(-1)
                        for name, _ in model.named_parameters()])
    initial = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert 0 < (params - replica).norm() < (params - initial).norm()


def test_resume_equals_uninterrupted(onebit_w2, tmp_path):
    """Continue from the checkpoint of step 3 (as if the run had died after it)."""
    cfg, run_dir, _ = onebit_w2
    residuals = [w["compressor"]["residual"] for w in load_checkpoint(
        run_dir / "checkpoints" / "step_3.pt")["workers"]]
    assert all(r is not None and r.abs().sum() > 0 for r in residuals)
    copy = tmp_path / "resumed"
    shutil.copytree(run_dir, copy)
    (copy / "checkpoints" / "latest").write_text("step_3.pt\n")
    assert launch(cfg.replace(run_dir=str(copy), resume=str(copy))) == 0
    assert_same_state(final(copy), final(run_dir))
    lines = lambda d: [(r["kind"], r["step"], r.get("loss"), r.get("test_accuracy"))  # noqa: E731
                       for r in read_metrics(d)]
    assert lines(copy) == lines(run_dir)
    assert read_summary(copy)["bytes_up"] == read_summary(run_dir)["bytes_up"]


def test_abort_on_nonfinite_ends_the_run(runs, capfd):
    cfg = tiny(runs, "abort", workers=2, inject_nonfinite="0:2", on_nonfinite="abort", steps=5)
    assert launch(cfg) == 1
    err = capfd.readouterr().err
    assert "run aborted: step 2: worker 0" in err and "non-finite" in err


def test_config_json_records_the_run(onebit_w2):
    cfg, run_dir, _ = onebit_w2
    saved = json.loads((run_dir / "config.json").read_text())
    assert TrainConfig.from_dict(saved["config"]) == cfg
    assert {"python", "torch"} <= set(saved["versions"])
