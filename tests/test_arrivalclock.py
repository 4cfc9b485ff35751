"""The modelled arrival order of the asynchronous modes against orders and times computed by
hand, and modelled asynchronous runs: reproducible, replayed, ssp with K = 0 as sync.

Units as in test_clock.py: a 1448-byte payload takes 1 ms per link; the calibration (ms):
forward 2, backward 4, encode 1, decode 0.5 per row, update 1, downlink encode 1, downlink
decode 1, evaluation 10. A fresh run's workers start at 0 without a downlink: a worker of
speed factor f has its payload ready at 6 f + 1, later ones at (downlink in) + 1 + 6 f + 1.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from run_states import assert_equal, final
from test_clock import CAL, RATE, SEG, config, ms, record

from dist_quant.config import TrainConfig
from dist_quant.errors import ConfigError
from dist_quant.ps.consistency import Bounded, Synchronous
from dist_quant.runtime.arrivalclock import ArrivalClock
from dist_quant.runtime.clock import Clock
from dist_quant.runtime.metrics import read_metrics, read_summary
from dist_quant.train import run_in_process


def drive(clock: ArrivalClock, policy, workers: int, arrivals: int) -> list[tuple]:
    """The leader's side (:mod:`dist_quant.ps.async_leader`) on ``clock``: ``(worker, ms the
    leader took it, dropped)`` per arrival."""
    clock.configure([SEG], [SEG], [SEG], 0)
    version = applied = completed = 0
    read = [0] * workers
    clock.released(list(range(workers)))
    log = []
    for _ in range(arrivals):
        i = clock.next()
        log.append((i, ms(clock.lead)))
        d = policy.arrive(i, read[i], version)
        if d.dropped:
            clock.dropped(i)
            log[-1] += ("dropped",)
        if d.update:
            version += 1
            applied += len(d.update)
            done = applied >= (completed + 1) * workers or policy.lockstep
            completed += done
            clock.updated(d.update, completed if done else 0)
        clock.released(d.release)
        for j in d.release:
            read[j] = version
    return log


def test_two_workers_one_three_times_slower():
    """Worker 0 ready at 7, in at 8; the leader updates (9.5) and releases it (10.5), its
    downlink in at 11.5, its next payload ready at 19.5, in at 21 (behind worker 1's, ready
    at 19, in at 20). Worker 1, taken at 20, completes step 1 (21.5), released at 22.5, in
    again at 23.5 + 20 + 1 = 44.5; worker 0 in at 21 is taken at 22.5 (when the leader is
    free), released at 25, in at 35: the fourth gradient, which completes step 2 (36.5)."""
    clock = ArrivalClock(config(consistency="async", slow_worker="1=3"), CAL)
    log = drive(clock, Bounded(2, None), 2, 5)
    assert log == [(0, 8), (1, 20), (0, 22.5), (0, 35), (1, 44.5)]
    assert ms(clock.at[1]) == 21.5 and ms(clock.at[2]) == 36.5


def test_a_worker_on_a_slow_link():
    """Worker 1 at a quarter of the rate: its payload takes 4 ms on its own link (in at 11),
    its downlink 4 ms (released at 13.5, in at 17.5, next payload ready at 25.5, in at
    29.5); worker 0 goes round in 12.5 ms."""
    clock = ArrivalClock(config(consistency="async", worker_rate=f"1={RATE / 4}"), CAL)
    log = drive(clock, Bounded(2, None), 2, 5)
    assert log == [(0, 8), (1, 11), (0, 20.5), (1, 29.5), (0, 33)]
    assert ms(clock.at[1]) == 12.5 and ms(clock.at[2]) == 31


def test_backup_workers_drop_the_slowest():
    """W = 3, B = 1, worker 2 twice as slow (ready at 13, in at 14): workers 0 and 1 (in at 8
    and 9) make step 1 (11), released at 12; worker 2's gradient is late, dropped, and it is
    released at once (15); its next one (in at 31) is late again."""
    clock = ArrivalClock(config(workers=3, backup_workers=1, slow_worker="2=2"), CAL)
    log = drive(clock, Synchronous(3, backup=1), 3, 6)
    assert log == [(0, 8), (1, 9), (2, 14, "dropped"), (0, 22), (1, 23), (2, 31, "dropped")]
    assert ms(clock.at[1]) == 11 and ms(clock.at[2]) == 25


def test_an_evaluation_step_holds_the_release():
    """With an evaluation every step, the leader evaluates (10 ms) before it releases."""
    clock = ArrivalClock(config(consistency="async", slow_worker="1=3", eval_every=1), CAL)
    log = drive(clock, Bounded(2, None), 2, 3)
    assert log[:2] == [(0, 8), (1, 20)] and ms(clock.at[1]) == 31.5
    assert log[2] == (0, 32.5)   # worker 0's second gradient, in at 21, waits for the leader


def test_shards_wait_for_their_payloads_and_the_statuses():
    """Two servers, one worker, ssp K = 0: shard payloads ready at 6.5 and 7, in at 7.5 and
    8.5 (the worker's link sends one after the other); the leader takes the gradient at 7.5
    (shard 0's) and steps (8.25); server 1 has its command at 7.5, its payload at 8.5, steps
    (9.25) and reports: the step is done at 9.25."""
    clock = ArrivalClock(config(workers=1, servers=2, consistency="ssp"), CAL)
    clock.configure([SEG // 2, SEG // 2], [SEG, SEG], [SEG, SEG], 0)
    clock.released([0])
    assert clock.next() == 0 and ms(clock.lead) == 7.5
    clock.updated([0], 1)
    assert ms(clock.at[1]) == 9.25


@pytest.mark.parametrize("over", [dict(), dict(servers=2), dict(slow_worker="1=3"),
                                  dict(servers=2, slow_worker="1=3", host_speed=2.0)])
def test_ssp_k0_keeps_the_synchronous_clocks_pace(over):
    """ssp with K = 0 is the synchronous step: once under way, each step takes what the
    synchronous clock gives it (without evaluations). Only the first differs: a fresh
    asynchronous run starts without a downlink, and its steps end at the leader's update
    rather than at the last downlink's arrival. (With a latency the asynchronous servers
    but the leader also wait for its UPDATE command, L after its decision, where the
    synchronous step's servers step as soon as their rows are in.)"""
    shards = over.get("servers", 1)
    sync = Clock(config(**over), CAL)
    want = [ms(sync.step(record(t, [2 * SEG] * shards, [2 * SEG] * shards)))
            for t in range(1, 6)]
    clock = ArrivalClock(config(consistency="ssp", **over), CAL)
    clock.configure([SEG // shards] * shards, [SEG] * shards, [SEG] * shards, 0)
    clock.configure = lambda *a, **k: None   # drive's single-shard configuration
    drive(clock, Bounded(2, 0), 2, 10)
    at = [0.0, *(ms(clock.at[t]) for t in range(1, 6))]
    assert [round(b - a, 9) for a, b in zip(at[1:-1], at[2:], strict=True)] == want[1:]


def test_the_state_carries_on():
    """A clock restored from another's state goes on alike."""
    a = ArrivalClock(config(consistency="async", slow_worker="1=3"), CAL)
    drive(a, Bounded(2, None), 2, 3)
    b = ArrivalClock(config(consistency="async", slow_worker="1=3"), CAL)
    b.configure([SEG], [SEG], [SEG], 0)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [(a.next(), ms(a.lead)) for _ in range(2)] == [(b.next(), ms(b.lead))
                                                          for _ in range(2)]


def test_async_needs_the_simulator_under_the_modelled_clock():
    with pytest.raises(ConfigError, match="^--clock.*--simulate"):
        TrainConfig(clock="dedicated", rate=10.0, consistency="async").validate()
    TrainConfig(clock="dedicated", rate=10.0, consistency="async", simulate=True).validate()


# ---- whole modelled runs ---------------------------------------------------------------------
TINY = dict(hidden="7,5", train_size=120, test_size=30, batch_size=4, eval_every=3,
            progress=False, timeout=60.0, bucket_size=5, lr=0.05, workers=3, simulate=True,
            clock="dedicated", rate=1.0, steps=7)


def run(tmp: Path, name: str, **changes) -> Path:
    cfg = TrainConfig(**{**TINY, "run_dir": str(tmp / name), **changes}).validate()
    assert run_in_process(cfg) == 0
    return tmp / name


def lines(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["kind"] == kind]


def timeless(run_dir: Path) -> list[dict]:
    measured = ("wall", "time", "time_wait", "cpu", "cpu_roles")
    return [{k: v for k, v in r.items() if k not in measured} for r in read_metrics(run_dir)]


def server_state(run_dir: Path) -> dict:
    state = final(run_dir)
    return {"server": {k: state["server"][k] for k in ("theta", "optimizer", "generator")},
            "shards": [{k: s[k] for k in ("theta", "optimizer", "generator")}
                       for s in state["shards"]]}


@pytest.fixture(scope="module")
def modelled(tmp_path_factory) -> Path:
    """An async run, worker 1 three times slower, worker 2 on a link a quarter as fast."""
    return run(tmp_path_factory.mktemp("arrivalclock"), "async", consistency="async",
               slow_worker="1=3", worker_rate="2=0.25", servers=2)


def test_a_modelled_run_records_its_times(modelled):
    steps, updates = lines(modelled, "step"), lines(modelled, "update")
    assert all(r["model_wall"] > 0 for r in steps)
    assert steps[-1]["model_time"] == pytest.approx(sum(r["model_wall"] for r in steps))
    assert all("model_time" in u and u["model_wall"] > 0 for u in updates)
    taken = [u["model_time"] for u in sorted(updates, key=lambda u: u["arrival"])]
    assert taken == sorted(taken)
    evals = {r["step"]: r["model_time"] for r in lines(modelled, "eval")}
    assert evals[3] == steps[2]["model_time"]
    summary = read_summary(modelled)
    assert summary["clock"] == "dedicated" and summary["model_seconds"] == steps[-1]["model_time"]
    # the modelled cluster chose the order: on these links the compute hardly counts (worker
    # 1 keeps up with worker 0), worker 2's slow link does
    per = summary["applied_per_worker"]
    assert per[2] < min(per[0], per[1]) and abs(per[0] - per[1]) <= 2


def test_a_modelled_run_is_reproducible_and_replays(modelled, tmp_path):
    again = run(tmp_path, "again", consistency="async", slow_worker="1=3",
                worker_rate="2=0.25", servers=2, calibration=str(modelled))
    assert timeless(again) == timeless(modelled)
    assert_equal(server_state(again), server_state(modelled))
    replay = run(tmp_path, "replay", consistency="async", slow_worker="1=3",
                 worker_rate="2=0.25", servers=2, calibration=str(modelled),
                 replay=str(modelled))
    assert_equal(server_state(replay), server_state(modelled))
    assert timeless(replay) == timeless(modelled)


def test_without_the_clock_the_unit_time_order_stays(tmp_path):
    """The same run on the wall clock takes the virtual clock's order (worker 1 every third
    unit), with no modelled field."""
    plain = run(tmp_path, "plain", consistency="async", slow_worker="1=3", clock="wall",
                rate=0.0)
    order = [u["worker"] for u in sorted(lines(plain, "update"), key=lambda u: u["arrival"])]
    assert order[:8] == [0, 2, 0, 2, 0, 1, 2, 0]
    assert not any("model_time" in r for r in read_metrics(plain))


def test_ssp_k0_under_the_modelled_clock_is_the_synchronous_modelled_run(tmp_path):
    sync = run(tmp_path, "sync", slow_worker="1=3", servers=2, downlink="sign",
               downlink_bucket_size=7)
    k0 = run(tmp_path, "k0", consistency="ssp", staleness=0, slow_worker="1=3", servers=2,
             downlink="sign", downlink_bucket_size=7, calibration=str(sync))
    assert_equal(server_state(k0), server_state(sync))
    ev = lambda d: [(r["step"], r["test_loss"], r["test_accuracy"]) for r in lines(d, "eval")]  # noqa: E731
    assert ev(k0) == ev(sync)
    assert all(r["staleness"] == 0 for r in lines(k0, "update"))
    assert all(r["model_wall"] > 0 for r in lines(k0, "step"))


def test_a_resumed_modelled_run_ends_where_the_uninterrupted_one_ends(modelled, tmp_path):
    """The clock's state travels in the checkpoint: the resumed run takes the same arrivals
    at the same modelled times."""
    opts = dict(consistency="async", slow_worker="1=3", worker_rate="2=0.25", servers=2,
                calibration=str(modelled), checkpoint_every=3, keep_checkpoints=0, steps=7)
    full = run(tmp_path, "full", **opts)
    copy = tmp_path / "resumed"
    shutil.copytree(full, copy)
    (copy / "checkpoints" / "latest").write_text("step_6.pt\n")
    cfg = TrainConfig(**{**TINY, **opts, "run_dir": str(copy), "resume": str(copy)})
    assert run_in_process(cfg.validate()) == 0
    assert timeless(copy) == timeless(full)
    assert_equal(server_state(copy), server_state(full))
