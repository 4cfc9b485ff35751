"""A new compressor is its own class plus one registry line: a toy compressor defined here,
registered with :func:`register_compressor`, runs through the parameter server (``--simulate``,
uplink and downlink, with shifts), the DDP hook (sliced on its buckets), the shift machinery
and the plot labels, none of which names it."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ranks import leave_group
from test_hooks import _free_port
from test_train import final, simulated, tiny

from dist_quant.compress import (
    available_compressors,
    get_compressor,
    register_compressor,
    unregister_compressor,
    wire,
)
from dist_quant.compress.base import Compressor, bucket_label, count_nonfinite
from dist_quant.compress.shift import ShiftedServer, ShiftedWorker, omega, resolve_rate
from dist_quant.config import TrainConfig
from dist_quant.errors import NonFiniteGradientError, PayloadError
from dist_quant.hooks import OneBitState, onebit_hook
from dist_quant.plot.labels import method_label

WIRE_ID = 200


class Int8Compressor(Compressor):
    """Absmax int8: per bucket of ``d`` the fp32 scale ``s = max |x_i|`` and
    ``q_i = round(127 x_i / s)``; decodes to ``s q_i / 127``. Deterministic, and
    ``|C(x)_i - x_i| <= s / 254`` gives ``||C(x) - x||^2 <= d / 254^2 ||x||^2``: contractive for
    ``d < 254^2``. Body: ``nb`` fp32 scales, then ``n`` int8 values."""

    name = kind = "int8"
    wire_id = WIRE_ID
    bits = 8
    contractive = True
    slice_aligned = True

    def __init__(self, bucket_size: int = 0):
        self.bucket_size = bucket_size

    @property
    def label(self) -> str:
        return f"int8 {bucket_label(self.bucket_size)}"

    def _body_nbytes(self, n: int) -> int:
        return 4 * self.num_buckets(n) + n

    def _buckets(self, x: torch.Tensor, n: int) -> torch.Tensor:
        nb, d = self.num_buckets(n), self.bucket_size or n
        return torch.nn.functional.pad(x, (0, nb * d - n)).view(nb, d)

    def _encode_body(self, x, body, generator):
        n = x.numel()
        if n == 0:
            return
        count = count_nonfinite(x)
        if count:
            raise NonFiniteGradientError(count, n)
        xb = self._buckets(x.float(), n)
        s = xb.abs().amax(1, keepdim=True)
        q = torch.where(s > 0, torch.round(127 * xb / torch.where(s > 0, s, 1.0)), 0.0)
        nb = self.num_buckets(n)
        body[:4 * nb].view(torch.float32).copy_(s.reshape(-1))
        body[4 * nb:].view(torch.int8).copy_(q.reshape(-1)[:n].to(torch.int8))

    def _decode_body(self, body, n):
        nb = self.num_buckets(n)
        s = wire.view_as(body, 0, nb, torch.float32).unsqueeze(1)
        q = self._buckets(body[4 * nb:4 * nb + n].view(torch.int8).float(), n)
        return (q * s / 127).reshape(-1)[:n]


@pytest.fixture
def int8():
    register_compressor("int8", lambda **o: Int8Compressor(o.get("bucket_size") or 0))
    yield
    unregister_compressor("int8")
    assert "int8" not in available_compressors()


def test_the_registry_builds_it_and_the_wire_knows_its_id(int8):
    comp = get_compressor("int8", bucket_size=4, bits=3, levels=2)  # unused options: ignored
    x = torch.linspace(-1, 2, 10)
    payload = comp.encode(x)
    assert payload.nbytes == comp.payload_nbytes(10) == 32 + 3 * 4 + 10
    assert payload.header.compressor_id == WIRE_ID and "int8" in repr(payload)
    assert torch.allclose(comp.decode(payload), x, atol=2 / 254)
    with pytest.raises(PayloadError, match="encoded by compressor 'int8'"):
        get_compressor("sign").decode(payload)
    with pytest.raises(ValueError, match="taken"):
        register_compressor("int8", lambda **o: Int8Compressor())
    with pytest.raises(ValueError, match="taken by 'int8'"):
        type("Clash", (Compressor,), {"kind": "clash", "wire_id": WIRE_ID})
    # contractive: a downlink may carry its error, and the config accepts it there
    assert comp.feedback_stable and not comp.unbiased and comp.omega(10) is None
    TrainConfig(downlink="int8", compressor="int8").validate()


def test_shifts_take_the_contractive_rate_and_keep_the_ef21_invariant(int8):
    comp = get_compressor("int8", bucket_size=8)
    assert omega(comp, 100) == 0.0 and resolve_rate(None, comp, 100) == 1.0
    grads = [torch.randn(100, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    workers = [ShiftedWorker(comp, None) for _ in grads]
    server = ShiftedServer(comp, None)
    for _ in range(3):
        rows = torch.stack([w.encode(g).to_tensor() for w, g in zip(workers, grads, strict=True)])
        mean, bad = server.aggregate(rows)
        assert not bad
        shifts = torch.stack([w.shift for w in workers])
        assert torch.equal(server.shifts, shifts)
        assert torch.allclose(mean, shifts.mean(0), atol=1e-6)  # EF21: ghat = mean h
    assert server.alpha == 1.0


def test_plot_labels_ask_the_compressor(int8):
    assert method_label({"compressor": "int8", "bucket_size": 4}) == "PS int8 b4"
    assert method_label({"compressor": "int8", "bucket_size": 0, "downlink": "int8",
                         "downlink_bucket_size": 0}) == "PS int8 whole up+down"
    assert method_label({"compressor": "onebit", "bucket_size": 4, "downlink": "int8",
                         "downlink_bucket_size": 8}) == "PS onebit b4 down int8 b8"
    assert method_label({"method": "ddp", "ddp_hook": "onebit", "compressor": "int8",
                         "bucket_size": 16}) == "DDP int8 b16"


def test_the_star_runs_it_up_and_down_with_shifts(int8, tmp_path):
    cfg = tiny(tmp_path, "star", workers=2, steps=4, compressor="int8", bucket_size=5,
               downlink="int8", downlink_bucket_size=7, shift_rate="auto")
    run = simulated(cfg)
    state = final(run)
    uplink = state["server"]["uplink"]
    assert uplink["alpha"] == 1.0 and uplink["shifts"].abs().sum() > 0
    assert torch.isfinite(state["server"]["theta"]).all()
    summary = json.loads((run / "summary.json").read_text())
    n = summary["params"]
    assert summary["payload_nbytes_up"] == Int8Compressor(5).payload_nbytes(n)
    assert summary["payload_nbytes_down"] == Int8Compressor(7).payload_nbytes(n)


# ---- the DDP hook, in two gloo processes (spawned: each registers the toy compressor, with
# the same one line, so no lock of the test process is inherited by a fork) ----------------
WORLD, N, D = 2, 37, 4


def _grads() -> list[torch.Tensor]:
    return [torch.randn(N, generator=torch.Generator().manual_seed(10 + r)) * (r + 1)
            for r in range(WORLD)]


def _hook_rank(rank: int, port: int, out: str) -> None:
    if "int8" not in available_compressors():
        register_compressor("int8", lambda **o: Int8Compressor(o.get("bucket_size") or 0))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    model = torch.nn.Linear(N, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    state = OneBitState(compressor="int8", bucket_size=D, allgather_bits=32, seed=1)
    ddp.register_comm_hook(state, onebit_hook)
    (ddp(_grads()[rank].unsqueeze(0)).sum()).backward()  # d/dw (w . g) = g
    torch.save({"grad": model.weight.grad.reshape(-1).clone(),
                "bounds": state.plan(N, WORLD).bounds}, f"{out}/rank{rank}.pt")
    # both ranks done before either closes its links: a rank that tore its process group down
    # while the other's gloo thread still read from it aborted that one ("terminate called
    # without an active exception", SIGABRT), once in a full suite run
    leave_group()


def test_the_ddp_hook_slices_it_on_its_buckets(int8, tmp_path):
    mp.start_processes(_hook_rank, args=(_free_port(), str(tmp_path)), nprocs=WORLD,
                       join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    bounds = ranks[0]["bounds"]
    assert all(b % D == 0 for b in bounds[:-1]) and bounds[-1] == N
    # slices on bucket boundaries: each slice's decode is the whole tensor's, averaged exactly
    comp = get_compressor("int8", bucket_size=D)
    decoded = [comp.decode(comp.encode(g)) for g in _grads()]
    expected = (torch.zeros(N) + decoded[0] + decoded[1]) / WORLD
    for r in ranks:
        assert torch.equal(r["grad"], expected)
