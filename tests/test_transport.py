"""The transport's pieces that need no process group: blobs, peer names, backend errors.

The point-to-point links run in every distributed test (tests/test_topology.py compares them
with the simulator bit for bit; tests/test_faults.py loses peers for real)."""

from __future__ import annotations

import pytest
import torch

from dist_quant.core.transport import (
    PeerLostError,
    Transport,
    _cause,
    blob_from,
    blob_to,
)


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
