"""``dist-quant plot`` on run directories written by RunRecorder with chosen bytes, accuracies
and wall times (a controlled clock), checked figure by figure and cell by cell."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import pytest
from click.testing import CliRunner

from dist_quant import metrics
from dist_quant.config import TrainConfig
from dist_quant.metrics import RunRecorder
from dist_quant.plot.command import plot
from dist_quant.plot.labels import method_label, run_labels
from dist_quant.plot.report import write_report
from dist_quant.plot.runs import find_runs, group_by_cap

PARAMS, WORKERS, STEPS = 1000, 4, 10
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("accuracy_vs_bytes.png", "accuracy_vs_time.png", "time_per_phase.png",
           "to_target.png")


@pytest.fixture(scope="module")
def clock():
    """RunRecorder's wall clock, set by the test: walls in the files are exact."""
    now = [0.0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics, "time", SimpleNamespace(perf_counter=lambda: now[0]))
        yield now


def write_run(path: Path, clock, accuracies, seconds_per_step, up, down=16000, link=None,
              wire=None, **config):
    """A run of STEPS steps evaluated every 2 steps; ``accuracies`` at steps 2, 4, ..., 10."""
    clock[0] = 0.0
    cfg = TrainConfig(bucket_size=512).replace(workers=WORKERS, steps=STEPS, **config).to_dict()
    rec = RunRecorder(path, cfg)
    for t in range(1, STEPS + 1):
        clock[0] = t * seconds_per_step
        times = {"compute": 0.1 * seconds_per_step, "communicate": 0.9 * seconds_per_step}
        rec.step(t, 1.0 / t, up, down, times)
        if t % 2 == 0:
            rec.eval(t, 1.0, accuracies[t // 2 - 1])
    rec.summary(test_accuracy=accuracies[-1], test_loss=1.0, steps=STEPS, workers=WORKERS,
                params=PARAMS, fp32_bytes_up=16000 * STEPS, fp32_bytes_down=16000 * STEPS,
                compressor=cfg["compressor"], method=cfg["method"])
    rec.close()
    if link is not None:
        (path / "link.json").write_text(json.dumps(link))
    if wire is not None:
        (path / "wire.json").write_text(json.dumps(wire))
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, clock):
    capped = {"rate_mbit": 10.0, "latency_ms": 5.0, "loss_pct": 0.0, "hosts": 5}
    root = tmp_path_factory.mktemp("runs") / "sweep"
    write_run(root / "ddp", clock, [0.3, 0.5, 0.7, 0.78, 0.8], 10.0, 16000, link=capped,
              method="ddp", ddp_hook="none")
    write_run(root / "nested" / "onebit", clock, [0.4, 0.6, 0.75, 0.76, 0.77], 1.0, 576,
              link=capped, wire={"wire_bytes_up": 6048, "wire_bytes_down": 170000,
                                 "payload_bytes_up": 5760, "payload_bytes_down": 160000,
                                 "per_host": {}})
    write_run(root / "signef", clock, [0.2, 0.3, 0.4, 0.5, 0.6], 2.0, 500, link=capped,
              compressor="sign", error_feedback=True)
    write_run(root / "loop-onebit", clock, [0.4, 0.6, 0.75, 0.76, 0.77], 0.5, 576)
    return root


def run_plot(*args):
    return CliRunner().invoke(plot, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def plotted(sweep):
    """One run of the command, default target and output directory; a run directory named
    beside its sweep is read once."""
    result = run_plot(sweep, sweep / "ddp")
    assert result.exit_code == 0, result.output
    return sweep / "plots", result.output


def report_for(paths, target, out) -> str:
    """The report alone (what the command writes, without drawing), for other targets."""
    runs = find_runs(list(paths))
    return write_report(group_by_cap(runs), target, "given", [], out).read_text()


def section(report: str, heading: str) -> dict[str, list[str]]:
    """The table under ``## heading`` as {method: other cells}."""
    lines = report.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0].strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:], strict=True))
    return rows


def test_figures_are_valid_non_empty_pngs(plotted):
    out, output = plotted
    for name in FIGURES:
        raw = (out / name).read_bytes()
        assert raw[:8] == PNG_SIGNATURE and len(raw) > 5000
        pixels = matplotlib.image.imread(out / name)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400
        assert pixels[..., :3].std() > 0.05  # not a blank canvas
        assert str(out / name) in output
    assert str(out / "report.md") in output


