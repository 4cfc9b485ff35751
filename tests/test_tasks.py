"""The built-in tasks (``--task``): the text split and its hash, each task training under
``--simulate`` to a loose bar, torchrun equal to ``--simulate`` bit for bit, and what ``fit``
accepts of a model: constant and averaged buffers, per-token outputs, and a model, loss and
metric that do not fit, refused by one forward pass before anything starts."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from run_states import assert_equal, final
from torch import nn

import dist_quant
from dist_quant.config import TrainConfig
from dist_quant.data import Dataset
from dist_quant.data.text import CONTEXT, load_text, split_text, topics
from dist_quant.errors import ConfigError
from dist_quant.ps import common
from dist_quant.ps.task import Task
from dist_quant.runner.preflight import preflight
from dist_quant.runtime.metrics import read_metrics, read_summary
from dist_quant.train import launch, run_in_process

# short runs: a loose bar each (chance: 25% for the 4 orientations; 5.55 nats a byte, ln 256)
RUNS = {
    "shapes-cnn": dict(steps=60, batch_size=32, lr=0.05, eval_every=30),
    "text-transformer": dict(steps=40, batch_size=16, optimizer="adamw", lr=3e-3,
                             weight_decay=0.01, eval_every=20, compressor="none"),
}


def cfg_of(task: str, run_dir: Path, **changes) -> TrainConfig:
    return TrainConfig(**{"task": task, "workers": 4, "progress": False,
                          "run_dir": str(run_dir), **RUNS[task], **changes}).validate()


# ---- the text --------------------------------------------------------------------------------
def test_the_text_split_is_the_fixed_rule_and_its_hash_is_recorded():
    table = {"b": "0123456789", "a": "abcdefghijklmnopqrst"}
    whole, train, val = split_text(table)
    assert (whole, train, val) == (b"abcdefghijklmnopqrst0123456789",
                                   b"abcdefghijklmnopqr012345678", b"st9")
    a, b = load_text(), load_text()
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    text = b"".join(topics()[k].encode() for k in sorted(topics()))
    assert a.info["sha256"] == hashlib.sha256(text).hexdigest()
    assert a.info["bytes"] == len(text) == a.info["train_bytes"] + a.info["validation_bytes"]
    assert a.x_train.shape[1] == CONTEXT and torch.equal(a.x_train[:, 1:], a.y_train[:, :-1])
    assert len(a.y_test) == (a.info["validation_bytes"] - 1) // CONTEXT


# ---- each task trains --------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("task", list(RUNS))
def test_each_task_trains_under_simulate(tmp_path, task):
    cfg = cfg_of(task, tmp_path / "r", simulate=True)
    assert run_in_process(cfg) == 0
    summary = read_summary(cfg.run_dir)
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["model"] == task and saved["config"]["task"] == task
    assert "hidden" not in saved["config"]   # the MLP's fields do not apply
    if task == "shapes-cnn":
        assert summary["test_accuracy"] > 0.5
    else:
        assert saved["metric"] == "next_byte_accuracy"
        assert saved["data"] == load_text().info
        assert summary["test_loss"] < 3.6 and summary["test_accuracy"] > 0.15
        assert summary["test_bits_per_byte"] == pytest.approx(summary["test_loss"] / math.log(2))
        evals = [r for r in read_metrics(cfg.run_dir) if r["kind"] == "eval"]
        assert all("test_bits_per_byte" in r for r in evals)


@pytest.mark.slow
@pytest.mark.parametrize("task,layout", [("shapes-cnn", {}), ("shapes-cnn", {"colocate": True}),
                                         ("text-transformer", {}),
                                         ("text-transformer", {"servers": 2})])
def test_torchrun_equals_simulate_for_each_task(tmp_path, task, layout):
    options = dict(workers=2, steps=3, eval_every=2, timeout=120.0, **layout)
    dist = cfg_of(task, tmp_path / "dist", **options)
    sim = cfg_of(task, tmp_path / "sim", **options, simulate=True)
    assert launch(dist) == 0
    assert run_in_process(sim) == 0
    assert_equal(final(dist.run_dir), final(sim.run_dir))
    steps = [[(r["step"], r["loss"]) for r in read_metrics(d) if r["kind"] == "step"]
             for d in (dist.run_dir, sim.run_dir)]
    assert steps[0] == steps[1]
    assert read_summary(dist.run_dir)["test_loss"] == read_summary(sim.run_dir)["test_loss"]


@pytest.mark.slow
def test_stop_loss_ends_the_run_at_the_first_evaluation_below_it(tmp_path):
    cfg = cfg_of("text-transformer", tmp_path / "r", simulate=True, steps=60, eval_every=10,
                 stop_loss=5.0, eval_lag=0)
    assert run_in_process(cfg) == 0
    summary = read_summary(cfg.run_dir)
    assert summary["stopped_early"] and summary["test_loss"] <= 5.0 and summary["steps"] < 60


def test_a_resumed_text_run_refuses_another_text(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    info = {**load_text().info, "sha256": "0" * 64}
    (run / "config.json").write_text(json.dumps({"config": {}, "data": info}))
    from dist_quant.runner.preflight import check_data_identity

    cfg = TrainConfig(task="text-transformer", batch_size=16, resume=str(run))
    with pytest.raises(ConfigError, match=r"--resume: .* was trained on pydoc_data.topics "
                                          r"sha256 0000000000000000 .*the data differ"):
        check_data_identity(cfg, load_text())


def test_bad_task_options_are_refused_before_anything_starts(tmp_path):
    for changes, message in [
            (dict(hidden="8"), "--hidden: describes the MLP of --task mnist1d-mlp"),
            (dict(train_size=100), "--train-size: does not apply to --task text-transformer"),
            (dict(batch_size=5000), "--batch-size: 5000 exceeds")]:
        with pytest.raises(ConfigError, match=message):
            preflight(TrainConfig(task="text-transformer", run_dir=str(tmp_path / "r"),
                                  **changes))
    assert not (tmp_path / "r").exists()


# ---- what fit accepts ------------------------------------------------------------------------
class Tokens(nn.Module):
    """Per-token outputs, a causal mask (non-persistent), a persistent constant table and a
    running mean of the inputs' embedding (a float buffer that changes: averaged)."""

    def __init__(self, per_token: bool = True):
        super().__init__()
        self.per_token = per_token
        self.embed = nn.Embedding(16, 8)
        self.out = nn.Linear(8, 16)
        self.register_buffer("mask", torch.ones(6, 6).tril(), persistent=False)
        self.register_buffer("table", torch.linspace(0, 1, 8))
        self.register_buffer("running", torch.zeros(8))

    def forward(self, x):
        e = self.embed(x) + self.table
        e = (self.mask[:x.shape[1], :x.shape[1]] @ e) / self.mask.sum(1)[:x.shape[1], None]
        if self.training:
            with torch.no_grad():
                self.running.mul_(0.9).add_(0.1 * e.mean((0, 1)))
        logits = self.out(e)
        return logits if self.per_token else logits[:, -1]


