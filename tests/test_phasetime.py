"""CPU time beside wall time (:mod:`dist_quant.runtime.phasetime`): the clocks themselves, the
sums in the summary, the machine's load and cores, and the ``cpu`` of every kind of
parameter-server run in one process (the DDP baselines: tests/test_ddp.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cpu_checks import READING, check_cpu_records

from dist_quant.config import TrainConfig
from dist_quant.runtime import metrics
from dist_quant.runtime.metrics import RunRecorder, cpu_quota, read_metrics, read_summary
from dist_quant.runtime.phasetime import Clocks, Window, charge, charged, now, since
from dist_quant.train import run_in_process

BUSY = 0.002      # CPU seconds of one busy loop: short enough to fit in one time slice
TRIES = 200       # busy loops at most, until one ran without being preempted much


def busy(cpu_seconds: float) -> Clocks:
    """Spin until this thread has used ``cpu_seconds``; the time it took on both clocks."""
    t0 = now()
    while time.thread_time() - t0.cpu < cpu_seconds:
        pass
    return now() - t0


def test_a_busy_phase_costs_cpu_close_to_its_wall_time():
    """A busy loop's CPU time is what it asked for and never more than its wall time; other
    processes may preempt any one loop (wall grows, CPU does not), so the best of up to
    ``TRIES`` loops must have run at least half of its wall time on the CPU."""
    best = 0.0
    for _ in range(TRIES):
        spent = busy(BUSY)
        assert BUSY <= spent.cpu <= spent.wall + READING
        best = max(best, spent.cpu / spent.wall)
        if best >= 0.9:
            break
    assert best >= 0.5


def test_a_sleeping_phase_costs_almost_no_cpu():
    spent = since(now())
    assert 0.0 <= spent.cpu <= spent.wall + READING
    t0 = now()
    time.sleep(0.05)
    spent = since(t0)
    assert spent.wall >= 0.05
    assert spent.cpu < 0.2 * spent.wall


def test_a_window_leaves_out_the_charged_phases():
    window = Window()
    before = charged()
    phase = since(now(), charge_cpu=True)   # nothing: a charge of ~0
    spent = busy(BUSY)
    charge(spent.cpu)
    assert charged() == pytest.approx(before + phase.cpu + spent.cpu, abs=1e-12)
    # what the window's thread did outside the charged loop: a little bookkeeping
    assert 0.0 <= window.rest() < spent.cpu
    assert window.rest(minus=1.0) == 0.0
    assert window.elapsed().wall >= spent.wall


def test_clocks_subtract_and_add_on_both_clocks():
    a, b = Clocks(3.0, 1.0), Clocks(1.0, 0.25)
    assert (a - b).wall == 2.0 and (a - b).cpu == 0.75
    assert (a + b).wall == 4.0 and (a + b).cpu == 1.25


# ---- the recorder ---------------------------------------------------------------------------
def test_the_summary_sums_every_line_resumed_ones_included(tmp_path):
    cfg = TrainConfig().replace(steps=4).to_dict()
    times = {"compute": 0.5, "encode": 0.25, "communicate": 0.125, "decode": 0.0625,
             "update": 0.03125}
    cpu = {p: s / 2 for p, s in times.items()}
    rec = RunRecorder(tmp_path, cfg)
    for t in (1, 2, 3):
        rec.step(t, 1.0, 10, 10, times, cpu=cpu)
    rec.eval(2, 1.0, 0.5, spent=Clocks(0.5, 0.25))
    rec.close()
    resumed = RunRecorder(tmp_path, cfg, resume_step=2)   # step 3 is dropped
    resumed.step(3, 1.0, 10, 10, times, cpu=cpu)
    resumed.step(4, 1.0, 10, 10, times, cpu=cpu)
    resumed.summary(steps=4)
    resumed.close()
    summary = read_summary(tmp_path)
    assert summary["cpu_seconds"] == {**{p: 4 * s for p, s in cpu.items()}, "evaluate": 0.25}
    assert summary["time_seconds"] == {**{p: 4 * s for p, s in times.items()}, "evaluate": 0.5}
    lines = read_metrics(tmp_path)
    assert [r["kind"] for r in lines] == ["step", "step", "eval", "step", "step"]
    assert lines[2]["time"] == {"evaluate": 0.5} and lines[2]["cpu"] == {"evaluate": 0.25}


def test_config_and_summary_record_the_load_and_the_cores(tmp_path, monkeypatch):
    loads = iter([(1.5, 1.0, 0.5), (2.5, 1.25, 0.75)])
    monkeypatch.setattr(metrics.os, "getloadavg", lambda: next(loads))
    rec = RunRecorder(tmp_path, TrainConfig().to_dict())
    rec.step(1, 1.0, 1, 1, {"compute": 0.0})
    rec.summary(steps=1)
    rec.close()
    summary = read_summary(tmp_path)
    machine = json.loads((tmp_path / "config.json").read_text())["machine"]
    for where in (summary, machine):
        assert where["load_start"] == [1.5, 1.0, 0.5] and where["load_end"] == [2.5, 1.25, 0.75]
        assert where["cores"]["logical"] == metrics.os.cpu_count()
    # a line without cpu (a caller that measures none) leaves the cpu sums at 0
    assert summary["cpu_seconds"]["compute"] == 0.0
    assert "cpu" not in read_metrics(tmp_path)[0]


def test_the_cgroup_quota_in_cores(tmp_path):
    assert cpu_quota(tmp_path) is None                      # nothing readable
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(tmp_path) is None                      # v2, no quota
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert cpu_quota(tmp_path) == 2.5
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(v1) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    assert cpu_quota(v1) == 0.5


# ---- runs in one process ---------------------------------------------------------------------
# 40 -> 7 -> 5 -> 10 with BatchNorm: 399 parameters; evaluations at 3, 6, 9 and the last step
TINY = dict(hidden="7,5", train_size=120, test_size=30, batch_size=4, eval_every=3,
            progress=False, timeout=60.0, bucket_size=5, lr=0.05, workers=3, steps=10)


@pytest.mark.parametrize("mode", [
    dict(),
    dict(servers=2, overlap=True, eval_lag=2, checkpoint_every=5),
    dict(colocate=True, downlink="sign", downlink_bucket_size=7),
    dict(consistency="async", servers=2),
    dict(consistency="ssp", staleness=1, slow_worker="2=3"),
], ids=["star", "sharded-overlap-lag", "colocated", "async", "ssp"])
def test_every_simulated_run_records_cpu_beside_each_phase(mode, tmp_path):
    cfg = TrainConfig(**{**TINY, "run_dir": str(tmp_path / "run"), **mode}).validate()
    assert run_in_process(cfg.replace(simulate=True)) == 0
    run = Path(cfg.run_dir)
    check_cpu_records(run)
    steps = [r for r in read_metrics(run) if r["kind"] == "step"]
    # one thread ran every role: it computed every step
    assert all(r["cpu"]["compute"] > 0.0 for r in steps)
    for r in steps:   # each phase's CPU is its roles'
        cpu, worker, server = r["cpu"], r["cpu_roles"]["worker"], r["cpu_roles"]["server"]
        assert cpu["compute"] == worker["compute"] and cpu["update"] == server["update"]
        assert cpu["encode"] == worker["encode"] + server["encode"]
        assert cpu["decode"] == worker["decode"] + server["decode"]
