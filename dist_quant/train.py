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
:mod:`dist_quant.roles.placement`. ``--workers`` may be left out under torchrun (it is
then the world size minus one); given, it must agree with the world size.

Processes. Every process calls ``torch.set_num_threads(1)``; the backend is gloo for CPU
tensors and nccl when the run is on CUDA (``--backend`` overrides), with every tensor placed
on ``cuda:LOCAL_RANK`` or the CPU explicitly. Start-up (rendezvous, imports, data) may take
up to ``STARTUP_TIMEOUT``; the training traffic then runs in a process group whose timeout is
``--timeout``: a peer that dies or hangs ends the run within it, with a message naming the
peer, instead of a hang. For
``--method ddp`` the world is W ranks, all workers, and :func:`dist_quant.ddp.run_ddp` runs.

Exit status: 0 done, 1 the run failed (lost peer, aborted, diverged), 2 bad option.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from dist_quant.config import TrainConfig, click_options
from dist_quant.errors import ConfigError

ROLE_ENV = "DIST_QUANT_ROLE"
STARTUP_TIMEOUT = 300.0  # seconds allowed for rendezvous and start-up (imports, data)


# ---- configuration ---------------------------------------------------------------------------
def config_from_options(ctx: click.Context, params: dict[str, Any]) -> tuple[TrainConfig, set]:
    """The validated config of a command line, and the names of the options given explicitly.

    With ``--resume RUN_DIR`` the run's saved config is the base and only the options given on
    this command line change it (the checkpoint check refuses changes that alter the run).
    """
    from click.core import ParameterSource

    explicit = {name for name in params
                if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)}
    values = dict(params)
    if params["resume"]:
        saved = Path(params["resume"]) / "config.json"
        if not saved.is_file():
            raise ConfigError("--resume", f"{saved} not found: not a run directory")
        base = json.loads(saved.read_text())["config"]
        values = {**base, **{k: params[k] for k in explicit}, "resume": params["resume"]}
        if "run_dir" not in explicit:
            values["run_dir"] = params["resume"]
    cfg = TrainConfig.from_dict(values).validate()
    if cfg.resume:
        from dist_quant.checkpoint import load_for_resume

        load_for_resume(cfg)  # refuses an incompatible continuation before anything starts
    return cfg, explicit


def default_run_dir(cfg: TrainConfig, root: str = "runs") -> str:
    stem = Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method}"
    path, k = stem, 1
    while path.exists():
        path, k = Path(f"{stem}-{k}"), k + 1
    return str(path)


def full_argv(cfg: TrainConfig) -> list[str]:
    """Every option of ``cfg`` on a command line (so a resumed run's processes agree)."""
    return cfg.to_argv(defaults=True)


# ---- launcher --------------------------------------------------------------------------------
def torchrun_command(cfg: TrainConfig) -> list[str]:
    """``python -m torch.distributed.run --standalone ...`` for this config on this machine."""
    if cfg.simulate:
        return [sys.executable, "-m", "dist_quant.train", *full_argv(cfg)]
    nproc = cfg.world_size
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(nproc), "-m", "dist_quant.train", *full_argv(cfg)]


