"""A model of communication time and wire bytes from the bytes a run recorded.

For machines where the namespace cluster cannot run (no root): predict what a link would do to
a run, and measure how far that prediction is from a namespace measurement where one exists.

Link. Every host has one full-duplex link of rate ``R`` bytes/s each way (``rate_mbit * 1e6 /
8``) to a switch; ``L`` is the one-way latency between two hosts (``latency_ms / 1000``). A
message crosses the sender's link and the receiver's link; at equal rates it is paced at ``R``.

Framing (TCP over IPv4 over Ethernet, TCP timestamps on, as Linux sends). The maximum segment
is ``MSS = MTU - 52`` (IPv4 20 + TCP 20 + timestamps 12) and every frame carries ``H = 66``
bytes of headers (Ethernet 14 + 52)::

    frames(m)   = ceil(m / MSS)
    wire(m)     = m + H * frames(m)                  bytes on the link for an m-byte message
    acks(m)     = H * ceil(frames(m) / 2)            bytes of ACKs going back (one per 2 frames)

so ``wire(m) / m -> MTU+14 / MTU-52`` (1.0456 at MTU 1500, 1.0074 at 9000) for large m.

Exchanges through servers: messages and links. A step of the parameter-server job (and of the
DDP ``onebit`` hook) is a list of messages ``(sender, receiver, m bytes, phase)`` in two
phases, ``up`` then ``down``. With ``up(n)`` / ``down(n)`` the payload bytes of ``n``
coordinates, ``n_s`` the coordinates of shard s and W workers, the payload bytes each link
carries per step (in = received, out = sent) are::

    star        server link   in W up(n)                  out W down(n)
    sharded     server s      in W up(n_s)                out W down(n_s)
                worker link   in sum_s down(n_s)          out sum_s up(n_s)
    colocated   rank i        in (W-1) up(n_i) + sum_{j!=i} down(n_j)
                              out sum_{j!=i} up(n_j) + (W-1) down(n_i)

(the DDP ``onebit`` hook is the colocated exchange on each gradient bucket, its slices those of
:meth:`dist_quant.hooks.OneBitState.plan`). The payload sizes come from the run's step records:
``servers[s].bytes_up / r_s`` with ``r_s`` the workers on another rank than server s (W, or W - 1
colocated); at evaluation steps every remote worker also sends ``bytes_stats / r_0`` to the
leader in the up phase.

Time of one step. Assumptions: every link is full duplex (in and out are independent, each at
``R``); the two phases are serial (the step's control message separates them: the downlink
cannot start before the servers have stepped), and within a phase every message starts at
once, so the phase lasts one latency plus the time its busiest link direction needs::

    t_phase = L + max over links k, directions d of  sum_{messages on (k, d)} wire(m) / R
    t_step  = t_up + t_down                           (a phase without a message takes 0)

For the star this is ``2 L + W wire(u) / R + W wire(d) / R`` (the server's link, in then out);
sharded, ``W max_s wire(u_s)`` (the largest shard's server) as long as the workers' links
carry less; colocated, about ``2 (W-1)/W`` payloads each way per link instead of W.
The overlap of the uplink with backward (``--overlap``) is not modelled: the prediction is the
communication a step would take with nothing hidden.

Allreduce baselines (DDP, gloo ring): with ``S`` the bytes all ranks sent in a step
(``U + D`` as ``metrics.jsonl`` records them), each of ``2 (W - 1)`` rounds has every rank send
a chunk ``c = S / (2 W (W - 1))`` to its neighbour, all links busy at once::

    t_step = A * 2 (W - 1) * (L + wire(c / A) / R)              (A allreduces per step)

Wall time. A run's wall time is its compute time plus its communication time; the compute
time is taken from a measured run of the same config on an uncapped, zero-latency link (whose
own, fast, communication counts as compute), so::

    predicted_wall(link) = wall(baseline) + sum_t t_step(link) - sum_t t_step(baseline link)

Not modelled: TCP slow start after idle periods (matters only when ``L`` is large), queueing
drops and retransmissions when W workers send into a server's link at once, loss, the small
telemetry and control messages, and the overlap of computation with communication
(``--overlap``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dist_quant.runtime.links import (  # noqa: F401 (the link model's public names)
    ETH_HEADER,
    FRAME_HEADER,
    IP_TCP_HEADER,
    TOPOLOGIES,
    Link,
    Message,
    Topology,
    ack_bytes,
    busiest_link,
    default_topology,
    exchange_step_seconds,
    frames,
    link_loads,
    ps_step_seconds,
    ring_step_seconds,
    step_messages,
    step_seconds,
    wire_bytes,
)
from dist_quant.runtime.metrics import read_metrics, read_summary


def topology_of(config: dict[str, Any], summary: dict[str, Any] | None = None) -> Topology:
    """The topology of a run from its ``config.json`` config (and ``summary.json``)."""
    summary = summary or {}
    workers = int(summary.get("workers", config["workers"]))
    if config["method"] == "ddp":
        if config.get("ddp_hook") != "onebit":
            return Topology("ring", workers)
        return Topology("hook", workers, workers, *_hook_plan(config, summary, workers))
    if config.get("colocate"):
        return Topology("colocated", workers, workers)
    servers = int(config.get("servers", 1))
    return Topology("star" if servers == 1 else "sharded", workers, servers)


def _hook_plan(config: dict[str, Any], summary: dict[str, Any],
               workers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if "params" not in summary:
        return (), ()
    # torch comes with the hook: only for a DDP onebit run, so reading other runs stays light
    from dist_quant.baselines.hooks import OneBitState

    state = OneBitState(compressor=config.get("compressor", "onebit"),
                        bucket_size=config.get("bucket_size", 128),
                        bits=config.get("bits", 2),
                        header_dtype=config.get("header_dtype", "fp32"))
    plan = state.plan(int(summary["params"]), workers)
    return plan.up_nbytes, plan.down_nbytes


def predict_comm_seconds(steps: Iterable[dict[str, Any]], method: str, workers: int, link: Link,
                         allreduces: int = 1, topology: Topology | None = None) -> float:
    """Sum of :func:`step_seconds` over a run's step records."""
    return sum(step_seconds(s, method, workers, link, allreduces, topology) for s in steps)


