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

Parameter server, one synchronous step with per-step recorded bytes ``U`` (uplink, all W
workers together) and ``D`` (downlink): each worker sends ``u = U / W`` at once, and the
server's link carries all W payloads, so it is the bottleneck in both phases::

    t_step = L + W * wire(u) / R   +   L + W * wire(d) / R        (d = D / W)

(one message each way per step: the gradient payload with its telemetry, the parameters with
the control word; small messages travel in the same flight and add no round trip.)

Allreduce baselines (DDP, gloo ring): with ``S`` the bytes all ranks sent in a step
(``U + D`` as ``metrics.jsonl`` records them), each of ``2 (W - 1)`` rounds has every rank send
a chunk ``c = S / (2 W (W - 1))`` to its neighbour, all links busy at once::

    t_step = A * 2 (W - 1) * (L + wire(c / A) / R)              (A allreduces per step)

Wall time. A run's wall time is its compute time plus its communication time; the compute
time is taken from a measured run of the same config on an uncapped, zero-latency link (whose
own, fast, communication counts as compute), so::

    predicted_wall(link) = wall(baseline) + sum_t t_step(link) - sum_t t_step(baseline link)

Not modelled: TCP slow start after idle periods (matters only when ``L`` is large), queueing
drops and retransmissions when W workers send into the server's link at once, loss, and the
overlap of computation with communication (this training loop does not overlap them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
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
    """One parameter-server step: both phases through the server's link (module docstring)."""
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


def step_seconds(step: dict[str, Any], method: str, workers: int, link: Link,
                 allreduces: int = 1) -> float:
    if method == "ddp":
        return ring_step_seconds(step["bytes_up"] + step["bytes_down"], workers, link,
                                 allreduces)
    return ps_step_seconds(step["bytes_up"], step["bytes_down"], workers, link)


def predict_comm_seconds(steps: Iterable[dict[str, Any]], method: str, workers: int, link: Link,
                         allreduces: int = 1) -> float:
    """Sum of :func:`step_seconds` over a run's step records."""
    return sum(step_seconds(s, method, workers, link, allreduces) for s in steps)


def predict_wire(steps: Iterable[dict[str, Any]], method: str, workers: int,
                 mtu: int = 1500) -> dict[str, int]:
    """Predicted wire bytes per direction: framed payloads (``data_*``) plus the ACKs of the
    other direction (``ack_*``); ``wire_* = data_* + ack_*``.

    Up = what the workers transmit, down = what the server transmits (ddp: the total of all
    ranks split evenly), as ``wire.json`` records them.
    """
    data_up = data_down = ack_up = ack_down = 0
    for s in steps:
        if method == "ddp":
            total = s["bytes_up"] + s["bytes_down"]
            if workers < 2 or total == 0:
                continue
            sends = workers * 2 * (workers - 1)
            chunk = total / sends
            data, acks = sends * wire_bytes(chunk, mtu), sends * ack_bytes(chunk, mtu)
            data_up, data_down = data_up + data // 2, data_down + data - data // 2
            ack_up, ack_down = ack_up + acks // 2, ack_down + acks - acks // 2
        else:
            u, d = s["bytes_up"] / workers, s["bytes_down"] / workers
            data_up += workers * wire_bytes(u, mtu)
            data_down += workers * wire_bytes(d, mtu)
            ack_up += workers * ack_bytes(d, mtu)
            ack_down += workers * ack_bytes(u, mtu)
    return {"data_bytes_up": int(data_up), "data_bytes_down": int(data_down),
            "ack_bytes_up": int(ack_up), "ack_bytes_down": int(ack_down),
            "wire_bytes_up": int(data_up + ack_up), "wire_bytes_down": int(data_down + ack_down)}


def predict_wall_seconds(baseline_wall: float, steps: list[dict[str, Any]], method: str,
                         workers: int, link: Link, baseline_link: Link | None = None,
                         allreduces: int = 1) -> float:
    """Compute time of the baseline run plus the modelled communication on ``link``."""
    base = baseline_link or Link(None, 0.0, 0.0, link.mtu)
    return (baseline_wall + predict_comm_seconds(steps, method, workers, link, allreduces)
            - predict_comm_seconds(steps, method, workers, base, allreduces))


def read_run(run_dir: Path) -> tuple[dict, list[dict], dict]:
    """(config, step records, summary) of a finished run directory."""
    from dist_quant.metrics import read_metrics, read_summary

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
    predicted = predict_wall_seconds(base_summary["wall_seconds"], steps, method, workers, link,
                                     base_link, allreduces)
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
        pred = predict_wire(window, method, workers, link.mtu)
        out["steady"] = {
            "steps": len(window),
            **{f"predicted_{k}": v for k, v in pred.items() if not k.startswith("wire")},
            "measured_data_bytes_up": steady["wire_bytes_up"] - steady["ack_bytes_up"],
            "measured_data_bytes_down": steady["wire_bytes_down"] - steady["ack_bytes_down"],
            "measured_ack_bytes_up": steady["ack_bytes_up"],
            "measured_ack_bytes_down": steady["ack_bytes_down"],
        }
    return out
