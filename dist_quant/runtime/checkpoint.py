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
``generator``, its bounds) beside the model (:mod:`dist_quant.ps.state`). A synchronous
parameter-server checkpoint also holds ``"eval_stop"``: None, or ``{"eval_step": s, "at": t}``
when the evaluation of step s reached ``--stop-accuracy`` and the run is to stop at step t
(``--eval-lag``); no evaluation is in flight at a checkpoint.

The workers send their states to the server at checkpoint steps and the server writes the one
file, so a multi-host run needs no shared file system. Every random stream the run draws from
is in it (the global RNG is never used), so a run resumed from step ``t`` continues bit for
bit like the uninterrupted one (same device type, same seed).

Writes are atomic: the file is written as ``step_<t>.pt.tmp`` and renamed, then ``latest``
(a text file holding the checkpoint's file name) is replaced the same way. A crash leaves
either the previous or the new checkpoint current, never a torn one. A disk that cannot take
the write (full, read-only, permission) leaves no ``.tmp`` behind and raises
:class:`~dist_quant.runtime.diskfault.DiskFault`, which names the newest complete checkpoint.

Size on disk: :func:`checkpoint_nbytes` (what preflight reserves for ``--keep-checkpoints``).

Retention (``--keep-checkpoints K``): once ``latest`` names the new file, all but the ``K``
newest ``step_<t>.pt`` are unlinked, oldest first (each unlink is atomic, and the one
``latest`` names is never among them); ``K = 0`` keeps all.

Reading is checked before anything starts (:func:`validate_state`): ``latest`` must hold a
bare ``step_<t>.pt`` name (it is never followed out of its directory), the file must load with
``weights_only=True`` and hold every key above, with every tensor of the server's and the
workers' models, the replica and the momentum buffers shaped as the configured model's.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from dist_quant.config import TrainConfig
from dist_quant.core.optim import DecoupledMomentumSGD, decay_param_groups
from dist_quant.errors import ConfigError
from dist_quant.runtime.checkpoint_files import (  # noqa: F401 (the reading side, re-exported)
    CHECKPOINT_NAME,
    checkpoint_dir,
    checkpoint_files,
    latest_checkpoint,
)
from dist_quant.runtime.diskfault import disk_write, write_all

# fields that may change between a run and its continuation (all others define the trajectory)
RESUMABLE_CHANGES = frozenset({
    "steps", "run_dir", "resume", "progress", "eval_every", "checkpoint_every", "timeout",
    "backend", "device", "stop_accuracy", "simulate", "keep_checkpoints", "max_restarts",
    "force",
    "replay",
})
SERVER_KEYS = ("step", "model", "optimizer", "replica", "generator")
WORKER_KEYS = ("index", "step", "model", "generator", "dropout_generator", "sampler",
               "compressor")


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 0) -> Path:
    """Write ``checkpoints/step_<step>.pt`` atomically, point ``latest`` at it, then keep only
    the ``keep`` newest checkpoints (0 = all)."""
    directory = checkpoint_dir(run_dir)
    path = directory / f"step_{step}.pt"
    tmp = path.with_name(path.name + ".tmp")
    latest_tmp = directory / "latest.tmp"
    buffer = io.BytesIO()
    torch.save(state, buffer)   # serialised first: a failed write below is an OSError

    def undo() -> None:
        tmp.unlink(missing_ok=True)
        latest_tmp.unlink(missing_ok=True)

    with disk_write(path, step, Path(run_dir), undo=undo):
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, buffer.getbuffer())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        latest_tmp.write_text(path.name + "\n")
        os.replace(latest_tmp, directory / "latest")
        if keep > 0:
            prune_checkpoints(directory, keep, current=path.name)
    return path


