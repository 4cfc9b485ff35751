"""Sharded (``--servers S``) and colocated (``--colocate``) parameter servers, run for real.

Two distributed jobs run once per module (torchrun over gloo on loopback, tiny model):
S = 2 dedicated servers with worker 1's gradient NaN at step 2, and W = 3 colocated servers
(odd: the shards are unequal) with a sign downlink and ``--overlap``. Each is compared bit for
bit with its ``--simulate`` reference, and the byte counts with the formula of
:mod:`dist_quant.ps.placement`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from run_states import assert_equal, final

from dist_quant.compress import get_compressor
from dist_quant.config import TrainConfig
from dist_quant.data import load_dataset
from dist_quant.errors import ConfigError
from dist_quant.ps import common
from dist_quant.ps.placement import shard_bounds
from dist_quant.ps.worker import replica_of
from dist_quant.runtime.metrics import read_metrics, read_summary
from dist_quant.train import launch, run_in_process

pytestmark = pytest.mark.slow

# 40 -> 7 -> 5 -> 10 with BatchNorm: 399 parameters, 80 buckets of 5 (the last one short)
TINY = dict(hidden="7,5", train_size=120, test_size=30, batch_size=4, eval_every=3,
            progress=False, timeout=60.0, bucket_size=5, lr=0.05, checkpoint_every=3)


def tiny(tmp: Path, name: str, **changes) -> TrainConfig:
    return TrainConfig(**{**TINY, "run_dir": str(tmp / name), **changes}).validate()


def simulated(cfg: TrainConfig, name: str) -> Path:
    sim = cfg.replace(simulate=True, run_dir=str(Path(cfg.run_dir).parent / name))
    assert run_in_process(sim) == 0
    return Path(sim.run_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("topology")


@pytest.fixture(scope="module")
def sharded(runs):
    cfg = tiny(runs, "s2", workers=3, servers=2, steps=6, inject_nonfinite="1:2")
    assert launch(cfg) == 0
    return cfg, Path(cfg.run_dir), simulated(cfg, "s2_sim")


@pytest.fixture(scope="module")
def colocated(runs):
    cfg = tiny(runs, "co", workers=3, colocate=True, steps=6, downlink="sign",
               downlink_bucket_size=7, error_feedback=False, overlap=True)
    assert launch(cfg) == 0
    return cfg, Path(cfg.run_dir), simulated(cfg, "co_sim")


# ---- shards ------------------------------------------------------------------------------
@pytest.mark.parametrize("n,bucket,shards", [(399, 5, 2), (399, 5, 3), (1000, 128, 4),
                                             (17, 0, 3), (10, 5, 2)])
def test_shards_are_contiguous_balanced_and_on_bucket_boundaries(n, bucket, shards):
    bounds = shard_bounds(n, bucket, shards)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    unit = bucket or 1
    assert all(lo % unit == 0 for lo, _ in bounds)
    buckets = [-(-(hi - lo) // unit) for lo, hi in bounds]
    assert max(buckets) - min(buckets) <= 1 and min(buckets) >= 1


def test_too_many_shards_and_bad_options_are_refused(tmp_path, capfd):
    with pytest.raises(ConfigError, match="--servers"):
        shard_bounds(10, 5, 3)
    # 399 parameters in buckets of 128: 4 buckets, not enough for 5 servers
    cfg = tiny(tmp_path, "many", workers=2, servers=5, bucket_size=128, simulate=True, steps=2)
    assert run_in_process(cfg) == 2
    assert "--servers: 5 shards need at least 5 buckets" in capfd.readouterr().err
    for bad, option in [(dict(servers=0), "--servers"), (dict(servers=2, colocate=True),
                                                          "--colocate"),
                        (dict(method="ddp", servers=2), "--servers"),
                        (dict(method="ddp", colocate=True), "--colocate")]:
        with pytest.raises(ConfigError, match=option):
            TrainConfig(**bad).validate()
    assert TrainConfig(workers=4, servers=2).world_size == 6
    assert TrainConfig(workers=4, colocate=True).world_size == 4


# ---- one step, several placements ---------------------------------------------------------
def test_exact_payloads_give_the_same_parameters_in_every_placement(tmp_path):
    """With fp32 payloads both ways the step is elementwise: the mean of the W rows and the
    optimizer act coordinate by coordinate, so where the shards sit changes no bit. The star,
    S = 2 and S = 3 dedicated servers and W = 3 colocated servers end equal."""
    base = dict(workers=3, steps=5, compressor="none", downlink="none", simulate=True)
    thetas = {}
    for name, extra in {"star": {}, "s2": {"servers": 2}, "s3": {"servers": 3},
                        "colocated": {"colocate": True}}.items():
        cfg = tiny(tmp_path, name, **base, **extra)
        assert run_in_process(cfg) == 0
        state = final(cfg.run_dir)
        thetas[name] = torch.cat([s["theta"] for s in [state["server"], *state["shards"]]])
        assert len(state["shards"]) == cfg.num_shards - 1
    initial = thetas["star"]
    assert not torch.equal(initial, common.flat_params(common.build_model(
        cfg, 40, 10, torch.device("cpu"))))
    for name, theta in thetas.items():
        assert torch.equal(theta, initial), name


@pytest.mark.parametrize("job", ["sharded", "colocated"])
def test_distributed_equals_simulated(job, request):
    cfg, dist_dir, sim_dir = request.getfixturevalue(job)
    a, b = final(dist_dir), final(sim_dir)
    assert_equal(a, b)
    assert len(a["shards"]) == cfg.num_shards - 1
    steps = lambda d: [(r["step"], r["loss"], r["bytes_up"], r["bytes_down"], r["servers"])  # noqa: E731
                       for r in read_metrics(d) if r["kind"] == "step"]
    assert steps(dist_dir) == steps(sim_dir)


@pytest.mark.parametrize("job", ["sharded", "colocated"])
def test_bytes_per_server_are_exact(job, request):
    """Server s's link: r_s x up(n_s) in, r_s x down(n_s) out, r_s = the workers on other
    ranks (W dedicated, W - 1 colocated); BN statistics (4k bytes) from every worker not on
    the leader's rank at evaluation steps."""
    cfg, run_dir, _ = request.getfixturevalue(job)
    data = load_dataset(cfg)
    model = common.build_model(cfg, data.in_features, data.num_classes, torch.device("cpu"))
    n = common.num_params(model)
    k = common.bn_stats(model).numel()
    bounds = shard_bounds(n, cfg.bucket_size, cfg.num_shards)
    up = get_compressor(cfg.compressor, bucket_size=cfg.bucket_size, bits=cfg.bits)
    down = get_compressor(cfg.downlink, bucket_size=cfg.downlink_bucket_size, bits=cfg.bits)
    remote = cfg.workers - 1 if cfg.colocate else cfg.workers
    if cfg.colocate:
        assert len({hi - lo for lo, hi in bounds}) > 1  # W = 3: unequal shards
    for r in (r for r in read_metrics(run_dir) if r["kind"] == "step"):
        is_eval = r["step"] % cfg.eval_every == 0 or r["step"] == cfg.steps
        assert [s["bytes_up"] for s in r["servers"]] == [remote * up.payload_nbytes(hi - lo)
                                                         for lo, hi in bounds]
        assert [s["bytes_down"] for s in r["servers"]] == [
            remote * down.payload_nbytes(hi - lo) for lo, hi in bounds]
        assert r["bytes_stats"] == is_eval * remote * 4 * k
        assert r["bytes_up"] == sum(s["bytes_up"] for s in r["servers"]) + r["bytes_stats"]
        assert r["bytes_down"] == sum(s["bytes_down"] for s in r["servers"])
    summary = read_summary(run_dir)
    assert summary["servers"] == cfg.num_shards and sum(summary["shard_sizes"]) == n


