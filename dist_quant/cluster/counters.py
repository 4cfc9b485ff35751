"""A host's link counters, parsed from what the kernel and tc print.

The namespace cluster reads them live (``/proc/PID/net/dev``, ``tc -s -j``); a container of the
compose cluster writes the same outputs to files before and after its job
(``launch/node.sh``), which the host reads here after the containers are gone.
"""

from __future__ import annotations

import json

IFACE = "eth0"
IFB = "ifb-dq"  # ingress device created by launch/node.sh
ETH_HEADER = 14


def parse_net_dev(text: str, iface: str = IFACE) -> dict[str, int]:
    """rx/tx bytes and packets of ``iface`` from the text of ``/proc/net/dev``."""
    for line in text.splitlines()[2:]:
        name, _, rest = line.partition(":")
        if name.strip() == iface:
            v = [int(x) for x in rest.split()]
            return {"rx_bytes": v[0], "rx_packets": v[1], "tx_bytes": v[8], "tx_packets": v[9]}
    raise ValueError(f"no {iface} in /proc/net/dev")


def parse_acks(text: str) -> dict[str, int]:
    """Pure ACK frames that arrived on eth0: the statistics of ingress filter prio 1, from
    ``tc -s -j filter show dev eth0 parent ffff:``.

    Actions at ingress see the packet without its Ethernet header; 14 bytes per frame are
    added back so the figure is comparable with the link counters.
    """
    frames = nbytes = 0
    for entry in json.loads(text or "[]"):
        if entry.get("pref") != 1:
            continue
        for action in entry.get("options", {}).get("actions", []):
            frames += action["stats"]["packets"]
            nbytes += action["stats"]["bytes"]
    return {"ack_rx_bytes": nbytes + ETH_HEADER * frames, "ack_rx_packets": frames}


def parse_qdiscs(text: str) -> dict[str, int]:
    """Packets the shaping qdiscs dropped, and the times the rate limiter held a packet back
    (``overlimits``: the cap acted), on egress (eth0) and ingress (the ifb device), from
    ``tc -s -j qdisc show``."""
    out = {"egress_drops": 0, "ingress_drops": 0, "egress_overlimits": 0,
           "ingress_overlimits": 0}
    for q in json.loads(text or "[]"):
        side = "ingress" if q.get("dev") == IFB else "egress"
        if q.get("kind") in ("tbf", "netem"):
            out[f"{side}_drops"] += int(q.get("drops", 0))
        if q.get("kind") == "tbf":
            out[f"{side}_overlimits"] += int(q.get("overlimits", 0))
    return out
