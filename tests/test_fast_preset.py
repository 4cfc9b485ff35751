"""The ps-fast preset: colocated, with compressed worker momentum and error feedback, at most
2.1 bits per coordinate up (headers included), and it trains (the loss falls) in a short
simulated run."""

from __future__ import annotations

import torch
from test_train import simulated, tiny

from dist_quant.compress import get_compressor
from dist_quant.ps.common import downlink_compressor, uplink_compressor
from dist_quant.runtime.metrics import read_metrics
from dist_quant.sweep import PRESETS, expand_grid

N = 47242  # the default MLP's parameters


def test_ps_fast_sends_at_most_2_1_bits_per_coordinate_up():
    (point,) = expand_grid(["ps-fast"])
    cfg = point.cfg
    assert cfg.colocate and cfg.worker_momentum and cfg.error_feedback
    up = uplink_compressor(cfg, stateful=False)
    assert 8 * up.payload_nbytes(N) / N <= 2.1
    assert 8 * up.payload_nbytes(N // 4) / (N // 4) <= 2.1  # one colocated shard
    down = downlink_compressor(cfg)
    assert 8 * down.payload_nbytes(N) / N < 32 / 4
    assert get_compressor(cfg.compressor).name == "sign"


def test_ps_fast_trains_in_a_short_simulated_run(tmp_path):
    fields = {k: v for k, v in PRESETS["ps-fast"].items() if k != "method"}
    cfg = tiny(tmp_path, "fast", workers=3, steps=30, eval_every=30, lr=0.05, **fields)
    steps = [r for r in read_metrics(simulated(cfg)) if r["kind"] == "step"]
    first = sum(r["loss"] for r in steps[:5]) / 5
    last = sum(r["loss"] for r in steps[-5:]) / 5
    assert last < first - 0.1, (first, last)
    assert all(r["skipped"] == 0 for r in steps)
    assert torch.isfinite(torch.tensor([r["loss"] for r in steps])).all()
