"""DDP baselines: exact equivalence with single-process training, the run-directory format,
byte counts per hook, early stop, and counted bytes against what gloo's sockets sent."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cpu_checks import check_cpu_records
from ranks import leave_group
from torch import nn

from dist_quant.baselines.ddp import (
    POWERSGD_START_ITER,
    _check,
    _union_length,
    ring_allreduce_bytes,
    train_ddp,
)
from dist_quant.config import TrainConfig
from dist_quant.core.optim import DecoupledMomentumSGD, decay_param_groups
from dist_quant.data import load_dataset, worker_batches
from dist_quant.errors import ConfigError
from dist_quant.ps.common import bn_stats, build_model, flat_params
from dist_quant.runtime.metrics import read_metrics, read_summary

SMALL = {"train_size": 400, "test_size": 200, "hidden": "32,16", "batch_size": 8,
         "progress": False}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tcp_bytes_sent(pid: int) -> int | None:
    """Sum of ``bytes_sent`` less ``bytes_retrans`` over this process's TCP sockets
    (``ss -ti``): the payload each sent once, a segment sent again counted once (a loaded
    machine's loopback may drop and resend), or None."""
    if shutil.which("ss") is None:
        return None
    out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True).stdout.splitlines()
    total, seen = 0, False
    for line, info in zip(out, out[1:] + [""], strict=True):
        if f"pid={pid}," in line:
            m = re.search(r"bytes_sent:(\d+)", info)
            if m:
                again = re.search(r"bytes_retrans:(\d+)", info)
                total = total + int(m.group(1)) - (int(again.group(1)) if again else 0)
                seen = True
    return total if seen else None


def _worker(rank: int, world: int, port: int, jobs: list[dict], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for job in jobs:
        cfg = TrainConfig(method="ddp", workers=world, run_dir=f"{out}/{job['name']}",
                          **{**SMALL, **job["cfg"]}).validate()
        dist.barrier()
        sent0 = _tcp_bytes_sent(os.getpid())
        result = train_ddp(cfg)
        dist.barrier()
        sent1 = _tcp_bytes_sent(os.getpid())
        wire = torch.tensor([-1 if sent0 is None or sent1 is None else sent1 - sent0])
        dist.all_reduce(wire)
        if rank == 0:
            torch.save({"params": flat_params(result.model), "bn": bn_stats(result.model),
                        "wire": int(wire) if int(wire) >= 0 else None},
                       f"{out}/{job['name']}/final.pt")
        torch.save({"params": flat_params(result.model), "bn": bn_stats(result.model)},
                   f"{out}/{job['name']}/final_rank{rank}.pt")
    leave_group()


def _spawn(world: int, jobs: list[dict], out: Path) -> Path:
    # fork: the children inherit the imported modules (spawn would re-import torch per rank)
    mp.start_processes(_worker, args=(world, _free_port(), jobs, str(out)), nprocs=world,
                       join=True, start_method="fork")
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    plain = {"batchnorm": False, "keep_prob": 1.0}
    return _spawn(2, [
        {"name": "fp32", "cfg": {"ddp_hook": "none", "steps": 12, "eval_every": 5, **plain}},
        {"name": "fp16", "cfg": {"ddp_hook": "fp16", "steps": 6, "eval_every": 4}},
        {"name": "powersgd", "cfg": {"ddp_hook": "powersgd", "steps": 6, "eval_every": 4}},
        {"name": "stop", "cfg": {"ddp_hook": "none", "steps": 40, "eval_every": 5,
                                 "stop_accuracy": 0.01}},
        {"name": "nostop", "cfg": {"ddp_hook": "none", "steps": 6, "eval_every": 3,
                                   "stop_accuracy": 0.99}},
    ], tmp_path_factory.mktemp("ddp2"))


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory) -> Path:
    # the default widths (79k parameters): gloo's per-message headers stay far below 2 %
    return _spawn(3, [{"name": "fp32", "cfg": {"ddp_hook": "none", "steps": 5,
                                               "hidden": "256,256", "eval_every": 2}}],
                  tmp_path_factory.mktemp("ddp3"))


def _cfg(run: Path) -> TrainConfig:
    return TrainConfig.from_dict(json.loads((run / "config.json").read_text())["config"])


