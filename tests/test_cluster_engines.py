"""Cluster engines: a new engine is its class and one ``register`` line; ``dist-quant cluster``
and ``dist-quant sweep`` take it by name without a change of their own.

The engine registered here is real and tiny: it runs the job in this process (the
``--simulate`` reference) and writes the records every engine writes, with no links to shape.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from dist_quant.cli import main
from dist_quant.cluster.engine import ClusterError, Engine
from dist_quant.cluster.records import traffic, wire_record
from dist_quant.cluster.registry import engines, get_engine, register, unregister
from dist_quant.config import TrainConfig
from dist_quant.errors import ConfigError
from dist_quant.runtime.metrics import write_json_atomic
from dist_quant.runtime.progress import summary_line
from dist_quant.sweep import INDEX, expand_grid, points_from_options
from dist_quant.train import run_in_process

TINY = ["--workers", "2", "--steps", "4", "--eval-every", "2", "--hidden", "7,5",
        "--train-size", "120", "--test-size", "30", "--batch-size", "4"]


class LocalEngine(Engine):
    """Every host in this one process: the job's ``--simulate`` reference, links unshaped."""

    name = "local"
    mark = "lo"
    help = "every host in this process, links unshaped"
    summary = "this process"
    missing: str | None = None   # what check() reports missing, if anything
    runs: list[TrainConfig] = []

    def check(self) -> None:
        if self.missing:
            raise ClusterError(f"no {self.missing}")

    def check_links(self, worker_rates: Mapping[int, float]) -> None:
        if worker_rates:
            raise ConfigError("--worker-rate", "not with --engine local (no links to shape)")

    def run(self, cfg: TrainConfig, rate_mbit: float | None, latency_ms: float,
            loss_pct: float = 0.0, *, mtu: int = 1500,
            worker_rates: Mapping[int, float] | None = None) -> dict[str, Any]:
        self.check_links(worker_rates or {})
        if rate_mbit or latency_ms or loss_pct:
            raise ConfigError("--rate", "not with --engine local (no links to shape)")
        self.runs.append(cfg)
        run_dir = Path(cfg.run_dir).resolve()
        code = run_in_process(cfg.replace(run_dir=str(run_dir)))   # the --simulate step
        if code != 0:
            err = ClusterError(f"the job ended with status {code}")
            err.exit_code = code
            raise err
        summary = json.loads((run_dir / "summary.json").read_text())
        link = {"engine": self.name, "rate_mbit": None, "latency_ms": 0.0, "loss_pct": 0.0,
                "hosts": 1, "mtu": mtu}
        wire = {**wire_record(traffic(cfg), {}, int(summary["bytes_up"]),
                              int(summary["bytes_down"])),
                "engine": self.name, "seconds": summary["wall_seconds"], "steady": None,
                "per_host": {}}
        write_json_atomic(run_dir / "link.json", link)
        write_json_atomic(run_dir / "wire.json", wire)
        return {"run_dir": str(run_dir), "link": link, "wire": wire,
                "seconds": summary["wall_seconds"]}


@pytest.fixture
def local():
    engine = register(LocalEngine())
    engine.runs = []
    yield engine
    unregister(engine.name)


def test_the_built_in_engines_are_registered_and_keep_their_names():
    assert [e.name for e in engines()][:2] == ["netns", "compose"]
    assert get_engine("netns").needs_root and not get_engine("compose").needs_root
    forced = expand_grid(["ddp-fp32"], force_cluster=True)[0]
    capped = expand_grid(["ddp-fp32"], rates=[10.0])[0]
    assert "_ns_" in forced.name and "_ns_" not in capped.name
    assert "engine" not in forced.identity()
    compose = expand_grid(["ddp-fp32"], rates=[10.0], engine="compose")[0]
    assert "_dc_" in compose.name and compose.identity()["engine"] == "compose"
    with pytest.raises(ConfigError, match="--engine"):
        get_engine("nope")


