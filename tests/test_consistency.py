"""The parameter server's consistency modes: sync with backup workers, ssp and async.

The policies are checked on their own (any arrival order), then whole runs: ``ssp`` with
``K = 0`` is the synchronous step bit for bit; every gradient is applied once or dropped once;
``ssp`` keeps every worker within K steps of the slowest, read from the record; backup workers
drop exactly B per step on workers of equal speed; ``--resume`` ends where the uninterrupted
run ends; a bad payload is left out of its update only. The distributed runs (torchrun on
loopback, a tiny model, workers slowed with ``--slow-worker``) end exactly where
``--simulate --replay`` of their own record ends.
"""

from __future__ import annotations

import ast
import random
import shutil
from pathlib import Path

import pytest
import torch
from run_states import assert_equal, final

from dist_quant.config import TrainConfig
from dist_quant.errors import ConfigError
from dist_quant.ps.arrivals import Replay, VirtualClock
from dist_quant.ps.consistency import Bounded, Synchronous
from dist_quant.runtime.metrics import read_metrics, read_summary
from dist_quant.train import launch, run_in_process

# 40 -> 7 -> 5 -> 10 with BatchNorm: 399 parameters, 80 buckets of 5
TINY = dict(hidden="7,5", train_size=120, test_size=30, batch_size=4, eval_every=3,
            progress=False, timeout=60.0, bucket_size=5, lr=0.05, workers=3)


def tiny(tmp: Path, name: str, **changes) -> TrainConfig:
    return TrainConfig(**{**TINY, "run_dir": str(tmp / name), **changes}).validate()


def simulate(cfg: TrainConfig, name: str | None = None, **changes) -> Path:
    run_dir = Path(cfg.run_dir) if name is None else Path(cfg.run_dir).parent / name
    sim = cfg.replace(simulate=True, run_dir=str(run_dir), **changes)
    assert run_in_process(sim) == 0
    return run_dir


def updates(run_dir: Path) -> list[dict]:
    return sorted((r for r in read_metrics(run_dir) if r["kind"] == "update"),
                  key=lambda r: r["arrival"])


def server_state(run_dir: Path) -> dict:
    state = final(run_dir)
    return {"server": {k: state["server"][k] for k in ("theta", "optimizer", "generator")},
            "shards": [{k: s[k] for k in ("theta", "optimizer", "generator")}
                       for s in state["shards"]]}


def evals(run_dir: Path) -> list[tuple]:
    return [(r["step"], r["test_loss"], r["test_accuracy"]) for r in read_metrics(run_dir)
            if r["kind"] == "eval"]


def without_timing(state: dict) -> dict:
    """A final checkpoint without what measures time (the workers' waits, the telemetry of
    gradients not applied yet) or names where arrivals came from (network, clock, record)."""
    st = state["consistency"]
    st.pop("wait_by")
    st.pop("order")
    for info in [*st["queue"], *st["held"].values()]:
        info.pop("telemetry", None)
        info.pop("cause", None)   # a lost worker's: the network's words, or the simulator's
    return state


# ---- the policies alone ----------------------------------------------------------------------
def drive(policy, workers: int, rounds: int, pick, log: list | None = None) -> list[tuple]:
    """Run ``policy`` with arrivals chosen by ``pick(computing)``; returns (update group,
    version) pairs; ``log`` gets (worker, its step, started after how many arrivals)."""
    version, computing, done, started = 0, set(range(workers)), [0] * workers, [0] * workers
    read, made, arrivals = [0] * workers, [], 0
    while min(done) < rounds:
        i = pick(sorted(computing))
        computing.discard(i)
        done[i] += 1
        arrivals += 1
        if log is not None:
            log.append((i, done[i], started[i]))
        d = policy.arrive(i, read[i], version)
        if d.update:
            version += 1
            made.append((d.update, version))
        for j in d.release:
            read[j], started[j] = version, arrivals
            computing.add(j)
    return made


def test_sync_makes_one_update_of_every_worker_per_step():
    made = drive(Synchronous(4), 4, 5, lambda c: c[-1])
    assert made == [([0, 1, 2, 3], v) for v in range(1, 6)]


