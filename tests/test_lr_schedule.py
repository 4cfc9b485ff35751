"""Learning-rate schedules: the formula, the optimizer applying it (and resuming it), the
server's lr per step, and the DDP baseline and the parameter server following the same one."""

from __future__ import annotations

import math

import pytest
import torch
from test_ddp import SMALL, _spawn
from torch import nn

from dist_quant.config import TrainConfig
from dist_quant.core.lr_schedule import LRSchedule, lr_at, schedule_from_config
from dist_quant.core.optim import DecoupledMomentumSGD
from dist_quant.data import load_dataset
from dist_quant.errors import ConfigError
from dist_quant.ps import common
from dist_quant.ps.shard import ShardServer
from dist_quant.runner.simulate import run_simulate
from dist_quant.runtime.metrics import read_metrics


def test_factors_by_hand():
    warm = LRSchedule("constant", total_steps=10, warmup_steps=4)
    assert [warm.factor(t) for t in range(1, 7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    step = LRSchedule("step", total_steps=20, warmup_steps=2, step_size=3, gamma=0.5)
    assert [step.factor(t) for t in range(1, 10)] == [0.5, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    cos = LRSchedule("cosine", total_steps=12, warmup_steps=2)
    assert cos.factor(3) == 1.0
    assert cos.factor(8) == pytest.approx(0.5)  # halfway: (8 - 3) / 10
    assert cos.factor(12) == pytest.approx((1 + math.cos(math.pi * 9 / 10)) / 2)
    assert all(cos.factor(t) > cos.factor(t + 1) for t in range(3, 12))
    assert LRSchedule().is_constant and LRSchedule().factor(1000) == 1.0


@pytest.mark.parametrize("option,changes", [
    ("--lr-schedule", {"lr_schedule": "linear"}),
    ("--warmup-steps", {"warmup_steps": 11}),
    ("--warmup-steps", {"warmup_steps": -1}),
    ("--lr-step-size", {"lr_step_size": 0}),
    ("--lr-gamma", {"lr_gamma": 1.5}),
    ("--lr-gamma", {"lr_gamma": 0.0}),
])
def test_bad_schedule_options_name_the_option(option, changes):
    with pytest.raises(ConfigError, match=option):
        TrainConfig(steps=10, **changes).validate()


def _params(seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(5, 3, generator=gen)),
            nn.Parameter(torch.randn(4, generator=gen))]


def _grads(steps: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(5, 3, generator=gen), torch.randn(4, generator=gen)]
            for _ in range(steps)]


def _run(opt, params, grads):
    lrs = []
    for g in grads:
        for p, gi in zip(params, g, strict=True):
            p.grad = gi.clone()
        opt.step()
        lrs.append([group["lr"] for group in opt.param_groups])
    return lrs


def test_optimizer_applies_the_schedule_as_a_changing_lr_would():
    sched = LRSchedule("cosine", total_steps=30, warmup_steps=5)
    grads = _grads(30)
    a = _params()
    groups = [{"params": [a[0]], "weight_decay": 0.01}, {"params": [a[1]], "lr": 0.05}]
    opt = DecoupledMomentumSGD(groups, lr=0.2, momentum=0.9, schedule=sched)
    lrs = _run(opt, a, grads)
    # the same rule with the lr set by hand before every step
    b = _params()
    manual = DecoupledMomentumSGD([{"params": [b[0]], "weight_decay": 0.01},
                                   {"params": [b[1]], "lr": 0.05}], lr=0.2, momentum=0.9)
    for t, g in enumerate(grads, 1):
        manual.param_groups[0]["lr"] = 0.2 * sched.factor(t)
        manual.param_groups[1]["lr"] = 0.05 * sched.factor(t)
        for p, gi in zip(b, g, strict=True):
            p.grad = gi.clone()
        manual.step()
        assert lrs[t - 1] == [0.2 * sched.factor(t), 0.05 * sched.factor(t)]
    for pa, pb in zip(a, b, strict=True):
        assert torch.equal(pa, pb)


def test_schedule_resumes_from_the_optimizer_state():
    sched = LRSchedule("step", total_steps=20, warmup_steps=3, step_size=4, gamma=0.5)
    grads = _grads(20)
    whole = _params()
    _run(DecoupledMomentumSGD(whole, lr=0.1, momentum=0.9, schedule=sched), whole, grads)
    part = _params()
    first = DecoupledMomentumSGD(part, lr=0.1, momentum=0.9, schedule=sched)
    _run(first, part, grads[:9])
    state = first.state_dict()
    second = DecoupledMomentumSGD(part, lr=0.1, momentum=0.9, schedule=sched)
    second.load_state_dict(state)
    lrs = _run(second, part, grads[9:])
    assert lrs[0] == [0.1 * sched.factor(10)]
    for p, q in zip(whole, part, strict=True):
        assert torch.equal(p, q)


def _cfg(**changes) -> TrainConfig:
    base = {**SMALL, "workers": 2, "batchnorm": False, "keep_prob": 1.0, "compressor": "none",
            "steps": 14, "eval_every": 7, "lr": 0.1, "lr_schedule": "step", "warmup_steps": 4,
            "lr_step_size": 3, "lr_gamma": 0.5}
    return TrainConfig(**{**base, **changes}).validate()


def test_server_lr_per_step_equals_the_formula():
    cfg = _cfg(lr_schedule="cosine", decay_all=False)
    data = load_dataset(cfg)
    model = common.build_model(cfg, data.in_features, data.num_classes, torch.device("cpu"))
    server = ShardServer(cfg, model, 0, common.num_params(model), 0, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for t in range(1, cfg.steps + 1):
        g = torch.randn(server.n, generator=gen) * 0.01
        server.update(None if t == 5 else g)  # a step without a valid payload keeps the count
        want = lr_at(cfg, t)
        assert [g["lr"] for g in server.opt.param_groups] == [want] * len(server.opt.param_groups)
    assert lr_at(cfg, 1) == pytest.approx(cfg.lr / cfg.warmup_steps)


def test_ddp_and_parameter_server_follow_the_same_schedule(tmp_path):
    """fp32 DDP (2 ranks, real gloo) and the fp32 parameter server (the simulator: the same
    parameters as its distributed run) train the same model on the same batches; under the same
    warmup + step schedule they end with the same parameters and record the same lr."""
    cfg = _cfg()
    ddp_dir = _spawn(2, [{"name": "sched", "cfg": {k: getattr(cfg, k) for k in (
        "ddp_hook", "steps", "eval_every", "batchnorm", "keep_prob", "lr", "lr_schedule",
        "warmup_steps", "lr_step_size", "lr_gamma")}}], tmp_path / "ddp") / "sched"
    ps_dir = tmp_path / "ps"
    run_simulate(cfg.replace(simulate=True, run_dir=str(ps_dir)), torch.device("cpu"),
                 str(ps_dir))
    want = [lr_at(cfg, t) for t in range(1, cfg.steps + 1)]
    for run in (ddp_dir, ps_dir):
        got = [r["lr"] for r in read_metrics(run) if r["kind"] == "step"]
        assert got == want, run
    assert len(set(want)) > 3  # warmup, then decays: the schedule is not constant
    ddp_params = torch.load(ddp_dir / "final.pt", weights_only=True)["params"]
    ckpt = ps_dir / "checkpoints" / f"step_{cfg.steps}.pt"
    state = torch.load(ckpt, weights_only=False)["server"]["model"]  # no BatchNorm: all params
    ps_params = torch.cat([v.reshape(-1) for v in state.values()])
    assert torch.allclose(ps_params, ddp_params, rtol=0, atol=1e-5), \
        (ps_params - ddp_params).abs().max()
    # and the schedule mattered: a constant lr ends elsewhere
    assert schedule_from_config(cfg).factor(cfg.steps) != 1.0


def test_the_documented_schedule_example_runs():
    """The documentation's snippet (Training, learning-rate schedules), as written, on a small
    model: lr follows the schedule."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:]]
    snippet = next(b for b in blocks if "LRSchedule" in b)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    scope = {"model": model}
    exec(snippet, scope)
    opt = scope["opt"]
    for t in range(1, 61):
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * scope["schedule"].factor(t))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * (1 + math.cos(math.pi * 9 / 950)) / 2)