def test_the_cluster_command_runs_a_registered_engine(local, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["cluster", "--engine", "local", *TINY,
                                       "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    assert [cfg.workers for cfg in local.runs] == [2]
    lines = result.output.strip().splitlines()
    assert f"dist-quant cluster: run directory {run}" in lines
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4
    assert lines[-2] == summary_line(summary)
    assert lines[-1].startswith("wire: up 0.00 MB, down 0.00 MB") and "wire.json" in lines[-1]
    assert json.loads((run / "link.json").read_text())["engine"] == "local"
    assert json.loads((run / "wire.json").read_text())["payload_bytes_up"] == \
        summary["bytes_up"]


def test_the_cluster_command_asks_the_engine_what_it_refuses(local, tmp_path):
    cli = CliRunner()
    # the engine's own check: one line, status 1, before the run directory is announced
    local.missing = "local hosts"
    result = cli.invoke(main, ["cluster", "--engine", "local", *TINY,
                               "--run-dir", str(tmp_path / "a")])
    assert result.exit_code == 1
    assert "dist-quant cluster: no local hosts" in result.output
    assert "run directory" not in result.output
    local.missing = None
    # link settings it cannot make: the option named, status 2, nothing run
    for extra, option in ((["--worker-rate", "0=1"], "--worker-rate"), (["--rate", "10"],
                                                                        "--rate")):
        result = cli.invoke(main, ["cluster", "--engine", "local", *TINY, *extra,
                                   "--run-dir", str(tmp_path / option.strip("-"))])
        assert result.exit_code == 2, result.output
        assert f"Error: {option}: not with --engine local" in result.output
    assert local.runs == []


def test_a_sweep_runs_its_points_on_a_registered_engine(local, tmp_path):
    out = tmp_path / "out"
    args = [str(out), "--cluster", "--engine", "local", "-m", "ps-fp32", "--set", "workers=2",
            "--set", "steps=4", "--set", "eval_every=2", "--set", "hidden=7",
            "--set", "train_size=120", "--set", "test_size=30", "--set", "batch_size=4",
            "--no-progress"]
    result = CliRunner().invoke(main, ["sweep", *args, "--dry-run"])
    assert result.exit_code == 0, result.output
    (line,) = result.output.strip().splitlines()
    name = line.split()[0]
    assert "_lo_" in name and "[cluster, to run]" in line
    result = CliRunner().invoke(main, ["sweep", *args])
    assert result.exit_code == 0, result.output
    assert len(local.runs) == 1 and local.runs[0].run_dir == str(out / name)
    point = json.loads((out / name / "point.json").read_text())
    assert point["engine"] == "local" and point["runner"] == "cluster"
    assert json.loads((out / name / "link.json").read_text())["engine"] == "local"
    assert json.loads((out / INDEX).read_text())["points"][name]["status"] == "done"
    # done points are skipped on the same engine; another engine is another point
    result = CliRunner().invoke(main, ["sweep", *args])
    assert "done before, skipped" in result.output and len(local.runs) == 1
    (netns,) = points_from_options(["ps-fp32"], ["workers=2"], None, None, None, None, True)
    (mine,) = points_from_options(["ps-fp32"], ["workers=2"], None, None, None, None, True,
                                  engine="local")
    assert netns.name != mine.name and mine.identity()["engine"] == "local"


def test_a_sweep_refuses_what_the_engine_refuses_before_any_point_runs(local, tmp_path):
    result = CliRunner().invoke(main, ["sweep", str(tmp_path / "out"), "--cluster",
                                       "--engine", "local", "-m", "ps-fp32",
                                       "--worker-rate", "0=1"])
    assert result.exit_code == 2
    assert "--worker-rate" in result.output and "not with --engine local" in result.output
    assert local.runs == [] and not (tmp_path / "out").exists()


def test_an_engine_no_longer_registered_is_no_choice(tmp_path):
    register(LocalEngine())
    unregister("local")
    for command in ("cluster", "sweep"):
        args = [command, *([str(tmp_path / "out")] if command == "sweep" else []),
                "--engine", "local"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2
        assert "'local' is not one of 'netns', 'compose'" in result.output