def _union_reference(cfg: TrainConfig) -> tuple[torch.Tensor, list[float]]:
    """Single-process training on the union of the W ranks' batches."""
    ds = load_dataset(cfg)
    shards = [ds.shard(r, cfg.workers) for r in range(cfg.workers)]
    samplers = [worker_batches(len(s.y_train), cfg.batch_size, cfg.seed, r)
                for r, s in enumerate(shards)]
    model = build_model(cfg, ds.in_features, ds.num_classes, torch.device("cpu"))
    opt = DecoupledMomentumSGD(decay_param_groups(model, cfg.weight_decay, cfg.decay_all),
                               lr=cfg.lr, momentum=cfg.momentum)
    losses = []
    for _ in range(cfg.steps):
        idx = [s.next() for s in samplers]
        x = torch.cat([sh.x_train[i] for sh, i in zip(shards, idx, strict=True)])
        y = torch.cat([sh.y_train[i] for sh, i in zip(shards, idx, strict=True)])
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return flat_params(model), losses


def test_fp32_ddp_equals_training_on_the_union_of_batches(two_ranks):
    # BatchNorm off: with BN each rank normalises by its own batch statistics, which is not the
    # union batch's normalisation, so DDP equals the union reference only without BN.
    run = two_ranks / "fp32"
    cfg = _cfg(run)
    ref_params, ref_losses = _union_reference(cfg)
    got = torch.load(run / "final.pt", weights_only=True)["params"]
    assert torch.allclose(got, ref_params, rtol=0, atol=1e-5), (got - ref_params).abs().max()
    steps = [r for r in read_metrics(run) if r["kind"] == "step"]
    # the logged loss is the mean over ranks = the union's mean loss (equal batch sizes)
    assert [r["step"] for r in steps] == list(range(1, cfg.steps + 1))
    for rec, ref in zip(steps, ref_losses, strict=True):
        assert rec["loss"] == pytest.approx(ref, abs=1e-5)


def _check_format(run: Path, compressor: str, steps: int, eval_every: int) -> list[dict]:
    recs = read_metrics(run)
    step_lines = [r for r in recs if r["kind"] == "step"]
    eval_lines = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in step_lines] == list(range(1, steps + 1))
    want_evals = sorted({s for s in range(1, steps + 1) if s % eval_every == 0} | {steps})
    assert [r["step"] for r in eval_lines] == want_evals
    for r in step_lines:
        assert set(r["time"]) == {"compute", "encode", "communicate", "decode", "update"}
        assert all(v >= 0 for v in r["time"].values())
        assert r["loss"] == r["loss"] and r["skipped"] == 0
    walls = [r["wall"] for r in recs]
    assert walls == sorted(walls)
    summary = read_summary(run)
    assert summary["compressor"] == compressor and summary["method"] == "ddp"
    assert summary["steps"] == steps and summary["workers"] == _cfg(run).workers
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in step_lines)
    assert summary["bytes_down"] == sum(r["bytes_down"] for r in step_lines)
    assert summary["test_accuracy"] == eval_lines[-1]["test_accuracy"]
    # read as a parameter-server run is: the step evaluated, each evaluation's own step
    assert summary["test_step"] == eval_lines[-1]["step"] and summary["eval_lag"] == 0
    assert all(r["evaluated_at"] == r["step"] for r in eval_lines)
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    for key in ("test_loss", "fp32_bytes_up", "fp32_bytes_down", "params", "wall_seconds",
                "skipped_payloads"):
        assert key in summary
    assert "config" in json.loads((run / "config.json").read_text())
    # rank 0's thread CPU per phase (gloo's threads and the hooks' continuations not counted)
    check_cpu_records(run, cpu_le_wall=False)
    return step_lines


def _bn_numel(cfg: TrainConfig) -> int:
    return 2 * sum(cfg.hidden_sizes) if cfg.batchnorm else 0


def _stats_bytes(step: int, cfg: TrainConfig) -> int:
    evaluated = step % cfg.eval_every == 0 or step == cfg.steps
    return (cfg.workers - 1) * 4 * _bn_numel(cfg) if evaluated else 0


def test_fp32_bytes_are_the_ring_allreduce_of_the_gradient_exactly(three_ranks):
    run = three_ranks / "fp32"
    cfg = _cfg(run)
    n = read_summary(run)["params"]
    assert n == sum(p.numel() for p in build_model(cfg, 40, 10, torch.device("cpu"))
                    .parameters())
    for r in _check_format(run, "none", cfg.steps, cfg.eval_every):
        # W = 3: each reduce-scatter and each allgather moves (W - 1) * 4n bytes in total
        assert r["bytes_up"] == 2 * 4 * n + _stats_bytes(r["step"], cfg)
        assert r["bytes_down"] == 2 * 4 * n
    summary = read_summary(run)
    assert summary["fp32_bytes_down"] == cfg.steps * 2 * 4 * n
    # fp32 would send the same statistics: the fp32 hook's reference is exactly what it sent
    assert summary["fp32_bytes_up"] == summary["bytes_up"]


