"""The modelled clock against step times computed by hand, its options, and a modelled run.

Units: a payload of 1448 bytes (one full segment at MTU 1500) is 1514 bytes on the wire; the
links run at 12.112 Mbit/s = 1514 bytes per ms, so such a message takes 1 ms per link. The
calibration (ms): forward 2, backward 4, encode 1, decode 0.5 per row, update 1, downlink
encode 1, downlink decode 1, evaluation 10.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dist_quant.config import TrainConfig
from dist_quant.errors import ConfigError
from dist_quant.runtime.clock import Clock, Links, deliver, pieces

SEG = 1448
RATE = 1514 * 8 / 1000          # Mbit/s: 1514 bytes per ms
MS = 1e-3
CAL = {"seconds": {"forward": 2 * MS, "backward": 4 * MS, "encode": 1 * MS, "decode": 0.5 * MS,
                   "update": 1 * MS, "down_encode": 1 * MS, "down_decode": 1 * MS,
                   "evaluate": 10 * MS},
       "params": 1448}


def config(**over):
    base = dict(method="ps", workers=2, servers=1, colocate=False, overlap=False,
                eval_every=1000, eval_lag=0, steps=10_000, checkpoint_every=0,
                slow_worker="", consistency="sync", backup_workers=0, ddp_hook="none",
                clock="dedicated", rate=RATE, latency=0.0, mtu=1500, worker_rate="",
                host_speed=1.0)
    return {**base, **over}


def record(step, ups, downs, stats=0):
    """A step record whose server s carried ``ups[s]`` / ``downs[s]`` bytes."""
    return {"step": step, "bytes_up": sum(ups) + stats, "bytes_down": sum(downs),
            "bytes_stats": stats,
            "servers": [{"bytes_up": u, "bytes_down": d} for u, d in zip(ups, downs, strict=True)]}


def ms(seconds):
    return round(seconds / MS, 9)


def test_star():
    """Workers ready at 1 + 2 + 4 + 1 = 8; the server's link takes their payloads at 9 and 10;
    it serves 2 x 0.5 + 1 + 1 = 3 (13) and sends the downlinks, in at 14 and 15. Step 2:
    worker 0 had its downlink 1 ms before the step ended, so it is ready at 7: 14."""
    clock = Clock(config(), CAL)
    assert ms(clock.step(record(1, [2 * SEG], [2 * SEG]))) == 15
    assert ms(clock.step(record(2, [2 * SEG], [2 * SEG]))) == 14
    assert ms(clock.time) == 29 and ms(clock.record_time(1)) == 15


def test_star_latency_and_host_speed():
    """A latency adds one L per phase; hosts twice as fast halve every compute term."""
    assert ms(Clock(config(latency=5.0), CAL).step(record(1, [2 * SEG], [2 * SEG]))) == 25
    # ready 4, links 5 and 6, serve 1.5 (7.5), downlinks at 8.5 and 9.5
    assert ms(Clock(config(host_speed=2.0), CAL).step(record(1, [2 * SEG], [2 * SEG]))) == 9.5


def test_sharded():
    """Two servers: shard s encoded at 7.5 and 8; server 0 has both rows at 9.5, server 1 at
    10; each serves 1.5 (11 and 11.5); the control reaches server 0 at once (it leads) and
    both send at 11.5; each worker's link takes two downlinks: 12.5, 13.5."""
    clock = Clock(config(servers=2), CAL)
    assert ms(clock.step(record(1, [2 * SEG, 2 * SEG], [2 * SEG, 2 * SEG]))) == 13.5


