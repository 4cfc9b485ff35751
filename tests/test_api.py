"""``dist_quant.fit`` on models that are not the MLP: the example CNN (BatchNorm2d, dropout)
and a model without BatchNorm (``tests/fit_job.py``, custom loss and metric).

Each is run for real under torchrun (gloo on loopback) and compared bit for bit with the
single-process run (``simulate=True``); a run resumed from a checkpoint equals the
uninterrupted one; bad inputs are refused with errors that say what is wrong.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from run_states import assert_equal, final
from torch import nn
from torch.utils.data import TensorDataset

import dist_quant
from dist_quant.errors import ConfigError
from dist_quant.runtime.metrics import read_metrics, read_summary

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cnn_shapes.py"


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = load(EXAMPLE)
job = load(ROOT / "tests" / "fit_job.py")


def steps(run_dir: Path | str) -> list[tuple]:
    return [(r["step"], r["loss"], r["bytes_up"], r["bytes_down"])
            for r in read_metrics(run_dir) if r["kind"] == "step"]


def torchrun(nproc: int, *argv: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-m", "dist_quant.localrun", "--standalone",
                          "--nproc-per-node", str(nproc), *argv], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(autouse=True)
def not_in_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


# ---- distributed == single process -------------------------------------------------------
@pytest.mark.slow
def test_example_cnn_under_torchrun_equals_simulated(tmp_path):
    """The example as written, launched by torchrun (2 workers + the server), against the same
    script with --simulate: BatchNorm2d statistics, dropout, 1-bit uplink, all bit for bit."""
    dist_dir, sim_dir = tmp_path / "dist", tmp_path / "sim"
    torchrun(3, str(EXAMPLE), "--workers", "2", "--steps", "4", "--run-dir", str(dist_dir))
    summary = example.main(["--simulate", "--workers", "2", "--steps", "4",
                            "--run-dir", str(sim_dir)], progress=False)
    assert_equal(final(dist_dir), final(sim_dir))
    assert steps(dist_dir) == steps(sim_dir)
    assert read_summary(dist_dir)["test_accuracy"] == summary["test_accuracy"]
    assert summary["params"] == sum(p.numel() for p in example.cnn().parameters())
    assert summary["compressor"] == "onebit" and summary["steps"] == 4


@pytest.mark.slow
def test_model_without_batchnorm_colocated_under_torchrun_equals_simulated(tmp_path):
    dist_dir, sim_dir = tmp_path / "dist", tmp_path / "sim"
    torchrun(2, str(ROOT / "tests" / "fit_job.py"), str(dist_dir), "6")
    summary = job.run(str(sim_dir), 6, simulate=True)
    a, b = final(dist_dir), final(sim_dir)
    assert_equal(a, b)
    assert len(a["shards"]) == 1  # two colocated shards
    assert steps(dist_dir) == steps(sim_dir)
    assert read_summary(dist_dir)["test_loss"] == summary["test_loss"]


# ---- resume --------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["cnn", "plain"])
def test_resume_equals_uninterrupted(tmp_path, model):
    """3 steps, then resumed to 6, against 6 in one go: the same final state bit for bit
    (parameters, BatchNorm statistics, momentum, samplers, dropout and quantiser streams)."""
    def run(run_dir: str, n: int, **extra):
        if model == "plain":
            return job.run(run_dir, n, simulate=True, **extra)
        train = example.make_bars(200, seed=1)
        return dist_quant.fit(example.cnn, train, example.make_bars(40, seed=2), workers=2,
                              steps=n, batch_size=16, lr=0.05, eval_every=3,
                              checkpoint_every=3, progress=False, simulate=True,
                              run_dir=run_dir, **extra)

    run(str(tmp_path / "whole"), 6)
    run(str(tmp_path / "part"), 3)
    resumed = run("", 6, resume=str(tmp_path / "part"))  # run_dir: the resumed one
    assert resumed["steps"] == 6
    assert_equal(final(tmp_path / "whole"), final(tmp_path / "part"))
    assert steps(tmp_path / "whole") == steps(tmp_path / "part")
    # the CLI knows only the MLP: it refuses to continue this run, in one line, before starting
    from click.testing import CliRunner

    from dist_quant.train import train_command

    result = CliRunner().invoke(train_command, ["--resume", str(tmp_path / "part")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"Error: --resume: {tmp_path / 'part'} was trained with a model of its own through "
        "dist_quant.fit; continue it with dist_quant.fit(..., resume=RUN_DIR)"]


# ---- loss, metric, data forms --------------------------------------------------------------
def test_custom_loss_and_metric_are_the_ones_used(tmp_path):
    calls = []

    def loss(output, target):
        calls.append(len(target))
        return job.smoothed(output, target)

    summary = job.run(str(tmp_path / "run"), 4, loss_fn=loss, simulate=True, eval_every=4)
    # the check before launch (2 training rows, 2 test rows), 2 workers x 4 steps, then one
    # evaluation
    assert calls == [2, 2] + [16] * 4 * 2 + [50]
    model = job.plain()
    state = final(tmp_path / "run")
    model.load_state_dict(state["server"]["model"])
    model.eval()
    _, (x_test, y_test) = job.data()
    with torch.no_grad():
        out = model(x_test)
    assert summary["test_loss"] == pytest.approx(float(job.smoothed(out, y_test)), abs=1e-6)
    assert summary["test_accuracy"] == pytest.approx(float(job.top2(out, y_test)), abs=1e-9)
    plain_ce = float(F.cross_entropy(out, y_test))
    assert abs(summary["test_loss"] - plain_ce) > 1e-3  # the smoothed loss, not the default
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"] == "custom" and saved["metric"] == "top2"
    assert not {"dataset", "hidden", "keep_prob", "batchnorm", "init"} & set(saved["config"])
    assert saved["config"]["train_size"] == len(job.data()[0][1])


def test_a_map_style_dataset_trains_like_the_tensors(tmp_path):
    (x, y), test = job.data()
    a = job.run(str(tmp_path / "pair"), 2, simulate=True)
    train, test_set = TensorDataset(x, y), TensorDataset(*test)
    dist_quant.fit(job.plain, train, test_set, loss_fn=job.smoothed, metric=job.top2,
                   **{**job.OPTIONS, "run_dir": str(tmp_path / "ds"), "steps": 2,
                      "simulate": True})
    assert_equal(final(tmp_path / "pair"), final(tmp_path / "ds"))
    assert read_summary(tmp_path / "ds")["test_accuracy"] == a["test_accuracy"]


# ---- bad inputs ----------------------------------------------------------------------------
class Counted(nn.Module):
    """A model whose integer buffer changes in training: it cannot be averaged."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(256, 4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        if self.training:
            self.calls += 1
        return self.linear(x.flatten(1))


