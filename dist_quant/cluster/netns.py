"""A cluster of hosts on one machine: network namespaces joined by a bridge.

Topology of one run with prefix ``dq<pid>-<seq>`` (names stay unique per process and run)::

    namespace <prefix>-hub : bridge br0, ports v0 .. v{H-1} (one veth end per host)
    namespace <prefix>-s   : eth0 (10.77.0.1/24)   the server
    namespace <prefix>-w1  : eth0 (10.77.0.2/24)   worker 1
    ...                                             (ddp: no server, w1 is 10.77.0.1)

Every veth pair is created directly inside its two namespaces (``ip -n HUB link add vI type
veth peer name eth0 netns HOST``), so nothing is added to the machine's own namespace and
interface names cannot collide with another run's. Deleting the namespaces removes every
link, the bridge and every qdisc with them. IPv6 is off in every namespace and the bridge
does no multicast snooping, so nothing but the job's own traffic (and its ARP) reaches the
counters.

Shaping is not done here: each host runs ``launch/node.sh shape`` inside its namespace (the
script the containers run; see its header for the exact tc commands). It shapes both
directions of the host's link from inside: the egress of eth0, and its ingress through an
ifb device, which meters what the bridge delivers exactly as a qdisc on the bridge side of
the veth would, and is what a container can do to its own link. This module only
builds and removes the namespaces, starts processes in them, and reads counters:
``ip -n NS -s -j link show dev eth0`` (the kernel's per-device counters, the same numbers
as ``/sys/class/net/eth0/statistics/{tx,rx}_bytes`` inside the namespace), or
``/proc/<pid>/net/dev`` of a process living in the namespace for cheap snapshots mid-run;
pure TCP ACKs that arrived are counted apart by an ingress filter (:func:`read_acks`).

Cleanup: :meth:`Cluster.close` ends every process group it started, then any process still
inside a namespace (``ip netns pids``), then deletes the namespaces; it runs on success,
failure and interrupt (``with Cluster(...)``). :func:`cleanup_stale` removes the namespaces of
runs whose process no longer exists (``dist-quant cluster --cleanup``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from dist_quant.cluster.counters import IFACE, parse_acks, parse_net_dev, parse_qdiscs
from dist_quant.cluster.engine import ClusterError

SUBNET = "10.77.0"  # private /24 inside the run's own namespaces; never routed anywhere
MAX_HOSTS = 250
_NAME = re.compile(r"^dq(\d+)-(\d+)-")
_seq = itertools.count()
IP_TIMEOUT_S = 60.0   # an `ip` call waits for the kernel's lock of the network stack
KILL_WAIT_S = 5.0     # after SIGKILL, for a process to be reaped


def require_root() -> None:
    """Stop with a clear message unless namespaces and tc can be used here."""
    if os.geteuid() != 0:
        raise ClusterError("dist-quant cluster needs root: it creates network namespaces, veth "
                           "links and tc qdiscs. Run it as root (sudo), or predict times "
                           "without root with dist_quant.analysis.linkmodel.")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise ClusterError(f"dist-quant cluster needs the `{tool}` command (iproute2)")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        out = subprocess.run(["ip", *args], capture_output=True, text=True,
                             timeout=IP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ClusterError(f"`ip {' '.join(args)}` did not answer within {IP_TIMEOUT_S:g} s "
                           "(the kernel may still be removing earlier namespaces)") from None
    if check and out.returncode != 0:
        raise ClusterError(f"`ip {' '.join(args)}` failed: {out.stderr.strip()}")
    return out


def list_namespaces() -> list[str]:
    out = _ip("-j", "netns", "list", check=False)
    if out.returncode != 0 or not out.stdout.strip():
        return []
    return [entry["name"] for entry in json.loads(out.stdout)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_processes(ns: str) -> None:
    out = _ip("netns", "pids", ns, check=False)
    for pid in (int(p) for p in out.stdout.split()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _add_namespace(ns: str) -> None:
    """A new namespace with IPv6 off (no neighbour discovery or MLD chatter on the links)."""
    _ip("netns", "add", ns)
    off = ("echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; "
           "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6")
    out = subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", off], capture_output=True,
                         text=True)
    if out.returncode != 0 and "No such file" not in out.stderr:   # a kernel without IPv6
        raise ClusterError(f"cannot turn IPv6 off in {ns}: {out.stderr.strip()}")


def delete_namespace(ns: str) -> None:
    _kill_namespace_processes(ns)
    _ip("netns", "delete", ns, check=False)


def cleanup_stale() -> list[str]:
    """Delete the namespaces of cluster runs whose process has exited; return their names."""
    removed = []
    for ns in list_namespaces():
        m = _NAME.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            delete_namespace(ns)
            removed.append(ns)
    return removed


def _read_stats(ns: str) -> dict[str, int]:
    out = _ip("-n", ns, "-s", "-j", "link", "show", "dev", IFACE)
    stats = json.loads(out.stdout)[0]["stats64"]
    return {"tx_bytes": stats["tx"]["bytes"], "rx_bytes": stats["rx"]["bytes"],
            "tx_packets": stats["tx"]["packets"], "rx_packets": stats["rx"]["packets"]}


def read_proc_net_dev(pid: int, iface: str = IFACE) -> dict[str, int]:
    """The counters of ``iface`` in the namespace of process ``pid`` (``/proc/PID/net/dev``)."""
    try:
        return parse_net_dev(Path(f"/proc/{pid}/net/dev").read_text(), iface)
    except ValueError:
        raise ClusterError(f"no {iface} in /proc/{pid}/net/dev") from None


def read_acks(ns: str) -> dict[str, int]:
    """Pure ACK frames that arrived on eth0 (:func:`~dist_quant.cluster.counters.parse_acks`)."""
    res = subprocess.run(["tc", "-n", ns, "-s", "-j", "filter", "show", "dev", IFACE,
                          "parent", "ffff:"], capture_output=True, text=True)
    return parse_acks(res.stdout)


@dataclass
class Host:
    label: str          # "s", "w1", ...
    ns: str             # namespace name
    addr: str           # IPv4 address of eth0
    procs: list[subprocess.Popen] = field(default_factory=list)


class Cluster:
    """``with Cluster(["s", "w1", "w2"]) as c:`` builds the namespaces; leaving removes them."""

    def __init__(self, labels: list[str], mtu: int = 1500):
        if not 1 <= len(labels) <= MAX_HOSTS:
            raise ClusterError(f"a cluster holds 1..{MAX_HOSTS} hosts; got {len(labels)}")
        if not 576 <= mtu <= 65535:
            raise ClusterError(f"MTU must be in 576..65535; got {mtu}")
        self.prefix = f"dq{os.getpid()}-{next(_seq)}"
        self.hub = f"{self.prefix}-hub"
        self.mtu = mtu
        self.hosts = [Host(label, f"{self.prefix}-{label}", f"{SUBNET}.{i + 1}")
                      for i, label in enumerate(labels)]

    def __enter__(self) -> Cluster:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def namespaces(self) -> list[str]:
        return [self.hub] + [h.ns for h in self.hosts]

    def build(self) -> None:
        require_root()
        mtu = str(self.mtu)
        _add_namespace(self.hub)
        # no multicast snooping: the bridge would send IGMP reports to every port
        _ip("-n", self.hub, "link", "add", "br0", "mtu", mtu, "type", "bridge",
            "mcast_snooping", "0")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts):
            port = f"v{i}"
            _add_namespace(host.ns)
            _ip("-n", self.hub, "link", "add", port, "mtu", mtu, "type", "veth",
                "peer", "name", IFACE, "netns", host.ns, "mtu", mtu)
            _ip("-n", self.hub, "link", "set", port, "master", "br0", "up")
            _ip("-n", host.ns, "link", "set", "lo", "up")
            _ip("-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", IFACE)
            _ip("-n", host.ns, "link", "set", IFACE, "up")

    def spawn(self, host: Host, argv: list[str], env: dict[str, str], log: Path,
              append: bool = False) -> subprocess.Popen:
        """Start ``argv`` inside ``host``'s namespace, in its own process group."""
        with open(log, "a" if append else "w") as fh:
            proc = subprocess.Popen(["ip", "netns", "exec", host.ns, *argv], env=env,
                                    stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        host.procs.append(proc)
        return proc

    def counters(self) -> dict[str, dict[str, int]]:
        """Per host: eth0 tx/rx bytes and packets (tx = what the host put on its link)."""
        return {h.label: _read_stats(h.ns) for h in self.hosts}

    def ack_counters(self) -> dict[str, dict[str, int]]:
        """Per host: pure TCP ACK frames received (``launch/node.sh`` counts them apart)."""
        return {h.label: read_acks(h.ns) for h in self.hosts}

    def qdisc_drops(self) -> dict[str, dict[str, int]]:
        """Per host: packets the shaping qdiscs dropped on egress (eth0) and ingress (ifb)."""
        out = {}
        for h in self.hosts:
            res = subprocess.run(["tc", "-n", h.ns, "-s", "-j", "qdisc", "show"],
                                 capture_output=True, text=True)
            stats = parse_qdiscs(res.stdout)
            out[h.label] = {k: stats[k] for k in ("egress_drops", "ingress_drops")}
        return out

    def stop_processes(self, grace: float = 3.0) -> None:
        """SIGTERM every process group started here, SIGKILL what is left after ``grace``."""
        procs = [p for h in self.hosts for p in h.procs if p.poll() is None]
        for p in procs:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                # a process in uninterruptible sleep is not reaped: the namespaces still go
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=KILL_WAIT_S)

    def close(self) -> None:
        """End every process, delete every namespace (with its links and qdiscs). A process
        that left its process group (a rank in its own session that ignores SIGTERM, or whose
        agent was killed) still lives in a namespace: it gets SIGKILL there."""
        self.stop_processes()
        existing = set(list_namespaces())
        for ns in self.namespaces():
            if ns in existing:
                with contextlib.suppress(ClusterError):
                    delete_namespace(ns)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