def prune_checkpoints(directory: Path, keep: int, current: str) -> list[Path]:
    """Unlink all but the ``keep`` newest checkpoints (never ``current``); return them."""
    files = [p for p in checkpoint_files(directory) if p.name != current]
    doomed = files[:max(0, len(files) - (keep - 1))]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (any unreadable file is the same user error)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError("--resume", f"cannot read checkpoint {path}: {first}") from err
    if not isinstance(state, dict) or state.get("format") != 1:
        raise ConfigError("--resume", f"{path} is not a dist_quant checkpoint (format 1)")
    for key in ("step", "config", "server", "workers"):
        if key not in state:
            raise ConfigError("--resume", f"{path}: the checkpoint has no {key!r} entry")
    if not isinstance(state["config"], dict) or not isinstance(state["server"], dict) \
            or not isinstance(state["workers"], list):
        raise ConfigError("--resume", f"{path}: 'config', 'server' or 'workers' has the wrong "
                          "type")
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


def _shape_error(path: Any, where: str, expected: dict[str, torch.Size], got: Any) -> None:
    if not isinstance(got, dict):
        raise ConfigError("--resume", f"{path}: {where} is not a dict of tensors")
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise ConfigError("--resume", f"{path}: {where} "
                          + (f"lacks {missing[0]!r}" if missing else f"has unknown {extra[0]!r}")
                          + " (not written for this model)")
    for name, shape in expected.items():
        value = got[name]
        if not isinstance(value, torch.Tensor) or value.shape != shape:
            what = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ConfigError("--resume", f"{path}: {where}[{name!r}] has shape {what}, the "
                              f"configured model needs {tuple(shape)}")


def validate_state(state: dict[str, Any], cfg: TrainConfig, model: torch.nn.Module,
                   path: Any = "checkpoint") -> None:
    """Every key and tensor shape of a checkpoint against ``model`` (built from ``cfg``);
    ConfigError(--resume) naming the file and the first entry that does not fit."""
    server = state["server"]
    for key in SERVER_KEYS:
        if key not in server:
            raise ConfigError("--resume", f"{path}: the server state has no {key!r} entry")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    _shape_error(path, "server.model", shapes, server["model"])
    n = sum(p.numel() for p in model.parameters())
    replica = server["replica"]
    if not isinstance(replica, torch.Tensor) or replica.numel() != n:
        raise ConfigError("--resume", f"{path}: server.replica does not hold the model's {n} "
                          "parameters")
    opt = server["optimizer"]
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict):
        raise ConfigError("--resume", f"{path}: server.optimizer is not an optimizer state")

    fresh = DecoupledMomentumSGD(decay_param_groups(model, cfg.weight_decay, cfg.decay_all),
                                 lr=cfg.lr, momentum=cfg.momentum)
    params = [p for group in fresh.param_groups for p in group["params"]]  # state_dict order
    for index, entry in opt["state"].items():
        buf = entry.get("momentum_buffer") if isinstance(entry, dict) else None
        if not (isinstance(index, int) and 0 <= index < len(params)) or (
                buf is not None and (not isinstance(buf, torch.Tensor)
                                     or buf.shape != params[index].shape)):
            raise ConfigError("--resume", f"{path}: server.optimizer's momentum buffer "
                              f"{index!r} does not fit the configured model")
    if len(state["workers"]) != cfg.workers:
        raise ConfigError("--resume", f"{path}: holds {len(state['workers'])} worker states, "
                          f"the run has {cfg.workers} workers")
    lost = set(state.get("consistency", {}).get("gone", []))
    for i, worker in enumerate(state["workers"]):
        if worker is None and i in lost:   # dropped by --min-workers before this checkpoint
            continue
        if not isinstance(worker, dict):
            raise ConfigError("--resume", f"{path}: worker {i}'s state is not a dict")
        for key in WORKER_KEYS:
            if key not in worker:
                raise ConfigError("--resume", f"{path}: worker {i}'s state has no {key!r} entry")
        if worker["index"] != i:
            raise ConfigError("--resume", f"{path}: worker {i}'s state is worker "
                              f"{worker['index']!r}'s")
        _shape_error(path, f"workers[{i}].model", shapes, worker["model"])
