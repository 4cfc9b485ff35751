"""Shifts in the DDP hook (``OneBitState(shift_rate=...)``) in real gloo processes: on a fixed
gradient per rank the shifts learn it and the averaged gradient becomes exact (DIANA with
onebit at the auto rate, EF21 with sign), every rank holds the same average, and bad settings
raise at construction."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ranks import leave_group
from test_hooks import Dot, _free_port, _targets
from torch.nn.parallel import DistributedDataParallel

from dist_quant.hooks import OneBitState, onebit_hook

pytestmark = pytest.mark.slow

WORLD, N, D, STEPS = 2, 200, 16, 300


def _run(rank: int, kwargs: dict) -> torch.Tensor:
    c = _targets(WORLD, N)[rank]
    ddp = DistributedDataParallel(Dot((N,)))
    ddp.register_comm_hook(OneBitState(seed=3, bucket_size=D, allgather_bits=32, **kwargs),
                           onebit_hook)
    grads = []
    for _ in range(STEPS):
        ddp([c]).backward()
        grads.append(ddp.module.grad().clone())
        ddp.zero_grad(set_to_none=True)
    return torch.stack(grads)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    result = {name: _run(rank, kwargs) for name, kwargs in {
        "diana": {"compressor": "onebit", "shift_rate": "auto"},
        "ef21": {"compressor": "sign", "shift_rate": 1.0},
        "plain": {"compressor": "onebit"}}.items()}
    torch.save(result, f"{out}/rank{rank}.pt")
    leave_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("shift-hook")
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True,
                       start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("name", ["diana", "ef21"])
def test_shifts_make_the_average_exact_on_a_fixed_gradient(ranks, name):
    target = torch.stack(_targets(WORLD, N)).mean(0)
    grads = ranks[0][name]
    assert torch.equal(grads, ranks[1][name])
    first = float((grads[0] - target).norm() / target.norm())
    last = float((grads[-1] - target).norm() / target.norm())
    plain = float((ranks[0]["plain"][-1] - target).norm() / target.norm())
    assert first > 1e-2 and plain > 1e-2   # without shifts the noise stays
    assert last < 1e-4, last


def test_bad_shift_settings_raise_at_construction():
    for kwargs in ({"shift_rate": 1.5}, {"shift_rate": "fast"},
                   {"shift_rate": 0.5, "error_feedback": True}):
        with pytest.raises(ValueError, match="shift_rate"):
            OneBitState(**kwargs)
