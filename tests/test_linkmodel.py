"""The link model's arithmetic, on constructed records (exact figures, worked out by hand)."""

from __future__ import annotations

import json

import pytest

from dist_quant.analysis.linkmodel import (
    Link,
    Topology,
    ack_bytes,
    busiest_link,
    compare,
    frames,
    link_loads,
    predict_comm_seconds,
    predict_wall_seconds,
    predict_wire,
    ps_step_seconds,
    read_run,
    ring_step_seconds,
    step_messages,
    step_seconds,
    topology_of,
    wire_bytes,
)
from dist_quant.errors import ConfigError

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


# ---- sharded, colocated and the DDP onebit hook: per-link bytes against the formula ---------
def _shard_step(ups, downs, remote, stats=0):
    """A step record whose server s received ``remote`` payloads of ``ups[s]`` bytes."""
    return {"kind": "step", "step": 1, "bytes_up": remote * sum(ups) + stats,
            "bytes_down": remote * sum(downs), "bytes_stats": stats,
            "servers": [{"bytes_up": remote * u, "bytes_down": remote * d, "skipped": 0}
                        for u, d in zip(ups, downs, strict=True)]}


def _totals(loads):
    out = {}
    for links in loads.values():
        for k, io in links.items():
            tot = out.setdefault(k, {"in": 0.0, "out": 0.0})
            tot["in"] += io["in"]
            tot["out"] += io["out"]
    return out


def test_star_with_server_records_equals_the_star_formula():
    link = Link(rate_mbit=8, latency_ms=5)
    w, u, d = 4, MSS, 2 * MSS
    step = _shard_step([u], [d], w)
    topo = Topology("star", w)
    assert step_seconds(step, "ps", w, link, topology=topo) == pytest.approx(
        ps_step_seconds(w * u, w * d, w, link), rel=1e-12)
    assert _totals(link_loads(step_messages(step, topo)))["server0"] == {"in": w * u,
                                                                         "out": w * d}


def test_sharded_link_bytes_and_time_follow_the_formula():
    w, ups, downs = 4, [3000, 1000], [500, 200]
    step = _shard_step(ups, downs, w)
    topo = Topology("sharded", w, servers=2)
    totals = _totals(link_loads(step_messages(step, topo)))
    for s in range(2):
        assert totals[f"server{s}"] == {"in": w * ups[s], "out": w * downs[s]}
    for i in range(w):
        assert totals[f"worker{i}"] == {"in": sum(downs), "out": sum(ups)}
    link = Link(rate_mbit=8, latency_ms=1)        # 1e6 bytes/s
    # up: server 0 receives W framed 3000-byte payloads; down: server 0 sends W 500-byte ones
    expected = 2 * 0.001 + (w * wire_bytes(3000) + w * wire_bytes(500)) / 1e6
    assert step_seconds(step, "ps", w, link, topology=topo) == pytest.approx(expected, rel=1e-12)
    # the busiest link is server 0's, not the star's single link carrying both shards
    assert busiest_link(link_loads(step_messages(step, topo))) == {
        "up": ("server0", "in"), "down": ("server0", "out")}


def test_colocated_link_bytes_and_time_follow_the_formula_with_unequal_shards():
    w, ups, downs = 3, [100, 200, 300], [10, 20, 30]
    step = _shard_step(ups, downs, w - 1)
    topo = Topology("colocated", w, servers=w)
    totals = _totals(link_loads(step_messages(step, topo)))
    for i in range(w):
        others = [j for j in range(w) if j != i]
        assert totals[f"rank{i}"] == {
            "in": (w - 1) * ups[i] + sum(downs[j] for j in others),
            "out": sum(ups[j] for j in others) + (w - 1) * downs[i]}
    link = Link(rate_mbit=8, latency_ms=1)
    # up: rank 2 receives 2 x 300 (framed 366 each) = 732 > rank 0 sends 266 + 366 = 632;
    # down: rank 2 sends 2 x 30 (framed 96) = 192 > rank 0 receives 86 + 96 = 182
    assert step_seconds(step, "ps", w, link, topology=topo) == pytest.approx(
        2 * 0.001 + (732 + 192) / 1e6, rel=1e-12)


def test_colocated_beats_the_star_by_w_squared_over_w_minus_1_at_equal_payloads():
    w = 8
    u = w * 10 * MSS   # whole frames for the star's payload and for each colocated shard
    link = Link(rate_mbit=10)
    star = step_seconds(_shard_step([u], [u], w), "ps", w, link, topology=Topology("star", w))
    coloc = step_seconds(_shard_step([u / w] * w, [u / w] * w, w - 1), "ps", w, link,
                         topology=Topology("colocated", w, w))
    # star: W payloads through one link per phase; colocated: (W - 1) / W payloads per link
    assert star / coloc == pytest.approx(w * w / (w - 1), rel=1e-12)


def test_evaluation_statistics_go_to_the_leader_in_the_up_phase():
    step = _shard_step([1000, 1000], [100, 100], 1, stats=64)   # colocated, W = 2
    loads = link_loads(step_messages(step, Topology("colocated", 2, 2)))
    assert loads["up"]["rank0"]["in"] == 1000 + 64 and loads["up"]["rank1"]["out"] == 1064