def token_data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 16, (n, 6), generator=g)
    return x, (x + 1) % 16   # the next token is the current one plus 1


def test_buffers_are_sorted_by_one_forward_pass():
    x, y = token_data(40, 0)
    task = Task.custom(Tokens, Dataset("t", x, y, x, y, 16), seed=0)
    model = task.model("cpu")
    assert getattr(model, common.AVERAGED) == ("running",)   # mask and table: constant
    assert common.bn_stats(model).numel() == 8


@pytest.mark.slow
def test_per_token_outputs_train_with_the_default_loss_and_metric(tmp_path):
    summary = dist_quant.fit(Tokens, token_data(200, 1), token_data(50, 2), workers=2,
                             steps=60, batch_size=16, lr=0.5, compressor="none",
                             eval_every=30, simulate=True, progress=False,
                             run_dir=str(tmp_path / "r"))
    assert summary["test_accuracy"] > 0.3   # chance: 1/16


def test_a_model_loss_and_metric_that_do_not_fit_are_refused_in_one_line(tmp_path):
    train, test = token_data(40, 0), token_data(10, 1)
    ok = dict(workers=2, batch_size=4, steps=2, simulate=True, progress=False,
              run_dir=str(tmp_path / "r"))
    with pytest.raises(ValueError) as err:   # [batch, classes] against [batch, tokens] targets
        dist_quant.fit(lambda: Tokens(per_token=False), train, test, **ok)
    assert str(err.value).startswith("the model, loss and metric do not fit the data: "
                                     "loss_fn(model(x_train), y_train) failed on a batch of 2: ")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"^the loss must be a scalar tensor"):
        dist_quant.fit(Tokens, train, test, loss_fn=lambda o, y: o.sum(-1), **ok)
    with pytest.raises(ValueError, match=r"metric\(model\(x_test\), y_test\) failed"):
        dist_quant.fit(Tokens, train, test, metric=lambda o, y: o.argmax(1) == y, **ok)
    assert not (tmp_path / "r").exists()