def test_backup_workers_update_with_the_first_w_minus_b_and_drop_the_late():
    p = Synchronous(4, backup=1)
    first = [p.arrive(i, 0, 0) for i in (2, 0, 3)]
    assert first[-1].update == [0, 2, 3] and first[-1].release == [0, 2, 3]
    late = p.arrive(1, 0, 1)
    assert late.dropped and late.release == [1] and not late.update


@pytest.mark.parametrize("k", [0, 1, 3])
def test_ssp_never_lets_a_worker_run_more_than_k_steps_ahead(k):
    rng = random.Random(k)
    log: list = []
    made = drive(Bounded(5, k), 5, 30, lambda c: rng.choice(c), log)
    arrived = {}   # (worker, step) -> arrival index
    for n, (i, step, started) in enumerate(log, 1):
        arrived[(i, step)] = n
        # worker i started this step after `started` arrivals: every worker had finished
        # step - K - 1 by then
        assert all(arrived[(j, step - k - 1)] <= started for j in range(5) if step - k - 1 > 0)
    if k == 0:
        assert all(len(group) == 5 for group, _ in made)


def test_async_updates_one_gradient_at_a_time_and_never_waits():
    log: list = []
    rng = random.Random(0)
    made = drive(Bounded(3, None), 3, 10, lambda c: rng.choice(c), log)
    assert all(len(group) == 1 for group, _ in made)
    assert len(made) == len(log)


def test_the_virtual_clock_follows_the_slow_factors():
    clock = VirtualClock(3, {1: 2.5})
    clock.released([0, 1, 2])
    order = []
    for _ in range(7):
        i = clock.next()
        order.append(i)
        clock.released([i])
    assert order == [0, 2, 0, 2, 1, 0, 2]   # worker 1 at 2.5; the others every 1.0
    assert Replay([2, 0]).computing == set()
    with pytest.raises(ConfigError, match="not computing"):
        Replay([2]).next()


# ---- options ---------------------------------------------------------------------------------
@pytest.mark.parametrize("changes,option", [
    (dict(consistency="async", colocate=True), "--consistency"),
    (dict(consistency="ssp", method="ddp"), "--consistency"),
    (dict(consistency="async", servers=2, overlap=True), "--consistency"),
    (dict(staleness=4), "--staleness"),
    (dict(consistency="ssp", staleness=-1), "--staleness"),
    (dict(backup_workers=3), "--backup-workers"),
    (dict(backup_workers=1, consistency="async"), "--backup-workers"),
    (dict(slow_worker="3=2"), "--slow-worker"),
    (dict(slow_worker="1=0.5"), "--slow-worker"),
    (dict(replay="/nonexistent"), "--replay"),
    (dict(consistency="async", shift_rate="auto"), "--shift-rate"),
    (dict(min_workers=2), "--min-workers"),
    (dict(consistency="ssp", staleness=1, min_workers=2), "--min-workers"),
    (dict(consistency="async", min_workers=4), "--min-workers"),
    (dict(consistency="async", inject_loss="2"), "--inject-loss"),
    (dict(consistency="async", inject_loss="3:1"), "--inject-loss"),
    (dict(inject_loss="1:2"), "--inject-loss"),
])
def test_modes_that_cannot_apply_are_refused_in_one_line(changes, option, tmp_path):
    with pytest.raises(ConfigError, match=f"^{option}"):
        tiny(tmp_path, "x", **changes)


