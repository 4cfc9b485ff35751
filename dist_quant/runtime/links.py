"""The link arithmetic of the modelled links: framing, messages per link, time per phase.

The mathematics is in the docstring of :mod:`dist_quant.analysis.linkmodel`, which re-times
recorded runs with it; it lives here, below the roles, so that a run can time its own steps on
modelled links as it records them (:mod:`dist_quant.runtime.clock`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dist_quant.errors import ConfigError

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
