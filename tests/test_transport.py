"""The transport over real gloo point-to-point links (three forked ranks on loopback)."""

from __future__ import annotations

import multiprocessing as mp
import socket

import pytest
import torch
import torch.distributed as dist

from dist_quant.transport import (
    TAG_DOWN,
    TAG_PAYLOAD,
    PeerLostError,
    Transport,
    _cause,
    blob_from,
    blob_to,
)


def _rank(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=3)
    t = Transport(server_rank=2, worker_ranks=[0, 1], device=torch.device("cpu"))
    if rank == 2:
        up = t.recv_from_workers(5, torch.uint8, TAG_PAYLOAD, "payload", counted=True)
        t.send_to_workers(torch.arange(7, dtype=torch.uint8), TAG_DOWN, "down", counted=True)
        blobs = t.recv_blobs("state")
        result = ("server", up.tolist(), t.bytes_up, t.bytes_down, blobs)
    else:
        t.send_to_server(torch.full((5,), 10 + rank, dtype=torch.uint8), TAG_PAYLOAD,
                         "payload", counted=True)
        down = t.recv_from_server(7, torch.uint8, TAG_DOWN, "down", counted=True)
        t.send_blob({"worker": rank, "x": torch.ones(rank + 1)}, "state")
        result = ("worker", rank, down.tolist(), t.bytes_up, t.bytes_down)
    dist.destroy_process_group()
    torch.save(result, f"{out}/{rank}.pt")


def test_point_to_point_exchange_and_byte_counts(tmp_path):
    """The server is rank 2 here (roles need not follow rank order); rows follow worker
    order; each side counts the bytes of the counted tensors it handled."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(r, port, str(tmp_path))) for r in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(3)]
    server = next(r for r in results if r[0] == "server")
    assert server[1] == [[10] * 5, [11] * 5]
    assert server[2] == 2 * 5 and server[3] == 2 * 7
    assert [b["worker"] for b in server[4]] == [0, 1]
    assert torch.equal(server[4][1]["x"], torch.ones(2))
    for r in results:
        if r[0] == "worker":
            assert r[2] == list(range(7)) and r[3] == 5 and r[4] == 7


def test_blob_round_trip_is_weights_only():
    state = {"a": torch.arange(5), "g": torch.Generator().manual_seed(3).get_state(),
             "pos": {"epoch": 2, "position": 8}, "none": None}
    back = blob_to(blob_from(state))
    assert torch.equal(back["a"], state["a"]) and torch.equal(back["g"], state["g"])
    assert back["pos"] == state["pos"] and back["none"] is None

    class Custom:
        pass

    with pytest.raises(Exception, match="weights_only|Unsupported|global"):
        blob_to(blob_from({"x": Custom()}))


def test_describe_and_cause():
    t = Transport(0, [3, 1], torch.device("cpu"))
    assert t.describe(0) == "rank 0 (the server)" and t.describe(1) == "rank 1 (worker 1)"
    err = RuntimeError("[/src/gloo/unbound_buffer.cc:78] Timed out waiting 4000ms\nmore")
    assert _cause(err) == "Timed out waiting 4000ms"
    assert issubclass(PeerLostError, RuntimeError)
