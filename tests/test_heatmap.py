"""Where compression pays: break-even links computed by hand, and the heat map of retime."""

from __future__ import annotations

import math

import pytest

from dist_quant.analysis.heatmap import break_even, break_even_text, cells, heatmap_figure


def row(method, w, rate, x, speed=1.0, seed=0):
    return {"method": method, "workers": w, "rate_mbit": rate, "host_speed": speed,
            "seed": seed, "x_ddp_fp32": x, "ddp_fp32": method == "ddp-fp32"}


def grid(xs, method="ps-fast", w=4, speed=1.0, rates=(1.0, 10.0, 100.0, None)):
    return [row(method, w, r, x, speed) for r, x in zip(rates, xs, strict=True)]


def test_break_even_between_two_rates():
    """x = 4 at 1, 2 at 10, 0.5 at 100 Mbit/s: log 2 / (log 2 + log 2) = 1/2 of the decade
    from 10 to 100: sqrt(1000) Mbit/s."""
    got = break_even(grid([4.0, 2.0, 0.5, 0.25]) + [row("ddp-fp32", 4, 10.0, 1.0)])
    assert len(got) == 1 and got[0]["where"] == "between"
    assert got[0]["break_even_mbit"] == pytest.approx(math.sqrt(1000))
    assert "Mbit/s" in break_even_text(got)


def test_break_even_above_below_unknown():
    got = {r["method"]: r for r in break_even(
        grid([3.0, 2.0, 1.5, 1.2], "a") + grid([0.9, 0.5, 0.4, 0.4], "b")
        + grid([3.0, 2.0, 1.5, 0.9], "c") + grid([3.0, None, 1.0, 1.0], "d"))}
    assert (got["a"]["where"], got["a"]["break_even_mbit"]) == ("above", 100.0)
    assert (got["b"]["where"], got["b"]["break_even_mbit"]) == ("below", 1.0)
    # the fall onto the uncapped column: no rate to interpolate to
    assert (got["c"]["where"], got["c"]["break_even_mbit"]) == ("above", 100.0)
    assert got["d"]["where"] == "unknown"


def test_cells_take_the_geometric_mean_over_seeds():
    rows = [row("m", 8, 10.0, 2.0, seed=0), row("m", 8, 10.0, 8.0, seed=1),
            row("m", 8, 10.0, None, seed=2)]
    assert cells(rows)[1.0, "m", 8, 10.0] == pytest.approx(4.0)


def test_heatmap_figure_one_row_per_host_speed():
    pytest.importorskip("matplotlib")
    rows = [r for speed in (1.0, 50.0) for w in (4, 8) for m in ("ps-fast", "ddp-powersgd")
            for r in grid([4.0, 2.0, 0.5, None], m, w, speed)]
    fig = heatmap_figure(rows)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 4
    assert {ax.get_title() for ax in panels} == {
        f"{m}, hosts {s:g}x" for m in ("ps-fast", "ddp-powersgd") for s in (1, 50)}
    labels = [t.get_text() for t in panels[0].get_xticklabels()]
    assert labels == ["1 Mbit/s", "10 Mbit/s", "100 Mbit/s", "uncapped"]
    texts = [t.get_text() for t in panels[0].texts]
    assert texts.count("4x") == 2 and texts.count("n/a") == 2
    with pytest.raises(ValueError, match="other than DDP fp32"):
        heatmap_figure([row("ddp-fp32", 4, 10.0, 1.0)])

