"""Shifts and worker momentum in the parameter-server job: a torchrun job equals --simulate bit
for bit (the shifts of every worker and the server's copies included), a resumed run equals the
uninterrupted one, the colocated servers carry their copies in checkpoints, and worker momentum
without compression is the server-momentum run up to float rounding."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_train import assert_same_state, distributed, final, simulated, tiny

from dist_quant.train import run_in_process

pytestmark = pytest.mark.slow


def _resume_from(run, cfg, step: int, tmp_path):
    copy = tmp_path / f"resumed-{run.name}"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "latest").write_text(f"step_{step}.pt\n")
    assert run_in_process(cfg.replace(simulate=True, run_dir=str(copy), resume=str(copy))) == 0
    return copy


def test_shifted_onebit_distributed_equals_simulate_and_resumes(tmp_path):
    cfg = tiny(tmp_path, "dist", workers=2, steps=6, checkpoint_every=3, shift_rate="auto",
               worker_momentum=True, compressor="onebit")
    sim_run = simulated(cfg.replace(run_dir=str(tmp_path / "sim")))
    dist_run = distributed(cfg)
    a, b = final(dist_run), final(sim_run)
    assert_same_state(a, b)
    assert torch.equal(a["server"]["uplink"]["shifts"], b["server"]["uplink"]["shifts"])
    # the server's copies are the workers' shifts, and they have moved
    shifts = b["server"]["uplink"]["shifts"]
    for i, w in enumerate(b["workers"]):
        assert torch.equal(w["compressor"]["inner"]["shift"], shifts[i])
        assert w["compressor"]["momentum_buffer"].abs().sum() > 0
    assert shifts.abs().sum() > 0
    assert b["server"]["uplink"]["alpha"] == pytest.approx(1 / (1 + 5 / 2))
    resumed = _resume_from(sim_run, cfg, 3, tmp_path)
    c = final(resumed)
    assert_same_state(c, b)
    assert torch.equal(c["server"]["uplink"]["shifts"], shifts)


def test_colocated_ef21_resume_equals_uninterrupted(tmp_path):
    cfg = tiny(tmp_path, "colo", workers=3, steps=6, checkpoint_every=3, colocate=True,
               compressor="sign", shift_rate="1")
    run = simulated(cfg)
    b = final(run)
    shards = [b["server"], *b["shards"]]
    assert len(shards) == 3 and all(s["uplink"]["shifts"].abs().sum() > 0 for s in shards)
    c = final(_resume_from(run, cfg, 3, tmp_path))
    assert_same_state(c, b)
    for s, t in zip(shards, [c["server"], *c["shards"]], strict=True):
        assert torch.equal(s["uplink"]["shifts"], t["uplink"]["shifts"])


def test_worker_momentum_without_compression_is_server_momentum(tmp_path):
    """Momentum is linear: mean_i m_i follows the server's buffer, so the parameters agree up
    to the rounding of sums taken in another order."""
    base = tiny(tmp_path, "plain", workers=3, steps=8, compressor="none", lr=0.05)
    a = final(simulated(base))
    b = final(simulated(base.replace(run_dir=str(tmp_path / "wm"), worker_momentum=True)))
    for key, value in a["server"]["model"].items():
        assert torch.allclose(value.float(), b["server"]["model"][key].float(),
                              rtol=1e-4, atol=1e-6), key
    # the tolerance tells momentum from none: the run without any momentum is far outside it
    c = final(simulated(base.replace(run_dir=str(tmp_path / "none"), momentum=0.0)))
    assert not all(torch.allclose(v.float(), c["server"]["model"][k].float(), rtol=1e-4,
                                  atol=1e-6) for k, v in a["server"]["model"].items())
    assert b["server"]["optimizer"]["param_groups"][0]["momentum"] == 0.0
    assert a["server"]["optimizer"]["param_groups"][0]["momentum"] == base.momentum
