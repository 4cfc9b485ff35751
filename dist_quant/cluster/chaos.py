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
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from dist_quant.cluster.faults import (
    ENGINES,
    JOB_LIMIT_S,
    POLL_S,
    Fault,
    Injector,
    StepFollower,
    check_kinds,
    default_kinds,
    plan,
)
from dist_quant.cluster.netns import require_root
from dist_quant.cluster.verdict import _env, check_async, check_sync
from dist_quant.config import MODEL_FIELDS, GroupedCommand, GroupedOption, click_options
from dist_quant.errors import ConfigError
from dist_quant.runner.options import config_error, config_from_options


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