def test_the_rank_side_imports_nothing_above_it():
    """train.py is the command line; the modules it starts take the rank's side from
    dist_quant.runtime.rank, so no import reaches back up to train."""
    root = Path(__file__).resolve().parents[1] / "dist_quant"
    for path in ["runtime/rank.py", "baselines/ddp.py", "runner/preflight.py",
                 "runner/simulate.py", "ps/start.py", "ps/sync_step.py", "ps/async_rank.py"]:
        tree = ast.parse((root / path).read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "dist_quant.train" not in names, path


# ---- whole runs in one process --------------------------------------------------------------
@pytest.mark.parametrize("servers", [1, 2])
def test_ssp_with_k_0_is_the_synchronous_step_bit_for_bit(servers, tmp_path):
    cfg = tiny(tmp_path, "sync", servers=servers, steps=7, downlink="sign",
               downlink_bucket_size=7, slow_worker="1=3")
    sync = simulate(cfg)
    k0 = simulate(cfg, "k0", consistency="ssp", staleness=0)
    assert_equal(server_state(k0), server_state(sync))
    assert evals(k0) == evals(sync)
    assert all(r["staleness"] == 0 for r in updates(k0))


def test_every_gradient_is_applied_or_dropped_once(tmp_path):
    cfg = tiny(tmp_path, "async", steps=9, consistency="async", slow_worker="0=2.5")
    run = simulate(cfg)
    lines, summary = updates(run), read_summary(run)
    assert [r["arrival"] for r in lines] == list(range(summary["gradients"]))
    for i in range(3):
        mine = [r for r in lines if r["worker"] == i]
        assert [r["worker_step"] for r in mine] == list(range(1, len(mine) + 1))
        applied = [r for r in mine if r["applied"] is not None]
        assert len(applied) == summary["applied_per_worker"][i]
        assert len(mine) - len(applied) == summary["dropped_per_worker"][i]
        assert all(r["dropped"] == "end" for r in mine if r["applied"] is None)
    assert sorted(r["applied"] for r in lines if r["applied"]) == list(range(1, 28))
    assert all(r["staleness"] == r["applied"] - 1 - r["read"] for r in lines if r["applied"])
    assert summary["updates"] == 27 and summary["steps"] == 9
    # the slow worker (0) sends fewer gradients, read on older versions
    assert summary["applied_per_worker"][0] < summary["applied_per_worker"][1]


def test_backup_workers_drop_exactly_b_per_step_on_equal_workers(tmp_path):
    run = simulate(tiny(tmp_path, "b1", steps=6, backup_workers=1))
    lines = updates(run)
    for step in range(1, 7):
        mine = [r for r in lines if r["step"] == step and r["dropped"] != "end"]
        assert sum(r["applied"] is not None for r in mine) == 2
        assert sum(r["dropped"] == "late" for r in mine) == (1 if step > 1 else 0)
    assert all(r["staleness"] == 0 for r in lines if r["applied"])


def test_a_bad_payload_is_left_out_of_its_update_only(tmp_path):
    run = simulate(tiny(tmp_path, "nan", steps=4, consistency="async", inject_nonfinite="1:2"))
    steps = [r for r in read_metrics(run) if r["kind"] == "step"]
    assert sum(r["skipped"] for r in steps) == 1
    assert read_summary(run)["skipped_payloads"] == 1


@pytest.mark.parametrize("mode", [dict(consistency="ssp", staleness=1, slow_worker="2=3"),
                                  dict(consistency="async", servers=2, downlink="sign",
                                       downlink_bucket_size=7, slow_worker="0=2")])
def test_resume_equals_uninterrupted(mode, tmp_path):
    cfg = tiny(tmp_path, "full", steps=9, checkpoint_every=3, keep_checkpoints=0, **mode)
    full = simulate(cfg)
    copy = tmp_path / "resumed"
    shutil.copytree(full, copy)
    (copy / "checkpoints" / "latest").write_text("step_6.pt\n")
    assert run_in_process(cfg.replace(run_dir=str(copy), resume=str(copy), simulate=True)) == 0
    assert_equal(without_timing(final(copy)), without_timing(final(full)))
    timing = ("wall", "time", "cpu", "cpu_roles", "time_wait")
    strip = lambda d: [{k: v for k, v in r.items() if k not in timing}  # noqa: E731
                       for r in read_metrics(d)]
    assert strip(copy) == strip(full)


# ---- a lost worker (--min-workers) ----------------------------------------------------------
LOST = dict(consistency="async", min_workers=2, inject_loss="2:3")


def lost_lines(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["kind"] == "lost"]


def test_a_lost_worker_is_dropped_named_and_the_run_goes_on(tmp_path, capfd):
    """Worker 2 leaves instead of computing its 3rd gradient; on the virtual clock (every
    worker 1 unit a gradient) the server notices when it would have arrived, after 8 arrivals
    (3 at t = 1, 3 at t = 2, workers 0 and 1 at t = 3), and the other two make every step."""
    run = simulate(tiny(tmp_path, "lost", steps=8, **LOST))
    out, err = capfd.readouterr()
    summary = read_summary(run)
    lost = lost_lines(run)
    assert [(r["worker"], r["after"], r["step"]) for r in lost] == [(2, 8, 3)]
    assert summary["lost_workers"] == [{k: v for k, v in lost[0].items() if k != "kind"}]
    assert summary["workers_at_end"] == 2 and summary["steps"] == 8
    assert summary["updates"] == 24   # a step is still W = 3 gradients
    assert [r["worker_step"] for r in updates(run) if r["worker"] == 2] == [1, 2]
    workers = final(run)["workers"]   # the others took its examples over; it has no state
    assert workers[2] is None and [w["lost"] for w in workers[:2]] == [[2], [2]]
    assert sum(summary["applied_per_worker"]) + sum(summary["dropped_per_worker"]) == \
        summary["gradients"] == len(updates(run))
    line = [x for x in err.splitlines() if "going on with" in x]
    assert len(line) == 1 and line[0].startswith("dist_quant: lost contact with rank 3 "
                                                 "(worker 2)"), err
    assert "going on with 2 of 3 workers (--min-workers 2)" in line[0]
    assert "lost worker 2 at step 3: ended with 2 workers" in out


def test_a_lost_workers_examples_go_to_the_others_once_each():
    """Every training example is held by exactly one live worker after any order of losses,
    and the live workers' shares differ by at most a few examples."""
    from dist_quant.ps.worker import examples_after_losses

    n, W = 103, 5
    for lost in ([], [2], [2, 0], [4, 1, 3]):
        live = [i for i in range(W) if i not in lost]
        held = [examples_after_losses(n, W, i, lost) for i in live]
        assert sorted(torch.cat(held).tolist()) == list(range(n)), lost
        sizes = [len(h) for h in held]
        assert max(sizes) - min(sizes) <= len(lost) + 1, (lost, sizes)
        # a worker keeps its own examples first, in order
        for i, h in zip(live, held, strict=True):
            assert h[:len(range(i, n, W))].tolist() == list(range(i, n, W))
    with pytest.raises(ValueError, match="dropped"):
        examples_after_losses(n, W, 2, [2])


def test_without_min_workers_a_lost_worker_ends_the_run_naming_it(tmp_path, capfd):
    cfg = tiny(tmp_path, "stop", steps=8, consistency="async", inject_loss="2:3")
    assert run_in_process(cfg.replace(simulate=True)) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dist_quant: lost contact with rank 3 (worker 2)"), err
    assert "ending the run" in err[-1] and not (Path(cfg.run_dir) / "summary.json").exists()


def test_a_checkpoint_after_a_loss_resumes_without_the_lost_worker(tmp_path):
    """Lost before the checkpoint of step 3: the checkpoint holds no state for it, and the
    run resumed from there (in one process, and distributed: its restarted process leaves at
    once) ends where the uninterrupted one ends, or where the replay of its record ends."""
    cfg = tiny(tmp_path, "full", steps=9, checkpoint_every=3, keep_checkpoints=0,
               **{**LOST, "inject_loss": "2:2"})
    full = simulate(cfg)
    assert lost_lines(full)[0]["step"] <= 3
    copies = {}
    for name in ("sim", "dist", "replay"):
        copies[name] = tmp_path / name
        shutil.copytree(full, copies[name])
        (copies[name] / "checkpoints" / "latest").write_text("step_3.pt\n")
    sim = copies["sim"]
    assert run_in_process(cfg.replace(run_dir=str(sim), resume=str(sim), simulate=True)) == 0
    assert_equal(without_timing(final(sim)), without_timing(final(full)))
    assert lost_lines(sim) == lost_lines(full)
    dist = copies["dist"]
    assert launch(cfg.replace(run_dir=str(dist), resume=str(dist))) == 0
    assert read_summary(dist)["workers_at_end"] == 2
    rep = copies["replay"]
    assert run_in_process(cfg.replace(run_dir=str(rep), resume=str(rep), simulate=True,
                                      replay=str(dist))) == 0
    assert_equal(without_timing(final(rep)), without_timing(final(dist)))


@pytest.mark.slow
def test_a_worker_lost_in_a_distributed_run_is_replayed(distributed):
    """Its process really ended (exit 0, so torchrun's agent keeps the others running) and
    its links closed; the record names it, and the replay drops it at the same place."""
    name, cfg, run = distributed
    if name != "lost":
        pytest.skip("the lost-worker job")
    lost = lost_lines(run)
    assert [r["worker"] for r in lost] == [2]
    assert "rank 3 (worker 2)" in lost[0]["cause"] and "left" not in lost[0]["cause"]  # gloo's
    assert [r["worker_step"] for r in updates(run) if r["worker"] == 2] == [1, 2, 3]
    replay = Path(cfg.run_dir).parent / "lost_replay"
    if not replay.exists():
        simulate(cfg, "lost_replay", replay=str(run))
    assert [(r["worker"], r["after"], r["step"]) for r in lost_lines(replay)] == \
        [(r["worker"], r["after"], r["step"]) for r in lost]
    assert read_summary(replay)["test_loss"] == read_summary(run)["test_loss"]


def test_a_replay_of_another_config_is_refused(tmp_path, capfd):
    run = simulate(tiny(tmp_path, "async", steps=3, consistency="async"))
    other = tiny(tmp_path, "other", steps=3, consistency="async", lr=0.1, replay=str(run),
                 simulate=True)
    assert run_in_process(other) == 2
    assert "--replay" in capfd.readouterr().err


# ---- distributed runs against their replay --------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("consistency")


JOBS = {
    "async": dict(consistency="async", slow_worker="1=3", steps=8),
    "ssp": dict(consistency="ssp", staleness=1, servers=2, slow_worker="0=3", downlink="sign",
                downlink_bucket_size=7, steps=8, checkpoint_every=4, keep_checkpoints=0),
    "backup": dict(backup_workers=1, slow_worker="2=4", steps=8, downlink="sign",
                   downlink_bucket_size=7),
    "lost": dict(consistency="async", slow_worker="1=3", steps=8, min_workers=2,
                 inject_loss="2:4"),
}


@pytest.fixture(scope="module", params=list(JOBS))
def distributed(request, runs):
    cfg = tiny(runs, request.param, **JOBS[request.param])
    assert launch(cfg) == 0
    return request.param, cfg, Path(cfg.run_dir)


@pytest.mark.slow
def test_every_mode_equals_the_replay_of_its_own_record(distributed):
    name, cfg, run = distributed
    replay = simulate(cfg, f"{name}_replay", replay=str(run))
    assert_equal(without_timing(final(replay)), without_timing(final(run)))
    assert evals(replay) == evals(run)
    assert [{k: v for k, v in r.items()} for r in updates(replay)] == updates(run)


@pytest.mark.slow
def test_a_distributed_run_resumed_from_its_checkpoint_ends_where_it_ended(distributed,
                                                                          tmp_path):
    """The ssp run (two shard servers) continued from its checkpoint of step 4, following the
    rest of its own record: the checkpoint holds everything its decisions depend on."""
    name, cfg, run = distributed
    if name != "ssp":
        pytest.skip("the ssp job writes intermediate checkpoints")
    copy = tmp_path / "resumed"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "latest").write_text("step_4.pt\n")
    resumed = cfg.replace(run_dir=str(copy), resume=str(copy), simulate=True, replay=str(run))
    assert run_in_process(resumed) == 0
    assert_equal(without_timing(final(copy)), without_timing(final(run)))
    assert updates(copy) == updates(run)


