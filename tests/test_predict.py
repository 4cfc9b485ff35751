"""``dist-quant predict``: the link model's figures for a recorded run, from the command line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dist_quant.cli import main

MSS = 1448


def _write_run(path, steps, wall, link=None):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"config": {"method": "ps", "workers": 2}}))
    (path / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    (path / "summary.json").write_text(json.dumps({
        "wall_seconds": wall, "workers": 2, "bytes_up": sum(s["bytes_up"] for s in steps),
        "bytes_down": sum(s["bytes_down"] for s in steps)}))
    if link is not None:
        (path / "link.json").write_text(json.dumps(link))


def _steps(n):  # W = 2: one frame up and two frames down per worker and step
    return [{"kind": "step", "step": t, "bytes_up": 2 * MSS, "bytes_down": 2 * 2 * MSS}
            for t in range(1, n + 1)]


def test_predict_prints_the_models_figures(tmp_path):
    _write_run(tmp_path / "run", _steps(10), 3.0)
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "run"), "--rate", "8",
                                       "--latency", "1", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    per_step = 2 * 0.001 + 2 * (1514 + 3028) / 1e6  # two latencies, W x framed bytes / rate
    assert out["predicted_comm_s"] == pytest.approx(10 * per_step)
    assert out["predicted_wall_s"] == pytest.approx(3.0 + 10 * per_step)
    assert out["data_bytes_up"] == 10 * 2 * 1514 and out["data_bytes_down"] == 10 * 2 * 3028
    text = CliRunner().invoke(main, ["predict", str(tmp_path / "run"), "--rate", "8"]).output
    assert "on 8 Mbit/s" in text and "measured 3.00 s on an uncapped link" in text


def test_predict_against_a_measured_capped_run(tmp_path):
    _write_run(tmp_path / "base", _steps(10), 3.0,
               link={"rate_mbit": None, "latency_ms": 0, "loss_pct": 0})
    _write_run(tmp_path / "capped", _steps(10), 5.0,
               link={"rate_mbit": 8, "latency_ms": 1, "loss_pct": 0})
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "base"), "--rate", "8",
                                       "--latency", "1", "--measured", str(tmp_path / "capped"),
                                       "--json"])
    assert result.exit_code == 0, result.output
    m = json.loads(result.output)["measured_run"]
    assert m["measured_wall_s"] == 5.0
    assert m["predicted_wall_s"] == pytest.approx(3.0 + 10 * (0.002 + 2 * 4542 / 1e6))


@pytest.mark.parametrize("argv, option", [(["--rate", "0"], "--rate"),
                                          (["--rate", "10", "--latency", "-1"], "--latency")])
def test_bad_values_exit_2_naming_the_option(tmp_path, argv, option):
    _write_run(tmp_path / "run", _steps(2), 1.0)
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "run"), *argv])
    assert result.exit_code == 2 and option in result.output


def test_a_directory_that_is_no_run_exits_2(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "empty"), "--rate", "10"])
    assert result.exit_code == 2 and "not a finished run directory" in result.output
