"""Figures read at a glance: one series per method (its seeds' mean and band), one colour per
method in every figure of one call, one legend entry per method, the time-to-target marks
with their ranges, and report.html that references only what exists and renders in a
headless browser. Runs are written in the run-directory format (dist_quant.runtime.metrics) with
chosen accuracies, walls and bytes."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_hex
from matplotlib.container import ErrorbarContainer

from dist_quant.config import TrainConfig
from dist_quant.plot.command import plot
from dist_quant.plot.figures import (
    accuracy_figure,
    plan,
    time_per_phase_figure,
    to_target_figure,
)
from dist_quant.plot.runs import find_runs
from dist_quant.plot.series import clean_evals, group_by_cap, panels, series_of
from dist_quant.sweep import PRESETS, parse_method

LINK = {"rate_mbit": 10.0, "latency_ms": 0.0, "loss_pct": 0.0, "hosts": 4}
STEPS = (2, 4, 6, 8)


def write_run(path: Path, label: str, seed: int, accuracies, seconds_per_step: float,
              bytes_per_step: int, workers: int = 4, link=LINK, restart_at: int | None = None,
              **own) -> Path:
    """A sweep's run of ``label`` (a preset, or the user's own with ``own`` fields):
    evaluations at STEPS with ``accuracies``; wall = step x seconds_per_step; each step sends
    ``bytes_per_step`` up and as much down. ``restart_at``: the file holds a first attempt
    that got to step 8 at a third of the pace, then the run again from that step on."""
    path.mkdir(parents=True)
    fields = {**PRESETS.get(label, {}), **own}
    cfg = TrainConfig(**fields).replace(workers=workers, seed=seed, batch_size=2048 // workers,
                                        stop_accuracy=0.0, eval_every=2)
    (path / "config.json").write_text(json.dumps({
        "config": cfg.to_dict(), "model": "mlp", "metric": "accuracy",
        "versions": {"torch": "2.13.0"}, "git_commit": "0123456789abcdef",
        "machine": {"cpu": "Test CPU", "logical_cpus": 2}}))
    (path / "point.json").write_text(json.dumps({
        "label": label, "preset": label if label in PRESETS else None,
        "rate_mbit": link["rate_mbit"], "latency_ms": 0.0, "loss_pct": 0.0,
        "runner": "cluster"}))
    (path / "link.json").write_text(json.dumps(link))

    def lines(steps, clock):
        for t in steps:
            times = {"compute": 0.2 * seconds_per_step, "communicate": 0.8 * seconds_per_step}
            yield {"kind": "step", "step": t, "loss": 1.0, "bytes_up": bytes_per_step,
                   "bytes_down": bytes_per_step, "cum_bytes_up": t * bytes_per_step,
                   "cum_bytes_down": t * bytes_per_step, "wall": t * clock, "time": times}
            if t in STEPS:
                yield {"kind": "eval", "step": t, "test_loss": 1.0,
                       "test_accuracy": accuracies[STEPS.index(t)],
                       "cum_bytes_up": t * bytes_per_step, "cum_bytes_down": t * bytes_per_step,
                       "wall": t * clock}

    records = list(lines(range(1, 9), seconds_per_step))
    if restart_at is not None:
        # a first attempt at 3x the pace to step 8, then the run again from step restart_at,
        # its clock going on from where the first attempt was at step restart_at - 1
        slow = list(lines(range(1, 9), 3 * seconds_per_step))
        offset = (3 - 1) * seconds_per_step * (restart_at - 1)
        again = [{**r, "wall": r["wall"] + offset} for r in records if r["step"] >= restart_at]
        records = slow + again
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "summary.json").write_text(json.dumps({
        "test_accuracy": accuracies[-1], "test_loss": 1.0, "steps": 8, "workers": workers,
        "params": 1000, "bytes_up": 8 * bytes_per_step, "bytes_down": 8 * bytes_per_step,
        "fp32_bytes_up": 1, "fp32_bytes_down": 1, "wall_seconds": 8 * seconds_per_step,
        "compressor": cfg.compressor, "method": cfg.method}))
    return path


# ---- two methods x three seeds: the series by hand --------------------------------------------
ACC = {  # (label, seed) -> accuracies at STEPS
    ("ddp-fp32", 0): [0.30, 0.50, 0.70, 0.80], ("ddp-fp32", 1): [0.20, 0.40, 0.60, 0.75],
    ("ddp-fp32", 2): [0.25, 0.45, 0.65, 0.85],
    ("ps-colocated", 0): [0.40, 0.60, 0.72, 0.78], ("ps-colocated", 1): [0.35, 0.55, 0.71, 0.77],
    ("ps-colocated", 2): [0.30, 0.50, 0.64, 0.70]}
SPS = {"ddp-fp32": (10.0, 12.0, 14.0), "ps-colocated": (1.0, 2.0, 3.0)}


@pytest.fixture(scope="module")
def two_by_three(tmp_path_factory):
    root = tmp_path_factory.mktemp("two") / "sweep"
    for (label, seed), acc in ACC.items():
        write_run(root / f"{label}_s{seed}", label, seed, acc, SPS[label][seed],
                  16000 if label == "ddp-fp32" else 600)
    return root


def test_two_methods_three_seeds_give_two_series_with_the_hand_computed_means(two_by_three):
    groups = group_by_cap(find_runs([two_by_three]))
    (panel,) = panels(groups)
    assert panel.title == "10 Mbit/s, 0 ms; W = 4, batch 512 per worker"
    by_method = {}
    for run in panel.runs:
        by_method.setdefault(run.method, []).append(run)
    assert sorted(by_method) == ["ddp-fp32", "ps-colocated"]
    for label, runs in by_method.items():
        assert len(runs) == 3
        s = series_of(label, runs, "wall")
        assert s.steps == STEPS
        for i, step in enumerate(STEPS):
            acc = [ACC[(label, seed)][i] for seed in range(3)]
            assert s.mean[i] == pytest.approx(sum(acc) / 3, abs=1e-12)
            assert (s.low[i], s.high[i]) == (min(acc), max(acc))
            assert s.x[i] == pytest.approx(step * sum(SPS[label]) / 3, abs=1e-12)
        mb = series_of(label, runs, "mb_total")
        per_step = 2 * (16000 if label == "ddp-fp32" else 600) / 1e6
        assert mb.x == pytest.approx([step * per_step for step in STEPS], abs=1e-12)


def test_a_restarted_run_is_read_from_its_last_attempt_and_no_series_runs_backwards(
        tmp_path):
    for seed, restart in ((0, None), (1, 4), (2, 6)):
        write_run(tmp_path / f"s{seed}", "ps-colocated", seed, REACHES, 2.0, 600,
                  restart_at=restart)
    runs = find_runs([tmp_path])
    restarted = next(r for r in runs if r.path.name == "s1")
    # the file: steps 2..8 at 6 s per step, then 4..8 again at 2 s per step from the first
    # attempt's 18 s at step 3: read as one line it would run back from 48 s to 20 s
    assert [(e["step"], e["wall"]) for e in restarted.evals] == [
        (2, 12.0), (4, 24.0), (6, 36.0), (8, 48.0), (4, 20.0), (6, 24.0), (8, 28.0)]
    assert [(e["step"], e["wall"]) for e in clean_evals(restarted)] == [
        (2, 12.0), (4, 20.0), (6, 24.0), (8, 28.0)]
    (panel,) = panels(group_by_cap(runs))
    for x in ("wall", "mb_up", "mb_total"):
        s = series_of("ps-colocated", panel.runs, x)
        assert s.steps == STEPS
        assert all(a <= b for a, b in zip(s.x, s.x[1:], strict=False)), (x, s.x)
        for curve in s.seeds:
            assert all(a <= b for a, b in zip(curve.x, curve.x[1:], strict=False)), (x, curve)


# ---- seven methods x three seeds at one link and W: the figures and the page -------------------
SEVEN = [("ddp-fp32", {}, 10.0), ("ddp-fp16", {}, 5.0), ("ddp-powersgd", {}, 3.0),
         ("ddp-onebit", {}, 2.5), ("ps-onebit-updown", {"header_dtype": "fp16"}, 1.5),
         ("ps-sharded", {}, 1.2), ("ps-colocated", {}, 1.0)]
REACHES = [0.3, 0.5, 0.7, 0.8]      # 68% first at step 6


@pytest.fixture(scope="module")
def seven(tmp_path_factory):
    root = tmp_path_factory.mktemp("seven") / "sweep"
    for label, own, sps in SEVEN:
        for seed in range(3):
            write_run(root / f"{label}_s{seed}", label, seed, REACHES, sps * (1 + 0.1 * seed),
                      1000, **own)
    return root


@pytest.fixture(scope="module")
def seven_plan(seven):
    return plan(group_by_cap(find_runs([seven])), 0.68)


def legend_entries(fig) -> list[str]:
    (legend,) = fig.legends
    return [t.get_text() for t in legend.get_texts()]


def test_accuracy_figures_have_one_legend_entry_and_one_band_per_method(seven_plan):
    names = [label for label, _, _ in SEVEN]
    for x in ("wall", "mb"):
        fig = accuracy_figure(seven_plan, x)
        assert legend_entries(fig) == names
        FigureCanvasAgg(fig).draw()
        box, page = fig.legends[0].get_window_extent(), fig.bbox
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and \
            box.y1 <= page.y1    # the legend is not cut
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent())   # and outside the panels
        panels_drawn = [ax for ax in fig.axes if ax.axison]
        assert len(panels_drawn) == (1 if x == "wall" else 2)
        for ax in panels_drawn:
            bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
            assert len(bands) == 7
            bold = [ln for ln in ax.get_lines() if ln.get_linewidth() >= 2]
            assert len(bold) == 7
            seeds = [ln for ln in ax.get_lines() if (ln.get_gid() or "").startswith("seed:")]
            assert len(seeds) == 21    # each seed's own curve, thin
            assert all(ln.get_linewidth() < 1 for ln in seeds)


def test_time_to_target_has_seven_marks_with_their_seed_ranges_and_speedups(seven_plan):
    fig = to_target_figure(seven_plan)
    (ax,) = [a for a in fig.axes if a.axison]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 7
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    # sorted fastest first: reached at step 6, seeds at 1, 1.1, 1.2 x the method's pace
    assert ticks == [label for label, _, _ in reversed(SEVEN)]
    for bar, (_, _, sps) in zip(bars, reversed(SEVEN), strict=True):
        line, _, (ranges,) = bar
        (x,), _ = line.get_data()
        times = [6 * sps * (1 + 0.1 * seed) for seed in range(3)]
        assert x == pytest.approx(sum(times) / 3)
        (segment,) = ranges.get_segments()
        assert [p[0] for p in segment] == pytest.approx([min(times), max(times)])
    texts = [t.get_text() for t in ax.texts]
    # speed-up of ps-colocated: DDP fp32's mean time over its own, 10x at every seed
    assert any(t.endswith("10.00x [10.00-10.00]") and t.startswith("6.6 s ") for t in texts)
    assert ax.get_xscale() == "log"     # 6 s to 84 s: over a factor of 8


def test_a_method_has_one_colour_in_every_figure_of_one_call(seven_plan):
    colour = {m: to_hex(s.colour) for m, s in seven_plan.style.items()}
    assert len(set(colour.values())) == 7
    for x in ("wall", "mb"):
        fig = accuracy_figure(seven_plan, x)
        (legend,) = fig.legends
        for text, handle in zip(legend.get_texts(), legend.legend_handles, strict=True):
            assert to_hex(handle.get_facecolor()) == colour[text.get_text()]  # its band
        for ax in (a for a in fig.axes if a.axison):
            for line in ax.get_lines():
                if line.get_linewidth() >= 2:   # a method's mean
                    assert to_hex(line.get_color()) == colour[line.get_label()]
    target = to_target_figure(seven_plan)
    (ax,) = [a for a in target.axes if a.axison]
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    for bar, name in zip(ax.containers, ticks, strict=True):
        assert to_hex(bar[0].get_color()) == colour[name]
    for fig in (target, time_per_phase_figure(seven_plan)):
        (ax,) = [a for a in fig.axes if a.axison]
        for tick in ax.get_yticklabels():
            assert to_hex(tick.get_color()) == colour[tick.get_text()]
    # DDP baselines and the parameter server's methods in separate families of hues
    ddp = {colour[m] for m in colour if m.startswith("ddp")}
    ps = {colour[m] for m in colour if m.startswith("ps")}
    assert not ddp & ps
    assert {seven_plan.style[m].linestyle for m in colour if m.startswith("ddp")} == {"--"}
    assert {seven_plan.style[m].linestyle for m in colour if m.startswith("ps")} == {"-"}


@pytest.fixture(scope="module")
def plotted(seven, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "plots"
    result = CliRunner().invoke(plot, [str(seven), "--out", str(out), "--target", "0.68"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def references(page: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', page)


def test_report_html_references_only_files_that_exist_and_holds_every_figure(plotted):
    page = (plotted / "report.html").read_text()
    pngs = sorted(p.name for p in plotted.glob("*.png"))
    assert pngs == ["accuracy_vs_bytes.png", "accuracy_vs_time.png", "time_per_phase.png",
                    "to_target.png"]
    refs = references(page)
    inline = [r for r in refs if r.startswith("data:image/png;base64,")]
    assert len(inline) == len(pngs)
    for ref in refs:
        if not ref.startswith(("data:", "#")):
            assert (plotted / ref).is_file(), ref
    assert sorted(r for r in refs if r.endswith(".png")) == pngs
    assert "<script" not in page and "http://" not in page and "https://" not in page
    # the tables, the machine, the commit and the commands are on the page
    assert "<table>" in page and "Test CPU, 2 logical CPUs" in page and "0123456789ab" in page
    assert "dist-quant plot " in page and "dist-quant sweep " in page


def test_the_sweep_command_in_the_report_rebuilds_every_method(plotted, seven):
    """Each ``-m`` of the rebuilt command, with its ``--set`` fields, gives the config the runs
    hold (seed, W and batch size aside)."""
    report = (plotted / "report.md").read_text()
    block = report.split("```\n", 2)[1].strip()
    words = shlex.split(block.replace(" \\\n", " "))   # continuation lines: one command
    assert words[:4] == ["dist-quant", "sweep", str(seven), "--cluster"]
    specs = [words[i + 1] for i, w in enumerate(words) if w == "-m"]
    sets = dict(words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "--set")
    assert sets["workers"] == "4" and sets["batch_size"] == "512"
    assert words[words.index("--seeds") + 1] == "0,1,2"
    assert words[words.index("--rate") + 1] == "10"
    runs = {r.point["label"]: r for r in find_runs([seven]) if r.config["seed"] == 0}
    assert [s.split(":")[0] for s in specs] == [label for label, _, _ in SEVEN]
    from dist_quant.sweep import parse_value

    shared = {k: parse_value(k, v) for k, v in sets.items()}
    for spec in specs:
        label, preset, own = parse_method(spec)
        cfg = TrainConfig().replace(**{**preset, **shared, **own}).to_dict()
        held = runs[label].config
        assert {k: v for k, v in cfg.items() if k != "seed"} == \
            {k: v for k, v in held.items() if k != "seed"}, spec


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-probe", ok + "/" + imgs.length);
});
</script>"""