def predict_wire(steps: Iterable[dict[str, Any]], method: str, workers: int,
                 mtu: int = 1500, topology: Topology | None = None) -> dict[str, int]:
    """Predicted wire bytes per direction: framed payloads (``data_*``) plus the ACKs of the
    other direction (``ack_*``); ``wire_* = data_* + ack_*``.

    Up = the messages of the up phase (what the workers transmit), down = those of the down
    phase (what the dedicated servers transmit); where every host sends alike (ddp, the onebit
    hook, colocated) the total of all hosts split evenly, as ``wire.json`` records them.
    """
    topology = topology or default_topology(method, workers)
    data_up = data_down = ack_up = ack_down = 0
    for s in steps:
        if topology.kind == "ring":
            total = s["bytes_up"] + s["bytes_down"]
            if workers < 2 or total == 0:
                continue
            sends = workers * 2 * (workers - 1)
            chunk = total / sends
            data, acks = sends * wire_bytes(chunk, mtu), sends * ack_bytes(chunk, mtu)
            data_up, data_down = data_up + data // 2, data_down + data - data // 2
            ack_up, ack_down = ack_up + acks // 2, ack_down + acks - acks // 2
        elif topology.kind == "star" and not s.get("servers"):
            u, d = s["bytes_up"] / workers, s["bytes_down"] / workers
            data_up += workers * wire_bytes(u, mtu)
            data_down += workers * wire_bytes(d, mtu)
            ack_up += workers * ack_bytes(d, mtu)
            ack_down += workers * ack_bytes(u, mtu)
        elif topology.kind in ("colocated", "hook"):   # every host sends alike: halves
            msgs = step_messages(s, topology)
            data = sum(wire_bytes(m, mtu) for _, _, m, _ in msgs)
            acks = sum(ack_bytes(m, mtu) for _, _, m, _ in msgs)
            data_up, data_down = data_up + data // 2, data_down + data - data // 2
            ack_up, ack_down = ack_up + acks // 2, ack_down + acks - acks // 2
        else:
            for _, _, m, phase in step_messages(s, topology):
                if phase == "up":
                    data_up += wire_bytes(m, mtu)
                    ack_down += ack_bytes(m, mtu)
                else:
                    data_down += wire_bytes(m, mtu)
                    ack_up += ack_bytes(m, mtu)
    return {"data_bytes_up": int(data_up), "data_bytes_down": int(data_down),
            "ack_bytes_up": int(ack_up), "ack_bytes_down": int(ack_down),
            "wire_bytes_up": int(data_up + ack_up), "wire_bytes_down": int(data_down + ack_down)}