@pytest.mark.slow
def test_the_record_keeps_ssp_within_its_bound(distributed):
    name, cfg, run = distributed
    lines = updates(run)
    arrived = {(r["worker"], r["worker_step"]): r["arrival"] for r in lines}
    if name == "ssp":
        for r in lines:
            behind = r["worker_step"] - cfg.staleness - 1
            if behind > 0:
                assert all(arrived[(j, behind)] <= r["started_after"] for j in range(3))
    if name == "backup":
        per_update = {}
        for r in lines:
            if r["applied"] is not None:
                per_update[r["applied"]] = per_update.get(r["applied"], 0) + 1
        assert set(per_update.values()) == {2}
    summary = read_summary(run)
    assert sum(summary["applied_per_worker"]) + sum(summary["dropped_per_worker"]) == \
        summary["gradients"] == len(lines)


@pytest.mark.slow
def test_a_slow_worker_changes_the_time_of_a_synchronous_run_only(runs):
    cfg = tiny(runs, "slow", steps=4, slow_worker="1=4")
    assert launch(cfg) == 0
    plain = simulate(cfg, "plain", slow_worker="")
    assert_equal(final(cfg.run_dir), final(plain))
    assert evals(Path(cfg.run_dir)) == evals(plain)
    assert torch.equal(final(cfg.run_dir)["server"]["theta"], final(plain)["server"]["theta"])


