"""The step watchdog: a DDP run whose gradient collective never starts ends every rank, named,
after twice ``--timeout`` (gloo's timeout cannot fire for work that was never queued)."""

from __future__ import annotations

import sys
import textwrap
import threading
import time

import pytest
from ranks import start_ranks

from dist_quant.config import TrainConfig
from dist_quant.runtime.watchdog import StepWatchdog
from dist_quant.train import full_argv


def test_no_beat_within_the_limit_ends_once_naming_the_rank_and_the_step():
    ended: list[tuple[str, str]] = []
    done = threading.Event()

    def end(who: str, message: str) -> None:
        ended.append((who, message))
        done.set()

    with StepWatchdog("rank 3", 0.5, end=end) as watch:
        watch.beat(7)
        assert done.wait(30), "the watchdog never fired"
        time.sleep(0.2)   # it fires once, then its thread ends
    assert len(ended) == 1
    who, message = ended[0]
    assert who == "rank 3"
    assert "step 8 never completed" in message and "twice --timeout is 0.5 s" in message


def test_beats_inside_the_limit_keep_it_quiet():
    ended: list[str] = []
    with StepWatchdog("rank 0", 5.0, end=lambda who, m: ended.append(m)) as watch:
        for step in range(1, 21):
            time.sleep(0.05)
            watch.beat(step)
    assert ended == []


def test_a_limit_that_is_not_positive_is_refused():
    with pytest.raises(ValueError, match="must be positive"):
        StepWatchdog("rank 0", 0.0)


# A real two-rank DDP run whose hook returns a future nobody completes: backward waits for it
# for good, as it did when torch's PowerSGD hook deadlocked gloo's threads.
HANG = textwrap.dedent("""
    import runpy, sys
    import torch
    import dist_quant.baselines.ddp as ddp

    ddp.make_hook = lambda cfg, group=None: (lambda state, bucket: torch.futures.Future(), None)
    sys.argv = ["dist_quant.train", *sys.argv[1:]]
    runpy.run_module("dist_quant.train", run_name="__main__")
""")


@pytest.mark.slow
def test_a_ddp_collective_that_never_starts_ends_every_rank_named(tmp_path):
    timeout = 2.0
    script = tmp_path / "hang.py"
    script.write_text(HANG)
    cfg = TrainConfig(method="ddp", workers=2, hidden="7,5", train_size=120, test_size=30,
                      batch_size=4, steps=50, eval_every=10**6, progress=False,
                      timeout=timeout, run_dir=str(tmp_path / "run"))
    procs = start_ranks([sys.executable, str(script), *full_argv(cfg)], 2)
    try:
        for p in procs:
            p.wait(timeout=180)   # hang detector only: without the watchdog they wait for good
        errors = [p.stderr.read() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [1, 1], errors
    for rank, err in enumerate(errors):
        lines = [x for x in err.splitlines() if x.startswith("dist_quant")]
        assert len(lines) == 1, err
        assert lines[0].startswith(f"dist_quant rank {rank}: no training step finished for "), err
        assert "step 1 never completed; twice --timeout is 4 s" in lines[0], err
