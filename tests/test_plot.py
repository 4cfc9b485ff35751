"""``dist-quant plot`` on run directories written by RunRecorder with chosen bytes, accuracies
and wall times (a controlled clock), checked figure by figure and cell by cell."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import pytest
from click.testing import CliRunner

from dist_quant.config import TrainConfig
from dist_quant.plot.command import plot
from dist_quant.plot.labels import method_label, run_labels
from dist_quant.plot.report import write_report
from dist_quant.plot.runs import find_runs
from dist_quant.plot.series import group_by_cap
from dist_quant.runtime import metrics
from dist_quant.runtime.metrics import RunRecorder

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


# ---- several seeds per point, and communication per step against W --------------------------
RATE10 = {"rate_mbit": 10.0, "latency_ms": 0.0, "loss_pct": 0.0, "hosts": 4}
PAYLOAD = 8 * 1448   # one worker's payload per direction: 8 full frames


def write_ps_run(path: Path, clock, accuracies, seconds_per_step, workers, eval_seconds=0.0,
                 link=None, **config):
    """A PS run whose step records carry per-server bytes: every worker's payload is PAYLOAD
    bytes each way, split into W equal shards when colocated; each evaluation takes
    ``eval_seconds`` of wall time outside the steps."""
    clock[0] = 0.0
    cfg = TrainConfig(bucket_size=512).replace(workers=workers, steps=STEPS, **config)
    colocated = cfg.colocate
    shards = workers if colocated else 1
    remote = workers - 1 if colocated else workers
    per = PAYLOAD // shards
    servers = [{"bytes_up": remote * per, "bytes_down": remote * per, "skipped": 0}] * shards
    rec = RunRecorder(path, cfg.to_dict())
    for t in range(1, STEPS + 1):
        clock[0] = t * seconds_per_step + (t - 1) // 2 * eval_seconds
        rec.step(t, 1.0 / t, remote * per * shards, remote * per * shards,
                 {"compute": 0.1 * seconds_per_step, "communicate": 0.9 * seconds_per_step},
                 extra={"servers": servers, "bytes_stats": 0})
        if t % 2 == 0:
            clock[0] += eval_seconds
            rec.eval(t, 1.0, accuracies[t // 2 - 1])
    rec.summary(test_accuracy=accuracies[-1], test_loss=1.0, steps=STEPS, workers=workers,
                params=PARAMS, fp32_bytes_up=1, fp32_bytes_down=1, compressor="onebit",
                method="ps")
    rec.close()
    (path / "link.json").write_text(json.dumps(link or RATE10))
    return path


REACH = [0.3, 0.5, 0.7, 0.78, 0.8]   # 70% first at step 6
MISS = [0.2, 0.3, 0.4, 0.5, 0.6]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, clock):
    root = tmp_path_factory.mktemp("seeded")
    for seed, sps in zip((0, 1, 2), (10.0, 12.0, 14.0), strict=True):
        write_run(root / f"ddp-s{seed}", clock, REACH, sps, 16000, link=RATE10, method="ddp",
                  ddp_hook="none", seed=seed)
    for seed, sps, acc in ((0, 1.0, REACH), (1, 2.0, REACH), (2, 3.0, MISS)):
        write_ps_run(root / f"coloc-w4-s{seed}", clock, acc, sps, 4, colocate=True, seed=seed)
    write_ps_run(root / "coloc-w2", clock, REACH, 0.5, 2, colocate=True)
    write_ps_run(root / "star-w2", clock, REACH, 1.0, 2)
    write_ps_run(root / "star-w4", clock, REACH, 2.0, 4)
    return root


def test_several_seeds_give_mean_spread_and_paired_speedup(seeded, tmp_path):
    rows = section(report_for([seeded], 0.7, tmp_path), "10 Mbit/s, 0 ms")
    ddp = rows["DDP fp32"]
    assert ddp["W"] == "4" and ddp["seeds"] == "3" and ddp["reached"] == "3/3"
    assert ddp["time to target (s)"] == "72.00 [60.00–84.00]"    # steps 6 x 10, 12, 14 s
    assert ddp["speed-up vs DDP fp32"] == "1.00x [1.00–1.00]"
    coloc = [line for line in report_for([seeded], 0.7, tmp_path).splitlines()
             if line.startswith("| PS onebit b512 colocated | 4 |")]
    cells = [c.strip() for c in coloc[0].strip("|").split("|")]
    # bits: 3 x 2896 B x 4 shards x 8 / (1000 params x 4 workers); MB at step 6: 6 x 2 x
    # 34752 B; seeds 0 and 1 reached: (60 + 72) / (6 + 12) = 7.33x, per seed 10x and 6x
    assert cells[2:] == ["3", "69.504", "73.3% [60.0–80.0]", "2/3", "0.417 [0.417–0.417]",
                         "9.00 [6.00–12.00]", "7.33x [6.00–10.00]",
                         "9.00 [6.00–12.00]", "7.33x [6.00–10.00]"]


def test_time_to_target_excluding_evaluation_leaves_out_what_evaluations_took(clock,
                                                                             tmp_path):
    """Colocated seeds of 1 and 2 s per step whose three evaluations up to step 6 take 0.5 s
    each: 7.5 and 13.5 s to target with them, 6 and 12 s without; DDP fp32 60 and 72 s."""
    root = tmp_path / "runs"
    for seed, sps in ((0, 10.0), (1, 12.0)):
        write_run(root / f"ddp-s{seed}", clock, REACH, sps, 16000, link=RATE10, method="ddp",
                  ddp_hook="none", seed=seed)
    for seed, sps in ((0, 1.0), (1, 2.0)):
        write_ps_run(root / f"coloc-s{seed}", clock, REACH, sps, 4, eval_seconds=0.5,
                     colocate=True, seed=seed)
    row = section(report_for([root], 0.7, tmp_path), "10 Mbit/s, 0 ms")[
        "PS onebit b512 colocated"]
    assert row["time to target (s)"] == "10.50 [7.50–13.50]"
    assert row["speed-up vs DDP fp32"] == "6.29x [5.33–8.00]"       # 132 / 21
    assert row["excl. evaluation (s)"] == "9.00 [6.00–12.00]"
    assert row["speed-up excl. evaluation"] == "7.33x [6.00–10.00]"  # 132 / 18


def test_a_point_without_ddp_at_its_worker_count_says_so(seeded, tmp_path):
    report = report_for([seeded], 0.7, tmp_path)
    line = next(x for x in report.splitlines() if x.startswith("| PS onebit b512 colocated | 2 |"))
    assert line.rstrip(" |").endswith("no DDP fp32 run")


def test_scaling_rows_match_the_link_model_by_hand(seeded):
    from dist_quant.plot.scaling import scaling

    data = scaling(group_by_cap(find_runs([seeded])))
    rows = {(r.label, r.workers): r for r in data["10 Mbit/s, 0 ms"]}
    rate = 10e6 / 8
    # star: W payloads of 8 frames (1514 B each on the wire) in, then W out, at the server
    assert rows[("PS onebit b512", 2)].predicted_s == pytest.approx(2 * 2 * 8 * 1514 / rate)
    assert rows[("PS onebit b512", 4)].predicted_s == pytest.approx(2 * 4 * 8 * 1514 / rate)
    # colocated: per phase every rank receives W - 1 shards of 8 / W frames
    assert rows[("PS onebit b512 colocated", 2)].predicted_s == pytest.approx(
        2 * 1 * 4 * 1514 / rate)
    assert rows[("PS onebit b512 colocated", 4)].predicted_s == pytest.approx(
        2 * 3 * 2 * 1514 / rate)
    assert rows[("PS onebit b512 colocated", 4)].runs == 3
    assert rows[("PS onebit b512 colocated", 4)].measured_s == pytest.approx(0.9 * 2.0)
    assert rows[("PS onebit b512 colocated", 4)].growth == pytest.approx(2.0 / 0.5)
    assert rows[("PS onebit b512 colocated", 4)].step_s == pytest.approx(2.0)   # 1, 2, 3 s
    assert rows[("PS onebit b512", 4)].growth == pytest.approx(2.0)
    assert ("DDP fp32", 4) in rows


def test_scaling_takes_the_uncapped_floor_out_where_the_same_points_ran_uncapped(clock,
                                                                                  tmp_path):
    """Colocated at W = 2 and 4, communicate 0.45 and 1.8 s per step at 10 Mbit/s and 0.18 and
    0.9 s uncapped: the cap's share is 0.27 and 0.9 s, a growth of 3.33x (measured 4x)."""
    free = {**RATE10, "rate_mbit": None}
    for w, capped, uncapped in ((2, 0.5, 0.2), (4, 2.0, 1.0)):
        write_ps_run(tmp_path / f"cap-w{w}", clock, REACH, capped, w, colocate=True)
        write_ps_run(tmp_path / f"free-w{w}", clock, REACH, uncapped, w, colocate=True,
                     link=free)
    from dist_quant.plot.scaling import scaling, scaling_table

    data = scaling(group_by_cap(find_runs([tmp_path])))
    assert list(data) == ["10 Mbit/s, 0 ms"]
    w2, w4 = data["10 Mbit/s, 0 ms"]
    assert (w2.uncapped_s, w4.uncapped_s) == (pytest.approx(0.18), pytest.approx(0.9))
    assert (w2.link_s, w4.link_s) == (pytest.approx(0.27), pytest.approx(0.9))
    assert w4.growth == pytest.approx(4.0) and w4.link_growth == pytest.approx(0.9 / 0.27)
    table = "\n".join(scaling_table(data))
    assert table.splitlines()[-1].endswith("| 900.00 | 900.00 | 3.33x |")