def test_colocated_latency():
    """Rank i serves shard i; rank 1's row of shard 0 arrives at 7.5 + 1 + 5 = 13.5, rank 0's
    of shard 1 at 14; they serve at 15 and 15.5; rank 1 learns the control at 20.5 + ... : the
    leader decides at max(15, 15.5 + 5) = 20.5, rank 1 sends at 25.5, in at 31.5."""
    clock = Clock(config(colocate=True, latency=5.0), CAL)
    assert ms(clock.step(record(1, [SEG, SEG], [SEG, SEG]))) == 31.5
    no_latency = Clock(config(colocate=True), CAL)
    assert ms(no_latency.step(record(1, [SEG, SEG], [SEG, SEG]))) == 11.5


def test_ring():
    """DDP, W = 2: 2 (W - 1) = 2 rounds of a 1448-byte chunk, 1 ms each, between compute
    (6, no hook to encode) and update (1); an evaluation step adds the evaluation."""
    cal = {**CAL, "seconds": {**CAL["seconds"], "encode": 0.0, "decode": 0.0}}
    clock = Clock(config(method="ddp", eval_every=2), cal)
    rec = {"step": 1, "bytes_up": 2 * SEG, "bytes_down": 2 * SEG}
    assert ms(clock.step(rec)) == 9
    assert ms(clock.step({**rec, "step": 2})) == 19
    slow = Clock(config(method="ddp", latency=5.0, slow_worker="1=2"), cal)
    assert ms(slow.step(rec)) == 12 + 2 * 6 + 1
    # PowerSGD's hook: three allreduces one after the other (uncompressed, P, Q), each 2 rounds
    # of a third of the bytes; with 5 ms of latency per round: 6 + 3 * 2 * 5 + 1 + the links
    three = {**rec, "bytes_up": 6 * SEG, "bytes_down": 6 * SEG}
    powersgd = Clock(config(method="ddp", ddp_hook="powersgd", latency=5.0), cal)
    assert powersgd.allreduces == 3 and ms(powersgd.step(three)) == 6 + 3 * 2 * (5 + 1) + 1


def test_overlap():
    """One worker, two servers. With --overlap the forward runs 1.5 per shard, the backward
    sends shard 1 at 5.5 and shard 0 at 8 (in at 6.5 and 9); server 0 steps at 10.25, both
    send at 10.25 and the worker's link takes them at 11.25 and 12.25. Without it both are
    encoded after the backward (7.5, 8): in at 8.5 and 9.5, decisions at 10.75: 12.75."""
    rec = record(1, [SEG, SEG], [SEG, SEG])
    assert ms(Clock(config(workers=1, servers=2, overlap=True), CAL).step(rec)) == 12.25
    assert ms(Clock(config(workers=1, servers=2), CAL).step(rec)) == 12.75


def test_overlap_next_forward_starts_on_the_first_shard():
    """The shard that came 1 ms early lets the next forward start on its layers: 11.25."""
    clock = Clock(config(workers=1, servers=2, overlap=True), CAL)
    rec = record(1, [SEG, SEG], [SEG, SEG])
    clock.step(rec)
    assert ms(clock.step({**rec, "step": 2})) == 11.25


def test_eval_lag():
    """Colocated, W = 2, evaluation every 2 steps with --eval-lag 2: n_s = 724, a piece is 362
    floats (1448 bytes) that rank 1 sends at the start of steps 3 and 4 (hidden in the
    compute); the evaluation runs in the lead of step 4 (+10). With --eval-lag 0 it runs in
    step 2's lead, after shard 1 (2896 bytes: 2 frames, 2.09 ms) has reached the leader."""
    rec = record(1, [SEG, SEG], [SEG, SEG])
    clock = Clock(config(colocate=True, eval_every=2, eval_lag=2), CAL)
    got = [ms(clock.step({**rec, "step": t})) for t in (1, 2, 3, 4, 5)]
    assert got == [11.5, 11.5, 11.5, 21.5, 11.5]
    assert ms(clock.record_time(2)) == 23
    now = Clock(config(colocate=True, eval_every=2, eval_lag=0), CAL)
    got = [ms(now.step({**rec, "step": t})) for t in (1, 2)]
    gather = 10.5 + 2 * (SEG + 66) / 1514          # shard 1 of rank 1, sent at d_1 = 10.5
    assert got[0] == 11.5 and got[1] == pytest.approx(gather + 10 + 1, abs=1e-6)