def test_counted_bytes_are_what_gloo_sockets_sent(three_ranks):
    run = three_ranks / "fp32"
    wire = torch.load(run / "final.pt", weights_only=True)["wire"]
    if wire is None:
        pytest.skip("ss -ti shows no per-socket byte counters here")
    s = read_summary(run)
    counted = s["bytes_up"] + s["bytes_down"]
    # TCP payload of all ranks, start to end of training (gloo message headers, the evaluation
    # gathers and barriers included): at least the counted bytes, at most 2 % more
    assert counted <= wire <= 1.02 * counted, (wire, counted)


def test_fp16_hook_halves_the_bytes_and_writes_the_format(two_ranks):
    run = two_ranks / "fp16"
    cfg = _cfg(run)
    n = read_summary(run)["params"]
    for r in _check_format(run, "fp16", cfg.steps, cfg.eval_every):
        assert r["bytes_up"] == 2 * n + _stats_bytes(r["step"], cfg)
        assert r["bytes_down"] == 2 * n


def _powersgd_elements(cfg: TrainConfig) -> int:
    """P + Q + uncompressed elements of one compressed step (torch's rule: a matrix n x m is
    compressed iff (n + m) r * 2 < n m with r = min(n, m, rank))."""
    model = build_model(cfg, 40, 10, torch.device("cpu"))
    total = 0
    for p in model.parameters():
        if p.dim() < 2:
            total += p.numel()
            continue
        rows, cols = p.shape[0], p.numel() // p.shape[0]
        r = min(rows, cols, cfg.powersgd_rank)
        total += (rows + cols) * r if (rows + cols) * r * 2 < rows * cols else rows * cols
    return total


def test_powersgd_hook_counts_its_p_q_and_uncompressed_allreduces(two_ranks):
    run = two_ranks / "powersgd"
    cfg = _cfg(run)
    n = read_summary(run)["params"]
    compressed = _powersgd_elements(cfg)
    assert compressed < n / 5
    for r in _check_format(run, "powersgd", cfg.steps, cfg.eval_every):
        elements = n if r["step"] <= POWERSGD_START_ITER else compressed
        assert r["bytes_up"] == 4 * elements + _stats_bytes(r["step"], cfg)
        assert r["bytes_down"] == 4 * elements


def test_ranks_share_parameters_and_rank0_keeps_its_own_bn_statistics(two_ranks):
    ranks = [torch.load(two_ranks / "fp16" / f"final_rank{r}.pt", weights_only=True)
             for r in range(2)]
    assert ranks[0]["bn"].numel() == _bn_numel(_cfg(two_ranks / "fp16"))
    assert torch.isfinite(ranks[0]["params"]).all()
    # the replicas are bitwise equal; the BatchNorm running statistics are each rank's own
    # (rank 0 evaluates with the average, then restores its own)
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    assert not torch.equal(ranks[0]["bn"], ranks[1]["bn"])


def test_stop_accuracy_ends_at_the_first_evaluation_reaching_it(two_ranks):
    run = two_ranks / "stop"
    summary = read_summary(run)
    assert summary["steps"] == 5 and summary["stopped_early"] is True
    assert read_metrics(run)[-1] == {**read_metrics(run)[-1], "kind": "eval", "step": 5}
    # a target no evaluation reaches: the run goes on to --steps
    summary = read_summary(two_ranks / "nostop")
    assert summary["steps"] == 6 and summary["stopped_early"] is False


def test_bad_settings_name_the_option():
    cfg = TrainConfig(method="ddp", workers=2)
    with pytest.raises(ConfigError, match="--workers"):
        _check(cfg, 3)
    with pytest.raises(ConfigError, match="--method"):
        _check(cfg.replace(method="ps"), 2)
    with pytest.raises(ConfigError, match="--inject-nonfinite"):
        _check(cfg.replace(inject_nonfinite="0:1"), 2)


def test_ring_bytes_and_interval_union():
    assert ring_allreduce_bytes(100, 1) == (0, 0)
    assert ring_allreduce_bytes(100, 4) == (300, 300)
    assert _union_length([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0)]) == pytest.approx(3.0)
    assert _union_length([]) == 0.0
