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
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_quant.errors import ConfigError
from dist_quant.runtime.metrics import read_metrics, read_summary

IP_TCP_HEADER = 52   # IPv4 20 + TCP 20 + timestamp option 12
ETH_HEADER = 14      # the counters and tbf see Ethernet frames without preamble and FCS
FRAME_HEADER = IP_TCP_HEADER + ETH_HEADER


@dataclass(frozen=True)
class Link:
    """One host's link: ``rate_mbit`` None = uncapped; ``latency_ms`` one-way host to host."""

    rate_mbit: float | None = None
    latency_ms: float = 0.0
    loss_pct: float = 0.0
    mtu: int = 1500

    def validate(self) -> Link:
        if self.rate_mbit is not None and not self.rate_mbit > 0:
            raise ConfigError("--rate", f"must be > 0 Mbit/s (0 = uncapped); got {self.rate_mbit}")
        if not self.latency_ms >= 0:
            raise ConfigError("--latency", f"must be >= 0 ms; got {self.latency_ms}")
        if not 0 <= self.loss_pct < 100:
            raise ConfigError("--loss", f"must be in [0, 100) percent; got {self.loss_pct}")
        if not 576 <= self.mtu <= 65535:
            raise ConfigError("--mtu", f"must be in 576..65535; got {self.mtu}")
        return self

    @property
    def bytes_per_second(self) -> float:
        return math.inf if self.rate_mbit is None else self.rate_mbit * 1e6 / 8

    @property
    def latency_s(self) -> float:
        return self.latency_ms / 1000

    @property
    def mss(self) -> int:
        return self.mtu - IP_TCP_HEADER