def test_bad_inputs_are_refused_clearly(tmp_path):
    train, test = job.data()
    ok = dict(workers=2, batch_size=8, steps=2, simulate=True, progress=False,
              run_dir=str(tmp_path / "r"))
    cases = [
        (dict(model_fn=3), TypeError, "model_fn must be a zero-argument callable"),
        (dict(model_fn=lambda: "cnn"), TypeError, "must return a torch.nn.Module; it returned "
                                                  "str"),
        (dict(model_fn=Counted), ValueError, "buffer 'calls' (torch.int64) changes in a "
                                             "training forward and cannot be averaged"),
        (dict(options=dict(task="text-transformer")), ConfigError, "--task: is given by "
                                                                    "model_fn"),
        (dict(train=(train[0], train[1][:-1])), ValueError, "train: x has 160 rows but y has "
                                                            "159"),
        (dict(test=[1, 2, 3]), ValueError, "test: a dataset must be non-empty and give (x, y)"),
        (dict(test=None), TypeError, "test must be a pair of tensors (x, y) or a map-style"),
        (dict(options=dict(workerz=3)), TypeError, "fit() got an unexpected keyword argument "
                                                   "'workerz'. Did you mean 'workers'?"),
        (dict(options=dict(lrr=0.1)), TypeError, "argument 'lrr'. Did you mean 'lr'"),
        (dict(options=dict(zzz=1)), TypeError, "argument 'zzz' (the options are the fields"),
        (dict(options=dict(lr=-1.0)), ConfigError, "--lr: must be > 0"),
        (dict(options=dict(hidden="8")), ConfigError, "--hidden: is given by model_fn"),
        (dict(options=dict(batch_size=100)), ConfigError, "--batch-size"),
        (dict(options=dict(method="ddp")), ConfigError, "--"),
        (dict(options=dict(simulate=False)), ConfigError, "--simulate: fit runs in a torchrun "
                                                          "job"),
    ]
    for case, error, message in cases:
        args = {"model_fn": job.plain, "train": train, "test": test, **case}
        options = {**ok, **args.pop("options", {})}
        with pytest.raises(error, match=re.escape(message)):
            dist_quant.fit(args["model_fn"], args["train"], args["test"], **options)
    assert not (tmp_path / "r").exists()  # nothing started


# ---- the README's example ------------------------------------------------------------------
def test_the_documented_example_is_the_example_file():
    """The documentation's "Your own model" shows examples/cnn_shapes.py by including the file
    itself (run above under torchrun and simulated), so the example a reader copies is the
    tested one."""
    assert "fit" in dist_quant.__all__
    text = (ROOT / "docs" / "training.md").read_text()
    section = text.split("## Your own model", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    assert block.strip() == f'--8<-- "{EXAMPLE.relative_to(ROOT).as_posix()}"'
    assert EXAMPLE.is_file()