def test_eval_lag_settles_at_the_last_step():
    """The last step (--steps) evaluates at once: both pieces after its downlink, then 10."""
    rec = record(1, [SEG, SEG], [SEG, SEG])
    clock = Clock(config(colocate=True, eval_every=100, eval_lag=2, steps=2), CAL)
    clock.step(rec)
    # rank 1 sends its shard (2896 bytes, 2.09 ms) after its downlink (10.5 + 1 = 11.5)
    assert ms(clock.step({**rec, "step": 2})) == pytest.approx(
        11.5 + 2 * (SEG + 66) / 1514 + 10, abs=1e-6)


def test_slow_worker():
    """Worker 0 twice as slow: ready at 1 + 12 + 1 = 14 (worker 1 at 8): the server has the
    rows at 15, steps at 18, downlinks in at 19 and 20."""
    clock = Clock(config(slow_worker="0=2"), CAL)
    assert ms(clock.step(record(1, [2 * SEG], [2 * SEG]))) == 20


def test_uneven_links():
    """Worker 1 at a quarter of the rate: its payload takes 4 ms on its own link."""
    clock = Clock(config(worker_rate=f"1={RATE / 4}"), CAL)
    # worker 1's payload in at 8 + 4 = 12, served at 15; the downlinks leave the server at
    # 16 and 17: worker 0 has its own at 16, worker 1 at 15 + 4 = 19 (its link bounds it)
    assert ms(clock.step(record(1, [2 * SEG], [2 * SEG]))) == 19


def test_deliver_queues():
    """Two messages into one link queue; the second waits for the first."""
    rate = {"a": 1514e3, "b": 1514e3, "c": 1514e3}
    got = deliver([("a", "c", SEG, 0.0, 0), ("b", "c", SEG, 0.0, 1)], rate, 0.0, 1500)
    assert [ms(x) for x in got] == [1, 2]
    assert pieces(10, 3) == [3, 3, 4] and pieces(5, 0) == [5]


def test_deterministic():
    recs = [record(t, [SEG, 3 * SEG], [SEG, 2 * SEG], stats=100 * (t % 2)) for t in range(1, 9)]
    runs = []
    for _ in range(2):
        clock = Clock(config(servers=2, overlap=True, eval_every=2, eval_lag=2), CAL)
        runs.append([clock.step(r) for r in recs])
    assert runs[0] == runs[1]


def test_async_has_a_clock_of_its_own():
    """The synchronous step's clock refuses the asynchronous modes: their arrivals are timed
    by runtime.arrivalclock (tests/test_arrivalclock.py)."""
    from dist_quant.runtime.arrivalclock import ArrivalClock, clock_of

    with pytest.raises(ConfigError, match="arrivalclock"):
        Clock(config(consistency="async"), CAL)
    assert isinstance(clock_of(config(backup_workers=1), CAL), ArrivalClock)
    assert isinstance(clock_of(config(), CAL), Clock)


def test_links_of_config():
    links = Links.of({"rate": 10.0, "latency": 2.0, "worker_rate": "1=1"})
    assert links.bytes_per_second(1) == 1e6 / 8 and links.bytes_per_second(0) == 10e6 / 8
    assert links.name == "10 Mbit/s, 2 ms, worker 1 at 1"