def predict_wall_seconds(baseline_wall: float, steps: list[dict[str, Any]], method: str,
                         workers: int, link: Link, baseline_link: Link | None = None,
                         allreduces: int = 1, topology: Topology | None = None) -> float:
    """Compute time of the baseline run plus the modelled communication on ``link``."""
    base = baseline_link or Link(None, 0.0, 0.0, link.mtu)
    return (baseline_wall + predict_comm_seconds(steps, method, workers, link, allreduces,
                                                 topology)
            - predict_comm_seconds(steps, method, workers, base, allreduces, topology))


def read_run(run_dir: Path) -> tuple[dict, list[dict], dict]:
    """(config, step records, summary) of a finished run directory."""

    config = json.loads((run_dir / "config.json").read_text())["config"]
    steps = [r for r in read_metrics(run_dir) if r["kind"] == "step"]
    return config, steps, read_summary(run_dir)


def link_of(run_dir: Path) -> Link:
    """The link a run ran on (its ``link.json``; uncapped without one)."""
    path = run_dir / "link.json"
    if not path.exists():
        return Link()
    rec = json.loads(path.read_text())
    return Link(rec["rate_mbit"], rec["latency_ms"], rec.get("loss_pct", 0.0),
                rec.get("mtu", 1500))


def compare(run_dir: str | Path, baseline_dir: str | Path, allreduces: int = 1) -> dict:
    """How far the model's wall time for ``run_dir`` is from what it measured.

    ``baseline_dir`` is the same config run on an uncapped link (its ``link.json`` if present
    says which link). Returns predicted and measured wall seconds, the seconds the link added
    over the baseline (``*_link_s``), the error; and, when ``run_dir`` has a ``wire.json``
    with a steady window, predicted against measured data and ACK bytes over that window.
    """
    run_dir, baseline_dir = Path(run_dir), Path(baseline_dir)
    config, steps, summary = read_run(run_dir)
    _, _, base_summary = read_run(baseline_dir)
    link, base_link = link_of(run_dir), link_of(baseline_dir)
    method, workers = config["method"], summary.get("workers", config["workers"])
    topology = topology_of(config, summary)
    predicted = predict_wall_seconds(base_summary["wall_seconds"], steps, method, workers, link,
                                     base_link, allreduces, topology)
    measured = summary["wall_seconds"]
    out: dict[str, Any] = {
        "predicted_wall_s": predicted, "measured_wall_s": measured,
        "baseline_wall_s": base_summary["wall_seconds"],
        "predicted_link_s": predicted - base_summary["wall_seconds"],
        "measured_link_s": measured - base_summary["wall_seconds"],
        "error_s": predicted - measured, "relative_error": (predicted - measured) / measured,
    }
    wire_path = run_dir / "wire.json"
    steady = json.loads(wire_path.read_text()).get("steady") if wire_path.exists() else None
    if steady:
        window = [s for s in steps if steady["from_step"] < s["step"] <= steady["to_step"]]
        pred = predict_wire(window, method, workers, link.mtu, topology)
        out["steady"] = {
            "steps": len(window),
            **{f"predicted_{k}": v for k, v in pred.items() if not k.startswith("wire")},
            "measured_data_bytes_up": steady["wire_bytes_up"] - steady["ack_bytes_up"],
            "measured_data_bytes_down": steady["wire_bytes_down"] - steady["ack_bytes_down"],
            "measured_ack_bytes_up": steady["ack_bytes_up"],
            "measured_ack_bytes_down": steady["ack_bytes_down"],
        }
    return out
