"""The main job: parameter-server training over torch.distributed, and its launchers.

Run it (W workers, one server)::

    dist-quant train --workers 4                                # starts torchrun itself
    torchrun --standalone --nproc-per-node 5 -m dist_quant.train --workers 4
    dist-quant train --simulate --workers 4                     # one process, same result

Two torchrun agents (two hosts, or two shells on one machine)::

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 3 --rdzv-backend c10d \\
        --rdzv-endpoint HOST0:29400 --rdzv-id job1 -m dist_quant.train --workers 5
    torchrun --nnodes 2 --node-rank 1 --nproc-per-node 3 --rdzv-backend c10d \\
        --rdzv-endpoint HOST0:29400 --rdzv-id job1 -m dist_quant.train --workers 5

Roles. The global rank 0 is the server and ranks 1..W are workers 0..W-1, unless every rank
has ``DIST_QUANT_ROLE=server|worker`` in its environment (containers whose rendezvous order is
arbitrary): then the ranks exchange their roles at start-up (one ``all_gather``); exactly one
must be the server and the workers are numbered in rank order. The worker index picks the
shard and seeds the worker's generators. ``--servers S`` (W + S ranks: servers first) and
``--colocate`` (W ranks, each worker and server; ``DIST_QUANT_ROLE=colocated``) are placed by
:mod:`dist_quant.ps.placement`. ``--workers`` may be left out under torchrun (it is
then the world size minus one); given, it must agree with the world size.

Processes and restarts. The rank's side (device, process group, restarts, the one-line
failure) is :mod:`dist_quant.runtime.rank`; this module is the command line on top of it and the
entry
of each torchrun process. A process group's timeout is ``--timeout``: a peer that dies or hangs
ends the run within it, with a message naming the peer, instead of a hang. For
``--method ddp`` the world is W ranks, all workers, and :func:`dist_quant.baselines.ddp.run_ddp`
runs.

Launcher. ``dist-quant train`` checks everything before it starts a process
(:mod:`dist_quant.runner.preflight`: options, conflicts, device, data, run directory, checkpoint),
prints the run directory, and runs torchrun through :mod:`dist_quant.runner.launcher` (its own
session, stop signals forwarded, one line per error, the raw output in ``launch.log``).

Restarts. ``--max-restarts N`` is torchrun's ``--max-restarts``; every attempt builds its
process group under its own store prefix, and on a restart every rank continues from the run
directory's latest checkpoint if there is one, exactly as ``--resume`` would
(:mod:`dist_quant.runtime.rank`).

Exit status: 0 done, 1 the run failed (lost peer, aborted, diverged), 2 bad option,
128 + signal when stopped (130 Ctrl-C, 143 SIGTERM).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from dist_quant.config import GroupedCommand, TrainConfig, click_options
from dist_quant.errors import ConfigError, RunAborted, WorkerLeaves
from dist_quant.runner.launcher import SHUTDOWN_TIMEOUT, die_with_parent, run_torchrun
from dist_quant.runner.options import config_error, config_from_options  # noqa: F401 (also from here)
from dist_quant.runtime.rank import (  # noqa: F401 (the rank's side, also reachable from here)
    STARTUP_TIMEOUT,
    attempt,
    continue_after_restart,
    default_run_dir,
    fail,
    init_process_group,
    join_job,
    lost_message,
    pick_device,
)


# ---- configuration ---------------------------------------------------------------------------
def full_argv(cfg: TrainConfig) -> list[str]:
    """Every option of ``cfg`` on a command line (so a resumed run's processes agree)."""
    return cfg.to_argv(defaults=True)


# ---- launcher --------------------------------------------------------------------------------
def torchrun_command(cfg: TrainConfig) -> list[str]:
    """``python -m dist_quant.localrun ...`` (torchrun on loopback) for this config here."""
    if cfg.simulate:
        return [sys.executable, "-m", "dist_quant.train", *full_argv(cfg)]
    nproc = cfg.world_size
    return [sys.executable, "-m", "dist_quant.localrun", "--standalone",
            "--nproc-per-node", str(nproc), "--max-restarts", str(cfg.max_restarts),
            "--shutdown-timeout", str(SHUTDOWN_TIMEOUT),
            "-m", "dist_quant.train", *full_argv(cfg)]


def launch(cfg: TrainConfig, extra_env: dict[str, str] | None = None,
           checked: bool = False) -> int:
    """Check ``cfg`` (:func:`dist_quant.runner.preflight.preflight`, unless ``checked``: a problem
    writes one line to file descriptor 2 and returns 2, nothing started), then run the job as
    a torchrun subprocess on this machine; return its exit status."""
    # preflight imports torch (the device, the data): after the options are checked
    from dist_quant.runner.preflight import preflight

    if not checked:
        try:
            cfg = preflight(cfg)
        except ConfigError as err:
            sys.stderr.flush()
            os.write(2, f"Error: {err}\n".encode())
            return 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    print(f"dist-quant train: run directory {cfg.run_dir}", file=sys.stderr, flush=True)
    return run_torchrun(torchrun_command(cfg), env, Path(cfg.run_dir), cfg.method)


@click.command("train", cls=GroupedCommand,
               context_settings={"help_option_names": ["-h", "--help"]})
@click_options()
@click.pass_context
def train_command(ctx: click.Context, **params: Any) -> None:
    """Train with W workers and a parameter server (starts torchrun; see --simulate).

    Defaults: 4 workers, 1-bit uplink in buckets of 128, fp32 downlink, MNIST-1D generated on
    the spot. Leaves a run directory (config.json, metrics.jsonl, summary.json, checkpoints/,
    launch.log). Exit status: 0 done, 1 the run failed, 2 bad option (nothing started),
    130/143 stopped by Ctrl-C/SIGTERM.

    \b
    The same job under torchrun, and on two machines (run the second line on each, NODE=0, 1):
      torchrun --standalone --nproc-per-node 5 -m dist_quant.train --workers 4
      torchrun --nnodes 2 --node-rank NODE --nproc-per-node 3 --rdzv-backend c10d \\
          --rdzv-endpoint HOST0:29400 --rdzv-id job1 -m dist_quant.train --workers 5
    """
    try:
        cfg, explicit = config_from_options(ctx, params)
        # preflight imports torch (the device, the data): after the options are checked
        from dist_quant.runner.preflight import preflight

        cfg = preflight(cfg, explicit)
        if cfg.simulate:
            click.echo(f"dist-quant train: run directory {cfg.run_dir}", err=True)
            code = run_in_process(cfg)
        else:
            code = launch(cfg, checked=True)
    except ConfigError as err:
        config_error(err)
    ctx.exit(code)


# ---- inside a torchrun process ---------------------------------------------------------------
def run_distributed(cfg: TrainConfig, workers_explicit: bool, task: Any = None) -> Any:
    """This torchrun process's part of the job; the parameter server's leader returns the
    summary (``task``: :func:`dist_quant.fit`'s model and data; None: the MLP of ``cfg``). A
    process group that existed before stays; one started here is destroyed at the end."""
    import torch.distributed as dist  # torch: in a rank's process only, not the launcher's

    owned = not dist.is_initialized()
    cfg, device, backend = join_job(cfg, workers_explicit)
    summary = None
    if cfg.method == "ddp":
        from dist_quant.baselines.ddp import run_ddp  # torch: in a rank's process only

        run_ddp(cfg)
        # every rank's outstanding collectives (the loss gathers started during backward)
        # finish before the group goes: tearing it down under one ended a rank with SIGABRT
        dist.barrier()
    else:
        from dist_quant.ps.start import run_distributed_rank  # torch: in a rank only

        rank = dist.get_rank()
        summary = run_distributed_rank(
            cfg, device, backend, task,
            on_lost=lambda err: fail(f"rank {rank}", lost_message(err, cfg), 1))
    if owned:
        dist.destroy_process_group()
    return summary


def backend_failure(err: BaseException) -> str:
    """The line for an error of torch.distributed or its backend that no role named: what
    happened and what to read first, then the error's first line without its source location
    (the traceback stays in the log)."""
    from dist_quant.core.transport import _cause  # torch: only once a rank has failed

    return (f"the process group failed (a peer ended, or the rendezvous or a link cannot be "
            f"reached); read the other ranks' lines first, then launch.log in the run directory "
            f"({type(err).__name__}: {_cause(err)})")


def run_in_process(cfg: TrainConfig) -> int:
    """The ``--simulate`` reference in this process."""
    import torch  # torch: once the options are checked (bad ones are refused without it)

    from dist_quant.core.transport import PeerLostError  # torch, as above
    from dist_quant.runner.simulate import run_simulate  # torch, as above

    torch.set_num_threads(1)
    if not cfg.run_dir:
        cfg = cfg.replace(run_dir=default_run_dir(cfg))
    try:
        run_simulate(cfg, pick_device(cfg), cfg.run_dir)
    except RunAborted as err:
        print(f"dist_quant: run aborted: {err}", file=sys.stderr, flush=True)
        return 1
    except PeerLostError as err:
        print(f"dist_quant: {lost_message(err, cfg)}", file=sys.stderr, flush=True)
        return 1
    except ConfigError as err:
        print(f"Error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


@click.command("dist_quant.train", cls=GroupedCommand,
               context_settings={"help_option_names": ["-h", "--help"]})
@click_options()
@click.pass_context
def main(ctx: click.Context, **params: Any) -> None:
    """Entry point of each torchrun process (see the module docstring)."""
    import torch  # torch: a rank's process; `--help` and bad options answer without it

    die_with_parent()
    torch.set_num_threads(1)
    try:
        cfg, explicit = config_from_options(ctx, params)
    except ConfigError as err:
        config_error(err)
    if cfg.simulate:
        ctx.exit(run_in_process(cfg))
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise click.UsageError("run under torchrun (torchrun --nproc-per-node W+1 -m "
                               "dist_quant.train ...), or use `dist-quant train`")
    from dist_quant.core.transport import PeerLostError  # torch: after the options are checked

    who = f"rank {os.environ['RANK']}"
    try:
        run_distributed(cfg, "workers" in explicit)
        code = 0
    except WorkerLeaves as err:   # ends cleanly: torchrun's agent keeps the others running
        fail(who, str(err), 0)
    except PeerLostError as err:
        fail(who, lost_message(err, cfg), 1)
    except RunAborted as err:
        fail(who, f"run aborted: {err}", 1)
    except ConfigError as err:
        fail(who, str(err), 2)
    except RuntimeError as err:  # e.g. rendezvous or store timeouts while starting up
        fail(who, backend_failure(err), 1)
    # A finished rank leaves without the interpreter's teardown: gloo's worker threads may
    # still hold work objects whose destruction during finalisation aborts the process
    # (SIGABRT: one rank of a finished 8-rank DDP run), which would fail a finished run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