def test_plot_writes_the_scaling_figure_and_table_when_several_w_exist(seeded, sweep, tmp_path):
    result = run_plot(seeded, "--target", "0.7", "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    raw = (tmp_path / "a" / "scaling.png").read_bytes()
    assert raw[:8] == PNG_SIGNATURE
    assert matplotlib.image.imread(tmp_path / "a" / "scaling.png")[..., :3].std() > 0.05
    report = (tmp_path / "a" / "report.md").read_text()
    assert "## Communication per step against W (10 Mbit/s, 0 ms)" in report
    assert ("| PS onebit b512 colocated | 4 | 3 | 1800.00 | 14.53 | 123.84 | 4.00x | 2000.00 |"
            in report)
    result = run_plot(sweep, "--out", tmp_path / "b")   # one W only: no scaling figure
    assert result.exit_code == 0 and not (tmp_path / "b" / "scaling.png").exists()
    assert "against W" not in (tmp_path / "b" / "report.md").read_text()


def test_a_batch_size_that_follows_w_stays_one_method(tmp_path, clock):
    """A fixed global batch (1024 per worker at W = 2, 512 at W = 4) keeps one series; two
    batch sizes at one W are two points, named by their batch size."""
    from dist_quant.plot.points import points
    from dist_quant.plot.scaling import scaling

    write_ps_run(tmp_path / "w2", clock, REACH, 0.5, 2, colocate=True, batch_size=1024)
    write_ps_run(tmp_path / "w4", clock, REACH, 1.5, 4, colocate=True, batch_size=512)
    rows = scaling(group_by_cap(find_runs([tmp_path])))["10 Mbit/s, 0 ms"]
    assert [(r.label, r.workers) for r in rows] == [("PS onebit b512 colocated", 2),
                                                    ("PS onebit b512 colocated", 4)]
    assert rows[1].growth == pytest.approx(3.0)
    write_ps_run(tmp_path / "w4b", clock, REACH, 1.5, 4, colocate=True, batch_size=256)
    names = {p.label for p in points(find_runs([tmp_path]))}
    assert names == {"PS onebit b512 colocated",
                     "PS onebit b512 colocated batch_size=512",
                     "PS onebit b512 colocated batch_size=256"}
