"""Figures of small sweeps: a series of one evaluation is a mark with a note, every axis has
labelled ticks, the target's label stays inside the axes, and a series of fewer than three
evaluations is warned of on stderr and in report.md."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from matplotlib.backends.backend_agg import FigureCanvasAgg

from dist_quant.config import TrainConfig
from dist_quant.plot.command import plot
from dist_quant.plot.figures import accuracy_figure, plan, to_target_figure
from dist_quant.plot.runs import find_runs
from dist_quant.plot.series import few_evaluations, group_by_cap
from dist_quant.runtime.metrics import RunRecorder

PARAMS, WORKERS = 1000, 2


def write_run(path: Path, evals: dict[int, float], steps: int, **config) -> Path:
    """A run of ``steps`` steps of 0.05 s each (its wall clock is the recorder's own), evaluated
    at the steps of ``evals`` (step: accuracy)."""
    cfg = TrainConfig().replace(workers=WORKERS, steps=steps, **config).to_dict()
    rec = RunRecorder(path, cfg)
    for t in range(1, steps + 1):
        rec.step(t, 1.0 / t, 1000, 1000, {"compute": 0.01, "communicate": 0.04})
        if t in evals:
            rec.eval(t, 1.0, evals[t])
    rec.summary(test_accuracy=evals[max(evals)], test_loss=1.0, steps=steps, workers=WORKERS,
                params=PARAMS, fp32_bytes_up=4000 * steps, fp32_bytes_down=4000 * steps,
                compressor=cfg["compressor"], method=cfg["method"])
    rec.close()
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """Two methods of 100 steps, one evaluation each (the default eval_every), and a third
    evaluated three times."""
    root = tmp_path_factory.mktemp("small")
    write_run(root / "ddp", {100: 0.62}, 100, method="ddp", ddp_hook="none")
    write_run(root / "onebit", {100: 0.60}, 100, compressor="onebit", bucket_size=512)
    write_run(root / "sign", {40: 0.3, 80: 0.5, 100: 0.58}, 100, compressor="sign",
              error_feedback=True)
    return root


def test_series_of_fewer_than_three_evaluations_are_warned_of(small, tmp_path):
    groups = group_by_cap(find_runs([small]))
    lines = few_evaluations(groups)
    assert len(lines) == 2
    assert all(ln.startswith("warning: ") and "1 evaluation per run, fewer than 3" in ln
               for ln in lines)
    assert not any("sign" in ln.split("(")[0] for ln in lines)

    result = CliRunner().invoke(plot, [str(small), "--out", str(tmp_path)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == lines
    report = (tmp_path / "report.md").read_text()
    for line in lines:
        assert f"- {line}" in report


def drawn(fig):
    FigureCanvasAgg(fig).draw()
    return fig


def labels(axis, minor: bool = False) -> list[str]:
    low, high = sorted(axis.get_view_interval())
    ticks = axis.get_minor_ticks() if minor else axis.get_major_ticks()
    return [t.label1.get_text() for t in ticks
            if t.label1.get_visible() and t.label1.get_text() and low <= t.get_loc() <= high]


def test_a_single_point_series_is_a_mark_with_a_note_and_axes_keep_labelled_ticks(small):
    groups = group_by_cap(find_runs([small]))
    p = plan(groups, 0.56)
    for x in ("wall", "mb"):
        fig = drawn(accuracy_figure(p, x))
        for ax in [a for a in fig.axes if a.axison]:
            gids = {a.get_gid() for a in ax.get_children() if a.get_gid()}
            singles = sorted(c.get_label() for c in ax.containers)   # the marks
            assert singles == ["DDP fp32", "PS onebit b512"]
            assert "single-note" in gids
            note = next(t for t in ax.texts if t.get_gid() == "single-note")
            assert "one evaluation" in note.get_text() and "sign" not in note.get_text()
            assert len(labels(ax.xaxis) + labels(ax.xaxis, minor=True)) >= 2, x
            assert len(labels(ax.yaxis)) >= 2
    fig = drawn(to_target_figure(p))
    for ax in [a for a in fig.axes if a.axison]:
        assert len(labels(ax.xaxis) + labels(ax.xaxis, minor=True)) >= 2


@pytest.mark.parametrize("target", [0.35, 0.6, 0.7])
def test_the_target_and_its_label_are_inside_the_axes(small, target):
    p = plan(group_by_cap(find_runs([small])), target)
    fig = drawn(accuracy_figure(p, "wall"))
    renderer = fig.canvas.get_renderer()
    for ax in [a for a in fig.axes if a.axison]:
        low, high = ax.get_ylim()
        assert low <= 100 * target <= high
        text = next(t for t in ax.texts if t.get_text().startswith("target"))
        box, frame = text.get_window_extent(renderer), ax.get_window_extent(renderer)
        assert frame.y0 <= box.y0 and box.y1 <= frame.y1, (box, frame)