def test_report_table_values_with_the_default_target(plotted):
    out, _ = plotted
    report = (out / "report.md").read_text()
    # best final accuracy 0.80 -> target 0.72; the sweep's ddp run given twice counts once
    assert "Target test accuracy: **72.0%** (90% of the best final accuracy over the 4 runs" \
        in report
    assert "4 run(s) under 2 link setting(s)" in report
    capped = section(report, "10 Mbit/s, 5 ms")
    assert list(capped) == ["DDP fp32", "PS onebit b512", "PS sign+EF"]
    assert capped["DDP fp32"] == {
        "bits/coord (up)": "32.000", "final acc": "80.0%", "MB up to target": "0.128",
        "MB total to target": "0.256", "time to target (s)": "80.00",
        "speed-up vs DDP fp32": "1.00x", "wire/payload (up)": "—"}
    # 576 B/step * 8 / (1000 params * 4 workers) = 1.152 bits; reached at step 6 after 6 s
    assert capped["PS onebit b512"] == {
        "bits/coord (up)": "1.152", "final acc": "77.0%", "MB up to target": "0.003456",
        "MB total to target": "0.09946", "time to target (s)": "6.00",
        "speed-up vs DDP fp32": "13.33x", "wire/payload (up)": "1.0500"}
    assert capped["PS sign+EF"] == {
        "bits/coord (up)": "1.000", "final acc": "60.0%", "MB up to target": "not reached",
        "MB total to target": "not reached", "time to target (s)": "not reached",
        "speed-up vs DDP fp32": "not reached", "wire/payload (up)": "—"}
    loop = section(report, "loopback (uncapped)")
    assert loop["PS onebit b512"]["time to target (s)"] == "3.00"
    assert loop["PS onebit b512"]["speed-up vs DDP fp32"] == "no DDP fp32 run"
    assert "wire/payload (up)" not in loop["PS onebit b512"]
    assert report.index("## 10 Mbit/s") < report.index("## loopback")


def test_explicit_target_changes_every_figure_of_merit(sweep, tmp_path):
    capped = section(report_for([sweep], 0.5, tmp_path), "10 Mbit/s, 5 ms")
    assert capped["DDP fp32"]["time to target (s)"] == "40.00"
    assert capped["PS onebit b512"]["speed-up vs DDP fp32"] == "10.00x"
    assert capped["PS sign+EF"]["time to target (s)"] == "16.00"
    assert capped["PS sign+EF"]["speed-up vs DDP fp32"] == "2.50x"


def test_a_baseline_that_never_reaches_the_target_is_said(sweep, tmp_path):
    runs = [sweep / "ddp", sweep / "nested"]
    capped = section(report_for(runs, 0.76, tmp_path), "10 Mbit/s, 5 ms")
    assert capped["PS onebit b512"]["time to target (s)"] == "8.00"
    assert capped["PS onebit b512"]["speed-up vs DDP fp32"] == "10.00x"
    capped = section(report_for(runs, 0.79, tmp_path), "10 Mbit/s, 5 ms")
    assert capped["DDP fp32"]["time to target (s)"] == "100.00"
    assert capped["PS onebit b512"]["speed-up vs DDP fp32"] == "not reached"
    assert "PS sign+EF" not in capped


def test_target_option_is_validated(sweep):
    result = CliRunner().invoke(plot, [str(sweep), "--target", "1.5"])
    assert result.exit_code == 2 and "--target" in result.output


def test_a_directory_without_runs_is_a_usage_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(plot, [str(tmp_path / "empty")])
    assert result.exit_code == 2
    assert "no run directory (summary.json)" in result.output


@pytest.mark.parametrize(("config", "label"), [
    ({"bucket_size": 512}, "PS onebit b512"),
    ({"bucket_size": 0}, "PS onebit whole"),
    ({"compressor": "sign", "error_feedback": True}, "PS sign+EF"),
    ({"downlink": "onebit", "bucket_size": 512, "downlink_bucket_size": 512},
     "PS onebit b512 up+down"),
    ({"downlink": "fp16", "bucket_size": 512}, "PS onebit b512 down fp16"),
    ({"downlink": "sign", "bucket_size": 512, "downlink_bucket_size": 512},
     "PS onebit b512 down sign"),
    ({"downlink": "sign", "bucket_size": 128, "downlink_bucket_size": 512,
      "header_dtype": "fp16"}, "PS onebit b128 fp16 headers down sign b512"),
    ({"compressor": "none"}, "PS fp32"),
    ({"compressor": "kbit", "bits": 2, "bucket_size": 256}, "PS 2bit b256"),
    ({"header_dtype": "fp16", "bucket_size": 512}, "PS onebit b512 fp16 headers"),
    ({"method": "ddp"}, "DDP fp32"),
    ({"method": "ddp", "ddp_hook": "fp16"}, "DDP fp16"),
    ({"method": "ddp", "ddp_hook": "powersgd", "powersgd_rank": 2}, "DDP PowerSGD r2"),
])
def test_method_label(config, label):
    assert method_label(config) == label


def test_run_labels_name_what_differs_and_number_repeats():
    configs = [{"seed": 0, "bucket_size": 512}, {"seed": 1, "run_dir": "x", "bucket_size": 512},
               {"method": "ddp"}, {"method": "ddp"}]
    assert run_labels(configs) == ["PS onebit b512 seed=0", "PS onebit b512 seed=1",
                                   "DDP fp32 #1", "DDP fp32 #2"]