def test_the_onebit_hook_uses_its_slice_plan_and_evaluation_stats():
    from dist_quant.hooks import OneBitState

    w, n = 3, 1000
    plan = OneBitState(compressor="onebit", bucket_size=128).plan(n, w)
    config = {"method": "ddp", "ddp_hook": "onebit", "compressor": "onebit",
              "bucket_size": 128, "workers": w}
    topo = topology_of(config, {"params": n, "workers": w})
    assert topo.kind == "hook" and topo.hook_up == plan.up_nbytes
    step = {"bytes_up": (w - 1) * sum(plan.up_nbytes) + 40,
            "bytes_down": (w - 1) * sum(plan.down_nbytes)}
    totals = _totals(link_loads(step_messages(step, topo)))
    for i in range(w):
        others = [j for j in range(w) if j != i]
        assert totals[f"rank{i}"]["in"] == pytest.approx(
            (w - 1) * plan.up_nbytes[i] + sum(plan.down_nbytes[j] for j in others)
            + (40 if i == 0 else 0))
        assert totals[f"rank{i}"]["out"] == pytest.approx(
            sum(plan.up_nbytes[j] for j in others) + (w - 1) * plan.down_nbytes[i]
            + (20 if i else 0))


@pytest.mark.parametrize(("config", "kind", "servers"), [
    ({"method": "ps", "servers": 1, "colocate": False}, "star", 1),
    ({"method": "ps", "servers": 2, "colocate": False}, "sharded", 2),
    ({"method": "ps", "servers": 1, "colocate": True}, "colocated", 4),
    ({"method": "ddp", "ddp_hook": "fp16"}, "ring", 1),
])
def test_topology_of_a_config(config, kind, servers):
    topo = topology_of({**config, "workers": 4})
    assert (topo.kind, topo.servers) == (kind, servers)


@pytest.mark.parametrize("topology", ["sharded", "colocated"])
def test_recorded_steps_of_a_real_run_give_the_formulas_link_bytes(tmp_path, topology):
    """A --simulate run (W = 3, odd: unequal shards) records per-server bytes from which the
    model rebuilds every link's bytes exactly as the formula gives them from the shard sizes
    and the compressors' payload sizes."""
    from dist_quant.compress import get_compressor
    from dist_quant.config import TrainConfig
    from dist_quant.train import run_in_process

    cfg = TrainConfig(hidden="7,5", train_size=120, test_size=30, batch_size=4, eval_every=3,
                      steps=3, progress=False, bucket_size=5, lr=0.05, workers=3,
                      compressor="onebit", downlink="sign", downlink_bucket_size=10,
                      servers=2 if topology == "sharded" else 1,
                      colocate=topology == "colocated", simulate=True,
                      run_dir=str(tmp_path / "run")).validate()
    assert run_in_process(cfg) == 0
    config, steps, summary = read_run(tmp_path / "run")
    topo = topology_of(config, summary)
    assert topo.kind == topology
    up, down = get_compressor("onebit", bucket_size=5), get_compressor("sign", bucket_size=10)
    n = summary["shard_sizes"]
    ups, downs = [up.payload_nbytes(k) for k in n], [down.payload_nbytes(k) for k in n]
    w = 3
    for step in steps:
        totals = _totals(link_loads(step_messages(step, topo)))
        stats = step.get("bytes_stats", 0)
        if topology == "sharded":
            for s in range(2):
                assert totals[f"server{s}"] == {"in": w * ups[s] + (stats if s == 0 else 0),
                                                "out": w * downs[s]}
            for i in range(w):
                assert totals[f"worker{i}"] == {"in": sum(downs),
                                                "out": sum(ups) + stats / w}
        else:
            for i in range(w):
                others = [j for j in range(w) if j != i]
                assert totals[f"rank{i}"] == {
                    "in": (w - 1) * ups[i] + sum(downs[j] for j in others)
                    + (stats if i == 0 else 0),
                    "out": sum(ups[j] for j in others) + (w - 1) * downs[i]
                    + (stats / (w - 1) if i else 0)}
    assert any(s.get("bytes_stats") for s in steps)   # the evaluation step was checked too


def test_predicted_wire_of_colocated_and_sharded_steps():
    w, ups, downs = 3, [100, 200, 300], [10, 20, 30]
    step = _shard_step(ups, downs, w - 1)
    pred = predict_wire([step], "ps", w, topology=Topology("colocated", w, w))
    data = (w - 1) * sum(wire_bytes(m) for m in ups + downs)   # 12 messages of one frame
    assert pred["data_bytes_up"] + pred["data_bytes_down"] == data
    assert pred["data_bytes_up"] == data // 2 and pred["ack_bytes_up"] == 12 * 66 // 2
    step = _shard_step([3000, 1000], [500, 200], 4)
    pred = predict_wire([step], "ps", 4, topology=Topology("sharded", 4, 2))
    assert pred["data_bytes_up"] == 4 * (wire_bytes(3000) + wire_bytes(1000))
    assert pred["data_bytes_down"] == 4 * (wire_bytes(500) + wire_bytes(200))
    assert pred["ack_bytes_down"] == 4 * (ack_bytes(3000) + ack_bytes(1000))