@pytest.mark.parametrize("over, option", [
    (dict(clock="dedicated"), "--clock"),
    (dict(clock="dedicated", rate=10.0, host_speed=-1.0), "--host-speed"),
    (dict(clock="dedicated", rate=-1.0), "--rate"),
    (dict(clock="dedicated", rate=10.0, mtu=100), "--mtu"),
    (dict(clock="dedicated", rate=10.0, worker_rate="7=1"), "--worker-rate"),
    (dict(clock="dedicated", rate=10.0, worker_rate="x"), "--worker-rate"),
    (dict(clock="dedicated", rate=10.0, consistency="async"), "--clock"),
    (dict(clock="dedicated", rate=10.0, backup_workers=1), "--clock"),
    (dict(rate=10.0), "--rate"),
    (dict(host_speed=50.0), "--host-speed"),
    (dict(clock="dedicated", rate=10.0, calibration="/nonexistent"), "--calibration"),
])
def test_bad_options(over, option):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**over).validate()
    assert err.value.option == option


def test_bad_option_refused_in_one_line_before_launch(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dist_quant", "train", "--simulate",
                          "--clock", "dedicated", "--rate", "10", "--host-speed", "-1",
                          "--run-dir", str(tmp_path / "r")], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "--host-speed" in out.stderr
    assert not (tmp_path / "r").exists()


def run(tmp_path, name, *extra):
    from click.testing import CliRunner

    from dist_quant.cli import main

    out = CliRunner().invoke(main, ["train", "--simulate", "--workers", "2", "--steps", "12",
                                    "--eval-every", "6", "--no-progress", "--colocate",
                                    "--run-dir", str(tmp_path / name), *extra])
    assert out.exit_code == 0, out.output
    return tmp_path / name


def test_modelled_run_same_parameters(tmp_path):
    """A modelled run trains exactly as the run without the clock; a second, with the first's
    calibration, reports the same modelled times."""
    import torch

    from dist_quant.runtime.metrics import read_metrics

    plain = run(tmp_path, "plain")
    modelled = run(tmp_path, "modelled", "--clock", "dedicated", "--rate", "10")
    again = run(tmp_path, "again", "--clock", "dedicated", "--rate", "10", "--calibration",
                str(modelled))

    def final(d):
        return torch.load(d / "checkpoints" / "step_12.pt", weights_only=False)["server"]

    a, b = final(plain), final(modelled)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    steps = [r for r in read_metrics(modelled) if r["kind"] == "step"]
    assert all(r["model_wall"] > 0 for r in steps)
    assert steps[-1]["model_time"] == pytest.approx(sum(r["model_wall"] for r in steps))
    evals = [r for r in read_metrics(modelled) if r["kind"] == "eval"]
    assert [e["model_time"] for e in evals][0] == steps[5]["model_time"]
    assert not any("model_wall" in r for r in read_metrics(plain))
    cal = json.loads((modelled / "calibration.json").read_text())
    assert cal["source"] == "measured" and cal["params"] > 0
    assert [r["model_wall"] for r in read_metrics(again) if r["kind"] == "step"] == \
        [r["model_wall"] for r in steps]
    summary = json.loads((modelled / "summary.json").read_text())
    assert summary["clock"] == "dedicated" and summary["model_seconds"] == steps[-1]["model_time"]

    # plot --time model draws it against the modelled clock, and refuses a run without one
    from click.testing import CliRunner

    from dist_quant.cli import main

    out = CliRunner().invoke(main, ["plot", str(modelled), "--time", "model", "--out",
                                    str(tmp_path / "plots")])
    assert out.exit_code == 0, out.output
    report = (tmp_path / "plots" / "report.md").read_text()
    assert "modelled: 10 Mbit/s" in report and "every time is modelled" in report
    refused = CliRunner().invoke(main, ["plot", str(plain), "--time", "model", "--out",
                                        str(tmp_path / "p2")])
    assert refused.exit_code == 2 and "no modelled clock" in refused.output


