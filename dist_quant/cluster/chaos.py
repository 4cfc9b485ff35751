"""Chaos that changes nothing: ``dist-quant chaos`` runs a job, injects random faults into it,
and checks that it ends where the undisturbed job ends, bit for bit.

::

    dist-quant chaos --workers 2 --steps 600 --max-restarts 3 --timeout 20     # sync, loopback
    dist-quant chaos --engine netns --rate 100 --workers 2 --steps 600 --timeout 30 \\
        --kinds stop,partition --faults 3                                         # sync, netns
    dist-quant chaos --engine netns --rate 100 --workers 3 --consistency async \\
        --min-workers 2 --steps 600 --timeout 30                                 # async
    dist-quant chaos ... --chaos-seed 7        # the faults of a recorded run, again

**Synchronous jobs** (``--consistency sync``). The job runs with ``--max-restarts K`` and gets
``--faults`` faults (default K) at distinct random steps, each one of

- ``kill``: SIGKILL to a random rank (``--engine local`` only: the namespace cluster's hosts run
  torchrun without restarts). torchrun restarts every rank, which continue from the latest
  checkpoint: the job must name the rank (``rank R (...) was killed by SIGKILL`` or ``lost
  contact with rank R``) and say ``restart N``;
- ``stop``: SIGSTOP to a random rank for a random time in [0.1, 0.4] x ``--timeout``, then
  SIGCONT: no peer waits longer than ``--timeout``, so the job goes on without a restart;
- ``partition`` (``--engine netns``): a random host's link is down (its bridge port, ``ip link
  set vI down``) for a random time in [0.1, 0.3] x ``--timeout``, at most 10 s, then up: TCP
  retransmits what was lost (its back-off at most doubles the gap), so no peer waits longer than
  ``--timeout`` and the job goes on without a restart.

The synchronous step's result does not depend on timing, and a restart continues from a
checkpoint that holds everything the rest depends on, so the final checkpoint must equal the
final checkpoint of the undisturbed job (``dist-quant train --simulate`` of the same config, the
single-process reference that equals the distributed job bit for bit): every tensor of the
server's, the shards' and the workers' state, and the step.

**Asynchronous jobs** (``--consistency async --min-workers M``, ``--engine netns``): the
faults are ``lose`` (every process of a random worker's host killed, as when a host goes down;
at most W - M of them, the first fault is one) and, with ``--kinds``, ``stop`` and ``partition``
of another host as above. The job must name each lost worker (the cluster's line for the host,
the record's ``lost`` line for the worker), apply no gradient twice (every gradient of the
record is applied or dropped once: ``applied + dropped = gradients = update lines``, and every
step holds W of them: ``updates = steps x W``), and ``--simulate --replay`` of its record must
end with its final state (what measures time, or names where an arrival came from, left out)
and its test loss.

**Seeds.** Every choice (steps, kinds, targets, durations) comes from ``--chaos-seed``
(default: drawn, then printed and recorded), so a failing run is replayed with the same faults
at the same steps. The run directory (``--run-dir``, default ``runs/chaos-<time>``) holds the
disturbed job (``job/``, its ``job.out`` and ``job.err``), the undisturbed job or the replay
(``reference/``), and ``chaos.json``: the seed, every fault as planned and as injected (the
step seen, the process or link, the line of the job that named it), the checks and their
outcome. One line per fault on stderr, then one line for the outcome; exit status 0 when
every check holds, 1 when one does not (the line says which and how to replay it), 2 for a
bad option.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from dist_quant.cluster.netns import list_namespaces, require_root
from dist_quant.cluster.run import cluster_roles
from dist_quant.config import MODEL_FIELDS, GroupedCommand, GroupedOption, click_options
from dist_quant.errors import ConfigError
from dist_quant.runner.launcher import descendants, describe_rank
from dist_quant.runner.options import config_error, config_from_options

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
def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def job_command(cfg, engine: str, rate: float, latency: float) -> list[str]:
    if engine == "local":
        return [sys.executable, "-m", "dist_quant", "train", *cfg.to_argv()]
    return [sys.executable, "-m", "dist_quant", "cluster", "--engine", "netns", "--rate",
            f"{rate:g}", "--latency", f"{latency:g}", *cfg.to_argv()]


def run_job(cfg, engine: str, faults: list[Fault], out: Path, rate: float,
            latency: float) -> tuple[int, str]:
    """Run the job with its faults; returns (exit status, its stderr)."""
    run = Path(cfg.run_dir)
    err_path, out_path = out / "job.err", out / "job.out"
    with open(out_path, "w") as fout, open(err_path, "w") as ferr:
        proc = subprocess.Popen(job_command(cfg, engine, rate, latency), stdout=fout,
                                stderr=ferr, env=_env(), start_new_session=True)
        t0 = time.monotonic()
        inj = Injector(faults, engine, cfg, proc.pid, t0)
        follower = StepFollower(run / "metrics.jsonl")
        todo = list(faults)
        try:
            while proc.poll() is None:
                if time.monotonic() - t0 > JOB_LIMIT_S:
                    break
                steps = follower.new_steps()
                if todo and steps and max(steps) >= todo[0].step:
                    fault = todo.pop(0)
                    inj.inject(fault, max(steps))
                    click.echo(f"dist-quant chaos: fault {faults.index(fault) + 1}/"
                               f"{len(faults)} at step {fault.seen_step}: "
                               f"{fault.describe().split(': ', 1)[1]}", err=True)
                    follower.new_steps()   # the next fault waits for steps after this one
                time.sleep(POLL_S)
        finally:
            if proc.poll() is None:   # interrupted, or over the limit: the job goes too
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    for fault in todo:
        fault.events.append("not injected: the job ended first")
    return proc.returncode, err_path.read_text(errors="replace")


def run_reference(cfg, out: Path, replay: Path | None = None) -> int:
    """The undisturbed job in one process (``--simulate``; ``replay``: following the record
    of that run directory); its output goes to ``out/reference.err``."""
    ref = cfg.replace(simulate=True, max_restarts=0, run_dir=str(out / "reference"),
                      progress=False, replay=str(replay) if replay else "")
    with open(out / "reference.err", "w") as ferr:
        return subprocess.run([sys.executable, "-m", "dist_quant", "train", *ref.to_argv()],
                              stdout=subprocess.DEVNULL, stderr=ferr, env=_env()).returncode


# ---- the checks ----------------------------------------------------------------------------
def differences(x: Any, y: Any, where: str = "", limit: int = 5) -> list[str]:
    """Where two nested states (dicts, lists, tensors, numbers) differ, bit for bit; at most
    ``limit`` places."""
    import torch  # the states are tensors; torch stays out of the option checks

    out: list[str] = []

    def bits(t: torch.Tensor) -> torch.Tensor:   # so -0.0 differs from 0.0, NaN equals NaN
        return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)

    def walk(a: Any, b: Any, at: str) -> None:
        if len(out) >= limit:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            if a.keys() != b.keys():
                out.append(f"{at or '.'}: keys {sorted(map(str, a.keys() ^ b.keys()))}")
                return
            for k in a:
                walk(a[k], b[k], f"{at}.{k}")
        elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
            if len(a) != len(b):
                out.append(f"{at}: {len(a)} items against {len(b)}")
                return
            for i, (u, v) in enumerate(zip(a, b, strict=True)):
                walk(u, v, f"{at}[{i}]")
        elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(bits(a), bits(b)):
                out.append(at)
        elif a != b:
            out.append(at)

    walk(x, y, where)
    return out


def final_state(run_dir: Path) -> dict:
    """The latest checkpoint's state, without the config (which names the run)."""
    # torch is needed to read a checkpoint; it stays out of the option checks
    from dist_quant.runtime.checkpoint import latest_checkpoint, load_checkpoint

    state = load_checkpoint(latest_checkpoint(run_dir))
    state.pop("config", None)
    return state


