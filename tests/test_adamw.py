"""AdamW on the server (``--optimizer adamw``) and the 1-bit Adam recipe
(``--onebit-adam-warmup``): the update against a hand-computed step and against
``torch.optim.AdamW``, the frozen-variance switch at the configured step on both sides, and a
resumed run equal to the uninterrupted one."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from run_states import assert_equal, final

from dist_quant.compress import get_compressor
from dist_quant.compress.momentum import AdamMomentum
from dist_quant.config import TrainConfig
from dist_quant.core.optim import AdamW, decay_param_groups
from dist_quant.errors import ConfigError
from dist_quant.runtime.metrics import read_metrics
from dist_quant.train import run_in_process

B1, B2, EPS = 0.9, 0.99, 1e-8


def test_first_two_steps_match_the_hand_computed_update():
    theta0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    g1 = torch.tensor([0.1, -0.3, 2.0], dtype=torch.float64)
    g2 = torch.tensor([-0.2, 0.1, 1.0], dtype=torch.float64)
    lr, lam = 0.01, 0.1
    p = torch.nn.Parameter(theta0.clone())
    opt = AdamW([p], lr=lr, betas=(B1, B2), eps=EPS, weight_decay=lam)
    p.grad = g1.clone()
    opt.step()
    # step 1: m-hat = g1, v-hat = g1^2
    theta1 = theta0 * (1 - lr * lam) - lr * g1 / (g1.abs() + EPS)
    assert torch.allclose(p.detach(), theta1, atol=1e-12, rtol=0)
    p.grad = g2.clone()
    opt.step()
    m = B1 * (1 - B1) * g1 + (1 - B1) * g2
    v = B2 * (1 - B2) * g1 ** 2 + (1 - B2) * g2 ** 2
    theta2 = theta1 * (1 - lr * lam) - lr * (m / (1 - B1 ** 2)) / (
        (v / (1 - B2 ** 2)).sqrt() + EPS)
    assert torch.allclose(p.detach(), theta2, atol=1e-12, rtol=0)


def test_matches_torch_adamw_with_decay_groups_over_50_steps():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4),
                                torch.nn.Linear(4, 3))
    twin = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    ours = AdamW(decay_param_groups(model, 0.05), lr=3e-3, betas=(B1, B2), eps=EPS)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    groups = [{"params": [twin[index[id(p)]] for p in g["params"]],
               "weight_decay": g["weight_decay"]} for g in ours.param_groups]
    ref = torch.optim.AdamW(groups, lr=3e-3, betas=(B1, B2), eps=EPS)
    assert [g["weight_decay"] for g in ours.param_groups] == [0.05, 0.0]   # LayerNorm: none
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        for p, q in zip(model.parameters(), twin, strict=True):
            g = torch.randn(p.shape, generator=gen) * 3
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(model.parameters(), twin, strict=True):
        assert torch.allclose(p.detach(), q.detach(), atol=1e-6, rtol=0)


def test_the_variance_freezes_after_the_configured_step():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = AdamW([p], lr=0.1, betas=(B1, B2), freeze_after=3)
    gen = torch.Generator().manual_seed(2)
    for t in range(1, 7):
        p.grad = torch.randn(4, generator=gen)
        v_before = opt.state[p]["exp_avg_sq"].clone() if t > 1 else None
        opt.step()
        state = opt.state[p]
        if t <= 3:
            assert not opt.frozen(opt.param_groups[0]) or t == 3
            assert state["variance_step"] == t
        else:   # the gradient given is the momentum; v is step 3's
            assert torch.equal(state["exp_avg_sq"], v_before)
            assert torch.equal(state["exp_avg"], p.grad)
            assert state["variance_step"] == 3 and state["step"] == t
    opt.skip_step()   # a step without a valid gradient still counts for the switch
    assert opt.param_groups[0]["updates"] == 7


def test_the_worker_sends_its_gradient_then_its_momentum():
    comp = AdamMomentum(get_compressor("none"), beta1=B1, warmup=2)
    gen = torch.Generator().manual_seed(3)
    m = torch.zeros(6)
    for t in range(1, 5):
        g = torch.randn(6, generator=gen)
        m = B1 * m + (1 - B1) * g
        sent = comp.decode(comp.encode(g).to_tensor())
        assert torch.allclose(sent, g if t <= 2 else m, atol=1e-7, rtol=0)
    state = comp.state_dict()
    twin = AdamMomentum(get_compressor("none"), beta1=B1, warmup=2)
    twin.load_state_dict(state)
    assert twin.steps == 4 and torch.equal(twin.buffer, comp.buffer)


def test_bad_adamw_options_are_refused():
    for changes, message in [
            (dict(onebit_adam_warmup=3), "--onebit-adam-warmup: is a recipe of --optimizer"),
            (dict(optimizer="adamw", onebit_adam_warmup=3),
             "--onebit-adam-warmup: compresses the momentum with error feedback"),
            (dict(optimizer="adamw", onebit_adam_warmup=3, error_feedback=True,
                  method="ddp"), "--onebit-adam-warmup: applies to the parameter-server job"),
            (dict(optimizer="adamw", worker_momentum=True), "--worker-momentum: applies to "
                                                            "--optimizer sgd"),
            (dict(beta2=1.0), "--beta2: must be in [0, 1)")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            TrainConfig(**changes).validate()


# ---- resume ----------------------------------------------------------------------------------
TINY = dict(hidden="7,5", train_size=120, test_size=30, batch_size=4, eval_every=3,
            checkpoint_every=3, progress=False, bucket_size=5, lr=0.01, workers=2,
            optimizer="adamw", simulate=True, steps=6, keep_checkpoints=0)


@pytest.mark.parametrize("recipe", [
    dict(), dict(onebit_adam_warmup=2, error_feedback=True, servers=2)])
def test_resume_equals_uninterrupted_with_adamw(tmp_path, recipe):
    cfg = TrainConfig(**{**TINY, **recipe, "run_dir": str(tmp_path / "whole")}).validate()
    assert run_in_process(cfg) == 0
    part = tmp_path / "part"
    shutil.copytree(cfg.run_dir, part)
    (part / "checkpoints" / "latest").write_text("step_3.pt\n")
    assert run_in_process(cfg.replace(run_dir=str(part), resume=str(part))) == 0
    a, b = final(Path(cfg.run_dir)), final(part)
    assert_equal(a, b)
    assert "exp_avg_sq" in str(a["server"]["optimizer"]["state"][0].keys())
    lines = lambda d: [(r["kind"], r["step"], r.get("loss")) for r in read_metrics(d)]  # noqa: E731
    assert lines(part) == lines(cfg.run_dir)
