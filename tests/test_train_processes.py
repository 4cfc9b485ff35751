"""Process-level behaviour: a dead or hung peer, two torchrun agents, roles from the environment.

The fault test starts the ranks itself (plain env:// variables, no torchrun, whose agent would
tear the group down on its own) so that what ends the survivors is this package's timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ranks import env, free_port, start_ranks, wait_for_lines

from dist_quant.config import TrainConfig
from dist_quant.runtime.checkpoint import latest_checkpoint, load_checkpoint
from dist_quant.train import full_argv, run_in_process

pytestmark = pytest.mark.slow

TIMEOUT = 5.0
TINY = dict(hidden="7,5", train_size=120, test_size=30, batch_size=4, eval_every=3,
            progress=False, bucket_size=5)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_dead_or_hung_peer_ends_the_run_within_the_timeout(tmp_path, sig):
    """Worker 1 (rank 2) is killed or stopped mid-run: the server and worker 0 end by
    themselves within --timeout + 5 s of the fault (measured), and both name rank 2."""
    cfg = TrainConfig(**{**TINY, "eval_every": 10**6}, workers=2, steps=10**6, timeout=TIMEOUT,
                      run_dir=str(tmp_path / "run"))
    argv = [sys.executable, "-m", "dist_quant.train", *full_argv(cfg)]
    procs = start_ranks(argv, 3)
    try:
        wait_for_lines(procs, tmp_path / "run" / "metrics.jsonl")
        os.kill(procs[2].pid, sig)  # worker 1
        t0 = time.monotonic()
        ended = []
        for p in procs[:2]:
            p.wait(timeout=TIMEOUT + 60)   # hang detector only; the bound is asserted below
            ended.append(time.monotonic() - t0)
        errors = [p.stderr.read() for p in procs[:2]]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert max(ended) <= TIMEOUT + 5, ended
    assert [p.returncode for p in procs[:2]] == [1, 1]
    for err in errors:   # one line each, naming the peer and the timeout
        assert len(err.strip().splitlines()) == 1 and "--timeout 5 s" in err, err
    assert "lost contact with rank 2 (worker 1)" in errors[0]
    if sig == signal.SIGSTOP:
        # the server waited for the timeout; the healthy worker waited longer for the server,
        # so it blames the hung worker as the server reported it, not the server
        assert ended[0] >= TIMEOUT - 0.5
        assert "rank 2 (worker 1) stopped answering (reported by rank 0 (the server))" \
            in errors[1]
    else:
        # a dead worker is seen at once; the healthy worker may be mid-send when the server
        # leaves, then the server is the peer it lost
        assert "rank 2 (worker 1)" in errors[1] or "rank 0 (the server)" in errors[1]


def test_two_torchrun_agents_with_roles_from_the_environment(tmp_path):
    """Multi-node on loopback: agent A runs three workers, agent B the server (c10d
    rendezvous assigns ranks in any order; DIST_QUANT_ROLE picks the server). The result equals
    the single-process reference."""
    cfg = TrainConfig(**TINY, workers=3, steps=5, timeout=60.0, run_dir=str(tmp_path / "mn"))
    port = free_port()
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--rdzv-backend",
             "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "mn"]
    job = ["-m", "dist_quant.train", *full_argv(cfg)]
    procs = [subprocess.Popen([*agent, "--nproc-per-node", "3", *job],
                              env=env(DIST_QUANT_ROLE="worker")),
             subprocess.Popen([*agent, "--nproc-per-node", "1", *job],
                              env=env(DIST_QUANT_ROLE="server"))]
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0]
    sim = cfg.replace(run_dir=str(tmp_path / "sim"), simulate=True)
    assert run_in_process(sim) == 0
    a = load_checkpoint(latest_checkpoint(cfg.run_dir))
    b = load_checkpoint(latest_checkpoint(sim.run_dir))
    for key, value in a["server"]["model"].items():
        assert torch.equal(value, b["server"]["model"][key]), key
    assert all(torch.equal(x["generator"], y["generator"])
               for x, y in zip(a["workers"], b["workers"], strict=True))
    assert Path(cfg.run_dir, "summary.json").is_file()
