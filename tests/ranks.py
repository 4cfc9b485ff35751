"""Starting the ranks of a job by hand (plain env:// variables, no torchrun agent), so that
what ends them in a fault test is this package's own timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def start_ranks(argv: list[str], world: int) -> list[subprocess.Popen]:
    """``world`` processes of ``argv`` on loopback, rank r with ``RANK=r``; stderr piped."""
    port = str(free_port())
    return [subprocess.Popen(argv, env=env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                           RANK=str(r), LOCAL_RANK=str(r),
                                           WORLD_SIZE=str(world)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for r in range(world)]


def wait_for_lines(procs: list[subprocess.Popen], metrics: Path, lines: int = 3,
                   within: float = 180.0) -> None:
    """Until ``metrics`` holds ``lines`` lines, every rank still running."""
    deadline = time.monotonic() + within
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= lines):
        assert all(p.poll() is None for p in procs), "a rank ended before the fault"
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)


def leave_group() -> None:
    """End a spawned rank's process group: every rank meets at a barrier first, so none tears
    its links down while another still sends (gloo then aborts the late rank with "terminate
    called without an active exception")."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
