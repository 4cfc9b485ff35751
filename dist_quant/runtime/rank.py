"""Inside one torchrun process: the device, the process group, restarts and failures.

The rank's side of :mod:`dist_quant.train`, kept below everything that runs on a rank
(:mod:`dist_quant.ps.sync_step`, :mod:`dist_quant.ps.async_rank`, :mod:`dist_quant.baselines.ddp`,
:mod:`dist_quant.runner.preflight`, :mod:`dist_quant.runner.simulate`): it imports none of
them, so the command line (:mod:`dist_quant.train`) sits on top and nothing imports it back.

Processes. Every process calls ``torch.set_num_threads(1)``; the backend is gloo for CPU
tensors and nccl when the run is on CUDA (``--backend`` overrides), with every tensor placed
on ``cuda:LOCAL_RANK`` or the CPU explicitly. Start-up (rendezvous, imports, data) may take
up to ``STARTUP_TIMEOUT``; the training traffic then runs in a process group whose timeout is
``--timeout``.

Restarts. torchrun's agent keeps one TCP store for all attempts, and ``env://`` start-up
would read the keys of the previous attempt (the dead ranks' gloo addresses), so every process
group here is built on that store under the prefix ``dist_quant/attempt-<N>``
(:func:`init_process_group`). On a restart the server's run directory decides whether every
rank continues from its latest checkpoint (:func:`continue_after_restart`).
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

from dist_quant.config import TrainConfig
from dist_quant.errors import ConfigError
from dist_quant.runtime.checkpoint_files import checkpoint_dir

STARTUP_TIMEOUT = 300.0  # seconds allowed for rendezvous and start-up (imports, data)


def default_run_dir(cfg: TrainConfig, root: str = "runs") -> str:
    """``runs/<time>-<method>`` (a suffix ``-k`` when it exists already)."""
    stem = Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method}"
    path, k = stem, 1
    while path.exists():
        path, k = Path(f"{stem}-{k}"), k + 1
    return str(path)


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


def attempt() -> int:
    """torchrun's restart count (0 on the first attempt and outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def init_process_group(backend: str, timeout: float) -> None:
    """``init_process_group`` on the env:// store, its keys prefixed by the attempt (see the
    module docstring: the agent's store outlives a failed attempt)."""
    import torch.distributed as dist
    from torch.distributed.rendezvous import rendezvous

    delta = datetime.timedelta(seconds=timeout)
    store, rank, world = next(rendezvous("env://", timeout=delta))
    store = dist.PrefixStore(f"dist_quant/attempt-{attempt()}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=delta)


def continue_after_restart(cfg: TrainConfig, is_server: bool, server_rank: int,
                           device) -> TrainConfig:
    """On a torchrun restart: the server's run directory decides (one broadcast) whether every
    rank continues from its latest checkpoint (``resume = run_dir``) or starts over."""
    import torch
    import torch.distributed as dist


    if attempt() == 0:
        return cfg
    found = int(is_server and bool(cfg.run_dir)
                and (checkpoint_dir(cfg.run_dir) / "latest").is_file())
    flag = torch.tensor([found], dtype=torch.int64, device=device)
    dist.broadcast(flag, src=server_rank)
    if not int(flag[0]):   # a restart before the first checkpoint: said too, not silent
        if is_server:
            print(f"dist_quant: restart {attempt()}: no checkpoint in {cfg.run_dir or 'the run'}"
                  " yet; starting over from step 0", file=sys.stderr, flush=True)
        return cfg
    if is_server:
        print(f"dist_quant: restart {attempt()}: continuing from the latest checkpoint of "
              f"{cfg.run_dir}", file=sys.stderr, flush=True)
    return cfg.replace(resume=cfg.run_dir)


def join_job(cfg: TrainConfig, workers_explicit: bool):
    """This torchrun process joins the job: (the config with ``workers`` from the world size,
    device, backend). Starts the process group (:func:`init_process_group`) unless one exists."""
    import torch.distributed as dist

    device = pick_device(cfg)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda"
                                                         else "gloo")
    if not dist.is_initialized():
        init_process_group(backend, max(cfg.timeout, STARTUP_TIMEOUT))
    world = dist.get_world_size()
    if workers_explicit and world != cfg.world_size:
        raise ConfigError("--workers", f"{cfg.workers} workers need {cfg.world_size} processes, "
                          f"torchrun started {world}")
    return cfg.replace(workers=cfg.workers_in(world)).validate(), device, backend


def lost_message(err: Exception, cfg: TrainConfig) -> str:
    return (f"{err}: a peer died or did not answer within --timeout {cfg.timeout:g} s; "
            "ending the run")


def fail(who: str, message: str, code: int) -> None:
    """Print one clear line and leave at once (a broken process group may block teardown)."""
    sys.stdout.flush()
    sys.stderr.flush()
    # one write: the ranks share torchrun's stderr, and print() may split text and newline
    os.write(2, f"dist_quant {who}: {message}\n".encode())
    os._exit(code)