def frames(message: int, mtu: int = 1500) -> int:
    return -(-int(message) // (mtu - IP_TCP_HEADER))


def wire_bytes(message: int, mtu: int = 1500) -> int:
    """Bytes on the link for one ``message``-byte TCP message (headers of every frame)."""
    return int(message) + FRAME_HEADER * frames(message, mtu)


def ack_bytes(message: int, mtu: int = 1500) -> int:
    """Bytes of the ACKs the receiver sends back (one ACK frame per two data frames)."""
    return FRAME_HEADER * -(-frames(message, mtu) // 2)


def ps_step_seconds(bytes_up: int, bytes_down: int, workers: int, link: Link) -> float:
    """One step of the star: both phases through the server's link (module docstring)."""
    up, down = bytes_up / workers, bytes_down / workers
    serial = workers * (wire_bytes(up, link.mtu) + wire_bytes(down, link.mtu))
    return 2 * link.latency_s + serial / link.bytes_per_second


def ring_step_seconds(bytes_total: int, workers: int, link: Link, allreduces: int = 1) -> float:
    """One step of ``allreduces`` ring allreduces that sent ``bytes_total`` over all ranks."""
    if workers < 2 or bytes_total == 0:
        return 0.0
    rounds = 2 * (workers - 1)
    chunk = bytes_total / (workers * rounds * allreduces)
    return allreduces * rounds * (link.latency_s
                                  + wire_bytes(chunk, link.mtu) / link.bytes_per_second)


# ---- exchanges through servers: messages per link ------------------------------------------
TOPOLOGIES = ("ring", "star", "sharded", "colocated", "hook")
Message = tuple[str, str, float, str]   # (sender link, receiver link, payload bytes, phase)


@dataclass(frozen=True)
class Topology:
    """Who sends what to whom. ``kind``: ``ring`` (DDP allreduce), ``star``, ``sharded``,
    ``colocated`` or ``hook`` (DDP ``onebit``); ``hook_up`` / ``hook_down``: the hook's payload
    bytes per slice of one bucket (from :meth:`~dist_quant.hooks.OneBitState.plan`), empty when
    unknown (then the step's totals are split evenly over the slices)."""

    kind: str
    workers: int
    servers: int = 1
    hook_up: tuple[int, ...] = ()
    hook_down: tuple[int, ...] = ()


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


def _spread(total: float, parts: int) -> list[float]:
    return [total / parts] * parts


def step_messages(step: dict[str, Any], topology: Topology) -> list[Message]:
    """The messages of one step record (module docstring); payload bytes, no framing."""
    w, kind = topology.workers, topology.kind
    if kind == "ring":
        raise ValueError("a ring allreduce is modelled by ring_step_seconds, not by messages")
    if kind == "hook":
        return _hook_messages(step, topology)
    shards = step.get("servers")
    n_shards = topology.servers if kind != "star" else 1
    colocated = kind == "colocated"
    remote = w - 1 if colocated else w
    stats = step.get("bytes_stats", 0)
    if shards:
        ups = [s["bytes_up"] / remote for s in shards]
        downs = [s["bytes_down"] / remote for s in shards]
    else:  # a record without per-server bytes (older runs): even shards
        ups = _spread(max(step["bytes_up"] - stats, 0) / remote, n_shards)
        downs = _spread(step["bytes_down"] / remote, n_shards)
    server = [f"rank{s}" if colocated else f"server{s}" for s in range(len(ups))]
    worker = [f"rank{i}" if colocated else f"worker{i}" for i in range(w)]
    out: list[Message] = []
    for s, (u, d) in enumerate(zip(ups, downs, strict=True)):
        for i in range(w):
            if worker[i] == server[s]:
                continue
            if u:
                out.append((worker[i], server[s], u, "up"))
            if d:
                out.append((server[s], worker[i], d, "down"))
    if stats:  # BN statistics: every remote worker to the leader, in the up phase
        senders = [x for x in worker if x != server[0]]
        out += [(x, server[0], stats / len(senders), "up") for x in senders]
    return out


def _hook_messages(step: dict[str, Any], topology: Topology) -> list[Message]:
    w = topology.workers
    stats = step.get("bytes_stats", 0)
    ups, downs = list(topology.hook_up), list(topology.hook_down)
    per_step_up, per_step_down = (w - 1) * sum(ups), (w - 1) * sum(downs)
    if not ups or per_step_down != step["bytes_down"]:   # unknown plan: even slices
        downs = _spread(step["bytes_down"] / (w - 1), w)
        ups = _spread(step["bytes_up"] / (w - 1), w)
    else:  # the rest of the uplink bytes: BN statistics of an evaluation step, to rank 0
        stats = step["bytes_up"] - per_step_up
    rank = [f"rank{i}" for i in range(w)]
    out: list[Message] = []
    for s in range(w):
        for i in range(w):
            if i != s and ups[s]:
                out.append((rank[i], rank[s], ups[s], "up"))
            if i != s and downs[s]:
                out.append((rank[s], rank[i], downs[s], "down"))
    if stats:
        out += [(rank[i], rank[0], stats / (w - 1), "up") for i in range(1, w)]
    return out


def link_loads(messages: Iterable[Message], mtu: int | None = None
               ) -> dict[str, dict[str, dict[str, float]]]:
    """``{phase: {link: {"in": bytes, "out": bytes}}}``: payload bytes (``mtu`` None) or wire
    bytes (every message framed, ``wire_bytes(m, mtu)``) each link carries in each phase."""
    loads: dict[str, dict[str, dict[str, float]]] = {}
    for src, dst, m, phase in messages:
        b = m if mtu is None else wire_bytes(m, mtu)
        links = loads.setdefault(phase, {})
        links.setdefault(src, {"in": 0.0, "out": 0.0})["out"] += b
        links.setdefault(dst, {"in": 0.0, "out": 0.0})["in"] += b
    return loads


def busiest_link(loads: dict[str, dict[str, dict[str, float]]]) -> dict[str, tuple[str, str]]:
    """``{phase: (link, direction)}`` of the link direction that bounds each phase."""
    return {phase: max(((k, d) for k, io in links.items() for d in ("in", "out")),
                       key=lambda kd: links[kd[0]][kd[1]])
            for phase, links in loads.items()}


def exchange_step_seconds(messages: list[Message], link: Link) -> float:
    """Serial phases, each one latency plus its busiest link direction's wire bytes / R."""
    loads = link_loads(messages, link.mtu)
    return sum(link.latency_s + max(max(io["in"], io["out"]) for io in links.values())
               / link.bytes_per_second for links in loads.values())


def default_topology(method: str, workers: int) -> Topology:
    return Topology("ring" if method == "ddp" else "star", workers)


def step_seconds(step: dict[str, Any], method: str, workers: int, link: Link,
                 allreduces: int = 1, topology: Topology | None = None) -> float:
    topology = topology or default_topology(method, workers)
    if topology.kind == "ring":
        return ring_step_seconds(step["bytes_up"] + step["bytes_down"], workers, link,
                                 allreduces)
    if topology.kind == "star" and not step.get("servers"):
        return ps_step_seconds(step["bytes_up"], step["bytes_down"], workers, link)
    return exchange_step_seconds(step_messages(step, topology), link)


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