def fake_run(path, cfg, steps, evals):
    """A run directory written by hand: its steps' bytes and its evaluations."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"config": cfg}))
    (path / "calibration.json").write_text(json.dumps(CAL))
    lines = [{"kind": "step", **s} for s in steps] + [
        {"kind": "eval", "step": t, "test_accuracy": a} for t, a in evals]
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (path / "summary.json").write_text(json.dumps({"test_accuracy": evals[-1][1],
                                                   "wall_seconds": 1.0}))
    return path


def test_retime(tmp_path):
    """Two recorded runs re-timed on two links: the star as in test_star, DDP fp32 as in
    test_ring; x ddp fp32 is DDP's time to target over the star's."""
    from click.testing import CliRunner

    from dist_quant.analysis.retime import retime
    from dist_quant.cli import main

    star = config(rate=0.0, clock="wall", steps=2, eval_every=2, eval_lag=0)
    fake_run(tmp_path / "sw" / "star", star, [record(1, [2 * SEG], [2 * SEG]),
                                              record(2, [2 * SEG], [2 * SEG])],
             [(2, 0.7)])
    ddp = config(method="ddp", rate=0.0, clock="wall", steps=2, eval_every=2)
    fake_run(tmp_path / "sw" / "ddp", ddp, [
        {"step": t, "bytes_up": 2 * SEG, "bytes_down": 2 * SEG} for t in (1, 2)], [(2, 0.7)])
    rows, skipped = retime([tmp_path / "sw"], [RATE, RATE / 2], [1.0], target=0.6)
    assert skipped == [] and len(rows) == 4
    by = {(Path(r["run"]).name, r["rate_mbit"]): r for r in rows}
    # the star at RATE: 15 + 14 ms, and the evaluation at step 2 (lag 0, the leader's own)
    assert ms(by["star", RATE]["model_time_to_target_s"]) == 15 + 14 + 10
    assert by["star", RATE]["target_step"] == 2
    # DDP: the ring's chunks take 1 ms each at RATE (the calibration's encode and decode: 1.5)
    assert ms(by["ddp", RATE]["model_seconds"]) == 2 * (6 + 1 + 2 + 0.5 + 1) + 10
    assert by["star", RATE]["x_ddp_fp32"] == pytest.approx(31 / 39)
    assert ms(by["star", RATE / 2]["model_time_to_target_s"]) > 39
    out = CliRunner().invoke(main, ["retime", str(tmp_path / "sw"), "--rate", str(RATE),
                                    "--host-speed", "1", "--host-speed", "2", "--target",
                                    "0.6", "--out", str(tmp_path / "t")])
    assert out.exit_code == 0, out.output
    assert "modelled time" in out.output and (tmp_path / "t" / "retime.json").is_file()
    bad = CliRunner().invoke(main, ["retime", str(tmp_path / "sw"), "--rate", "10",
                                    "--host-speed", "-1"])
    assert bad.exit_code == 2 and "--host-speed" in bad.output


def test_retime_heatmap(tmp_path):
    """`retime --heatmap`: the PNG, and the break-even links in the output, retime.md and
    retime.json (the star of test_retime against DDP fp32 at two rates)."""
    pytest.importorskip("matplotlib")
    from click.testing import CliRunner

    from dist_quant.cli import main

    star = config(rate=0.0, clock="wall", steps=2, eval_every=2, eval_lag=0)
    fake_run(tmp_path / "sw" / "star", star, [record(t, [2 * SEG], [2 * SEG]) for t in (1, 2)],
             [(2, 0.7)])
    ddp = config(method="ddp", rate=0.0, clock="wall", steps=2, eval_every=2)
    fake_run(tmp_path / "sw" / "ddp", ddp, [
        {"step": t, "bytes_up": 2 * SEG, "bytes_down": 2 * SEG} for t in (1, 2)], [(2, 0.7)])
    out = CliRunner().invoke(main, ["retime", str(tmp_path / "sw"), "--rate", str(RATE),
                                    "--rate", str(RATE / 4), "--target", "0.6", "--out",
                                    str(tmp_path / "t"), "--heatmap", str(tmp_path / "h.png")])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    assert "Break-even link" in out.output
    saved = json.loads((tmp_path / "t" / "retime.json").read_text())
    # the star is slower than the ring at both rates (x = 31/39 at RATE): it pays at neither
    assert [(r["workers"], r["where"], r["break_even_mbit"]) for r in saved["break_even"]] \
        == [(2, "below", RATE / 4)]
    assert "Break-even link" in (tmp_path / "t" / "retime.md").read_text()


def test_retime_shared_compute():
    """--shared-compute: the method-independent phases are their median over the runs of one
    model and batch size; the coding phases stay each run's own; another batch size is apart."""
    from dist_quant.analysis.retime import pool_compute

    def cal(forward, encode):
        return {**CAL, "seconds": {**CAL["seconds"], "forward": forward, "encode": encode}}

    runs = [{"config": {"batch_size": b, "hidden": "8"}} for b in (32, 32, 32, 64)]
    got = pool_compute(runs, [cal(1.0, 5.0), cal(2.0, 6.0), cal(6.0, 7.0), cal(9.0, 8.0)])
    assert [g["seconds"]["forward"] for g in got] == [2.0, 2.0, 2.0, 9.0]
    assert [g["seconds"]["encode"] for g in got] == [5.0, 6.0, 7.0, 8.0]
    assert "median of 3 runs" in got[0]["source"]


