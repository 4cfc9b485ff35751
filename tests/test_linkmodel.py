"""The link model's arithmetic, on constructed records (exact figures, worked out by hand)."""

from __future__ import annotations

import json

import pytest

from dist_quant.errors import ConfigError
from dist_quant.linkmodel import (
    Link,
    ack_bytes,
    compare,
    frames,
    predict_comm_seconds,
    predict_wall_seconds,
    predict_wire,
    ps_step_seconds,
    ring_step_seconds,
    wire_bytes,
)

MSS = 1448  # MTU 1500 - IPv4 20 - TCP 20 - timestamps 12


def test_framing_at_mtu_1500_and_9000():
    assert frames(0) == 0 and frames(1) == 1 and frames(MSS) == 1 and frames(MSS + 1) == 2
    assert wire_bytes(MSS) == 1514                    # one full Ethernet frame
    assert wire_bytes(2 * MSS) == 2 * 1514
    assert wire_bytes(10) == 10 + 66
    assert ack_bytes(MSS) == 66 and ack_bytes(2 * MSS) == 66 and ack_bytes(3 * MSS) == 132
    assert frames(8948, mtu=9000) == 1 and wire_bytes(8949, mtu=9000) == 8949 + 132
    assert Link(10, mtu=1500).mss == MSS


def test_parameter_server_step_goes_through_the_server_link_twice():
    link = Link(rate_mbit=8, latency_ms=5)            # 1e6 bytes/s, L = 5 ms
    # 4 workers, each 1 frame up (1448 B) and 2 frames down (2896 B)
    t = ps_step_seconds(4 * MSS, 4 * 2 * MSS, 4, link)
    assert t == pytest.approx(2 * 0.005 + 4 * (1514 + 2 * 1514) / 1e6, rel=1e-12)
    assert ps_step_seconds(4 * MSS, 4 * 2 * MSS, 4, Link(None, 5)) == pytest.approx(0.01)
    assert ps_step_seconds(4 * MSS, 4 * 2 * MSS, 4, Link(None, 0)) == 0.0


def test_ring_allreduce_step():
    link = Link(rate_mbit=8, latency_ms=2)
    w = 4
    total = 2 * (w - 1) * w * MSS            # every rank sends a 1448-byte chunk per round
    assert ring_step_seconds(total, w, link) == pytest.approx(6 * (0.002 + 1514 / 1e6),
                                                              rel=1e-12)
    # two allreduces per step of half the size: twice the rounds, half-size chunks
    assert ring_step_seconds(total, w, link, allreduces=2) == pytest.approx(
        12 * (0.002 + (724 + 66) / 1e6), rel=1e-12)
    assert ring_step_seconds(total, 1, link) == 0.0


def _steps(n, up, down):
    return [{"kind": "step", "step": t, "bytes_up": up, "bytes_down": down,
             "cum_bytes_up": up * t, "cum_bytes_down": down * t} for t in range(1, n + 1)]


def test_wall_prediction_is_baseline_plus_link_time():
    steps = _steps(10, 2 * MSS, 2 * 2 * MSS)       # W = 2
    link = Link(rate_mbit=8, latency_ms=1)
    per_step = 2 * 0.001 + 2 * (1514 + 3028) / 1e6
    assert predict_comm_seconds(steps, "ps", 2, link) == pytest.approx(10 * per_step)
    assert predict_wall_seconds(3.0, steps, "ps", 2, link) == pytest.approx(3.0 + 10 * per_step)
    # a baseline measured with latency already holds that latency's time
    base = Link(None, 1)
    assert predict_wall_seconds(3.0, steps, "ps", 2, link, base) == pytest.approx(
        3.0 + 10 * 2 * (1514 + 3028) / 1e6)


def test_predicted_wire_bytes_per_direction():
    steps = _steps(3, 2 * MSS, 2 * 3 * MSS)        # W = 2: 1 frame up, 3 frames down each
    p = predict_wire(steps, "ps", 2)
    assert p["data_bytes_up"] == 3 * 2 * 1514 and p["data_bytes_down"] == 3 * 2 * 3 * 1514
    assert p["ack_bytes_up"] == 3 * 2 * 132          # ceil(3 / 2) ACKs for each downlink
    assert p["ack_bytes_down"] == 3 * 2 * 66
    assert p["wire_bytes_up"] == p["data_bytes_up"] + p["ack_bytes_up"]
    # ddp: all sends together, split evenly between the two directions
    w = 3
    total = 2 * (w - 1) * w * MSS
    d = predict_wire([{"bytes_up": total // 2, "bytes_down": total - total // 2}], "ddp", w)
    sends = w * 2 * (w - 1)
    assert d["data_bytes_up"] + d["data_bytes_down"] == sends * 1514
    assert d["ack_bytes_up"] + d["ack_bytes_down"] == sends * 66


def _write_run(path, *, method, workers, steps, wall, link=None, wire=None):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"config": {"method": method,
                                                             "workers": workers}}))
    (path / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    (path / "summary.json").write_text(json.dumps({"wall_seconds": wall, "workers": workers}))
    if link is not None:
        (path / "link.json").write_text(json.dumps(link))
    if wire is not None:
        (path / "wire.json").write_text(json.dumps(wire))


def test_compare_reports_the_distance_from_a_measurement(tmp_path):
    steps = _steps(10, 2 * MSS, 2 * 2 * MSS)
    steady = {"from_step": 2, "to_step": 6, "wire_bytes_up": 40000, "ack_bytes_up": 1000,
              "wire_bytes_down": 70000, "ack_bytes_down": 500}
    _write_run(tmp_path / "capped", method="ps", workers=2, steps=steps, wall=5.0,
               link={"rate_mbit": 8, "latency_ms": 1, "loss_pct": 0, "hosts": 3},
               wire={"wire_bytes_up": 1, "wire_bytes_down": 1, "steady": steady})
    _write_run(tmp_path / "base", method="ps", workers=2, steps=steps, wall=3.0,
               link={"rate_mbit": None, "latency_ms": 0, "loss_pct": 0, "hosts": 3})
    out = compare(tmp_path / "capped", tmp_path / "base")
    predicted = 3.0 + 10 * (2 * 0.001 + 2 * (1514 + 3028) / 1e6)
    assert out["predicted_wall_s"] == pytest.approx(predicted)
    assert out["measured_wall_s"] == 5.0 and out["baseline_wall_s"] == 3.0
    assert out["measured_link_s"] == pytest.approx(2.0)
    assert out["error_s"] == pytest.approx(predicted - 5.0)
    assert out["relative_error"] == pytest.approx((predicted - 5.0) / 5.0)
    s = out["steady"]
    assert s["steps"] == 4                                  # steps 3..6
    assert s["predicted_data_bytes_up"] == 4 * 2 * 1514
    assert s["measured_data_bytes_up"] == 39000 and s["measured_ack_bytes_down"] == 500


@pytest.mark.parametrize("kwargs, option", [
    ({"rate_mbit": 0}, "--rate"), ({"rate_mbit": -1}, "--rate"),
    ({"latency_ms": -0.5}, "--latency"), ({"loss_pct": 100}, "--loss"),
    ({"mtu": 100}, "--mtu"),
])
def test_bad_links_name_the_option(kwargs, option):
    with pytest.raises(ConfigError) as err:
        Link(**kwargs).validate()
    assert err.value.option == option
