"""The baselines' sweep presets and plot labels."""

from __future__ import annotations

import pytest

from dist_quant.plot.labels import method_label
from dist_quant.sweep import PRESETS, points_from_options


@pytest.mark.parametrize(("config", "label"), [
    ({"compressor": "qsgd", "bucket_size": 128}, "PS QSGD s4 b128"),
    ({"compressor": "qsgd", "qsgd_levels": 16, "bucket_size": 0}, "PS QSGD s16 whole"),
    ({"compressor": "terngrad", "bucket_size": 512}, "PS TernGrad b512"),
    ({"compressor": "topk", "error_feedback": True}, "PS top-1%+EF"),
    ({"compressor": "randk", "sparsity_ratio": 0.25}, "PS rand-25%"),
    ({"downlink": "topk", "bucket_size": 128, "sparsity_ratio": 0.1},
     "PS onebit b128 down top-10%"),
])
def test_method_label(config, label):
    assert method_label(config) == label


def test_the_baseline_comparison_is_one_sweep_command():
    """The 10 Mbit/s record: every preset a valid point on the namespace cluster."""
    points = points_from_options(["ps-qsgd", "ps-terngrad", "ps-topk-ef", "ps-onebit"],
                                 ["workers=4", "eval_every=25"], "10", None, None, None, True)
    assert [p.cfg.compressor for p in points] == ["qsgd", "terngrad", "topk", "onebit"]
    assert [p.cfg.error_feedback for p in points] == [False, False, True, False]
    assert all(p.runner == "cluster" and p.rate_mbit == 10.0 for p in points)
    assert [p.label for p in points] == ["ps-qsgd", "ps-terngrad", "ps-topk-ef", "ps-onebit"]
    randk = points_from_options(["ps-randk"], ["sparsity_ratio=0.2"], None, None, None, None,
                                False)[0]
    assert randk.cfg.compressor == "randk" and randk.cfg.sparsity_ratio == 0.2
    assert {"ps-qsgd", "ps-terngrad", "ps-topk-ef", "ps-randk"} <= set(PRESETS)
