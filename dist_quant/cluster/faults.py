"""The faults of a chaos run: which kinds a job can survive, the seeded plan of when and where
they strike, and their injection into the running job's processes and links
(:mod:`dist_quant.cluster.chaos` has the whole contract)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from dist_quant.cluster.netns import list_namespaces
from dist_quant.cluster.run import cluster_roles
from dist_quant.errors import ConfigError
from dist_quant.runner.launcher import descendants, describe_rank

KINDS = ("kill", "stop", "partition", "lose")
ENGINES = ("local", "netns")
STOP_SHARE = (0.1, 0.4)        # a SIGSTOP lasts this share of --timeout
PARTITION_SHARE = (0.1, 0.3)   # a partition this share (TCP's back-off may double the gap)
PARTITION_MAX_S = 10.0
POLL_S = 0.05
JOB_LIMIT_S = 3600.0           # a job that has not ended by then is stopped and fails


@dataclass
class Fault:
    """One fault: planned (kind, step, target, seconds), then as injected."""

    kind: str
    step: int                  # injected once a step line >= this one appears
    target: int                # kill/stop (local): rank; netns: host index; lose: worker
    seconds: float = 0.0       # stop and partition: how long
    name: str = ""             # the target in words
    seen_step: int | None = None
    pid: int | None = None
    injected_at: float | None = None   # seconds since the job started
    named: str = ""            # the job's line that names it (kill, lose)
    events: list[str] = field(default_factory=list)

    def describe(self) -> str:
        what = {"kill": f"SIGKILL to {self.name}",
                "stop": f"SIGSTOP to {self.name} for {self.seconds:.1f} s, then SIGCONT",
                "partition": f"link of {self.name} down for {self.seconds:.1f} s, then up",
                "lose": f"{self.name} goes down (every process killed)"}[self.kind]
        return f"step {self.step}: {what}"


# ---- the plan ------------------------------------------------------------------------------
def default_kinds(asynchronous: bool, engine: str) -> tuple[str, ...]:
    if asynchronous:
        return ("lose",)
    return ("kill", "stop") if engine == "local" else ("stop", "partition")


def check_kinds(kinds: tuple[str, ...], asynchronous: bool, engine: str, cfg) -> None:
    """Refuse a kind this engine and mode cannot survive (ConfigError naming --kinds)."""
    for k in kinds:
        if k not in KINDS:
            raise ConfigError("--kinds", f"unknown fault {k!r}; choose from {', '.join(KINDS)}")
    if "partition" in kinds and engine != "netns":
        raise ConfigError("--kinds", "partition cuts a host's link: it needs --engine netns")
    if "kill" in kinds and (engine != "local" or asynchronous):
        raise ConfigError("--kinds", "kill is survived by torchrun's restarts of a synchronous "
                          "job on this machine (--engine local); the namespace cluster's hosts "
                          "run without restarts (an asynchronous job loses a worker: lose)")
    if "lose" in kinds and not (asynchronous and engine == "netns"):
        raise ConfigError("--kinds", "lose takes a worker's host down: it needs --consistency "
                          "async --min-workers M < W on --engine netns")
    if asynchronous and "lose" in kinds and cfg.min_alive >= cfg.workers:
        raise ConfigError("--min-workers", "a lost worker ends the job unless --min-workers "
                          f"M < W = {cfg.workers} lets it go on")


def plan(cfg, engine: str, count: int, seed: int, kinds: tuple[str, ...]) -> list[Fault]:
    """``count`` faults at distinct steps in [steps/10, 9 steps/10), drawn from ``seed``.

    Local ranks are 0..world-1 (rank 0 the server); netns targets are hosts (their index in
    the cluster's labels); a lost worker is a worker index (at most W - M of them, distinct,
    the first fault among them; a stop or partition of an asynchronous job hits another
    worker, never the server or a lost one)."""
    rng = random.Random(seed)
    lo, hi = max(2, cfg.steps // 10), max(3, cfg.steps - cfg.steps // 10)
    if hi - lo < count:
        raise ConfigError("--faults", f"{count} faults need more steps than --steps "
                          f"{cfg.steps} leaves between step {lo} and step {hi}")
    steps = sorted(rng.sample(range(lo, hi), count))
    asynchronous = cfg.consistency != "sync"
    labels = cluster_roles(cfg)[0] if engine == "netns" else []
    lose_left = cfg.workers - cfg.min_alive if asynchronous else 0
    lost: list[int] = []
    faults = []
    for i, step in enumerate(steps):
        choice = [k for k in kinds if k != "lose" or lose_left > 0]
        kind = "lose" if "lose" in choice and i == 0 else rng.choice(choice)
        if kind == "lose":
            worker = rng.choice([w for w in range(cfg.workers) if w not in lost])
            lost.append(worker)
            lose_left -= 1
            faults.append(Fault(kind, step, worker, name=f"host w{worker + 1} (worker {worker})"))
            continue
        seconds = 0.0
        if kind in ("stop", "partition"):
            share = STOP_SHARE if kind == "stop" else PARTITION_SHARE
            seconds = round(rng.uniform(*share) * cfg.timeout, 2)
            if kind == "partition":
                seconds = min(seconds, PARTITION_MAX_S)
        if engine == "local":
            rank = rng.randrange(cfg.world_size)
            faults.append(Fault(kind, step, rank, seconds, describe_rank(rank, cfg.method)))
            continue
        hosts = range(len(labels))
        if asynchronous:   # the survivors of an asynchronous job: not the server, not lost
            hosts = [h for h in hosts if labels[h].startswith("w")
                     and int(labels[h][1:]) - 1 not in lost]
        host = rng.choice(list(hosts))
        name = f"host {labels[host]}" if kind == "partition" else f"the rank on host {labels[host]}"
        faults.append(Fault(kind, step, host, seconds, name))
    return faults


# ---- the processes -------------------------------------------------------------------------
def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _is_rank(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"dist_quant.train" in cmd and b"dist_quant.localrun" not in cmd


def _restart_count(env: list[bytes]) -> int:
    for item in env:
        if item.startswith(b"TORCHELASTIC_RESTART_COUNT="):
            return int(item.split(b"=", 1)[1] or 0)
    return -1


def local_rank_pid(job: int, rank: int) -> int | None:
    """The live process of global rank ``rank`` of the newest attempt below ``job``."""
    best: tuple[int, int] | None = None
    for pid in descendants(job):
        env = _environ(pid)
        if f"RANK={rank}".encode() not in env or not _is_rank(pid) or not _alive(pid):
            continue
        attempt = _restart_count(env)
        if best is None or attempt > best[0]:
            best = (attempt, pid)
    return None if best is None else best[1]


def host_namespace(job: int, label: str) -> str | None:
    """The namespace of host ``label`` of the cluster that process ``job`` built."""
    return next((n for n in list_namespaces() if n.startswith(f"dq{job}-")
                 and n.endswith(f"-{label}")), None)


def namespace_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                         timeout=60)
    return [int(p) for p in out.stdout.split()]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], capture_output=True, text=True, timeout=60, check=True)


class Injector:
    """Injects the faults of a plan into a running job (``job``: its top process's pid)."""

    def __init__(self, faults: list[Fault], engine: str, cfg, job: int, t0: float):
        self.faults, self.engine, self.cfg, self.job, self.t0 = faults, engine, cfg, job, t0
        self.labels = cluster_roles(cfg)[0] if engine == "netns" else []

    def inject(self, fault: Fault, step: int) -> None:
        """Inject ``fault`` now (blocks for a stop or a partition, and always ends them)."""
        fault.seen_step = step
        fault.injected_at = round(time.monotonic() - self.t0, 2)
        if fault.kind == "lose":
            ns = host_namespace(self.job, f"w{fault.target + 1}")
            pids = namespace_pids(ns) if ns else []
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            fault.events.append(f"SIGKILL to {len(pids)} processes of {ns}")
            return
        if fault.kind == "partition":
            hub = host_namespace(self.job, "hub")
            if hub is None:
                fault.events.append("no cluster found: not injected")
                return
            port = f"v{fault.target}"
            try:
                _ip("-n", hub, "link", "set", port, "down")
                fault.events.append(f"{hub} {port} down")
                time.sleep(fault.seconds)
            finally:
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    _ip("-n", hub, "link", "set", port, "up")
                    fault.events.append(f"{hub} {port} up")
            return
        pid = self._rank_pid(fault)
        fault.pid = pid
        if pid is None:
            fault.events.append("no such process: not injected")
            return
        if fault.kind == "kill":
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            fault.events.append(f"SIGKILL to pid {pid}")
            return
        try:
            os.kill(pid, signal.SIGSTOP)
            fault.events.append(f"SIGSTOP to pid {pid}")
            time.sleep(fault.seconds)
        except ProcessLookupError:
            fault.events.append(f"pid {pid} was gone")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                fault.events.append(f"SIGCONT to pid {pid}")

    def _rank_pid(self, fault: Fault) -> int | None:
        if self.engine == "local":
            return local_rank_pid(self.job, fault.target)
        ns = host_namespace(self.job, self.labels[fault.target])
        if ns is None:
            return None
        ranks = [p for p in namespace_pids(ns) if _is_rank(p) and _alive(p)
                 and any(e.startswith(b"LOCAL_RANK=") for e in _environ(p))]
        return max(ranks, key=lambda p: _restart_count(_environ(p))) if ranks else None


class StepFollower:
    """The step lines appended to a ``metrics.jsonl`` (whole lines only)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.rest = path, 0, b""

    def new_steps(self) -> list[int]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return []
        self.offset += len(data)
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        steps = []
        for line in lines:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                rec = json.loads(line)
                if rec.get("kind") == "step":
                    steps.append(int(rec["step"]))
        return steps


# ---- the runs ------------------------------------------------------------------------------