@pytest.mark.skipif(chromium() is None,
                    reason="no chromium binary (Debian package 'chromium'): the page is not "
                           "rendered in a browser here")
def test_report_html_renders_in_a_headless_browser_with_every_figure_loaded(plotted):
    """A copy of the page beside it, with a probe that counts the images the browser decoded
    once the page loaded; Chromium prints the DOM after the load."""
    probe = plotted / "report-probe.html"
    probe.write_text((plotted / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    try:
        result = subprocess.run(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-dev-shm-usage", f"--user-data-dir={plotted / 'chromium-profile'}",
             "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
            capture_output=True, text=True, timeout=180)
    finally:
        probe.unlink()
    found = re.search(r'data-probe="(\d+)/(\d+)"', result.stdout)
    assert found, result.stderr[-2000:]
    assert found[1] == found[2] == "4"
    assert "Bandwidth versus convergence" in result.stdout


def test_links_and_worker_counts_go_to_separate_panels_titled_with_what_they_fix(tmp_path):
    """Two methods at W = 2 and 4 under 10 Mbit/s and uncapped links: a 2 x 2 grid of panels,
    links down the rows, W across; each method one colour in all of them and in scaling.png."""
    free = {**LINK, "rate_mbit": None}
    for link in (LINK, free):
        for workers in (2, 4):
            for label, sps in (("ddp-fp32", 4.0), ("ps-onebit", 1.0)):
                for seed in (0, 1):
                    name = f"{label}_w{workers}_{link['rate_mbit']}_s{seed}"
                    write_run(tmp_path / name, label, seed, REACHES, sps, 1000,
                              workers=workers, link=link)
    groups = group_by_cap(find_runs([tmp_path]))
    p = plan(groups, 0.68)
    fig = accuracy_figure(p, "wall")
    titles = [ax.get_title() for ax in fig.axes if ax.axison]
    assert titles == ["10 Mbit/s, 0 ms; W = 2, batch 1024 per worker",
                      "10 Mbit/s, 0 ms; W = 4, batch 512 per worker",
                      "uncapped, 0 ms; W = 2, batch 1024 per worker",
                      "uncapped, 0 ms; W = 4, batch 512 per worker"]
    assert legend_entries(fig) == ["ddp-fp32", "ps-onebit"]
    for ax in fig.axes:
        assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 2
    from dist_quant.plot.figures import scaling_figure
    from dist_quant.plot.scaling import scaling

    scaled = scaling_figure(scaling(groups), p)
    colour = {m: to_hex(s.colour) for m, s in p.style.items()}
    (legend,) = scaled.legends
    for text, handle in zip(legend.get_texts(), legend.legend_handles, strict=True):
        if text.get_text() in colour:
            assert to_hex(handle.get_color()) == colour[text.get_text()]
    lines = [ln for ln in scaled.axes[0].get_lines() if ln.get_marker() == "o"]
    assert sorted(to_hex(ln.get_color()) for ln in lines) == sorted(colour.values())


def test_one_label_with_two_configs_is_two_methods_named_by_what_differs(tmp_path):
    """``-m ps-colocated -m ps-colocated:overlap=true``: two methods in one panel, and the
    rebuilt command gives each its own ``-m``."""
    from dist_quant.plot.recipe import sweep_commands
    from dist_quant.plot.series import method_order

    for seed in (0, 1):
        write_run(tmp_path / "sweep" / f"plain_s{seed}", "ps-colocated", seed, REACHES, 1.0, 600)
        write_run(tmp_path / "sweep" / f"overlap_s{seed}", "ps-colocated", seed, REACHES, 0.9,
                  600, overlap=True)
    groups = group_by_cap(find_runs([tmp_path]))
    runs = groups["10 Mbit/s, 0 ms"]
    order = method_order(runs)
    assert order == ["ps-colocated overlap=False", "ps-colocated overlap=True"]
    (panel,) = panels(groups)
    assert len(panel.runs) == 4
    assert legend_entries(accuracy_figure(plan(groups, 0.68), "wall")) == order
    (command,) = sweep_commands(runs, order)
    assert " -m ps-colocated -m ps-colocated:overlap=true " in command