def test_replicas_match_the_servers_tracked_copies(colocated):
    cfg, run_dir, _ = colocated
    state = final(run_dir)
    data = load_dataset(cfg)
    model = common.build_model(cfg, data.in_features, data.num_classes, torch.device("cpu"))
    replica = torch.cat([s["replica"] for s in [state["server"], *state["shards"]]])
    theta = torch.cat([s["theta"] for s in [state["server"], *state["shards"]]])
    for w in state["workers"]:
        assert torch.equal(replica_of(model, w), replica)
    assert (theta - replica).norm() > 0


def test_overlap_changes_no_bit_and_records_what_it_hid(colocated, tmp_path):
    """Shipping each shard during backward gives the sequential step's payloads (each shard
    draws from its own generator), with a NaN injected as well; the shards of the last layers
    leave before backward ends, so some uplink time ran alongside it. The downlink is decoded
    shard by shard in the next forward: the same replica, and its transfer ran beside the next
    step's start (except after a checkpoint, which decodes it at once, and before step 1)."""
    cfg, run_dir, _ = colocated
    states = {}
    for overlap in (False, True):
        c = cfg.replace(run_dir=str(tmp_path / str(overlap)), overlap=overlap, simulate=True,
                        inject_nonfinite="1:2", steps=4)
        assert run_in_process(c) == 0
        states[overlap] = final(c.run_dir)
    assert_equal(states[False], states[True])
    hidden = [r["time_overlap"] for r in read_metrics(run_dir) if r["kind"] == "step"]
    assert len(hidden) == cfg.steps and all(h > 0 for h in hidden)
    sequential = [(r["time_overlap"], r["time_overlap_down"])
                  for r in read_metrics(tmp_path / "False") if r["kind"] == "step"]
    assert sequential == [(0.0, 0.0)] * 4
    down = {r["step"]: r["time_overlap_down"] for r in read_metrics(run_dir)
            if r["kind"] == "step"}
    after_save = {1} | {t + 1 for t in range(cfg.checkpoint_every, cfg.steps,
                                             cfg.checkpoint_every)}
    assert all(d == 0.0 for t, d in down.items() if t in after_save)
    assert all(d > 0 for t, d in down.items() if t not in after_save)