def without_timing(state: dict) -> dict:
    """An asynchronous job's final state without what measures time (the workers' waits, the
    telemetry of gradients not applied yet) or names where arrivals came from (the network's
    words, the clock, the record): what its replay cannot know."""
    st = state.get("consistency")
    if isinstance(st, dict):
        st.pop("wait_by", None)
        st.pop("order", None)
        for info in [*st.get("queue", []), *st.get("held", {}).values()]:
            info.pop("telemetry", None)
            info.pop("cause", None)
    return state


def records(run_dir: Path, kind: str) -> list[dict]:
    out = []
    with contextlib.suppress(OSError):
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if rec.get("kind") == kind:
                    out.append(rec)
    return out


def summary(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


RESTART = re.compile(r"^dist_quant: restart (\d+): ")


def name_faults(faults: list[Fault], err: str, cfg) -> tuple[list[str], list[str]]:
    """What the job's output must say of each fault: (the failures, one line each; notes).

    A killed rank must be named and followed by a restart line (continuing from the latest
    checkpoint, or starting over before the first one). A restart that no fault of the plan
    explains (a peer that missed ``--timeout`` on a loaded machine) is a note, not a
    failure: the final state must still be equal."""
    lines = err.splitlines()
    restarts = [i for i, x in enumerate(lines) if RESTART.match(x)]
    problems, notes = [], []
    used: set[int] = set()
    for i, f in enumerate(faults, 1):
        if f.seen_step is None:
            problems.append(f"fault {i} ({f.describe()}) was not injected: the job ended first")
            continue
        if f.kind == "kill":
            said = [j for j, x in enumerate(lines) if f"{f.name} was killed by SIGKILL" in x
                    and j not in used]
            said += [j for j, x in enumerate(lines) if f"lost contact with {f.name}" in x
                     and j not in used]
            if not said:
                problems.append(f"fault {i} ({f.describe()}): no line of the job names {f.name}")
                continue
            j = min(said)
            after = [r for r in restarts if r > j and r not in used]
            if not after:
                problems.append(f"fault {i} ({f.describe()}): no restart followed")
            else:
                used.add(after[0])
            used.update(k for k in said if k < (after[0] if after else len(lines)))
            mine = [k for k in said if k < (after[0] if after else len(lines))]
            f.named = lines[next((k for k in mine if lines[k].endswith("SIGKILL")), j)]
        elif f.kind == "lose":
            label = f"w{f.target + 1}"
            said = [x for x in lines if f"host {label} (" in x and "goes on without it" in x]
            if not said:
                problems.append(f"fault {i} ({f.describe()}): no line of the job names host "
                                f"{label}")
            f.named = said[0] if said else ""
    for r in restarts:
        if r not in used:
            cause = next((x for x in reversed(lines[:r]) if x.startswith("dist_quant")
                          and not RESTART.match(x)), "no line before it")
            notes.append(f"a restart no fault of the plan explains: {lines[r]} (after: {cause})")
    return problems, notes


def check_sync(cfg, out: Path, faults: list[Fault], code: int, err: str) -> dict:
    job, ref = Path(cfg.run_dir), out / "reference"
    problems = [] if code == 0 else [f"the job ended with exit status {code} (see job.err)"]
    named, notes = name_faults(faults, err, cfg)
    problems += named
    diff: list[str] = []
    if code == 0:
        if run_reference(cfg, out) != 0:
            problems.append("the undisturbed run failed (see reference.err)")
        else:
            diff = differences(final_state(job), final_state(ref))
            if diff:
                problems.append("the final state differs from the undisturbed run's at "
                                + ", ".join(diff))
            if summary(job).get("test_loss") != summary(ref).get("test_loss"):
                problems.append("the test loss differs from the undisturbed run's")
    return {"problems": problems, "notes": notes, "differences": diff,
            "compared_with": "undisturbed"}


def check_async(cfg, out: Path, faults: list[Fault], code: int, err: str) -> dict:
    job = Path(cfg.run_dir)
    problems = [] if code == 0 else [f"the job ended with exit status {code} (see job.err)"]
    named, notes = name_faults(faults, err, cfg)
    problems += named
    diff: list[str] = []
    counts: dict[str, Any] = {}
    if code == 0:
        summ = summary(job)
        lost = [r["worker"] for r in records(job, "lost")]
        meant = [f.target for f in faults if f.kind == "lose" and f.seen_step is not None]
        for f in faults:   # the record's own words for the worker the job dropped
            rec = next((r for r in records(job, "lost") if r["worker"] == f.target), None)
            if f.kind == "lose" and rec is not None:
                f.named += f"; record: worker {rec['worker']} lost at step {rec['step']}: " \
                    f"{rec.get('cause', '')}"
        if sorted(lost) != sorted(meant):
            problems.append(f"the record's lost workers are {lost}; the lost hosts ran "
                            f"workers {meant}")
        updates = records(job, "update")
        counts = {"applied": sum(summ.get("applied_per_worker", [])),
                  "dropped": sum(summ.get("dropped_per_worker", [])),
                  "gradients": summ.get("gradients"), "update_lines": len(updates),
                  "updates": summ.get("updates"), "steps": summ.get("steps"),
                  "workers": cfg.workers, "workers_at_end": summ.get("workers_at_end")}
        if not counts["applied"] + counts["dropped"] == counts["gradients"] == len(updates):
            problems.append(f"the counts do not add up: applied {counts['applied']} + dropped "
                            f"{counts['dropped']}, gradients {counts['gradients']}, update "
                            f"lines {len(updates)}")
        if counts["updates"] != (counts["steps"] or 0) * cfg.workers:
            problems.append(f"{counts['updates']} gradients made the updates of "
                            f"{counts['steps']} steps of W = {cfg.workers}")
        arrivals = [r.get("arrival") for r in updates]
        if len(set(arrivals)) != len(arrivals):
            problems.append("an arrival is recorded twice")
        if run_reference(cfg, out, replay=job) != 0:
            problems.append("the replay of the job's record failed (see reference.err)")
        else:
            ref = out / "reference"
            diff = differences(without_timing(final_state(job)),
                               without_timing(final_state(ref)))
            if diff:
                problems.append("the final state differs from the replay's at "
                                + ", ".join(diff))
            if summ.get("test_loss") != summary(ref).get("test_loss"):
                problems.append("the test loss differs from the replay's")
    return {"problems": problems, "notes": notes, "differences": diff, "counts": counts,
            "compared_with": "replay"}


def run_chaos(cfg, *, engine: str = "local", faults: int = 0, seed: int | None = None,
              kinds: tuple[str, ...] = (), rate: float = 0.0, latency: float = 0.0,
              out: Path | None = None) -> dict:
    """Plan, run and check one chaos job (module docstring); returns its record (also in
    ``<out>/chaos.json``), whose ``problems`` is empty when every check held."""
    asynchronous = cfg.consistency != "sync"
    if asynchronous and cfg.consistency != "async":
        raise ConfigError("--consistency", "chaos checks sync jobs against the undisturbed "
                          "run and async jobs against their replay; got "
                          f"{cfg.consistency}")
    if cfg.backup_workers:
        raise ConfigError("--backup-workers", "which gradients a step leaves out depends on "
                          "timing: chaos checks sync jobs without backup workers against the "
                          "undisturbed run")
    if engine not in ENGINES:
        raise ConfigError("--engine", f"must be one of {', '.join(ENGINES)}; got {engine!r}")
    if asynchronous and engine != "netns":
        raise ConfigError("--engine", "an asynchronous job loses a worker's host: it needs "
                          "--engine netns (on this machine's torchrun a killed worker stops "
                          "every rank)")
    kinds = tuple(kinds) or default_kinds(asynchronous, engine)
    check_kinds(kinds, asynchronous, engine, cfg)
    count = faults or (cfg.max_restarts if not asynchronous else cfg.workers - cfg.min_alive)
    if count < 1:
        raise ConfigError("--max-restarts", "chaos injects K faults into a job with "
                          "--max-restarts K: give K >= 1 (or --faults)")
    if "kill" in kinds and cfg.max_restarts < count:
        raise ConfigError("--max-restarts", f"{count} faults may all be kills: give "
                          f"--max-restarts {count} or more")
    if cfg.max_restarts and not cfg.checkpoint_every:
        cfg = cfg.replace(checkpoint_every=cfg.eval_every)   # as the launcher would
    if engine == "netns":
        require_root()
    seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
    plan_ = plan(cfg, engine, count, seed, kinds)
    out = Path(out or f"runs/chaos-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg.replace(run_dir=str(out / "job"), progress=False)
    click.echo(f"dist-quant chaos: {len(plan_)} faults (--chaos-seed {seed}) into "
               f"{'an async' if asynchronous else 'a sync'} job on {engine}; directory {out}",
               err=True)
    started = time.time()
    code, err = run_job(cfg, engine, plan_, out, rate, latency)
    check = (check_async if asynchronous else check_sync)(cfg, out, plan_, code, err)
    rec = {"chaos_seed": seed, "engine": engine, "kinds": list(kinds), "rate": rate,
           "latency": latency, "config": cfg.to_dict(), "job_exit": code,
           "seconds": round(time.time() - started, 1), "faults": [asdict(f) for f in plan_],
           **check}
    (out / "chaos.json").write_text(json.dumps(rec, indent=1) + "\n")
    return rec


# ---- the command ---------------------------------------------------------------------------
def _chaos_option(*names: str, **kw):
    return click.option(*names, cls=GroupedOption, group="Chaos", **kw)


@click.command("chaos", cls=GroupedCommand,
               context_settings={"help_option_names": ["-h", "--help"]})
@_chaos_option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
               help="local: torchrun on this machine; netns: one network namespace per host "
                    "(needs root).")
@_chaos_option("--faults", type=int, default=0, show_default=True,
               help="How many faults (0 = --max-restarts for sync, W - --min-workers for "
                    "async).")
@_chaos_option("--kinds", default="", metavar="K[,K...]",
               help="Faults to draw from: kill, stop, partition, lose (default: kill,stop on "
                    "local, stop,partition on netns, lose for async).")
@_chaos_option("--chaos-seed", "chaos_seed", type=int, default=None,
               help="Seed of the faults (default: drawn, printed and recorded in chaos.json).")
@_chaos_option("--rate", type=float, default=0.0, show_default=True,
               help="--engine netns: every host's link in Mbit/s (0 = uncapped).")
@_chaos_option("--latency", type=float, default=0.0, show_default=True,
               help="--engine netns: one-way host-to-host latency in ms.")
@click_options(exclude=MODEL_FIELDS)
@click.pass_context
def chaos(ctx: click.Context, engine: str, faults: int, kinds: str, chaos_seed: int | None,
          rate: float, latency: float, **params: Any) -> None:
    """Inject random faults into a job and check it ends as the undisturbed job ends.

    Sync: the final checkpoint equals the undisturbed run's, bit for bit, and every fault
    that ended a process is named; async (--min-workers): the lost worker is dropped and
    named, no gradient counted twice, and --replay of the record ends equal. Writes
    chaos.json (the seed, each fault, the checks) into the run directory.
    """
    try:
        cfg, _ = config_from_options(ctx, params)
        if cfg.simulate:
            raise ConfigError("--simulate", "chaos disturbs the distributed job; drop "
                              "--simulate")
        if faults < 0:
            raise ConfigError("--faults", f"must be >= 0; got {faults}")
        out = Path(cfg.run_dir) if cfg.run_dir else None
        rec = run_chaos(cfg, engine=engine, faults=faults, seed=chaos_seed,
                        kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()),
                        rate=rate, latency=latency, out=out)
    except ConfigError as err:
        config_error(err)
    out = Path(rec["config"]["run_dir"]).parent
    for i, f in enumerate(rec["faults"], 1):
        fault = Fault(**f)
        named = f"; named: {fault.named}" if fault.named else ""
        click.echo(f"dist-quant chaos: fault {i}: {fault.describe()} "
                   f"(seen at step {fault.seen_step}){named}", err=True)
    for note in rec["notes"]:
        click.echo(f"dist-quant chaos: note: {note}", err=True)
    if rec["problems"]:
        for p in rec["problems"]:
            click.echo(f"dist-quant chaos: {p}", err=True)
        click.echo(f"dist-quant chaos: FAILED; replay the same faults with --chaos-seed "
                   f"{rec['chaos_seed']} (record {out / 'chaos.json'})", err=True)
        sys.exit(1)
    what = ("equal to the undisturbed run, bit for bit" if rec["compared_with"] == "undisturbed"
            else "counts add up, equal to the replay of its record, bit for bit")
    click.echo(f"dist-quant chaos: {len(rec['faults'])} faults survived; {what} "
               f"(--chaos-seed {rec['chaos_seed']}; {out / 'chaos.json'})")