# ---- uneven clusters: options, names, placement -----------------------------------------------
def test_worker_rates_name_a_worker_and_its_host():
    from dist_quant.analysis.linkmodel import Link
    from dist_quant.cluster.run import host_links, parse_worker_rates

    assert parse_worker_rates(["1=1", "3=2.5"], 4) == {1: 1.0, 3: 2.5}
    for bad in (["1"], ["x=1"], ["1=0"], ["1=1", "1=2"], ["4=1"]):
        with pytest.raises(ConfigError, match="--worker-rate"):
            parse_worker_rates(bad, 4)
    links = host_links(["s", "w1", "w2", "w3"], Link(10.0), {1: 1.0})
    assert [(lk.rate_mbit, w) for lk, w in links] == [(10.0, None), (10.0, 0), (1.0, 1),
                                                      (10.0, 2)]


def test_a_sweep_point_names_its_straggler():
    from dist_quant.sweep import points_from_options

    (p,) = points_from_options(["ps-tolerant"], ["workers=4"], "10", None, None, None, False,
                               None, ["1=1"], ["2=4"])
    assert "_w1at1mbit_slow2x4_" in p.name and p.runner == "cluster"
    assert p.cfg.consistency == "async" and p.cfg.slow_factors == {2: 4.0}
    (q,) = points_from_options(["ps-tolerant"], ["workers=4"], "10", None, None, None, False)
    assert q.name != p.name


