"""Run a job as containers: ``docker-compose.yml`` under ``docker compose`` (v2) or
``docker-compose`` (v1), with the same hosts, links and records as the namespace cluster.

One container per torchrun agent, each running ``launch/node.sh run`` (shape its own eth0 and
the ingress through an ifb device with tc, then start its agent), so the shaping and launch are
the namespace cluster's, line for line. The services of the compose file:

- ``server``: the rendezvous host. ``--method ps``: the server (of shard 0); ``--colocate``
  and ``--method ddp``: the first worker host (labelled ``w1`` like the namespace cluster's).
- ``shard``: servers 2..S of ``--servers S`` (labels ``s2``..``sS``).
- ``worker``: the other W (ps) or W - 1 (colocated, ddp) hosts.

The options reach every container through the compose file's variables (``DQ_NNODES``,
``DQ_WORKERS``, ``DQ_TRAIN_ARGS``, ...): nothing but the image and the compose file is
needed, which is what a user of ``docker compose up`` has. The network is the project's own
bridge on a /24 inside 10.78.0.0/16 not used by another Docker network; the run directory is
mounted at ``/runs/NAME``. Each container keeps its whole output and its link's counters before
and after its job in ``RUN_DIR/hosts`` (``launch/node.sh``, ``DQ_LOG_DIR``); from those this
module writes ``link.json`` and ``wire.json`` as :func:`dist_quant.cluster.run.run_cluster`
does (``engine: "compose"``; ``seconds`` from the first counter snapshot before a launch to
the last one after; no ``steady`` window: the containers' counters are read before and after
the job only). Containers and the network are removed on success, failure and Ctrl-C
(``compose down``); the ifb devices live in the containers' namespaces and go with them.

:class:`ComposeEngine` is this runner as the cluster engine ``compose``
(:mod:`dist_quant.cluster.engine`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dist_quant.analysis.linkmodel import Link
from dist_quant.cluster.counters import parse_acks, parse_net_dev, parse_qdiscs
from dist_quant.cluster.engine import ClusterError, Engine
from dist_quant.cluster.records import QUEUE_FRAMES, REPO, MetricsTail, traffic, wire_record
from dist_quant.cluster.signals import interrupts_raise, no_interrupts
from dist_quant.config import TrainConfig
from dist_quant.errors import (
    ComposeError,  # noqa: F401 (re-exported)
    ConfigError,
)
from dist_quant.runner.launcher import SHOWN
from dist_quant.runtime.metrics import write_json_atomic
from dist_quant.runtime.rank import default_run_dir

COMPOSE_FILE = REPO / "docker-compose.yml"
HOST_SCRIPT = REPO / "launch" / "docker-host.sh"
SUBNETS = ipaddress.ip_network("10.78.0.0/16")
RUNS_MOUNT = "/runs"
POLL_S = 0.1
STOP_TIMEOUT_S = 5
BUILTIN_DATA = ("mnist1d", "teacher")
_seq = itertools.count()
_LINE = re.compile(r"^\S+\s+\| ?(.*)$")   # compose's "service_1  | text" prefix


def compose_command() -> list[str]:
    """``docker compose`` where the v2 plugin answers, else ``docker-compose`` (v1)."""
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise ClusterError("no docker compose nor docker-compose: run launch/docker-host.sh")


def check_engine() -> None:
    """One line naming what is missing (engine, compose, daemon, a current image) unless the
    machine can run the compose cluster now (``launch/docker-host.sh check``)."""
    if shutil.which("docker") is None:
        raise ClusterError("no container engine (docker): run launch/docker-host.sh")
    res = subprocess.run(["bash", str(HOST_SCRIPT), "check"], capture_output=True, text=True)
    if res.returncode != 0:
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        raise ClusterError((lines[-1] if lines else "docker-host.sh check failed")
                           .removeprefix("docker-host: "))


def plan(cfg: TrainConfig) -> dict[str, Any]:
    """Service scales, roles and labels of the containers for ``cfg``."""
    if cfg.method == "ddp" or cfg.colocate:
        role = "colocated" if cfg.colocate and cfg.method != "ddp" else "worker"
        return {"nnodes": cfg.workers, "shard": 0, "worker": cfg.workers - 1,
                "server_role": role, "worker_role": role, "first_worker": 2,
                "server_label": "w1"}
    return {"nnodes": cfg.world_size, "shard": cfg.servers - 1, "worker": cfg.workers,
            "server_role": "server", "worker_role": "worker", "first_worker": 1,
            "server_label": "s"}


def free_subnet() -> str:
    """The first /24 of 10.78.0.0/16 that no Docker network uses."""
    ids = subprocess.run(["docker", "network", "ls", "-q"], capture_output=True,
                         text=True).stdout.split()
    used = []
    if ids:
        res = subprocess.run(["docker", "network", "inspect", *ids], capture_output=True,
                             text=True)
        for net in json.loads(res.stdout or "[]"):
            for conf in (net.get("IPAM") or {}).get("Config") or []:
                with contextlib.suppress(ValueError, KeyError):
                    used.append(ipaddress.ip_network(conf["Subnet"], strict=False))
    for subnet in SUBNETS.subnets(new_prefix=24):
        if not any(subnet.overlaps(u) for u in used):
            return str(subnet)
    raise ClusterError("every /24 of 10.78.0.0/16 is taken by a Docker network")


def train_args(cfg: TrainConfig, run_dir: Path) -> str:
    """The options of ``cfg`` the compose file's own variables do not carry, as
    ``DQ_TRAIN_ARGS`` (split on spaces by ``launch/node.sh``)."""
    carried = {"--method", "--workers", "--ddp-hook", "--servers", "--colocate",
               "--no-colocate", "--steps", "--seed", "--run-dir", "--progress",
               "--no-progress"}
    argv = cfg.replace(run_dir=f"{RUNS_MOUNT}/{run_dir.name}", progress=False).to_argv()
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in carried:
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            continue
        if any(c.isspace() for c in arg) or not arg:
            raise ConfigError("--engine", f"compose passes options split on spaces; {arg!r} "
                              "holds one")
        out.append(arg)
    return " ".join(out)


def compose_env(cfg: TrainConfig, link: Link, run_dir: Path, subnet: str,
                mtu: int, dilate: float = 1.0) -> dict[str, str]:
    """The variables of ``docker-compose.yml`` for this job (``dilate``: ``DQ_DILATE``, the
    time dilation the rate limiters' bursts are sized for)."""
    p = plan(cfg)
    return {**os.environ,
            "DQ_RUNS_DIR": str(run_dir.parent), "DQ_RUN_NAME": run_dir.name,
            "DQ_NNODES": str(p["nnodes"]), "DQ_WORKERS": str(cfg.workers),
            "DQ_METHOD": cfg.method, "DQ_DDP_HOOK": cfg.ddp_hook,
            "DQ_SERVERS": str(cfg.servers),
            "DQ_COLOCATE": "--colocate" if cfg.colocate else "--no-colocate",
            "DQ_SERVER_ROLE": p["server_role"], "DQ_WORKER_ROLE": p["worker_role"],
            "DQ_STEPS": str(cfg.steps), "DQ_SEED": str(cfg.seed),
            "DQ_RATE_MBIT": f"{link.rate_mbit or 0:g}", "DQ_LATENCY_MS": f"{link.latency_ms:g}",
            "DQ_LOSS_PCT": f"{link.loss_pct:g}", "DQ_DILATE": f"{dilate:g}",
            "DQ_SUBNET": subnet, "DQ_MTU": str(mtu),
            "DQ_TRAIN_ARGS": train_args(cfg, run_dir)}


def check_config(cfg: TrainConfig) -> None:
    """What containers cannot do that the namespace cluster can: files of this machine."""
    if cfg.dataset not in BUILTIN_DATA or cfg.data_dir:
        raise ConfigError("--dataset", f"the compose cluster generates its data in the "
                          f"containers: use one of {', '.join(BUILTIN_DATA)} (files of this "
                          "machine are not mounted)")
    if cfg.resume:
        raise ConfigError("--resume", "not with --engine compose; resume on the namespace "
                          "cluster or with dist-quant train")
    if cfg.min_alive < cfg.workers:
        raise ConfigError("--min-workers", "not with --engine compose (a lost container's "
                          "peers would wait at torchrun's exit barrier); drop a lost host on "
                          "the namespace cluster")


def containers(project: str) -> list[dict[str, str]]:
    """Id, hostname, service and number of every container of ``project``."""
    ids = subprocess.run(["docker", "ps", "-a", "-q", "--filter",
                          f"label=com.docker.compose.project={project}"],
                         capture_output=True, text=True).stdout.split()
    if not ids:
        return []
    fmt = ('{{.Id}} {{.Config.Hostname}} {{index .Config.Labels "com.docker.compose.service"}} '
           '{{index .Config.Labels "com.docker.compose.container-number"}}')
    res = subprocess.run(["docker", "inspect", "-f", fmt, *ids], capture_output=True,
                         text=True)
    out = []
    for line in res.stdout.splitlines():
        cid, host, service, number = line.split()
        out.append({"id": cid, "hostname": host, "service": service, "number": number})
    return out


def job_status(found: list[dict[str, str]]) -> int:
    """The job's exit status from its containers': the rendezvous host's (``server``) when it
    failed, else 1 if another failed, else 0."""
    codes = {}
    for c in found:
        res = subprocess.run(["docker", "inspect", "-f", "{{.State.ExitCode}}", c["id"]],
                             capture_output=True, text=True)
        codes[c["service"]] = max(codes.get(c["service"], 0), int(res.stdout.strip() or 1))
    if not codes:
        return 1
    return codes.get("server", 1) or (1 if any(codes.values()) else 0)


def host_labels(cfg: TrainConfig, found: list[dict[str, str]]) -> dict[str, str]:
    """hostname -> the namespace cluster's label (``s``, ``s2``.., ``w1``..)."""
    p = plan(cfg)
    labels = {}
    for kind in ("server", "shard", "worker"):
        group = sorted((c for c in found if c["service"] == kind),
                       key=lambda c: int(c["number"]))
        for i, c in enumerate(group):
            labels[c["hostname"]] = (p["server_label"] if kind == "server" else
                                     f"s{i + 2}" if kind == "shard" else
                                     f"w{i + p['first_worker']}")
    return labels


def read_host(hosts_dir: Path, hostname: str) -> dict[str, Any]:
    """Counter deltas of one container (``launch/node.sh``'s before/after files)."""
    snap = {}
    for when in ("before", "after"):
        base = f"{hostname}.{when}"
        snap[when] = {**parse_net_dev((hosts_dir / f"{base}.netdev").read_text()),
                      **parse_acks((hosts_dir / f"{base}.filter.json").read_text())}
    qdiscs = parse_qdiscs((hosts_dir / f"{hostname}.after.qdisc.json").read_text())
    delta = {k: snap["after"][k] - snap["before"][k] for k in snap["before"]}
    return {**delta, **qdiscs}


def snapshot_seconds(hosts_dir: Path) -> float:
    """From the first counter snapshot before a launch to the last one after its job."""
    before = [p.stat().st_mtime for p in hosts_dir.glob("*.before.netdev")]
    after = [p.stat().st_mtime for p in hosts_dir.glob("*.after.netdev")]
    return max(after) - min(before) if before and after else 0.0


def failure_lines(log: Path) -> list[str]:
    """dist_quant's own lines (and node.sh's) from compose's output, each once."""
    seen: list[str] = []
    for raw in log.read_text(errors="replace").splitlines():
        m = _LINE.match(raw)
        text = (m.group(1) if m else raw).strip()
        if (SHOWN.match(text) or text.startswith("node.sh: ")) and text not in seen:
            seen.append(text)
    return seen


DOCKER_TIMEOUT_S = 60   # one docker call of the cleanup (a daemon busy with other projects)


def _docker(argv: list[str], env: dict[str, str] | None = None) -> bool:
    """Run a docker command of the cleanup, bounded; whether it ended with status 0."""
    try:
        return subprocess.run(argv, env=env, capture_output=True, stdin=subprocess.DEVNULL,
                              timeout=DOCKER_TIMEOUT_S).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def remove_project(base: list[str], env: dict[str, str], project: str, interrupted: bool,
                   up: subprocess.Popen | None = None) -> None:
    """Remove every container and the network of ``project``. A job that did not end (Ctrl-C,
    a deadline, a failure here) is killed first: its containers get SIGKILL (``compose kill``)
    instead of compose's graceful stop, which waits for each container's stop timeout, and
    ``compose up`` itself is ended. Every docker call is bounded; whatever ``compose down``
    left is removed by the project's label."""
    if interrupted:
        _docker([*base, "kill"], env)
        if up is not None and up.poll() is None:
            up.terminate()
            try:
                up.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                up.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    up.wait(STOP_TIMEOUT_S)
    timeout = "0" if interrupted else str(STOP_TIMEOUT_S)
    if _docker([*base, "down", "--remove-orphans", "-t", timeout], env):
        return
    label = f"label=com.docker.compose.project={project}"
    for kind, remove in (("ps", ["rm", "-f"]), ("network", ["network", "rm"])):
        listing = ["docker", "ps", "-a", "-q"] if kind == "ps" else ["docker", "network",
                                                                    "ls", "-q"]
        try:
            ids = subprocess.run([*listing, "--filter", label], capture_output=True, text=True,
                                 timeout=DOCKER_TIMEOUT_S).stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            continue
        if ids:
            _docker(["docker", *remove, *ids])


def run_compose(cfg: TrainConfig, rate_mbit: float | None, latency_ms: float,
                loss_pct: float = 0.0, *, mtu: int = 1500,
                deadline_s: float | None = None, dilate: float = 1.0) -> dict[str, Any]:
    """Run ``cfg`` as one container per torchrun agent over shaped links (module docstring);
    ``dilate``: the links given are dilated by this factor
    (:meth:`dist_quant.cluster.engine.Engine.run`).

    Returns ``{"run_dir", "link", "wire", "seconds"}`` like
    :func:`dist_quant.cluster.run.run_cluster`; raises :class:`ComposeError` with the failing
    ranks' own lines when the job fails.
    """
    if cfg.simulate:
        raise ConfigError("--simulate", "the cluster runs the distributed job; drop --simulate")
    cfg = cfg.validate()
    check_config(cfg)
    link = Link(rate_mbit or None, latency_ms, loss_pct, mtu).validate()
    check_engine()
    compose = compose_command()
    run_dir = Path(cfg.run_dir or default_run_dir(cfg)).resolve()
    cfg = cfg.replace(run_dir=str(run_dir))
    hosts_dir = run_dir / "hosts"
    hosts_dir.mkdir(parents=True, exist_ok=True)
    project = f"dq{os.getpid()}x{next(_seq)}"
    env = compose_env(cfg, link, run_dir, free_subnet(), mtu, dilate)
    p = plan(cfg)
    base = [*compose, "-p", project, "-f", str(COMPOSE_FILE)]
    log = hosts_dir / "compose.log"
    tail = MetricsTail(run_dir / "metrics.jsonl", cfg, dilate=dilate)
    found: list[dict[str, str]] = []
    code = None
    proc: subprocess.Popen | None = None
    try:
        with interrupts_raise(), open(log, "w") as fh:
            # no --exit-code-from: it stops every container once the first has left, before
            # the others wrote their counters; a failed rank ends the others within --timeout
            proc = subprocess.Popen(
                [*base, "up", "--no-build", "--no-color", "--scale", f"shard={p['shard']}",
                 "--scale", f"worker={p['worker']}"],
                env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
            t0 = time.monotonic()
            while code is None:
                time.sleep(POLL_S)
                tail.poll()
                if len(found) < p["nnodes"]:
                    found = containers(project) or found
                if proc.poll() is not None:
                    found = containers(project) or found
                    code = job_status(found)
                if deadline_s is not None and time.monotonic() - t0 > deadline_s:
                    raise ClusterError(f"the job did not finish within {deadline_s:g} s")
    finally:
        tail.close()
        with no_interrupts():
            remove_project(base, env, project, interrupted=code is None, up=proc)
    if code != 0:
        lines = failure_lines(log) or [f"compose exited with status {code}; log {log}"]
        raise ComposeError("\n".join(lines), 2 if code == 2 else 1)
    summary = json.loads((run_dir / "summary.json").read_text())
    labels = host_labels(cfg, found)
    per_host = {}
    roles = {p["server_label"]: p["server_role"]}
    for hostname, label in sorted(labels.items(), key=lambda kv: kv[1]):
        per_host[label] = {"hostname": hostname,
                           "role": roles.get(label, "server" if label.startswith("s")
                                             else p["worker_role"]),
                           **read_host(hosts_dir, hostname)}
    server_host = next(h for h, lab in labels.items() if lab == p["server_label"])
    tc_commands = [x for x in (hosts_dir / f"{server_host}.log").read_text().splitlines()
                   if x.startswith(("tc ", "ip "))]
    seconds = snapshot_seconds(hosts_dir)
    link_rec = {"engine": "compose", "rate_mbit": link.rate_mbit,
                "latency_ms": link.latency_ms, "loss_pct": link.loss_pct,
                "hosts": len(per_host), "mtu": mtu, "queue_frames": QUEUE_FRAMES,
                "subnet": env["DQ_SUBNET"], "tc_commands": tc_commands}
    wire = {**wire_record(traffic(cfg), per_host, int(summary["bytes_up"]),
                          int(summary["bytes_down"])),
            "engine": "compose", "seconds": seconds, "steady": None, "per_host": per_host}
    write_json_atomic(run_dir / "link.json", link_rec)
    write_json_atomic(run_dir / "wire.json", wire)
    return {"run_dir": str(run_dir), "link": link_rec, "wire": wire, "seconds": seconds}


class ComposeEngine(Engine):
    """``--engine compose``: one container per host (``docker-compose.yml``)."""

    name = "compose"
    mark = "dc"
    help = ("one container per host (docker-compose.yml; launch/docker-host.sh prepares the "
            "machine)")
    summary = "containers of docker-compose.yml (launch/docker-host.sh prepares the machine)"

    def check(self) -> None:
        check_engine()

    def check_links(self, worker_rates: Mapping[int, float]) -> None:
        if worker_rates:
            raise ConfigError("--worker-rate", "not with --engine compose (the workers are one "
                              "scaled service); use --engine netns")

    def run(self, cfg: TrainConfig, rate_mbit: float | None, latency_ms: float,
            loss_pct: float = 0.0, *, mtu: int = 1500,
            worker_rates: Mapping[int, float] | None = None,
            dilate: float = 1.0) -> dict[str, Any]:
        self.check_links(worker_rates or {})
        return run_compose(cfg, rate_mbit, latency_ms, loss_pct, mtu=mtu, dilate=dilate)
