"""Sweeps: grid expansion and presets, stable point names, resumption, failures recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from dist_quant.config import TrainConfig
from dist_quant.errors import ConfigError
from dist_quant.runner.launcher import descendants
from dist_quant.runtime.metrics import read_metrics, read_summary
from dist_quant.sweep import (
    INDEX,
    PRESETS,
    expand_grid,
    is_done,
    parse_axis,
    parse_method,
    points_from_options,
    run_sweep,
    sweep,
)

TINY = {"train_size": [200], "test_size": [100], "hidden": ["24"], "batch_size": [8],
        "steps": [3], "eval_every": [3], "workers": [1]}


def test_presets_map_onto_config_fields():
    points = {p.label: p.cfg for p in expand_grid(list(PRESETS))}
    assert set(points) == {"ps-fp32", "ps-onebit-whole", "ps-onebit", "ps-sign-ef",
                           "ps-onebit-updown", "ps-sharded", "ps-colocated", "ps-qsgd",
                           "ps-terngrad", "ps-topk-ef", "ps-randk", "ddp-fp32", "ddp-fp16",
                           "ddp-powersgd", "ddp-onebit", "ps-fast", "ps-tolerant"}
    assert (points["ps-sharded"].servers, points["ps-colocated"].colocate) == (2, True)
    assert points["ps-fp32"].compressor == "none" and points["ps-fp32"].method == "ps"
    assert points["ps-onebit-whole"].bucket_size == 0
    assert points["ps-onebit"].bucket_size == TrainConfig().bucket_size > 0
    assert points["ps-sign-ef"].compressor == "sign" and points["ps-sign-ef"].error_feedback
    assert points["ps-onebit-updown"].downlink == "sign"
    assert [points[k].ddp_hook for k in ("ddp-fp32", "ddp-fp16", "ddp-powersgd")] == \
        ["none", "fp16", "powersgd"]
    assert all(points[k].method == "ddp" for k in ("ddp-fp32", "ddp-fp16", "ddp-powersgd"))


def test_grid_is_the_product_of_axes_with_set_over_preset_and_method_fields_over_all():
    points = expand_grid(["ps-onebit-whole", "own:compressor=kbit,bits=3,hidden=64,32"],
                         {"bucket_size": [128, 256], "seed": [0, 1]}, rates=[10.0, None])
    assert len(points) == 2 * 2 * 2 * 2
    whole = [p for p in points if p.label == "ps-onebit-whole"]
    assert sorted({p.cfg.bucket_size for p in whole}) == [128, 256]  # --set beats the preset
    own = [p for p in points if p.label == "own"]
    assert all(p.cfg.compressor == "kbit" and p.cfg.bits == 3 and p.cfg.hidden == "64,32"
               for p in own)
    assert len({p.name for p in points}) == len(points)
    assert {p.runner for p in points if p.rate_mbit == 10.0} == {"cluster"}
    assert {p.runner for p in points if p.rate_mbit is None} == {"local"}
    assert {p.runner for p in expand_grid(["ddp-fp32"], force_cluster=True)} == {"cluster"}
    # the same point has the same name in another grid; another config, another name
    again = expand_grid(["ps-onebit-whole"], {"bucket_size": [128], "seed": [1]},
                        rates=[10.0])
    assert again[0].name in {p.name for p in points}
    assert again[0].name.startswith("ps-onebit-whole_w4_10mbit_s1_")
    other = expand_grid(["ps-onebit-whole"], {"bucket_size": [128], "seed": [1], "lr": [0.1]},
                        rates=[10.0])
    assert other[0].name != again[0].name


def test_options_parse_and_bad_values_name_the_option(tmp_path):
    assert parse_axis("hidden=64,64;32") == ("hidden", ["64,64", "32"])
    assert parse_axis("error-feedback=true,no") == ("error_feedback", [True, False])
    assert parse_method("ps-onebit:bucket_size=64")[2] == {"bucket_size": 64}
    for bad, option in [("nope=1", "--set"), ("steps=ten", "--set"), ("steps=", "--set")]:
        with pytest.raises(ConfigError, match=option):
            parse_axis(bad)
    with pytest.raises(ConfigError, match="--method"):
        parse_method("ps-onebit-tiny")
    with pytest.raises(ConfigError, match="--workers"):
        expand_grid(["ps-onebit"], {"workers": [0]})
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"methods": ["ddp-fp16"], "set": {"workers": [2, 3]},
                                "rate_mbit": [10, None]}))
    points = points_from_options((), ("workers=2",), None, "0,5", None, str(grid), False)
    assert {(p.cfg.workers, p.rate_mbit, p.latency_ms) for p in points} == \
        {(2, 10.0, 0.0), (2, None, 0.0), (2, 10.0, 5.0), (2, None, 5.0)}
    result = CliRunner().invoke(sweep, [str(tmp_path / "out"), "-m", "ps-onebit", "--rate",
                                        "fast"])
    assert result.exit_code == 2 and "--rate" in result.output


def _mtimes(out: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime for p in out.glob("*/summary.json")}


def test_sweep_resumes_and_runs_only_new_points(tmp_path):
    out = tmp_path / "sweep"
    first = expand_grid(["ps-fp32", "ddp-fp32"], TINY)
    index = run_sweep(first, out, progress=False, echo=lambda _: None)
    assert sorted(index["ran"]) == sorted(p.name for p in first) and index["failed"] == []
    for p in first:
        rec = index["points"][p.name]
        assert rec["status"] == "done" and is_done(p, out / p.name)
        summary = read_summary(out / p.name)
        assert summary["steps"] == 3 and summary["method"] == p.cfg.method
        assert rec["test_accuracy"] == summary["test_accuracy"]
        assert json.loads((out / p.name / "point.json").read_text())["runner"] == "local"
    # the DDP baseline runs the PS job's model, data, dropout, optimizer and BN policy: with
    # fp32 on both sides the two runs agree to rounding
    ps, ddp = (read_metrics(out / p.name) for p in first)
    assert [r["kind"] for r in ps] == [r["kind"] for r in ddp]
    for a, b in zip(ps, ddp, strict=True):
        key = "loss" if a["kind"] == "step" else "test_loss"
        assert a[key] == pytest.approx(b[key], abs=1e-5)
    before = _mtimes(out)

    again = run_sweep(first, out, progress=False, echo=lambda _: None)
    assert again["ran"] == [] and _mtimes(out) == before

    more = expand_grid(["ps-fp32", "ddp-fp32", "ddp-fp16"], TINY)
    added = run_sweep(more, out, progress=False, echo=lambda _: None)
    assert added["ran"] == [more[2].name] and added["failed"] == []
    assert {k: v for k, v in _mtimes(out).items() if k in before} == before
    saved = json.loads((out / INDEX).read_text())
    assert set(saved["points"]) == {p.name for p in more}


def test_a_failed_point_is_recorded_and_the_sweep_goes_on(tmp_path):
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"not an npz archive")
    out = tmp_path / "sweep"
    args = [str(out), "--no-progress", "-m", "ddp-fp32", "-m", f"broken:dataset={bad}"]
    for name, values in TINY.items():
        args += ["--set", f"{name}={';'.join(map(str, values))}"]
    result = CliRunner().invoke(sweep, args)
    assert result.exit_code == 1, result.output
    index = json.loads((out / INDEX).read_text())
    status = {rec["label"]: rec for rec in index["points"].values()}
    assert status["ddp-fp32"]["status"] == "done"
    assert status["broken"]["status"] == "failed"
    assert status["broken"]["returncode"] != 0 and status["broken"]["error"]
    assert status["broken"]["log_tail"]
    assert "FAILED" in result.output and "1 failed" in result.output


def test_seeds_and_repeated_set_of_one_field_sweep_every_value_once(tmp_path):
    def seeds_of(**kw):
        args = dict(methods=("ddp-fp32",), sets=("workers=2",), rate=None, latency=None,
                    loss=None, grid=None, cluster=False)
        return [p.cfg.seed for p in points_from_options(**{**args, **kw})]

    assert seeds_of(seeds="0,1,2") == [0, 1, 2]
    assert seeds_of(sets=("workers=2", "seed=0", "seed=1,2", "seed=1")) == [0, 1, 2]
    assert seeds_of(sets=("seed=3",), seeds="0,3") == [3, 0]
    points = points_from_options(("ddp-fp32", "ps-colocated"), ("workers=2",), "10", None,
                                 None, None, False, "0,1,2")
    assert len({p.name for p in points}) == 6 and {p.name.split("_")[-2] for p in points} == \
        {"s0", "s1", "s2"}
    with pytest.raises(ConfigError, match="--seeds"):
        seeds_of(seeds="0,one")
    result = CliRunner().invoke(sweep, [str(tmp_path / "out"), "-m", "ddp-fp32", "--seeds",
                                        "0,1", "--set", "workers=2", "--dry-run"])
    assert result.exit_code == 0 and result.output.count("[local, to run]") == 2
    result = CliRunner().invoke(sweep, [str(tmp_path / "out"), "-m", "ddp-fp32", "--seeds",
                                        "x", "--dry-run"])
    assert result.exit_code == 2 and "--seeds" in result.output


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_whole_sweep_not_only_its_point(tmp_path, sig):
    """Ctrl-C or SIGTERM during a point ends the sweep (not only the point, after which it
    went on to the next): exit 128 + signal, one line saying so, no later point started,
    nothing of the job left; the same command then resumes the stopped point."""
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "dist_quant", "sweep", str(out), "--no-progress",
            "-m", "ps-fp32:simulate=true", "-m", "ps-onebit:simulate=true",
            "--set", "steps=100000", "--set", "eval_every=100000", "--set", "workers=2",
            "--set", "train_size=200", "--set", "test_size=50", "--set", "hidden=8",
            "--set", "batch_size=8"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(
                (d / "metrics.jsonl").is_file() and (d / "metrics.jsonl").stat().st_size > 0
                for d in out.glob("ps-*")):
            time.sleep(0.2)
        job = descendants(proc.pid)
        assert job, "the point never started"
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, (stdout, stderr)
    assert f"stopped by {signal.Signals(sig).name}; the same command resumes" in stderr
    assert [d.name.split("_")[0] for d in out.glob("ps-*")] == ["ps-fp32"]   # no next point
    t0 = time.monotonic()
    while any(_alive(p) for p in job) and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    assert not [p for p in job if _alive(p)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:   # a zombie is gone for our purpose
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_done_point_of_another_task_is_recognised(tmp_path):
    """config.json of a --task other than the MLP leaves out the MLP's fields; a sweep run
    again must still find the point done (it ran every such point again)."""
    from dist_quant.config import MLP_TASK_FIELDS

    point = expand_grid(["ps-fp32"], {"task": ["shapes-cnn"], "workers": [2]})[0]
    run = tmp_path / point.name
    run.mkdir()
    saved = {k: v for k, v in point.cfg.to_dict().items() if k not in MLP_TASK_FIELDS}
    (run / "config.json").write_text(json.dumps({"config": saved}))
    assert not is_done(point, run)                       # no summary yet
    (run / "summary.json").write_text("{}")
    assert is_done(point, run)
    other = expand_grid(["ps-fp32"], {"task": ["shapes-cnn"], "workers": [3]})[0]
    assert not is_done(other, run)
