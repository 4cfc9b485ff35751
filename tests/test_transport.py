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


GLOO_CLOSED = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by "
               "peer [127.0.0.1]:3298. This is typically caused by a remote worker crashing. "
               "Check the logs of the remote workers. GLHF!")


@pytest.mark.parametrize("post", ["_isend", "_irecv"])
def test_a_link_found_closed_as_a_message_is_posted_names_the_peer(monkeypatch, post):
    """gloo sends (and posts receives) at once and raises there on a closed link: the error
    names the peer like a failed wait does, and gloo's own words are not what the user reads."""
    from rawtext import raw_escapes

    import dist_quant.core.transport as transport
    from dist_quant.config import TrainConfig
    from dist_quant.runtime.rank import lost_message

    def closed(*args, **kwargs):
        raise RuntimeError(GLOO_CLOSED)

    monkeypatch.setattr(transport.dist, post[1:], closed)
    t = Transport(0, [1, 2], torch.device("cpu"))
    with pytest.raises(PeerLostError) as info:
        getattr(t, post)(torch.zeros(3), 2, 1)
    assert info.value.rank == 2
    line = f"dist_quant rank 0: {lost_message(info.value, TrainConfig())}"
    assert "lost contact with rank 2 (worker 1) while" in line
    assert "Connection closed by peer" in line and "GLHF" not in line and "pair.cc" not in line
    assert raw_escapes(line) == []
    assert raw_escapes(f"dist_quant rank 0: RuntimeError: {GLOO_CLOSED}") != []


def test_a_start_up_collective_that_loses_a_peer_says_so():
    from dist_quant.core.transport import collective
    from dist_quant.train import backend_failure

    said = r"^lost contact with a peer while starting \(Connection closed by peer \[127\.0\.0\.1\]"
    with pytest.raises(PeerLostError, match=said + r":3298\)$"), collective("starting"):
        raise RuntimeError(GLOO_CLOSED)
    line = backend_failure(RuntimeError(GLOO_CLOSED))
    assert line.startswith("the process group failed") and "launch.log" in line
    assert "GLHF" not in line and "pair.cc" not in line