def launch(cfg: TrainConfig, extra_env: dict[str, str] | None = None) -> int:
    """Run the job as a torchrun subprocess on this machine; return its exit status."""
    cfg = cfg.validate()
    if not cfg.run_dir:
        cfg = cfg.replace(run_dir=default_run_dir(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    return subprocess.run(torchrun_command(cfg), env=env).returncode


@click.command("train", context_settings={"help_option_names": ["-h", "--help"]})
@click_options()
@click.pass_context
def train_command(ctx: click.Context, **params: Any) -> None:
    """Train with W workers and a parameter server (starts torchrun; see --simulate).

    Defaults: 4 workers, 1-bit uplink in buckets of 128, fp32 downlink, MNIST-1D generated on
    the spot. Leaves a run directory (config.json, metrics.jsonl, summary.json, checkpoints/).
    Exit status: 0 done, 1 the run failed, 2 bad option.

    \b
    The same job under torchrun, and on two machines (run the second line on each, NODE=0, 1):
      torchrun --standalone --nproc-per-node 5 -m dist_quant.train --workers 4
      torchrun --nnodes 2 --node-rank NODE --nproc-per-node 3 --rdzv-backend c10d \\
          --rdzv-endpoint HOST0:29400 --rdzv-id job1 -m dist_quant.train --workers 5
    """
    try:
        cfg, _ = config_from_options(ctx, params)
    except ConfigError as err:
        raise click.BadParameter(str(err).split(": ", 1)[-1], param_hint=err.option) from None
    if cfg.simulate:
        ctx.exit(run_in_process(cfg))
    ctx.exit(launch(cfg))


# ---- inside a torchrun process ---------------------------------------------------------------
def pick_device(cfg: TrainConfig):
    import torch

    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device", "cuda requested but no CUDA device is available")
    index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def run_distributed(cfg: TrainConfig, workers_explicit: bool) -> int:
    import torch.distributed as dist

    device = pick_device(cfg)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda"
                                                         else "gloo")
    dist.init_process_group(backend, timeout=datetime.timedelta(
        seconds=max(cfg.timeout, STARTUP_TIMEOUT)))
    world = dist.get_world_size()
    expected = cfg.world_size
    if workers_explicit and world != expected:
        raise ConfigError("--workers", f"{cfg.workers} workers need {expected} processes, "
                          f"torchrun started {world}")
    cfg = cfg.replace(workers=cfg.workers_in(world)).validate()
    if cfg.method == "ddp":
        from dist_quant.ddp import run_ddp

        run_ddp(cfg)
        # every rank's outstanding collectives (the loss gathers started during backward)
        # finish before the group goes: tearing it down under one ended a rank with SIGABRT
        dist.barrier()
        dist.destroy_process_group()
        return 0

    from dist_quant.roles.exchange import run_distributed_rank

    run_distributed_rank(cfg, device, backend)
    dist.destroy_process_group()
    return 0


def run_in_process(cfg: TrainConfig) -> int:
    """The ``--simulate`` reference in this process."""
    import torch

    from dist_quant.roles.worker import RunAborted
    from dist_quant.simulate import run_simulate

    torch.set_num_threads(1)
    if not cfg.run_dir:
        cfg = cfg.replace(run_dir=default_run_dir(cfg))
    try:
        run_simulate(cfg, pick_device(cfg), cfg.run_dir)
    except RunAborted as err:
        print(f"dist_quant: run aborted: {err}", file=sys.stderr, flush=True)
        return 1
    except ConfigError as err:  # found once the model exists (e.g. more shards than buckets)
        print(f"dist_quant: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


def _fail(who: str, message: str, code: int) -> None:
    """Print one clear line and leave at once (a broken process group may block teardown)."""
    print(f"dist_quant {who}: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


@click.command("dist_quant.train", context_settings={"help_option_names": ["-h", "--help"]})
@click_options()
@click.pass_context
def main(ctx: click.Context, **params: Any) -> None:
    """Entry point of each torchrun process (see the module docstring)."""
    import torch

    torch.set_num_threads(1)
    try:
        cfg, explicit = config_from_options(ctx, params)
    except ConfigError as err:
        raise click.BadParameter(str(err).split(": ", 1)[-1], param_hint=err.option) from None
    if cfg.simulate:
        ctx.exit(run_in_process(cfg))
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise click.UsageError("run under torchrun (torchrun --nproc-per-node W+1 -m "
                               "dist_quant.train ...), or use `dist-quant train`")
    from dist_quant.roles.worker import RunAborted
    from dist_quant.transport import PeerLostError

    who = f"rank {os.environ['RANK']}"
    try:
        code = run_distributed(cfg, "workers" in explicit)
    except PeerLostError as err:
        _fail(who, f"{err}: a peer died or did not answer within --timeout {cfg.timeout:g} s; "
              "ending the run", 1)
    except RunAborted as err:
        _fail(who, f"run aborted: {err}", 1)
    except ConfigError as err:
        _fail(who, str(err), 2)
    except RuntimeError as err:  # e.g. rendezvous or store timeouts while starting up
        _fail(who, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", 1)
    ctx.exit(code)


if __name__ == "__main__":
    main()