# ---- faults and resume -------------------------------------------------------------------
def test_a_bad_payload_costs_only_its_own_shard(sharded, tmp_path):
    """Worker 1's NaN sits in shard 0: at step 2 shard 0 averages the two other rows, while
    shard 1's step is the one of a run without the NaN, bit for bit."""
    cfg, run_dir, _ = sharded
    servers = {r["step"]: [s["skipped"] for s in r["servers"]]
               for r in read_metrics(run_dir) if r["kind"] == "step"}
    assert servers[2] == [1, 0] and all(v == [0, 0] for s, v in servers.items() if s != 2)
    assert read_summary(run_dir)["skipped_payloads"] == 1
    runs = {}
    for name, inject in (("bad", "1:2"), ("good", "")):
        c = cfg.replace(run_dir=str(tmp_path / name), steps=2, inject_nonfinite=inject,
                        simulate=True)
        assert run_in_process(c) == 0
        runs[name] = final(c.run_dir)
    bad, good = runs["bad"], runs["good"]
    assert_equal(bad["shards"][0], good["shards"][0], "shard 1")
    assert not torch.equal(bad["server"]["theta"], good["server"]["theta"])


@pytest.mark.parametrize("job", ["sharded", "colocated"])
def test_resume_equals_uninterrupted(job, request, tmp_path):
    """Continue the distributed run from its checkpoint of step 3 (as if it had died after
    it) in one process: every shard's and worker's state is in the file. (The distributed
    resume, states sent to every rank, is the same code; tests/test_train.py runs it.)"""
    cfg, run_dir, _ = request.getfixturevalue(job)
    copy = tmp_path / "resumed"
    shutil.copytree(run_dir, copy)
    (copy / "checkpoints" / "latest").write_text("step_3.pt\n")
    resumed = cfg.replace(run_dir=str(copy), resume=str(copy), simulate=True)
    assert run_in_process(resumed) == 0
    assert_equal(final(copy), final(run_dir))
    lines = lambda d: [(r["kind"], r["step"], r.get("loss"), r.get("test_accuracy"))  # noqa: E731
                       for r in read_metrics(d)]
    assert lines(copy) == lines(run_dir)
    assert read_summary(copy)["bytes_up"] == read_summary(run_dir)["bytes_up"]


def test_abort_on_nonfinite_ends_a_sharded_run(tmp_path, capfd):
    cfg = tiny(tmp_path, "abort", workers=2, servers=2, inject_nonfinite="0:2",
               on_nonfinite="abort", steps=5, simulate=True)
    assert run_in_process(cfg) == 1
    err = capfd.readouterr().err
    assert "step 2: shard 0: worker 0" in err and "run aborted" in err


def test_a_lost_peer_ends_a_colocated_run_within_the_timeout(tmp_path):
    """Kill one of three colocated ranks mid-run: the others end with status 1 and a
    message naming it, within --timeout (ranks started by hand: no torchrun agent)."""
    import os
    import signal
    import sys

    from ranks import start_ranks, wait_for_lines

    from dist_quant.train import full_argv

    timeout = 5.0
    cfg = tiny(tmp_path, "lost", workers=3, colocate=True, steps=10**6, eval_every=10**6,
               checkpoint_every=0, timeout=timeout)
    procs = start_ranks([sys.executable, "-m", "dist_quant.train", *full_argv(cfg)], 3)
    try:
        wait_for_lines(procs, Path(cfg.run_dir) / "metrics.jsonl")
        os.kill(procs[2].pid, signal.SIGKILL)
        for p in procs[:2]:
            p.wait(timeout=timeout + 60)   # hang detector: they end on their own
        errors = [p.stderr.read() for p in procs[:2]]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert [p.returncode for p in procs[:2]] == [1, 1]
    # each survivor names the killed rank: from its own wait, or from the leader's notice
    assert all("rank 2 (server 2 and worker 2)" in e for e in errors), errors


def test_presets_and_labels_name_the_topology():
    import dataclasses

    from dist_quant.plot.labels import method_label
    from dist_quant.sweep import PRESETS

    sharded = TrainConfig(**PRESETS["ps-sharded"]).validate()
    colocated = TrainConfig(**PRESETS["ps-colocated"]).validate()
    assert (sharded.servers, sharded.colocate, sharded.downlink) == (2, False, "sign")
    assert (colocated.servers, colocated.colocate, colocated.downlink) == (1, True, "sign")
    assert sharded.compressor == colocated.compressor == "onebit"
    assert method_label(dataclasses.asdict(sharded)).endswith(" down sign b512 S=2")
    assert method_label(dataclasses.asdict(colocated)).endswith(" down sign b512 colocated")
    assert not method_label(dataclasses.asdict(TrainConfig())).endswith(("S=1", "colocated"))
