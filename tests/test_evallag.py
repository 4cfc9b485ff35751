"""Evaluation off the critical path (``--eval-lag L``): the parameters of an evaluation at step
s travel in L pieces beside steps s..s+L-1, are evaluated at step s + L, and a
``--stop-accuracy`` reached there stops the run at s + L.

In one process: the lag changes no evaluation's numbers and no parameter (a run that does not
stop ends as without it; one that stops at s + L holds the parameters of a run of s + L steps
without the lag); a checkpoint with an evaluation in flight resumes to the uninterrupted run.
For real (torchrun over gloo on loopback, tiny model): the star and the colocated servers with
the lag equal their ``--simulate`` reference bit for bit, stopping step included.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from run_states import assert_equal, final

from dist_quant.config import TrainConfig
from dist_quant.errors import ConfigError
from dist_quant.runtime.metrics import read_metrics, read_summary
from dist_quant.train import launch, run_in_process

# 40 -> 7 -> 5 -> 10 with BatchNorm: 399 parameters; evaluations at 3, 6, 9, 12
TINY = dict(hidden="7,5", train_size=120, test_size=30, batch_size=4, eval_every=3,
            progress=False, timeout=60.0, bucket_size=5, lr=0.05, workers=3, steps=12)
LAG = 2


def tiny(tmp: Path, name: str, **changes) -> TrainConfig:
    return TrainConfig(**{**TINY, "run_dir": str(tmp / name), **changes}).validate()


def simulate(cfg: TrainConfig, name: str | None = None) -> Path:
    if name is not None:
        cfg = cfg.replace(run_dir=str(Path(cfg.run_dir).parent / name))
    assert run_in_process(cfg.replace(simulate=True)) == 0
    return Path(cfg.run_dir)


def evals(run: Path) -> list[tuple]:
    return [(r["step"], r["test_loss"], r["test_accuracy"]) for r in read_metrics(run)
            if r["kind"] == "eval"]


def steps(run: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["bytes_up"], r["bytes_down"]) for r in read_metrics(run)
            if r["kind"] == "step"]


def trained(state: dict) -> dict:
    """A final checkpoint less what records its last evaluation (the leader's BN statistics,
    averaged at that evaluation, and the stop decision): every trained state."""
    server = {**state["server"], "model": {k: v for k, v in state["server"]["model"].items()
                                           if "running" not in k and "batches" not in k}}
    return {**{k: v for k, v in state.items() if k != "eval_stop"}, "server": server}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, list[tuple]]:
    """Colocated, no lag, no stop: the evaluations every other run is compared with."""
    run = simulate(tiny(tmp_path_factory.mktemp("evallag"), "ref", colocate=True, eval_lag=0))
    return run, evals(run)


def target_of(ref_evals: list[tuple], upto: int) -> tuple[float, int]:
    """A --stop-accuracy the reference reaches first at an evaluation of step <= ``upto``:
    the best accuracy up to there, and that first step."""
    best = max(a for s, _, a in ref_evals if s <= upto)
    assert best > 0
    return best, next(s for s, _, a in ref_evals if a >= best)


def test_a_negative_lag_is_refused():
    with pytest.raises(ConfigError, match="--eval-lag"):
        TrainConfig(eval_lag=-1).validate()


@pytest.mark.parametrize("lag,placement", [(LAG, {"colocate": True}), (5, {"colocate": True}),
                                           (LAG, {}), (LAG, {"servers": 2})])
def test_the_lag_changes_no_evaluation_and_no_parameter(reference, lag, placement, tmp_path):
    """Every evaluation line has the reference's step and numbers, evaluated ``lag`` steps
    later (the last step at once); the final parameters are the same (lag 5 > eval_every: two
    evaluations in flight at once). Star and sharded runs against their own lag-0 run."""
    ref_run, ref_evals = reference
    if placement != {"colocate": True}:
        ref_run = simulate(tiny(tmp_path, "ref0", eval_lag=0, **placement))
        ref_evals = evals(ref_run)
    run = simulate(tiny(tmp_path, "lag", eval_lag=lag, **placement))
    assert evals(run) == ref_evals
    lines = [r for r in read_metrics(run) if r["kind"] == "eval"]
    assert [r["evaluated_at"] for r in lines] == [min(r["step"] + lag, 12) for r in lines]
    walls = {r["step"]: (r["wall"], r["cum_bytes_up"]) for r in read_metrics(run)
             if r["kind"] == "step"}
    assert all((r["wall"], r["cum_bytes_up"]) == walls[r["step"]] for r in lines)
    assert steps(run) == steps(ref_run)
    assert_equal(final(run), final(ref_run))
    summary = read_summary(run)
    assert summary["eval_lag"] == lag and summary["test_step"] == 12
    assert summary["stop_eval_step"] is None and not summary["stopped_early"]


def test_a_stop_is_applied_lag_steps_later_with_the_same_parameters(reference, tmp_path):
    """The evaluation of step s reaches the target: the run stops at s + lag, and its
    parameters are those of a run of s + lag steps without the lag."""
    _, ref_evals = reference
    target, s = target_of(ref_evals, 9)
    run = simulate(tiny(tmp_path, "stop", colocate=True, eval_lag=LAG, stop_accuracy=target))
    summary = read_summary(run)
    assert summary["steps"] == s + LAG and summary["stopped_early"]
    assert summary["stop_eval_step"] == s
    assert evals(run) == [e for e in ref_evals if e[0] <= s]
    plain = simulate(tiny(tmp_path, "plain", colocate=True, eval_lag=0, steps=s + LAG))
    assert_equal(trained(final(run)), trained(final(plain)))
    assert final(run)["eval_stop"] == {"eval_step": s, "at": s + LAG}


def test_resume_with_an_evaluation_in_flight_equals_uninterrupted(reference, tmp_path):
    """Checkpoints at 4 and 8: the evaluation of step 3 is in flight at 4 (due at 5): the
    checkpoint finishes it and keeps its stop decision, which the resumed run applies at 5."""
    _, ref_evals = reference
    target = next(a for s, _, a in ref_evals if s == 3)
    cfg = tiny(tmp_path, "whole", colocate=True, eval_lag=LAG, stop_accuracy=target,
               checkpoint_every=4)
    run = simulate(cfg)
    assert read_summary(run)["steps"] == 3 + LAG
    resumed_from_step_4_equals(cfg, run, tmp_path / "resumed")
    # without a stop: the same from the checkpoint of step 4, to step 12
    cfg = cfg.replace(stop_accuracy=0.0, run_dir=str(tmp_path / "whole2"))
    resumed_from_step_4_equals(cfg, simulate(cfg), tmp_path / "resumed2")


def resumed_from_step_4_equals(cfg, run: Path, copy: Path) -> None:
    """A copy of ``run`` resumed from its checkpoint of step 4 ends where ``run`` ended, with
    the same metrics lines."""
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "latest").write_text("step_4.pt\n")
    assert run_in_process(cfg.replace(run_dir=str(copy), resume=str(copy),
                                      simulate=True)) == 0
    assert_equal(final(copy), final(run))
    lines = lambda d: [(r["kind"], r["step"], r.get("loss"), r.get("test_accuracy"))  # noqa: E731
                       for r in read_metrics(d)]
    assert lines(copy) == lines(run)


@pytest.mark.slow
@pytest.mark.parametrize("placement", [{}, {"colocate": True, "overlap": True}])
def test_distributed_equals_simulated_with_the_lag_and_a_stop(placement, tmp_path):
    """torchrun with the lag and --stop-accuracy (star: 4 processes; colocated with
    --overlap: 3; a checkpoint at step 4 while an evaluation is in flight) stops at s + lag, as
    its --simulate reference does, with the same parameters, steps and evaluations."""
    target, s = target_of(evals(simulate(tiny(tmp_path, "ref", eval_lag=0, **placement))), 9)
    cfg = tiny(tmp_path, "dist", eval_lag=LAG, stop_accuracy=target, checkpoint_every=4,
               **placement)
    assert launch(cfg) == 0
    sim = simulate(cfg, "sim")
    assert_equal(final(Path(cfg.run_dir)), final(sim))
    assert steps(Path(cfg.run_dir)) == steps(sim)
    assert evals(Path(cfg.run_dir)) == evals(sim)
    a, b = read_summary(Path(cfg.run_dir)), read_summary(sim)
    assert a["steps"] == b["steps"] == s + LAG
    assert a["stop_eval_step"] == b["stop_eval_step"] == s
