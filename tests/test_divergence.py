"""A diverged run ends with exit 1 and a hint of what to lower; a healthy one is left alone."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dist_quant.config import TrainConfig
from dist_quant.runtime.divergence import FACTOR, PATIENCE, DivergenceMonitor
from dist_quant.train import run_in_process

SMALL = dict(hidden="64,64", train_size=800, test_size=200, batch_size=64, workers=2,
             steps=200, eval_every=50, progress=False, simulate=True)


def feed(monitor: DivergenceMonitor, losses) -> str | None:
    for step, loss in enumerate(losses, 1):
        if (why := monitor.observe(step, loss)) is not None:
            return why
    return None


def test_a_healthy_or_briefly_spiking_loss_is_not_divergence():
    cfg = TrainConfig()
    assert feed(DivergenceMonitor(cfg), [2.3 * 0.99 ** t for t in range(500)]) is None
    spikes = [2.3] + [2.0] * 50 + [FACTOR * 2.3 * 2] * (PATIENCE - 1) + [2.0] * 50
    assert feed(DivergenceMonitor(cfg), spikes) is None
    assert feed(DivergenceMonitor(cfg), [math.nan] * 3 + [2.3] * 100) is None


def test_a_loss_far_above_its_start_or_not_finite_for_patience_steps_is_divergence():
    cfg = TrainConfig(lr=50.0, compressor="onebit", bucket_size=0)
    why = feed(DivergenceMonitor(cfg), [2.3] + [FACTOR * 2.3 * 1.01] * PATIENCE)
    assert why is not None and f"step {PATIENCE + 1}" in why
    assert "lower --lr (now 50)" in why and "--bucket-size (now 0" in why
    why = feed(DivergenceMonitor(cfg), [2.3] + [math.inf] * PATIENCE)
    assert why is not None and "not finite" in why
    assert feed(DivergenceMonitor(cfg), [2.3] + [math.inf] * (PATIENCE - 1)) is None


def test_chance_accuracy_with_an_exploded_loss_at_the_end_is_divergence():
    monitor = DivergenceMonitor(TrainConfig())
    monitor.observe(1, 2.3)
    assert monitor.final(61.0, 0.10, 10) is not None
    assert monitor.final(61.0, 0.40, 10) is None      # it learned something
    assert monitor.final(2.2, 0.10, 10) is None       # at chance, but nothing exploded


@pytest.mark.parametrize("change, hint", [
    ({"lr": 50.0, "compressor": "none"}, "lower --lr (now 50)"),
    ({"bucket_size": 0}, "lower --bucket-size (now 0 = the whole gradient"),
])
def test_a_diverging_run_ends_with_exit_1_and_a_hint(tmp_path, capfd, change, hint):
    cfg = TrainConfig(**SMALL, **change, run_dir=str(tmp_path / "r"))
    assert run_in_process(cfg) == 1
    err = capfd.readouterr().err
    assert "training diverged" in err and hint in err
    assert not Path(cfg.run_dir, "summary.json").exists()


def test_the_same_small_run_with_sane_options_finishes(tmp_path):
    cfg = TrainConfig(**SMALL, run_dir=str(tmp_path / "r"))
    assert run_in_process(cfg) == 0
