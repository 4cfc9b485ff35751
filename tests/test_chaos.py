"""``dist-quant chaos``: its plan (drawn from the seed, within what the engine survives), its
refusals, its comparison, and one short chaos run through the real launcher.

The run is a tiny job with one SIGKILL of a rank: it must restart, name the rank and end equal
to the undisturbed run bit for bit. Nothing here measures time: the job's --timeout is
generous (a loaded machine), and the only bound is the job's own limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from rawtext import raw_escapes

from dist_quant.cluster.chaos import run_chaos
from dist_quant.cluster.faults import Fault, plan
from dist_quant.cluster.verdict import differences, name_faults
from dist_quant.config import TrainConfig
from dist_quant.errors import ConfigError
from dist_quant.runtime.rank import continue_after_restart

TINY = dict(hidden="7,5", train_size=120, test_size=30, batch_size=4, bucket_size=5,
            workers=2, progress=False)


def test_the_plan_is_the_seeds_and_stays_within_the_job():
    cfg = TrainConfig(**TINY, steps=300, timeout=20.0, max_restarts=3)
    a = plan(cfg, "local", 3, seed=11, kinds=("kill", "stop"))
    assert a == plan(cfg, "local", 3, seed=11, kinds=("kill", "stop"))
    assert a != plan(cfg, "local", 3, seed=12, kinds=("kill", "stop"))
    for seed in range(30):
        faults = plan(cfg, "local", 3, seed=seed, kinds=("kill", "stop"))
        steps = [f.step for f in faults]
        assert steps == sorted(set(steps)) and steps[0] >= 30 and steps[-1] < 270
        for f in faults:
            assert 0 <= f.target < cfg.world_size
            if f.kind == "stop":   # shorter than --timeout: no peer gives up on it
                assert 0.1 * cfg.timeout <= f.seconds <= 0.4 * cfg.timeout
            else:
                assert f.kind == "kill" and f.seconds == 0


def test_an_async_plan_loses_at_most_w_minus_m_workers_first_and_spares_them_after():
    cfg = TrainConfig(**{**TINY, "workers": 4}, steps=300, timeout=30.0, consistency="async",
                      min_workers=2)
    for seed in range(30):
        faults = plan(cfg, "netns", 4, seed=seed, kinds=("lose", "stop", "partition"))
        lost = [f.target for f in faults if f.kind == "lose"]
        assert faults[0].kind == "lose" and len(lost) == len(set(lost)) <= 2
        gone = []
        for f in faults:
            if f.kind == "partition":
                assert f.seconds <= min(0.3 * cfg.timeout, 10.0)
            if f.kind == "lose":
                gone.append(f.target)
            else:   # hosts are s, w1..w4: a worker's not lost so far
                assert f.target >= 1 and f.target - 1 not in gone


@pytest.mark.parametrize("changes, kinds, engine, option", [
    (dict(), (), "local", "--max-restarts"),                       # no faults asked
    (dict(max_restarts=1), ("kill",), "netns", "--kinds"),         # no restarts there
    (dict(max_restarts=1), ("partition",), "local", "--kinds"),    # no link to cut
    (dict(max_restarts=1), ("shake",), "local", "--kinds"),
    (dict(consistency="async", min_workers=1), ("lose",), "local", "--engine"),
    (dict(consistency="async"), ("lose",), "netns", "--min-workers"),
    (dict(consistency="ssp", staleness=1, max_restarts=1), (), "local", "--consistency"),
    (dict(backup_workers=1, max_restarts=1), (), "local", "--backup-workers"),
])
def test_what_a_job_cannot_survive_is_refused_naming_the_option(changes, kinds, engine,
                                                                 option, tmp_path):
    cfg = TrainConfig(**TINY, steps=100, **changes)
    with pytest.raises(ConfigError) as err:
        run_chaos(cfg, engine=engine, kinds=kinds, out=tmp_path / "c")
    assert str(err.value).startswith(option), err.value
    assert not (tmp_path / "c").exists()   # refused before anything started


def test_a_refusal_on_the_command_line_is_one_line_and_exit_2():
    res = subprocess.run([sys.executable, "-m", "dist_quant", "chaos", "--workers", "2",
                          "--kinds", "partition", "--max-restarts", "1"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("Error: --kinds:"), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_differences_name_where_two_states_differ_bit_for_bit():
    a = {"step": 3, "server": {"theta": torch.zeros(4), "opt": [torch.ones(2)]}}
    b = {"step": 3, "server": {"theta": torch.zeros(4), "opt": [torch.ones(2)]}}
    assert differences(a, b) == []
    a["server"]["nan"] = b["server"]["nan"] = torch.tensor([float("nan")])   # the same bits
    assert differences(a, b) == []
    b["server"]["theta"] = torch.tensor([0.0, 0.0, 0.0, -0.0])   # equal as numbers, not bits
    b["server"]["opt"][0] = torch.ones(2, dtype=torch.float64)
    assert differences(a, b) == [".server.theta", ".server.opt[0]"]
    assert differences(a, {**a, "step": 4}) == [".step"]


def test_a_fault_says_what_it_does():
    assert Fault("stop", 12, 1, 2.5, "rank 1 (worker 0)").describe() == \
        "step 12: SIGSTOP to rank 1 (worker 0) for 2.5 s, then SIGCONT"
    assert Fault("partition", 7, 2, 3.0, "host w2").describe() == \
        "step 7: link of host w2 down for 3.0 s, then up"


def test_a_kill_needs_its_name_and_a_restart_and_an_unplanned_restart_is_a_note():
    kill = Fault("kill", 40, 1, name="rank 1 (worker 0)", seen_step=41)
    err = ("dist_quant rank 1: lost contact with rank 0 (the server) while exchanging the "
           "control (Timed out waiting 23000ms): a peer died or did not answer within "
           "--timeout 20 s; ending the run\n"
           "dist_quant: restart 1: no checkpoint in R yet; starting over from step 0\n"
           "dist_quant rank 0: lost contact with rank 1 (worker 0) while exchanging ...\n"
           "dist_quant: rank 1 (worker 0) was killed by SIGKILL\n"
           "dist_quant: restart 2: continuing from the latest checkpoint of R\n")
    problems, notes = name_faults([kill], err, None)
    assert problems == [] and kill.named == "dist_quant: rank 1 (worker 0) was killed by SIGKILL"
    assert len(notes) == 1 and "restart 1: no checkpoint" in notes[0]
    assert "Timed out" in notes[0]   # what came before it
    unnamed = Fault("kill", 40, 2, name="rank 2 (worker 1)", seen_step=41)
    problems, _ = name_faults([unnamed], err, None)
    assert problems == ["fault 1 (step 40: SIGKILL to rank 2 (worker 1)): no line of the job "
                        "names rank 2 (worker 1)"]
    no_restart = err.split("dist_quant: restart 2")[0]
    problems, _ = name_faults([Fault(**{**kill.__dict__, "named": ""})], no_restart, None)
    assert problems == ["fault 1 (step 40: SIGKILL to rank 1 (worker 0)): no restart followed"]


def test_a_restart_before_the_first_checkpoint_says_so(tmp_path, monkeypatch, capfd):
    """A rank killed before the first checkpoint: the restart starts over, and the server
    says so (it used to say nothing, so the restart was not told)."""
    import torch.distributed as dist

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        cfg = TrainConfig(**TINY, run_dir=str(tmp_path / "run"))
        assert continue_after_restart(cfg, True, 0, torch.device("cpu")) == cfg
    finally:
        dist.destroy_process_group()
    err = capfd.readouterr().err
    assert err == (f"dist_quant: restart 1: no checkpoint in {tmp_path / 'run'} yet; starting "
                   "over from step 0\n")


@pytest.mark.slow
def test_a_killed_rank_changes_nothing(tmp_path):
    """One SIGKILL (seed 4 draws a kill of the server, rank 0, at step 42) into a tiny job with
    --max-restarts 1: the job names the rank, restarts, and ends with the undisturbed run's
    final state, bit for bit; the record holds the seed and the fault."""
    out = tmp_path / "chaos"
    argv = [sys.executable, "-m", "dist_quant", "chaos", "--chaos-seed", "4", "--kinds", "kill",
            "--workers", "2", "--hidden", "7,5", "--train-size", "120", "--test-size", "30",
            "--batch-size", "4", "--bucket-size", "5", "--steps", "120", "--eval-every", "20",
            "--timeout", "60", "--max-restarts", "1", "--run-dir", str(out)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    rec = json.loads((out / "chaos.json").read_text())
    assert rec["chaos_seed"] == 4 and rec["problems"] == [] and rec["differences"] == []
    [fault] = rec["faults"]
    assert fault["kind"] == "kill" and fault["seen_step"] >= fault["step"]
    assert fault["named"].endswith(f"{fault['name']} was killed by SIGKILL") or \
        f"lost contact with {fault['name']}" in fault["named"]
    lines = [x for x in res.stderr.splitlines() if x.startswith("dist-quant chaos: fault 1:")]
    assert len(lines) == 1 and fault["name"] in lines[0], res.stderr
    assert "bit for bit" in res.stdout
    job_err = (out / "job.err").read_text()
    assert "restart 1: continuing from the latest checkpoint" in job_err
    assert raw_escapes(job_err) == [], job_err
