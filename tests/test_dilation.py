"""Time dilation of the real clusters (``--dilate``), without root: the option's refusals, the
factor ``auto`` finds, what the engine is given and how the records are rewritten.

An engine registered here records what it is given and writes the records a real engine's job
would (fixed times), so the arithmetic is checked exactly; the namespace cluster's own dilated
run is in tests/test_cluster.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from dist_quant.cli import main
from dist_quant.cluster.dilation import (
    Dilation,
    cgroup_quota,
    dilate_line,
    parse_dilate,
    restore_line,
    run_dilated,
)
from dist_quant.cluster.engine import Engine
from dist_quant.cluster.registry import register, unregister
from dist_quant.config import TrainConfig
from dist_quant.errors import ConfigError
from dist_quant.plot.runs import link_of
from dist_quant.runtime.metrics import write_json_atomic
from dist_quant.runtime.progress import Progress
from dist_quant.sweep import expand_grid

TINY = ["--workers", "2", "--steps", "4", "--eval-every", "2", "--hidden", "7,5",
        "--train-size", "120", "--test-size", "30", "--batch-size", "4"]
PHASES = {"compute": 0.5, "encode": 0.25, "communicate": 1.0, "decode": 0.125, "update": 0.0}


class RecordingEngine(Engine):
    """Records what it is given; writes the files of a job whose every step took 2 s."""

    name = "recording"
    mark = "rec"
    help = "records what it is given"
    summary = "a recorder"
    given: list[dict[str, Any]] = []

    def run(self, cfg: TrainConfig, rate_mbit: float | None, latency_ms: float,
            loss_pct: float = 0.0, *, mtu: int = 1500,
            worker_rates: Mapping[int, float] | None = None,
            dilate: float = 1.0) -> dict[str, Any]:
        self.given.append({"cfg": cfg, "rate": rate_mbit, "latency": latency_ms,
                           "worker_rates": dict(worker_rates or {}), "dilate": dilate})
        run = Path(cfg.run_dir)
        run.mkdir(parents=True, exist_ok=True)
        lines = []
        for t in range(1, cfg.steps + 1):
            lines.append({"kind": "step", "step": t, "loss": 1.0, "wall": 2.0 * t,
                          "time": dict(PHASES), "time_overlap": 0.5, "model_wall": 0.1,
                          "cum_bytes_up": t, "cum_bytes_down": t})
            if t % cfg.eval_every == 0:
                lines.append({"kind": "eval", "step": t, "test_accuracy": 0.5,
                              "wall": 2.0 * t, "cum_bytes_up": t, "cum_bytes_down": t})
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        write_json_atomic(run / "config.json", {"config": cfg.to_dict(), "model": "mlp"})
        write_json_atomic(run / "summary.json", {
            "wall_seconds": 2.0 * cfg.steps, "wait_seconds_per_worker": [1.0, 3.0],
            "bytes_up": 1, "bytes_down": 1, "fp32_bytes_up": 1, "fp32_bytes_down": 1,
            "test_accuracy": 0.5, "steps": cfg.steps, "workers": cfg.workers, "params": 1})
        link = {"engine": self.name, "rate_mbit": rate_mbit, "latency_ms": latency_ms,
                "worker_rates": {str(i): r for i, r in (worker_rates or {}).items()}}
        wire = {"seconds": 10.0, "steady": {"seconds": 4.0}, "wire_bytes_up": 0,
                "wire_bytes_down": 0, "ratio_up": None, "ratio_down": None}
        write_json_atomic(run / "link.json", link)
        write_json_atomic(run / "wire.json", wire)
        return {"run_dir": str(run), "link": link, "wire": wire, "seconds": 10.0}


class OldEngine(RecordingEngine):
    """An engine written before dilation: its run takes no ``dilate``."""

    name = "old"
    mark = "old"

    def run(self, cfg, rate_mbit, latency_ms, loss_pct=0.0, *, mtu=1500,  # noqa: ANN001
            worker_rates=None):
        return super().run(cfg, rate_mbit, latency_ms, loss_pct, mtu=mtu,
                           worker_rates=worker_rates)


@pytest.fixture
def recording():
    engine = register(RecordingEngine())
    engine.given = []
    old = register(OldEngine())
    yield engine
    unregister(engine.name)
    unregister(old.name)


# ---- the option ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, factor", [("1", 1.0), ("2.5", 2.5), ("auto", None),
                                          (" AUTO ", None), (None, 1.0), (4, 4.0)])
def test_a_factor_or_auto_is_read(text, factor):
    assert parse_dilate(text) == factor


@pytest.mark.parametrize("text", ["0", "-1", "-2.5", "0.5", "abc", "", "nan", "inf", "1e9"])
def test_zero_negative_below_one_and_words_other_than_auto_are_refused(text):
    with pytest.raises(ConfigError, match="^--dilate: must be a factor"):
        parse_dilate(text)


@pytest.mark.parametrize("value", ["0", "-1", "abc"])
def test_the_cluster_command_refuses_a_bad_factor_in_one_line_before_launch(
        recording, tmp_path, value):
    result = CliRunner().invoke(main, ["cluster", "--engine", "recording", "--dilate", value,
                                       *TINY, "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--dilate" in lines[0], result.output
    assert recording.given == [] and not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["0", "-3", "fast"])
def test_the_sweep_refuses_a_bad_factor_in_one_line(tmp_path, value):
    result = CliRunner().invoke(main, ["sweep", str(tmp_path / "sw"), "-m", "ps-onebit",
                                       "--rate", "10", "--dilate", value])
    assert result.exit_code == 2
    assert "--dilate" in result.output.strip().splitlines()[-1]
    assert not (tmp_path / "sw").exists()


def test_a_sweep_dilates_cluster_points_only_and_names_the_factor(tmp_path):
    with pytest.raises(ConfigError, match="--dilate.*add --cluster"):
        expand_grid(["ps-onebit"], dilate=2.0)        # uncapped: it would run locally
    plain = expand_grid(["ps-onebit"], rates=[10.0])[0]
    dilated = expand_grid(["ps-onebit"], rates=[10.0], dilate=2.0)[0]
    assert "dilate" not in plain.name and "dilate" not in plain.identity()
    assert "_dilate2_" in dilated.name and dilated.identity()["dilate"] == 2.0
    assert dilated.name.split("_")[:3] == plain.name.split("_")[:3]
    # auto: each point's training processes over the cores (W + S star, W colocated)
    auto = expand_grid(["ps-onebit", "ps-colocated"], {"workers": [4]}, rates=[10.0],
                       dilate=None, cores=2)
    assert [p.dilation.factor for p in auto] == [2.5, 2.0]
    assert [p.dilation.asked for p in auto] == ["auto", "auto"]
    assert "_dilate2.5_" in auto[0].name and "_dilate2_" in auto[1].name
    # more cores than processes: no dilation, the undilated point
    assert expand_grid(["ps-onebit"], rates=[10.0], dilate=None, cores=64)[0].name == plain.name
    with pytest.raises(ConfigError, match="--dilate.*--engine old"):
        register(OldEngine())
        try:
            expand_grid(["ps-onebit"], rates=[10.0], dilate=2.0, engine="old")
        finally:
            unregister("old")


# ---- auto ------------------------------------------------------------------------------------
def test_auto_is_processes_over_cores_and_at_least_one():
    star = TrainConfig(workers=4)
    assert Dilation.resolve(None, star, cores=2).factor == 2.5        # 4 workers + 1 server
    assert Dilation.resolve(None, star.replace(colocate=True), cores=2).factor == 2.0
    assert Dilation.resolve(None, star.replace(method="ddp"), cores=3).factor == 1.33
    assert Dilation.resolve(None, star, cores=16).factor == 1.0
    assert Dilation.resolve(None, star, cores=1.5).factor == 3.33     # a fractional quota
    fixed = Dilation.resolve(3.0, star, cores=2)
    assert (fixed.factor, fixed.asked, fixed.processes, fixed.cores) == (3.0, "3", 5, 2.0)


def test_the_cgroup_quota_is_the_smallest_on_the_way_to_the_root(tmp_path):
    root = tmp_path / "cgroup"
    (root / "job" / "rank").mkdir(parents=True)
    (root / "cpu.max").write_text("max 100000\n")
    (root / "job" / "cpu.max").write_text("150000 100000\n")
    (root / "job" / "rank" / "cpu.max").write_text("max 100000\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/job/rank\n")
    assert cgroup_quota(root, proc) == 1.5
    proc.write_text("0::/\n")
    assert cgroup_quota(root, proc) is None                           # no quota: "max"
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    proc.write_text("4:cpu,cpuacct:/\n1:memory:/x\n")
    assert cgroup_quota(v1, proc) == 3.0
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")     # v1's "no quota"
    assert cgroup_quota(v1, proc) is None


# ---- the engine is given the dilated link and timeout ----------------------------------------
def test_the_engine_gets_rates_over_f_latency_and_timeout_times_f(recording, tmp_path):
    cfg = TrainConfig(workers=2, steps=4, eval_every=2, timeout=30.0,
                      run_dir=str(tmp_path / "run"))
    d = Dilation(2.5, "2.5", 3, 2.0)
    out = run_dilated(recording, cfg, 10.0, 4.0, worker_rates={1: 1.0}, dilation=d)
    given = recording.given[-1]
    assert given["rate"] == 4.0 and given["latency"] == 10.0
    assert given["worker_rates"] == {1: 0.4} and given["dilate"] == 2.5
    assert given["cfg"].timeout == 75.0 and given["cfg"].replace(timeout=30.0) == cfg
    run = Path(out["run_dir"])
    link = json.loads((run / "link.json").read_text())
    assert (link["rate_mbit"], link["latency_ms"], link["worker_rates"]) == (10.0, 4.0,
                                                                           {"1": 1.0})
    assert link["applied"] == {"rate_mbit": 4.0, "latency_ms": 10.0, "worker_rates": {"1": 0.4}}
    assert link["dilate"] == 2.5 and out["link"] == link
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["timeout"] == 30.0                       # as asked
    assert config["dilation"] == {"factor": 2.5, "asked": "2.5", "processes": 3, "cores": 2.0,
                                  "timeout": 30.0, "timeout_raw": 75.0}
    # the plots name it
    assert link_of(link).name == "10 Mbit/s, 4 ms, dilated x2.5"


def test_undilated_runs_go_to_the_engine_unchanged(recording, tmp_path):
    cfg = TrainConfig(workers=2, steps=2, eval_every=2, run_dir=str(tmp_path / "run"))
    out = run_dilated(recording, cfg, 10.0, 0.0)
    assert recording.given[-1]["rate"] == 10.0 and recording.given[-1]["cfg"] == cfg
    assert "dilate" not in json.loads((Path(out["run_dir"]) / "summary.json").read_text())
    assert link_of(out["link"]).name == "10 Mbit/s, 0 ms"


# ---- every reported time is the raw one / F --------------------------------------------------
def test_every_reported_time_is_the_raw_one_over_f_and_the_raw_one_is_kept(recording, tmp_path):
    cfg = TrainConfig(workers=2, steps=4, eval_every=2, run_dir=str(tmp_path / "run"))
    out = run_dilated(recording, cfg, 10.0, 0.0, dilation=Dilation(4.0))
    run = Path(out["run_dir"])
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["kind"] == "step"]
    evals = [x for x in lines if x["kind"] == "eval"]
    for x in steps:
        assert x["wall_raw"] == 2.0 * x["step"] and x["wall"] == x["wall_raw"] / 4
        assert x["time_raw"] == PHASES and x["time"] == {k: v / 4 for k, v in PHASES.items()}
        assert x["time_overlap"] == 0.125 and x["model_wall"] == 0.1   # modelled: untouched
    assert [(x["wall"], x["wall_raw"]) for x in evals] == [(1.0, 4.0), (2.0, 8.0)]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["wall_seconds"], summary["wall_seconds_raw"]) == (2.0, 8.0)
    assert summary["wait_seconds_per_worker"] == [0.25, 0.75]
    assert summary["dilate"] == 4.0 and summary["dilation"]["factor"] == 4.0
    wire = json.loads((run / "wire.json").read_text())
    assert (wire["seconds"], wire["seconds_raw"], wire["dilate"]) == (2.5, 10.0, 4.0)
    assert (wire["steady"]["seconds"], wire["steady"]["seconds_raw"]) == (1.0, 4.0)
    assert (out["seconds"], out["seconds_raw"]) == (2.5, 10.0)


def test_a_line_is_dilated_from_its_raw_times_however_often_and_restored():
    line = {"kind": "step", "step": 3, "wall": 6.0, "time": dict(PHASES), "time_wait": 1.0}
    once = dilate_line(line, 2.0)
    assert dilate_line(once, 2.0) == once
    assert dilate_line(once, 3.0)["wall"] == 2.0                      # from the raw 6 s
    assert restore_line(once) == line and dilate_line(once, 1.0) == line
    update = {"kind": "update", "arrival": 4, "started_after": 2}
    assert dilate_line(update, 2.0) == update


def test_the_cluster_command_says_what_the_dilation_does(recording, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["cluster", "--engine", "recording", "--rate", "10",
                                       "--dilate", "2", *TINY, "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert any(x.startswith("dist-quant cluster: dilated x2 (as asked): links at 5 Mbit/s, "
                            "timeout 120 s") for x in lines)
    assert lines[-1] == "dilated x2: 4.0 s of dilated time, 8.0 s raw wall time"
    assert recording.given[-1]["rate"] == 5.0
    result = CliRunner().invoke(main, ["cluster", "--engine", "old", "--rate", "10",
                                       "--dilate", "2", *TINY, "--run-dir", str(run)])
    assert result.exit_code == 2 and "--dilate" in result.output


def test_the_progress_bar_counts_dilated_seconds(monkeypatch):
    import io

    from dist_quant.runtime import progress

    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    bar = Progress(20, stream=io.StringIO(), dilate=2.0)
    bar.seen(1)
    now[0] += 120.0                                   # two raw minutes for 10 of 20 steps
    line = bar.line(10, 1.0, 0.5, 0, 0)
    assert line.endswith("1:00, ETA 1:00")
