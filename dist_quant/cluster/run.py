"""Run a job on a namespace cluster over capped links and record wire bytes beside payload bytes.

One host (network namespace) per torchrun agent: for ``--method ps`` the server ``s`` (with
``--servers S`` the servers ``s, s2..sS``) and the workers ``w1..wW`` (W + S hosts), for
``--colocate`` and ``--method ddp`` the workers only (W hosts, ``w1`` hosts the rendezvous;
colocated hosts carry both roles, ``DIST_QUANT_ROLE=colocated``). Each host runs
``launch/node.sh shape`` and then ``launch/node.sh launch``
(c10d rendezvous on the first host, ``GLOO_SOCKET_IFNAME=eth0``, ``DIST_QUANT_ROLE`` set), so
every byte between ranks crosses two shaped links (the sender's egress, the receiver's
ingress) over TCP between distinct addresses.

Records written into the run directory next to the training job's own files:

- ``link.json``: ``rate_mbit`` (null = uncapped), ``latency_ms`` (one-way, host to host),
  ``loss_pct``, ``hosts``, ``mtu``, ``queue_frames``, ``worker_rates`` (``{"I": Mbit/s}``:
  worker I's own cap, ``--worker-rate``; empty when every link has ``rate_mbit``) and
  ``tc_commands`` (what the first host ran; every host runs the same, at its own rate).
- ``wire.json``: eth0 counters read before the agents start and after they exit.
  ``wire_bytes_up`` = bytes the workers transmitted, ``wire_bytes_down`` = bytes the server
  transmitted (ddp: all ranks transmit; the total is split evenly, as ``metrics.jsonl`` does
  for payloads); ``payload_bytes_*`` from ``summary.json``; ``ratio_* = wire / payload``;
  ``ack_bytes_*``/``data_ratio_*`` split off the pure TCP ACKs; ``per_host`` deltas (tx/rx
  bytes and packets, pure ACKs received, qdisc drops). Wire bytes are Ethernet frames:
  payload + TCP/IP/Ethernet headers (66 bytes per frame with TCP timestamps) + the ACKs of
  the other direction + rendezvous, gloo handshakes and receive notices, telemetry and
  control messages, and torchrun's rendezvous keep-alives.
  ``steady`` holds the same figures for training steps alone, counted where the bytes arrive:
  counters are read (from ``/proc/<pid>/net/dev`` and the ACK filter) when a step line
  appears in ``metrics.jsonl`` (at most every 0.25 s); the window runs from the mark a
  quarter of the way in to the one before the last step, so rendezvous, start-up, TCP buffer
  growth, the last step and the final checkpoint fall outside it. A step line is written once
  the server has received every uplink payload of that step and before any worker can send
  the next one (it first needs the new parameters), so the uplink data counted at the server
  (``wire_bytes_up - ack_bytes_up``) is exact whenever the parameters take longer to arrive
  than the 20 ms poll (any capped link of interest; not on an uncapped one). The downlink of
  that step may still be in flight at either end, so the downlink figures are exact to a
  fraction of one step's downlink at each end.

Uneven links. ``--worker-rate I=MBIT`` shapes worker I's host (``w{I+1}``) at its own rate in
both directions; every other host keeps ``rate_mbit``. The parameter-server hosts carry
``DIST_QUANT_WORKER=I`` (:mod:`dist_quant.ps.placement`), so the training job's worker I,
the one ``--slow-worker I=...`` slows, is the one on that link.

:class:`NetnsEngine` is this runner as the cluster engine ``netns``
(:mod:`dist_quant.cluster.engine`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dist_quant.analysis.linkmodel import Link
from dist_quant.cluster.engine import Engine, parse_worker_rates
from dist_quant.cluster.netns import (
    Cluster,
    ClusterError,
    Host,
    cleanup_stale,
    read_acks,
    read_proc_net_dev,
    require_root,
)
from dist_quant.cluster.records import (
    QUEUE_FRAMES,
    REPO,
    JsonlFollower,
    MetricsTail,
    log_tail,
    traffic,
    wire_record,
)
from dist_quant.cluster.signals import interrupts_raise, no_interrupts
from dist_quant.config import TrainConfig
from dist_quant.errors import ConfigError
from dist_quant.runtime.metrics import write_json_atomic
from dist_quant.runtime.rank import default_run_dir

# parse_worker_rates is also reachable from here
__all__ = ["NetnsEngine", "cluster_roles", "host_links", "node_env", "parse_worker_rates",
           "run_cluster", "run_hosts"]

NODE_SCRIPT = REPO / "launch" / "node.sh"
RDZV_PORT = 29400
POLL_S = 0.02
MARK_EVERY_S = 0.25  # at most 4 counter marks a second (each reads tc statistics per host)


def node_env(host: Host, link: Link, *, role: str, nnodes: int, rdzv_host: str, run_id: str,
             module: str, worker: int | None = None, dilate: float = 1.0) -> dict[str, str]:
    """The environment ``launch/node.sh`` reads (the same variables the compose file sets);
    ``worker``: the worker index this host runs (``DIST_QUANT_WORKER``); ``dilate``: the
    time dilation the rate limiter's burst is sized for (``DQ_DILATE``)."""
    path = os.environ.get("PYTHONPATH", "")
    extra = {} if worker is None else {"DIST_QUANT_WORKER": str(worker)}
    return {**os.environ, **extra,
            "PYTHONPATH": str(REPO) + (os.pathsep + path if path else ""),
            "DQ_IFACE": "eth0", "DQ_RATE_MBIT": f"{link.rate_mbit or 0:g}",
            "DQ_LATENCY_MS": f"{link.latency_ms:g}", "DQ_LOSS_PCT": f"{link.loss_pct:g}",
            "DQ_DILATE": f"{dilate:g}", "DQ_QUEUE_FRAMES": str(QUEUE_FRAMES), "DQ_ROLE": role,
            "DQ_NNODES": str(nnodes),
            "DQ_RDZV_HOST": rdzv_host, "DQ_RDZV_PORT": str(RDZV_PORT), "DQ_RUN_ID": run_id,
            "DQ_MODULE": module, "DQ_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


class StepWindow:
    """Counter snapshots taken when step lines appear in ``metrics.jsonl`` (see module doc)."""

    def __init__(self, metrics: Path, hosts: list[Host]):
        self.metrics = metrics
        self.hosts = hosts
        self.follower = JsonlFollower(metrics)
        self.skip_upto = self._last_step()  # a resumed run's earlier lines are not this run's
        self.marks: list[tuple[dict, dict]] = []   # (step record, counters per host)
        self.last_mark = 0.0

    def _last_step(self) -> int:
        if not self.metrics.exists():
            return 0
        last = 0
        for line in self.metrics.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                last = max(last, int(json.loads(line)["step"]))
        return last

    def poll(self) -> None:
        steps = [rec for rec in self.follower.new_records()
                 if rec.get("kind") == "step" and rec["step"] > self.skip_upto]
        if not steps:
            return
        now = time.monotonic()
        if self.marks and now - self.last_mark < MARK_EVERY_S:
            return
        try:
            snap = {h.label: read_proc_net_dev(h.procs[-1].pid) for h in self.hosts}
            for h in self.hosts:
                snap[h.label].update(read_acks(h.ns))
        except (OSError, ClusterError, KeyError, ValueError):
            return  # a host already left
        self.last_mark = now
        self.marks.append((steps[-1], snap))

    def window(self) -> tuple[tuple[dict, dict], tuple[dict, dict]] | None:
        """(start, end) marks: from a quarter of the way in (TCP buffers have grown by then)
        to the step before the last (the last step and the final checkpoint differ)."""
        if len(self.marks) < 2:
            return None
        if len(self.marks) < 4:
            return self.marks[0], self.marks[-1]
        return self.marks[len(self.marks) // 4], self.marks[-2]


def host_links(labels: list[str], link: Link,
               worker_rates: dict[int, float] | None) -> list[tuple[Link, int | None]]:
    """Each host's link and worker index: worker I on host ``w{I+1}`` at its own rate when
    ``worker_rates`` names it, every other host at ``link``."""
    out = []
    for label in labels:
        worker = int(label[1:]) - 1 if label.startswith("w") else None
        rate = (worker_rates or {}).get(worker) if worker is not None else None
        out.append((link if rate is None else
                    Link(rate, link.latency_ms, link.loss_pct, link.mtu).validate(), worker))
    return out


EXIT_GRACE_S = 10.0  # after the summary of a job that lost hosts, for the others to end


def run_hosts(cluster: Cluster, link: Link, roles: list[str], args: list[str], log_dir: Path,
              *, module: str, run_id: str, metrics: Path | None = None,
              deadline_s: float | None = None,
              tail: MetricsTail | None = None,
              worker_rates: dict[int, float] | None = None,
              may_lose: int = 0, summary: Path | None = None,
              dilate: float = 1.0) -> dict[str, Any]:
    """Shape every host, run one torchrun agent per host, return counters and tc commands.
    ``worker_rates``: ``{I: Mbit/s}`` for the hosts of the workers whose link differs;
    ``dilate``: the time dilation of the links given (:func:`node_env`).

    Raises :class:`ClusterError` naming the host(s) found failed (with their logs' tails) at
    the first poll that sees one; the caller's cleanup then stops the others at once instead
    of leaving them to their process-group timeout.

    ``may_lose`` (``--consistency async --min-workers``): up to that many worker hosts may
    fail while the job goes on (each named in one line; the server drops its worker). Once the
    job has written ``summary`` the others are given ``EXIT_GRACE_S`` to end, then stopped:
    torchrun's agents would otherwise wait 300 s at their exit barrier for the lost ones.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    rdzv = cluster.hosts[0].addr
    links = host_links([h.label for h in cluster.hosts], link, worker_rates)
    envs = [node_env(h, own, role=r, nnodes=len(cluster.hosts), rdzv_host=rdzv,
                     run_id=run_id, module=module, worker=None if r == "server" else w,
                     dilate=dilate)
            for h, r, (own, w) in zip(cluster.hosts, roles, links, strict=True)]
    tc_commands: list[str] = []
    for host, env in zip(cluster.hosts, envs, strict=True):
        log = log_dir / f"{host.label}.log"
        proc = cluster.spawn(host, [str(NODE_SCRIPT), "shape"], env, log)
        if proc.wait() != 0:
            raise ClusterError(f"shaping host {host.label} failed (exit {proc.returncode}):\n"
                               f"{log_tail(log)}")
        if not tc_commands:
            tc_commands = [x for x in log.read_text().splitlines() if x.strip()]
    before = _merge(cluster.counters(), cluster.ack_counters())
    t0 = time.monotonic()
    for host, env in zip(cluster.hosts, envs, strict=True):
        cluster.spawn(host, [str(NODE_SCRIPT), "launch", *args], env,
                      log_dir / f"{host.label}.log", append=True)
    window = StepWindow(metrics, cluster.hosts) if metrics is not None else None
    pending = list(cluster.hosts)
    lost: list[str] = []
    done_at: float | None = None
    while pending:
        time.sleep(POLL_S)
        if window is not None:
            window.poll()
        if tail is not None:
            tail.poll()
        failed = []
        for host in list(pending):
            code = host.procs[-1].poll()
            if code is None:
                continue
            pending.remove(host)
            if code == 0:
                continue
            log = log_dir / f"{host.label}.log"
            role = roles[cluster.hosts.index(host)]
            if role == "worker" and len(lost) < may_lose:
                lost.append(host.label)
                print(f"dist-quant cluster: host {host.label} ({host.addr}) exited with status "
                      f"{code}: the job goes on without it ({len(lost)} of at most {may_lose} "
                      f"worker hosts lost; log {log})", file=sys.stderr, flush=True)
                continue
            failed.append(f"host {host.label} ({host.addr}) exited with status {code}; "
                          f"log {log}:\n{log_tail(log)}")
        if failed:
            raise ClusterError("\n".join(failed))
        if lost and summary is not None and summary.exists():
            done_at = done_at or time.monotonic()
            if time.monotonic() - done_at > EXIT_GRACE_S:
                cluster.stop_processes()   # only torchrun's exit barrier was left
                pending = []
        if deadline_s is not None and time.monotonic() - t0 > deadline_s:
            raise ClusterError(f"the job did not finish within {deadline_s:g} s")
    seconds = time.monotonic() - t0
    after = _merge(cluster.counters(), cluster.ack_counters())
    delta = {h: {k: after[h][k] - before[h][k] for k in before[h]} for h in before}
    drops = cluster.qdisc_drops()
    return {"seconds": seconds, "per_host": {h.label: {"addr": h.addr, "role": r,
                                                       **delta[h.label], **drops[h.label]}
                                             for h, r in zip(cluster.hosts, roles, strict=True)},
            "window": window, "tc_commands": tc_commands}


def _merge(a: dict[str, dict], b: dict[str, dict]) -> dict[str, dict]:
    return {h: {**a[h], **b[h]} for h in a}


def _steady(method: str, window: StepWindow | None) -> dict | None:
    ends = window.window() if window is not None else None
    if ends is None:
        return None
    (r0, s0), (r1, s1) = ends
    delta = {h: {k: s1[h][k] - s0[h][k] for k in s0[h]} for h in s0}
    rec = wire_record(method, delta, r1["cum_bytes_up"] - r0["cum_bytes_up"],
                      r1["cum_bytes_down"] - r0["cum_bytes_down"], side="rx")
    return {"from_step": r0["step"], "to_step": r1["step"],
            "seconds": r1["wall"] - r0["wall"], **rec}


def cluster_roles(cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """Host labels and DIST_QUANT_ROLE values: ps = server(s) + W workers (servers ``s``,
    ``s2``, ...), colocated = W hosts that are worker and server, ddp = W workers."""
    workers = [f"w{i}" for i in range(1, cfg.workers + 1)]
    if cfg.method == "ddp":
        return workers, ["worker"] * cfg.workers
    if cfg.colocate:
        return workers, ["colocated"] * cfg.workers
    servers = ["s"] + [f"s{k}" for k in range(2, cfg.servers + 1)]
    return [*servers, *workers], ["server"] * cfg.servers + ["worker"] * cfg.workers


def run_cluster(cfg: TrainConfig, rate_mbit: float | None, latency_ms: float,
                loss_pct: float = 0.0, *, mtu: int = 1500,
                module: str = "dist_quant.train",
                worker_rates: dict[int, float] | None = None,
                dilate: float = 1.0) -> dict[str, Any]:
    """Run ``cfg`` with one namespace host per torchrun agent over shaped links.

    ``rate_mbit`` None or 0 = uncapped; ``worker_rates`` ``{I: Mbit/s}`` caps worker I's host
    at its own rate; ``dilate``: the links given are dilated by this factor
    (:meth:`dist_quant.cluster.engine.Engine.run`). Returns ``{"run_dir", "link", "wire",
    "seconds"}`` and writes ``link.json`` and ``wire.json`` into the run directory (module
    docstring).
    """
    require_root()
    cleanup_stale()  # namespaces of earlier runs that were killed before they could clean up
    if cfg.simulate:
        raise ConfigError("--simulate", "the cluster runs the distributed job; drop --simulate")
    cfg = cfg.validate()
    link = Link(rate_mbit or None, latency_ms, loss_pct, mtu).validate()
    worker_rates = dict(worker_rates or {})
    if any(not 0 <= i < cfg.workers for i in worker_rates):
        raise ConfigError("--worker-rate", f"names a worker outside 0..{cfg.workers - 1}")
    run_dir = Path(cfg.run_dir or default_run_dir(cfg)).resolve()
    cfg = cfg.replace(run_dir=str(run_dir))
    labels, roles = cluster_roles(cfg)
    cluster = Cluster(labels, mtu=mtu)
    run_dir.mkdir(parents=True, exist_ok=True)
    tail = MetricsTail(run_dir / "metrics.jsonl", cfg, dilate=dilate)
    try:
        with interrupts_raise():
            cluster.build()
            job = run_hosts(cluster, link, roles, cfg.to_argv(), run_dir / "hosts",
                            module=module, run_id=cluster.prefix,
                            metrics=run_dir / "metrics.jsonl", tail=tail,
                            worker_rates=worker_rates,
                            may_lose=cfg.workers - cfg.min_alive,
                            summary=run_dir / "summary.json", dilate=dilate)
    finally:
        tail.close()
        with no_interrupts():
            cluster.close()
    summary = json.loads((run_dir / "summary.json").read_text())
    link_rec = {"rate_mbit": link.rate_mbit, "latency_ms": link.latency_ms,
                "loss_pct": link.loss_pct, "hosts": len(labels), "mtu": mtu,
                "queue_frames": QUEUE_FRAMES, "tc_commands": job["tc_commands"],
                "worker_rates": {str(i): r for i, r in sorted(worker_rates.items())}}
    wire = {**wire_record(traffic(cfg), job["per_host"], int(summary["bytes_up"]),
                          int(summary["bytes_down"])),
            "seconds": job["seconds"], "steady": _steady(traffic(cfg), job["window"]),
            "per_host": job["per_host"]}
    write_json_atomic(run_dir / "link.json", link_rec)
    write_json_atomic(run_dir / "wire.json", wire)
    return {"run_dir": str(run_dir), "link": link_rec, "wire": wire,
            "seconds": job["seconds"]}


class NetnsEngine(Engine):
    """``--engine netns``: one network namespace per host on this machine (needs root)."""

    name = "netns"
    mark = "ns"
    help = "one network namespace per host"
    summary = "network namespaces"
    needs_root = True

    def check(self) -> None:
        require_root()

    def run(self, cfg: TrainConfig, rate_mbit: float | None, latency_ms: float,
            loss_pct: float = 0.0, *, mtu: int = 1500,
            worker_rates: Mapping[int, float] | None = None,
            dilate: float = 1.0) -> dict[str, Any]:
        return run_cluster(cfg, rate_mbit, latency_ms, loss_pct, mtu=mtu,
                           worker_rates=dict(worker_rates or {}), dilate=dilate)