def test_hosts_given_a_worker_index_are_that_worker():
    from dist_quant.ps.placement import place

    cfg = TrainConfig(workers=3, servers=2, hidden="7,5", bucket_size=5).validate()
    roles = ["worker", "server", "worker", "worker", "server"]
    p = place(cfg, 399, roles, [2, None, 0, 1, None])
    assert p.server_ranks == (1, 4) and p.worker_ranks == (2, 3, 0)
    assert place(cfg, 399, roles).worker_ranks == (0, 2, 3)
    with pytest.raises(ConfigError, match="DIST_QUANT_WORKER"):
        place(cfg, 399, roles, [0, None, 0, 1, None])


@pytest.mark.slow
def test_an_async_cluster_run_with_an_uneven_link_replays_to_its_test_loss(tmp_path):
    """The namespace cluster (root): worker 1's host capped at 2 Mbit/s, the others at 10; the
    replay of the run's record ends with its test loss and parameters exactly."""
    from test_cluster import REASON

    if REASON is not None:
        pytest.skip(REASON)
    from dist_quant.cluster.run import run_cluster

    cfg = TrainConfig(workers=3, steps=6, eval_every=3, progress=False, consistency="async",
                      downlink="sign", slow_worker="0=2", run_dir=str(tmp_path / "run"))
    out = run_cluster(cfg, rate_mbit=10, latency_ms=0, worker_rates={1: 2.0})
    run = Path(out["run_dir"])
    assert out["link"]["worker_rates"] == {"1": 2.0}
    assert "tbf rate 2mbit" in (run / "hosts" / "w2.log").read_text()
    assert "tbf rate 2mbit" not in (run / "hosts" / "w1.log").read_text()
    replay = simulate(cfg, "replay", replay=str(run))
    assert evals(replay)[-1][1] == evals(run)[-1][1]
    assert_equal(without_timing(final(replay)), without_timing(final(run)))
