"""A new consistency mode is its Policy subclass and one register_policy line: a toy mode
(updates of two gradients, both workers released together) is refused before it is
registered, then runs through the asynchronous step under --simulate and keeps its rule."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from dist_quant.config import TrainConfig
from dist_quant.errors import ConfigError
from dist_quant.ps.consistency import Decision, Policy, register_policy, unregister_policy
from dist_quant.runtime.metrics import read_metrics, read_summary
from dist_quant.train import run_in_process

TINY = dict(hidden="7,5", train_size=120, test_size=30, batch_size=4, eval_every=3,
            steps=6, workers=3, progress=False)


class Pairs(Policy):
    """Every second arrival makes an update of the two pending gradients; their workers are
    released together, the others run on."""

    name = "pairs"
    mean = False

    def arrive(self, worker: int, read: int, version: int) -> Decision:
        self.pending.append(worker)
        if len(self.pending) < 2:
            return Decision(release=[])
        group, self.pending = sorted(self.pending), []
        return Decision(update=group, release=group)


@pytest.fixture
def pairs():
    register_policy("pairs", lambda cfg: Pairs(cfg.workers))   # the one registry line
    yield
    unregister_policy("pairs")


def test_an_unregistered_mode_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="--consistency: must be one of"):
        TrainConfig(**TINY, consistency="pairs").validate()


def test_a_registered_mode_runs_and_keeps_its_rule(pairs, tmp_path: Path):
    cfg = TrainConfig(**TINY, consistency="pairs", simulate=True,
                      run_dir=str(tmp_path / "run")).validate()
    assert run_in_process(cfg) == 0
    arrivals = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "update"]
    per_update = Counter(r["applied"] for r in arrivals if r["applied"] is not None)
    assert per_update and set(per_update.values()) == {2}, arrivals[:4]   # pairs, each once
    assert read_summary(tmp_path / "run")["steps"] == 6
