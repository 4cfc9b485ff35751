"""Atomic checkpoints of a run, and resuming from them.

A checkpoint ``<run_dir>/checkpoints/step_<t>.pt`` is a ``torch.save`` of plain containers and
tensors (loaded with ``weights_only=True``)::

    {"format": 1, "step": t, "config": TrainConfig as a dict,
     "server":  {"step", "model" (parameters and BN buffers), "optimizer" (momentum buffers),
                 "replica" (the workers' replica the server tracks), "generator" (downlink
                 quantiser state)},
     "workers": [ {"index", "step", "model" (replica and the worker's BN running statistics),
                   "generator" (quantiser), "dropout_generator", "sampler" (epoch, position),
                   "compressor" (error-feedback residual or {})} for each worker ]}

With ``--servers S > 1`` or ``--colocate`` the file also holds ``"shards"`` (the states of
shards 1..S-1) and ``"server"`` holds shard 0's (``theta``, ``optimizer``, ``replica``,
``generator``, its bounds) beside the model (:mod:`dist_quant.roles.exchange`).

The workers send their states to the server at checkpoint steps and the server writes the one
file, so a multi-host run needs no shared file system. Every random stream the run draws from
is in it (the global RNG is never used), so a run resumed from step ``t`` continues bit for
bit like the uninterrupted one (same device type, same seed).

Writes are atomic: the file is written as ``step_<t>.pt.tmp`` and renamed, then ``latest``
(a text file holding the checkpoint's file name) is replaced the same way. A crash leaves
either the previous or the new checkpoint current, never a torn one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dist_quant.config import TrainConfig
from dist_quant.errors import ConfigError

# fields that may change between a run and its continuation (all others define the trajectory)
RESUMABLE_CHANGES = frozenset({
    "steps", "run_dir", "resume", "progress", "eval_every", "checkpoint_every", "timeout",
    "backend", "device", "stop_accuracy", "simulate",
})


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any]) -> Path:
    """Write ``checkpoints/step_<step>.pt`` atomically and point ``latest`` at it."""
    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step}.pt"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    latest_tmp = directory / "latest.tmp"
    latest_tmp.write_text(path.name + "\n")
    os.replace(latest_tmp, directory / "latest")
    return path


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint ``latest`` names; ConfigError(--resume) when there is none."""
    latest = checkpoint_dir(run_dir) / "latest"
    if not latest.is_file():
        raise ConfigError("--resume", f"no checkpoint in {run_dir} (missing {latest})")
    path = latest.parent / latest.read_text().strip()
    if not path.is_file():
        raise ConfigError("--resume", f"{latest} names {path.name}, which does not exist")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (any unreadable file is the same user error)
        raise ConfigError("--resume", f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(state, dict) or state.get("format") != 1:
        raise ConfigError("--resume", f"{path} is not a dist_quant checkpoint (format 1)")
    return state


def check_compatible(saved: dict[str, Any], cfg: TrainConfig, step: int) -> None:
    """The continuation must follow the same trajectory: same options except
    ``RESUMABLE_CHANGES``, and more steps than already done."""
    current = cfg.to_dict()
    for name in sorted(current):
        if name in RESUMABLE_CHANGES or name not in saved:
            continue
        if saved[name] != current[name]:
            raise ConfigError("--" + name.replace("_", "-"),
                              f"is {current[name]!r} but the checkpoint was written with "
                              f"{saved[name]!r}; a resumed run keeps it")
    if step >= cfg.steps:
        raise ConfigError("--steps", f"the checkpoint is at step {step}; pass --steps > {step} "
                          "to continue the run")


def load_for_resume(cfg: TrainConfig) -> dict[str, Any]:
    """The latest checkpoint of ``cfg.resume``, checked against ``cfg``."""
    state = load_checkpoint(latest_checkpoint(cfg.resume))
    check_compatible(state["config"], cfg, int(state["step"]))
    return state