def test_plots_name_each_task_metric():
    from dist_quant.plot.labels import metric_label

    assert metric_label([{"task": "text-transformer"}] * 2) == "next-byte accuracy (%)"
    assert metric_label([{"task": "mnist1d-mlp"}, {}]) == "test accuracy (%)"
    assert metric_label([{"task": "text-transformer"}, {}]) == "test metric (%)"


# ---- each task's own defaults ----------------------------------------------------------
def test_each_task_brings_its_defaults_for_the_options_not_given():
    """A command line or sweep point of another --task takes that task's defaults
    (``TASK_DEFAULTS``) for the options it does not give; an option given keeps its value,
    even one equal to the MLP's default, and travels to the ranks as given."""
    import click
    from click.testing import CliRunner

    from dist_quant.config import TASK_DEFAULTS, click_options
    from dist_quant.runner.options import config_from_options
    from dist_quant.sweep import expand_grid

    text = TASK_DEFAULTS["text-transformer"]
    assert text["optimizer"] == "adamw" and TASK_DEFAULTS["shapes-cnn"]["lr"] == 0.05
    cfg = TrainConfig(task="text-transformer").with_task_defaults()
    assert {k: getattr(cfg, k) for k in text} == text
    mine = TrainConfig(task="text-transformer").with_task_defaults({"lr"})
    assert mine.lr == TrainConfig().lr and mine.batch_size == text["batch_size"]
    argv = mine.to_argv()
    assert argv[argv.index("--lr") + 1] == str(TrainConfig().lr)
    assert TrainConfig().with_task_defaults() == TrainConfig()   # the MLP: nothing changes

    @click.command()
    @click_options()
    @click.pass_context
    def show(ctx, **params):
        cfg, _ = config_from_options(ctx, params)
        click.echo(f"{cfg.lr} {cfg.batch_size} {cfg.optimizer}")

    runner = CliRunner()
    assert runner.invoke(show, ["--task", "text-transformer"]).output.split() == \
        [str(text["lr"]), str(text["batch_size"]), "adamw"]
    assert runner.invoke(show, ["--task", "text-transformer", "--lr", "0.2"]).output.split() \
        == ["0.2", str(text["batch_size"]), "adamw"]
    assert runner.invoke(show, []).output.split() == ["0.2", "512", "sgd"]

    points = expand_grid(["ps-fp32", "ps-tolerant", "mine:lr=0.1"],
                         {"task": ["text-transformer"], "workers": [4]})
    assert [p.cfg.lr for p in points] == [text["lr"], 1.0, 0.1]
    assert {p.cfg.batch_size for p in points} == {text["batch_size"]}


# ---- DDP on the new tasks ------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("task", list(RUNS))
def test_ddp_fp32_follows_the_parameter_server_fp32_run_of_each_task(tmp_path, task):
    """DDP runs the task's model, data, dropout and optimizer as the PS job does: with fp32 on
    both sides the losses agree to rounding (the MLP's check, tests/test_sweep.py)."""
    options = dict(workers=2, steps=3, eval_every=3, timeout=120.0, compressor="none")
    ddp = cfg_of(task, tmp_path / "ddp", method="ddp", **options)
    ps = cfg_of(task, tmp_path / "ps", simulate=True, **options)
    assert launch(ddp) == 0 and run_in_process(ps) == 0
    losses = [[r["loss"] for r in read_metrics(d) if r["kind"] == "step"]
              for d in (ddp.run_dir, ps.run_dir)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


@pytest.mark.slow
def test_ddp_powersgd_on_a_model_of_two_buckets_ends(tmp_path):
    """The transformer (1.4 MB) is two DDP buckets at DDP's defaults; torch's PowerSGD hook on
    gloo then hung every rank for good (both of gloo's threads waiting inside the hook's
    callbacks). It must end, and in one bucket."""
    import subprocess
    import sys

    cfg = cfg_of("text-transformer", tmp_path / "r", method="ddp", ddp_hook="powersgd",
                 workers=2, steps=3, eval_every=3, timeout=60.0)
    res = subprocess.run([sys.executable, "-m", "dist_quant", "train", *cfg.to_argv()],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert read_summary(cfg.run_dir)["steps"] == 3
