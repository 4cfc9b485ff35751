"""The 1-bit DDP communication hook (``dist_quant.hooks``) in real gloo processes on loopback:
unbiasedness and variance against their formulas, identical replicas, equality with allreduce
for fp32 payloads, exact bytes (against the formula and against what reaches the transport),
DDP's tiny and odd buckets, training accuracy next to plain DDP, and the CLI plumbing."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ranks import leave_group
from test_ddp import _tcp_bytes_sent
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import dist_quant
import dist_quant.core.collective as collective
from dist_quant.baselines.ddp import train_ddp
from dist_quant.config import TrainConfig
from dist_quant.core.collective import slice_bounds
from dist_quant.core.optim import DecoupledMomentumSGD, decay_param_groups
from dist_quant.data import load_dataset, worker_batches
from dist_quant.errors import ConfigError
from dist_quant.hooks import OneBitState, onebit_hook
from dist_quant.plot.labels import method_label
from dist_quant.ps.common import DROPOUT, build_model, flat_params, generator
from dist_quant.runtime.metrics import read_metrics, read_summary
from dist_quant.sweep import PRESETS, expand_grid

WORLD = 3
N, D, DRAWS = 515, 16, 300          # the draws: one bucket of N coordinates, buckets of D
SIZES = (1, 2, 5, 130, 17)         # parameters of the multi-bucket model: one bucket each
SAFE_Z = 5.0                       # |z| bound per coordinate (Bonferroni: 515 P(|N| > 5) < 3e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _targets(world: int, n: int) -> list[torch.Tensor]:
    """Rank r's fixed gradient: a seeded vector of scale r + 1, with a constant run (a bucket
    whose range is 0 decodes exactly)."""
    out = []
    for r in range(world):
        c = torch.randn(n, generator=torch.Generator().manual_seed(100 + r)) * (r + 1)
        c[2 * D:3 * D] = 0.25 * (r + 1)
        out.append(c)
    return out


class Dot(nn.Module):
    """loss = sum_p <p, c_p>: the gradient of parameter p is c_p, known exactly."""

    def __init__(self, sizes: tuple[int, ...]):
        super().__init__()
        self.ps = nn.ParameterList([nn.Parameter(torch.zeros(k)) for k in sizes])

    def forward(self, cs: list[torch.Tensor]) -> torch.Tensor:
        return sum((p * c).sum() for p, c in zip(self.ps, cs, strict=True))

    def grad(self) -> torch.Tensor:
        return torch.cat([p.grad.reshape(-1) for p in self.ps])


class SplitRecorder:
    """Stands in for torch.distributed inside dist_quant.core.collective: records the bytes each
    all_to_all_single hands to the transport and takes from it (own rank's split excluded)."""

    def __init__(self) -> None:
        self.sent = self.received = 0

    def all_to_all_single(self, out, inp, out_splits, in_splits, group=None, async_op=False):
        rank = dist.get_rank(group)
        self.sent += sum(in_splits) - in_splits[rank]
        self.received += sum(out_splits) - out_splits[rank]
        return dist.all_to_all_single(out, inp, out_splits, in_splits, group=group,
                                      async_op=async_op)

    def __getattr__(self, name):
        return getattr(dist, name)


def _counters(state: OneBitState) -> dict[str, int]:
    return {k: getattr(state, k) for k in ("sent_up", "received_up", "sent_down",
                                           "received_down", "world_up", "world_down",
                                           "fp32_sent")}


def _draws(rank: int, allgather_bits: int) -> dict:
    """DRAWS backward passes of Dot with a fixed gradient per rank; sums of the hook's
    averages; then one gradient holding a NaN on rank 1."""
    c = _targets(WORLD, N)[rank]
    ddp = DistributedDataParallel(Dot((N,)))
    state = OneBitState(compressor="onebit", bucket_size=D, seed=7,
                        allgather_bits=allgather_bits)
    ddp.register_comm_hook(state, onebit_hook)
    s1 = torch.zeros(N, dtype=torch.float64)
    s2 = torch.zeros(N, dtype=torch.float64)
    for _ in range(DRAWS):
        ddp([c]).backward()
        g = ddp.module.grad().double()
        s1 += g
        s2 += g * g
        ddp.zero_grad(set_to_none=True)
    bad = c.clone()
    if rank == 1:
        bad[5] = float("nan")
    ddp([bad]).backward()
    nan_grad = ddp.module.grad().clone()
    ddp.zero_grad(set_to_none=True)
    ddp([c]).backward()  # the exchange goes on after a non-finite step
    return {"sum": s1, "sumsq": s2, "nan_grad": nan_grad, "after_nan": ddp.module.grad().clone()}


def _tiny_buckets(rank: int) -> dict:
    """Dot with one DDP bucket per parameter (sizes below W included): the onebit hook's bytes
    at the transport, and the fp32 hook against plain DDP."""
    out: dict = {}
    rng = torch.Generator().manual_seed(1000 + rank)
    steps = [[torch.randn(k, generator=rng) * 10 ** (i % 3) for i, k in enumerate(SIZES)]
             for _ in range(4)]
    for compressor in ("onebit", "none"):
        model, plain = Dot(SIZES), Dot(SIZES)
        ddp = DistributedDataParallel(model, bucket_cap_mb=1e-6)
        ref = DistributedDataParallel(plain, bucket_cap_mb=1e-6)
        state = OneBitState(compressor=compressor, bucket_size=D, seed=1)
        buckets: list[int] = []

        def hook(s, bucket, state=state, buckets=buckets):
            buckets.append(bucket.buffer().numel())
            return onebit_hook(s, bucket)

        ddp.register_comm_hook(state, hook)
        recorder = SplitRecorder()
        saved, collective.dist = collective.dist, recorder
        grads, refs = [], []
        try:
            for cs in steps:
                ddp(cs).backward()
                ref(cs).backward()
                grads.append(model.grad().clone())
                refs.append(plain.grad().clone())
                ddp.zero_grad(set_to_none=True)
                ref.zero_grad(set_to_none=True)
        finally:
            collective.dist = saved
        out[compressor] = {"buckets": buckets, "grads": torch.stack(grads),
                           "plain": torch.stack(refs), "counters": _counters(state),
                           "transport": (recorder.sent, recorder.received),
                           "stats": state.compression_stats()}
    return out


def _replicas(rank: int, world: int) -> dict:
    """The project's MLP (BatchNorm, dropout) under DDP with the hook, the decoupled optimizer
    of the DDP baseline; the largest difference between any rank's parameters and rank 0's
    after each step, for the default hook and for sign with error feedback."""
    cfg = TrainConfig(method="ddp", workers=world, train_size=600, test_size=100,
                      hidden="32,16", batch_size=32).validate()
    ds = load_dataset(cfg)
    shard = ds.shard(rank, world)
    out = {}
    for name, kwargs in {"onebit": {}, "sign-ef": {"compressor": "sign",
                                                   "error_feedback": True}}.items():
        model = build_model(cfg, ds.in_features, ds.num_classes, torch.device("cpu"),
                            dropout_generator=generator(torch.device("cpu"), 0, rank, DROPOUT))
        ddp = DistributedDataParallel(model, init_sync=False,
                                      forward_sync_buffers=False)
        ddp.register_comm_hook(OneBitState(seed=cfg.seed, **kwargs), onebit_hook)
        opt = DecoupledMomentumSGD(decay_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                   momentum=cfg.momentum)
        sampler = worker_batches(len(shard.y_train), cfg.batch_size, 0, rank)
        diffs = []
        for _ in range(8):
            idx = sampler.next()
            nn.functional.cross_entropy(ddp(shard.x_train[idx]), shard.y_train[idx]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            flat = flat_params(model)
            every = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(every, flat)
            diffs.append(max(float((t - every[0]).abs().max()) for t in every))
        out[name] = {"diffs": diffs, "finite": bool(torch.isfinite(flat).all())}
    return out


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = {"draws": {k: _draws(rank, k) for k in (32, 1)},
              "tiny": _tiny_buckets(rank), "replicas": _replicas(rank, world)}
    torch.save(result, f"{out}/rank{rank}.pt")
    leave_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("hooks")
    mp.start_processes(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True,
                       start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ---- the formulas ----------------------------------------------------------------------------
def _kbit_nbytes(m: int, k: int, d: int = D) -> int:
    """MATH 4f, 4i: 32-byte fixed header, fp32 (a, b) per bucket, ceil(m k / 8) bytes of bits;
    an empty slice sends nothing."""
    return 0 if m == 0 else 32 + 8 * math.ceil(m / d) + math.ceil(m * k / 8)


def _onebit_nbytes(m: int, d: int = D) -> int:
    return _kbit_nbytes(m, 1, d)


def _slices(n: int, world: int = WORLD, d: int = D) -> list[int]:
    """Slice sizes: the nb = ceil(n / d) buckets dealt out, floor(s nb / W) up to
    floor((s + 1) nb / W)."""
    nb = math.ceil(n / d)
    ends = [min(n, (s * nb // world) * d) for s in range(world + 1)]
    return [ends[s + 1] - ends[s] for s in range(world)]


def _bucket_ranges(c: torch.Tensor, d: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    """Each coordinate's bucket min and max (buckets of d from coordinate 0: slices start on
    bucket boundaries, so these are the buckets the compressor sees)."""
    pad = (-c.numel()) % d
    x = torch.cat([c, c[-1:].expand(pad)]).view(-1, d).double()
    lo, hi = x.min(1).values, x.max(1).values
    return lo.repeat_interleave(d)[:c.numel()], hi.repeat_interleave(d)[:c.numel()]


def _uplink_variance() -> tuple[torch.Tensor, torch.Tensor]:
    """V_up,i = (1/W^2) sum_r (c_ri - m_r)(M_r - c_ri) (MATH 4c, 4h) and the bound on what a
    1-bit all-gather adds, (mean_r (M_r - m_r))^2 / 4."""
    cs = _targets(WORLD, N)
    v = torch.zeros(N, dtype=torch.float64)
    spread = torch.zeros(N, dtype=torch.float64)
    for c in cs:
        lo, hi = _bucket_ranges(c)
        v += (c.double() - lo) * (hi - c.double())
        spread += (hi - lo) / WORLD
    return v / WORLD ** 2, spread ** 2 / 4


# ---- tests -----------------------------------------------------------------------------------
def test_slice_bounds_deal_out_compressor_buckets():
    assert slice_bounds(515, 3, 16) == [0, 176, 352, 515]  # 33 buckets: 11 each
    assert slice_bounds(100, 3, 16) == [0, 32, 64, 100]    # 7 buckets: 2, 2, 3
    assert slice_bounds(2, 3, 16) == [0, 0, 0, 2]          # one bucket: one owner
    assert slice_bounds(10, 3, 0) == [0, 3, 6, 10]         # no buckets: coordinates
    assert slice_bounds(0, 3, 16) == [0, 0, 0, 0]
    for n in (1, 2, 5, 17, 130, 515):
        assert [b - a for a, b in zip(slice_bounds(n, 3, 16)[:-1], slice_bounds(n, 3, 16)[1:],
                                      strict=True)] == _slices(n)


def test_every_rank_receives_the_same_average(ranks):
    for bits in (32, 1):
        sums = [r["draws"][bits]["sum"] for r in ranks]
        assert all(torch.equal(sums[0], s) for s in sums), bits
        assert all(torch.equal(ranks[0]["draws"][bits]["sumsq"], r["draws"][bits]["sumsq"])
                   for r in ranks)
    for compressor in ("onebit", "none"):
        grads = [r["tiny"][compressor]["grads"] for r in ranks]
        assert all(torch.equal(grads[0], g) for g in grads), compressor


def test_fp32_allgather_is_unbiased_with_the_predicted_variance(ranks):
    draws = ranks[0]["draws"][32]
    truth = torch.stack(_targets(WORLD, N)).double().mean(0)
    mean = draws["sum"] / DRAWS
    var = (draws["sumsq"] - DRAWS * mean ** 2) / (DRAWS - 1)
    v_up, _ = _uplink_variance()
    exact = v_up == 0  # bucket minima/maxima and the constant run: no noise at all
    assert exact[2 * D:3 * D].all()
    assert torch.allclose(mean[exact], truth[exact], rtol=0, atol=1e-5)
    z = (mean - truth)[~exact] / (v_up[~exact] / DRAWS).sqrt()
    assert z.abs().max() < SAFE_Z, z.abs().max()
    # chi-square with ~500 degrees of freedom: mean z^2 = 1 +- 0.065 (1 sd)
    assert 0.8 < float((z ** 2).mean()) < 1.25, float((z ** 2).mean())
    # the variance itself (each coordinate's sample variance has relative sd sqrt(2/299))
    ratio = float(var[~exact].sum() / v_up[~exact].sum())
    assert 0.93 < ratio < 1.07, ratio


def test_one_bit_allgather_is_unbiased_and_adds_at_most_its_bound(ranks):
    draws = ranks[0]["draws"][1]
    truth = torch.stack(_targets(WORLD, N)).double().mean(0)
    mean = draws["sum"] / DRAWS
    var = (draws["sumsq"] - DRAWS * mean ** 2) / (DRAWS - 1)
    v_up, v_gather_bound = _uplink_variance()
    bound = v_up + v_gather_bound
    exact = bound == 0
    assert torch.allclose(mean[exact], truth[exact], rtol=0, atol=1e-5)
    z = (mean - truth)[~exact] / (bound[~exact] / DRAWS).sqrt()
    assert z.abs().max() < SAFE_Z, z.abs().max()
    # the re-encode adds noise of its own, within its bound (both sums have ~2 % spread)
    total = float(var.sum())
    assert 1.2 * float(v_up.sum()) < total < 1.05 * float(bound.sum()), \
        (total, float(v_up.sum()), float(bound.sum()))
    # z against the measured variance: unbiased at the draws' own standard error
    z_own = (mean - truth)[~exact] / (var[~exact] / DRAWS).sqrt()
    assert z_own.abs().max() < SAFE_Z + 1 and 0.8 < float((z_own ** 2).mean()) < 1.25


def test_nan_travels_as_nan_in_its_slice_and_the_exchange_goes_on(ranks):
    first = slice_bounds(N, WORLD, D)[1]
    for r in ranks:
        g = r["draws"][32]["nan_grad"]
        assert torch.isnan(g[:first]).all() and torch.isfinite(g[first:]).all()
        assert torch.isfinite(r["draws"][32]["after_nan"]).all()


def test_fp32_payloads_equal_plain_allreduce_to_rounding(ranks):
    tiny = ranks[0]["tiny"]["none"]
    grads, plain = tiny["grads"], tiny["plain"]
    scale = plain.abs().max()
    # averages of three float32 values summed in another order: a few ulps apart
    assert torch.allclose(grads, plain, rtol=0, atol=4 * torch.finfo(torch.float32).eps *
                          float(scale)), (grads - plain).abs().max()


def _fp32_nbytes(m: int) -> int:
    return 0 if m == 0 else 32 + 4 * m


def test_tiny_buckets_and_exact_bytes(ranks):
    # onebit up, the default 4-bit all-gather down (same buckets); none: fp32 both ways
    for compressor, up, down, d in (
            ("onebit", _onebit_nbytes, lambda m: _kbit_nbytes(m, 4), D),
            ("none", _fp32_nbytes, _fp32_nbytes, 1)):
        buckets = ranks[0]["tiny"][compressor]["buckets"]
        # DDP's first iteration uses one bucket, then one per parameter (sizes 1 and 2 < W)
        assert buckets[0] == sum(SIZES) and sorted(buckets[-len(SIZES):]) == sorted(SIZES)
        slices = [_slices(n, d=d) for n in buckets]
        world_up = sum((WORLD - 1) * up(m) for sl in slices for m in sl)
        world_down = sum((WORLD - 1) * down(m) for sl in slices for m in sl)
        for rank, r in enumerate(ranks):
            t = r["tiny"][compressor]
            assert t["buckets"] == buckets
            c = t["counters"]
            own = [sl[rank] for sl in slices]
            assert c["sent_up"] == sum(up(m) for sl in slices for s, m in enumerate(sl)
                                       if s != rank)
            assert c["received_up"] == (WORLD - 1) * sum(up(m) for m in own)
            assert c["sent_down"] == (WORLD - 1) * sum(down(m) for m in own)
            assert c["received_down"] == sum(down(m) for sl in slices
                                             for s, m in enumerate(sl) if s != rank)
            # what reached the transport is what was counted
            assert t["transport"] == (c["sent_up"] + c["sent_down"],
                                      c["received_up"] + c["received_down"])
            assert (c["world_up"], c["world_down"]) == (world_up, world_down)
            assert c["fp32_sent"] == sum(4 * (n - m) + 4 * (WORLD - 1) * m
                                         for n, m in zip(buckets, own, strict=True))
            rate, fp32, sent = t["stats"]
            assert (fp32, sent) == (c["fp32_sent"], c["sent_up"] + c["sent_down"])
            assert rate == pytest.approx(fp32 / sent)
        for key, world in (("sent_up", world_up), ("received_up", world_up),
                           ("sent_down", world_down), ("received_down", world_down)):
            assert sum(r["tiny"][compressor]["counters"][key] for r in ranks) == world, key


def test_replicas_hold_identical_parameters_after_every_step(ranks):
    for name in ("onebit", "sign-ef"):
        rec = ranks[0]["replicas"][name]
        assert rec["diffs"] == [0.0] * 8 and rec["finite"], (name, rec)


def test_bad_settings_raise_value_error_at_construction():
    for kwargs, option in (({"compressor": "twobit"}, "compressor"),
                           ({"bucket_size": -1}, "bucket_size"),
                           ({"compressor": "kbit", "bits": 9}, "bits"),
                           ({"header_dtype": "fp8"}, "header_dtype"),
                           ({"allgather_bits": 16}, "allgather_bits"),
                           ({"seed": 1.5}, "seed"),
                           ({"error_feedback": 1}, "error_feedback")):
        with pytest.raises(ValueError, match=option):
            OneBitState(**kwargs)
    assert dist_quant.OneBitState is OneBitState and dist_quant.onebit_hook is onebit_hook


def test_cli_plumbing_preset_and_label():
    cfg = TrainConfig(method="ddp", ddp_hook="onebit").validate()
    assert cfg.ddp_hook == "onebit"
    with pytest.raises(ConfigError, match="--ddp-hook"):
        TrainConfig(method="ddp", ddp_hook="twobit").validate()
    (point,) = expand_grid(["ddp-onebit"])
    assert point.cfg.method == "ddp" and point.cfg.ddp_hook == "onebit"
    assert point.cfg.compressor == "onebit" and point.cfg.bucket_size == PRESETS[
        "ddp-onebit"]["bucket_size"] == TrainConfig().bucket_size
    assert method_label(point.cfg.to_dict()) == "DDP onebit b128"
    assert method_label({"method": "ddp", "ddp_hook": "onebit", "compressor": "sign",
                         "error_feedback": True, "bucket_size": 64}) == "DDP sign+EF"


# ---- training: the MLP with the hook next to plain DDP -------------------------------------
# W = 2, the default hook (onebit in buckets of 128, 4-bit all-gather), lr 0.05. Measured
# (accuracy of plain DDP -> with the hook, seeds 0-7): 45.8 -> 44.9, 46.6 -> 45.2, 46.1 -> 46.5,
# 45.4 -> 45.3, 44.2 -> 45.4, 43.5 -> 44.2, 45.4 -> 44.0, 44.7 -> 42.9: at most 1.8 points apart.
# At the default lr 0.2 such short runs are noise-limited and the hook loses 2-7 points; the
# default job (1000 steps, W = 4) closes the gap (README).
TRAIN = {"train_size": 2000, "test_size": 1000, "hidden": "64,64", "batch_size": 250,
         "lr": 0.05, "steps": 150, "eval_every": 75, "progress": False}


def _train_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for hook in ("none", "onebit"):
        dist.barrier()
        sent0 = _tcp_bytes_sent(os.getpid())
        train_ddp(TrainConfig(method="ddp", workers=world, ddp_hook=hook,
                              run_dir=f"{out}/{hook}", **TRAIN).validate())
        dist.barrier()
        sent1 = _tcp_bytes_sent(os.getpid())
        wire = torch.tensor([-1 if sent0 is None or sent1 is None else sent1 - sent0])
        dist.all_reduce(wire)
        if rank == 0:
            Path(f"{out}/{hook}/wire.txt").write_text(str(int(wire)))
    leave_group()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hook-train")
    mp.start_processes(_train_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True,
                       start_method="fork")
    return out


def test_ddp_with_the_hook_trains_within_two_points_of_plain_ddp(trained):
    plain, hooked = read_summary(trained / "none"), read_summary(trained / "onebit")
    assert hooked["compressor"] == "onebit" and hooked["ddp_hook"] == "onebit"
    assert abs(hooked["test_accuracy"] - plain["test_accuracy"]) <= 0.02, \
        (hooked["test_accuracy"], plain["test_accuracy"])
    assert plain["test_accuracy"] > 0.3  # both learnt something: chance is 0.1


def test_train_records_the_hook_bytes_exactly(trained):
    run = trained / "onebit"
    summary = read_summary(run)
    n, world = summary["params"], summary["workers"]
    slices = _slices(n, world, 128)  # the MLP fits in one DDP bucket
    up = (world - 1) * sum(_onebit_nbytes(m, 128) for m in slices)
    down = (world - 1) * sum(_kbit_nbytes(m, 4, 128) for m in slices)
    stats = (world - 1) * 4 * 2 * sum(int(w) for w in TRAIN["hidden"].split(","))
    for r in read_metrics(run):
        if r["kind"] != "step":
            continue
        evaluated = r["step"] % TRAIN["eval_every"] == 0
        assert r["bytes_up"] == up + (stats if evaluated else 0)
        assert r["bytes_down"] == down
    assert summary["bytes_down"] == TRAIN["steps"] * down
    assert summary["fp32_bytes_down"] == TRAIN["steps"] * (world - 1) * 4 * n


def test_counted_bytes_are_what_the_sockets_sent(trained):
    s = read_summary(trained / "onebit")
    wire = int((trained / "onebit" / "wire.txt").read_text())
    if wire < 0:
        pytest.skip("ss -ti shows no per-socket byte counters here")
    counted = s["bytes_up"] + s["bytes_down"]
    # TCP payload of both ranks over the run: at least the counted payloads; the rest is
    # gloo's per-message headers and the uncounted per-step loss gather, large next to payloads
    # of about 5.8 kB a step (measured: 1.13 times the counted bytes)
    assert counted <= wire <= 1.25 * counted, (wire, counted)