def _roles(compute, encode, w_decode, s_decode, update, s_encode):
    return {"worker": {"compute": compute, "encode": encode, "decode": w_decode},
            "server": {"decode": s_decode, "update": update, "encode": s_encode}}


@pytest.mark.parametrize("simulated", [False, True])
def test_retime_own_cpu(simulated):
    """--own-cpu: each phase is the median of the run's own per-role CPU records (step 1 left
    out), as whole-model costs: W = 4 colocated (S = 4 shards); a simulated run's records are
    sums over the workers and over the servers, a cluster's the largest rank's."""
    from dist_quant.analysis.retime import own_cpu

    w = s = 4
    k_w, k_s = (w, s) if simulated else (1, 1)
    steps = [{"step": 1, "cpu_roles": _roles(*[100.0] * 6), "servers": [{}] * s}]
    for step, f in ((2, 1.0), (3, 3.0), (4, 2.0)):   # medians: the f = 2 values
        steps.append({"step": step, "servers": [{}] * s, "cpu_roles": _roles(
            6.0 * f * k_w, 1.0 * f * k_w, 0.5 * f * k_w, 0.25 * f * k_s, 0.125 * f * k_s,
            0.375 * f * k_s)})
    run = {"config": {"workers": w, "simulate": simulated, "servers": 1, "colocate": True},
           "steps": steps, "evals": [{"cpu": {"evaluate": 0.03}}, {"cpu": {"evaluate": 0.05}},
                                     {}]}
    got = own_cpu(run, CAL)["seconds"]
    assert got["forward"] == pytest.approx(12.0 / 3)       # forward : backward as CAL's, 2 : 4
    assert got["backward"] == pytest.approx(12.0 * 2 / 3)
    assert got["encode"] == pytest.approx(2.0) and got["down_decode"] == pytest.approx(1.0)
    assert got["decode"] == pytest.approx(0.5 * s / w)     # W rows of n / S coordinates
    assert got["update"] == pytest.approx(0.25 * s)
    assert got["down_encode"] == pytest.approx(0.75 * s)
    assert got["evaluate"] == pytest.approx(0.04)
    ddp = {**run, "steps": [{k: v for k, v in r.items() if k != "cpu_roles"} for r in steps]}
    assert own_cpu(ddp, CAL) is CAL                         # no per-role records: unchanged


def test_retime_own_cpu_and_shared_compute_refused(tmp_path):
    from dist_quant.analysis.retime import retime

    with pytest.raises(ConfigError, match="--own-cpu"):
        retime([tmp_path], [10.0], [1.0], shared_compute=True, own=True)
