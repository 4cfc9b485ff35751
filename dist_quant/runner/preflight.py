"""Everything a launcher checks before any process starts.

:func:`preflight` runs once, in the process that would start torchrun (``dist-quant train``,
``dist-quant cluster``, :func:`dist_quant.train.launch`) or the ``--simulate`` run, after
:meth:`TrainConfig.validate`. It raises :class:`~dist_quant.errors.ConfigError` naming the
option or the file, so the command exits 2 with one line and nothing was started:

- conflicting options: ``--method ddp`` with an option of the parameter-server job given on the
  command line (a compressor other than ``none``, a downlink, buckets, error feedback,
  checkpoints, restarts ...), and ``--method ps`` with a DDP hook option; restarts under
  ``--simulate``;
- the device: ``--device cuda`` (or ``--backend nccl``) without a CUDA device;
- the data, loaded in full exactly as the ranks will load it (every check of
  :mod:`dist_quant.data`: files, keys, shapes, dtypes, finite values, labels), then every
  worker's shard against ``--batch-size`` (the message gives the largest batch size that fits);
- the run directory: a new run refuses a directory that already holds a run (continue it with
  ``--resume DIR``, or choose another ``--run-dir``); a resumed run's latest checkpoint is
  checked key by key and shape by shape against the configured model;
- the disk: the run directory (or, before it exists, the directory it would be made in) must
  take a file (a probe file is created and removed: a read-only file system or a missing
  permission is refused), and its file system must have the free space the run will fill at
  its fullest: the checkpoints kept at once, the metrics and the logs
  (:mod:`dist_quant.runner.footprint`);
- memory: the job's processes (torchrun's agent and every rank) must fit in the memory
  available, by the estimate of :mod:`dist_quant.runner.footprint` (from torch's own footprint,
  measured once, the data's peak as measured while it is loaded here, the model and the
  batch); the refusal names ``--workers`` and the estimate, and ``--force`` starts the job
  anyway. Not checked for ``--simulate`` (one process, this one).

It returns the config the processes run with: the run directory filled in, and with
``--max-restarts`` a ``--checkpoint-every`` of ``--eval-every`` when none was given (a
restart continues from the latest checkpoint, so without one it would start over).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dist_quant.config import TrainConfig
from dist_quant.data import load_dataset
from dist_quant.data.dataset import check_batch_fits
from dist_quant.errors import ConfigError
from dist_quant.ps.common import build_model
from dist_quant.ps.task import Task
from dist_quant.runner.footprint import (
    available_mb,
    job_memory_mb,
    measured_load,
    megabytes,
    model_shape,
    nearest_existing,
    rank_memory_mb,
    run_disk_nbytes,
)
from dist_quant.runtime.checkpoint import (
    CHECKPOINT_NAME,
    checkpoint_dir,
    latest_checkpoint,
    load_for_resume,
    validate_state,
)
from dist_quant.runtime.rank import default_run_dir

# options that only the parameter-server job reads, and only the DDP baseline
PS_ONLY = ("bucket_size", "bits", "header_dtype", "error_feedback", "downlink",
           "downlink_bucket_size", "on_nonfinite", "inject_nonfinite", "checkpoint_every",
           "min_workers", "inject_loss",
           "keep_checkpoints", "resume", "max_restarts")
DDP_ONLY = ("ddp_hook", "powersgd_rank")
# the uplink settings that --ddp-hook onebit reads as well (dist_quant.baselines.hooks)
ONEBIT_HOOK = ("compressor", "bucket_size", "bits", "header_dtype", "error_feedback")
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoints")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_conflicts(cfg: TrainConfig, explicit: set[str]) -> None:
    """Options given on the command line that the chosen method would silently ignore."""
    if cfg.method == "ddp":
        hooked = ONEBIT_HOOK if cfg.ddp_hook == "onebit" else ()
        if "compressor" in explicit and cfg.compressor != "none" and not hooked:
            raise ConfigError("--compressor", f"{cfg.compressor!r} compresses the parameter "
                              "server's uplink; --method ddp allreduces fp32, or compresses "
                              "with --ddp-hook fp16|powersgd, or --ddp-hook onebit "
                              f"--compressor {cfg.compressor} (this project's hook)")
        for name in PS_ONLY:
            if name in explicit and name not in hooked:
                raise ConfigError(_flag(name), "applies to the parameter-server job only "
                                  "(--method ps); drop it for --method ddp")
    else:
        for name in DDP_ONLY:
            if name in explicit and getattr(cfg, name) != TrainConfig.__dataclass_fields__[
                    name].default:
                raise ConfigError(_flag(name), "applies to --method ddp only")
    if cfg.simulate and cfg.max_restarts:
        raise ConfigError("--max-restarts", "restarts failed processes; --simulate runs in "
                          "this one process")


def check_device(cfg: TrainConfig) -> None:
    import torch

    wants_cuda = cfg.device == "cuda" or cfg.backend == "nccl"
    if wants_cuda and not torch.cuda.is_available():
        option = "--device" if cfg.device == "cuda" else "--backend"
        raise ConfigError(option, f"{getattr(cfg, option[2:])} needs a CUDA device and none "
                          "is available (use --device cpu)")


def holds_run(directory: Path) -> bool:
    return directory.is_dir() and any((directory / name).exists() for name in RUN_FILES)


def check_run_dir(cfg: TrainConfig) -> None:
    if cfg.resume or not cfg.run_dir:
        return
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("--run-dir", f"{run_dir} exists and is not a directory")
    if holds_run(run_dir):
        raise ConfigError("--run-dir", f"{run_dir} already holds a run; continue it with "
                          f"--resume {run_dir}, or choose another --run-dir")


def check_data(cfg: TrainConfig):
    """Load the dataset as the ranks will (another --task: build the task, whose one forward
    pass checks model, loss and metric); check every shard against the batch size."""

    data = load_dataset(cfg) if cfg.task == "mnist1d-mlp" else Task.from_config(cfg).data
    check_batch_fits(len(data.y_train), cfg.workers, cfg.batch_size)
    return data


def _run_dir_option(cfg: TrainConfig) -> str:
    return "--resume" if cfg.resume and Path(cfg.resume) == Path(cfg.run_dir) else "--run-dir"


def check_writable(cfg: TrainConfig) -> None:
    """The run directory, or where it would be made, takes a file (probed, then removed)."""
    import tempfile


    where = nearest_existing(Path(cfg.run_dir))
    if not where.is_dir():
        raise ConfigError(_run_dir_option(cfg), f"{cfg.run_dir}: {where} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=where, prefix=".dist_quant-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(_run_dir_option(cfg), f"cannot write in {where} "
                          f"({err.strerror or err}); choose another --run-dir") from None


def check_disk(cfg: TrainConfig, shape: tuple[int, int, int, int]) -> None:
    """Free space for the run directory at its fullest (:mod:`dist_quant.runner.footprint`)."""
    import shutil


    start = existing = 0
    if cfg.resume:

        start = int(CHECKPOINT_NAME.fullmatch(latest_checkpoint(cfg.resume).name).group(1))
        folder = checkpoint_dir(cfg.run_dir)
        existing = sum(1 for p in folder.glob("step_*.pt")) if folder.is_dir() else 0
    need, files, size = run_disk_nbytes(cfg, None if cfg.method == "ddp" else shape, start,
                                        existing)
    where = nearest_existing(Path(cfg.run_dir))
    free = shutil.disk_usage(where).free
    if free < need:
        kept = (f"{files} checkpoint(s) of {megabytes(size)} at once with --keep-checkpoints "
                f"{cfg.keep_checkpoints}, " if files else "")
        raise ConfigError(_run_dir_option(cfg), f"{where} has {megabytes(free)} free; the run "
                          f"needs about {megabytes(need)} there ({kept}metrics and logs): free "
                          "space, keep fewer checkpoints, or choose another --run-dir")


def check_memory(cfg: TrainConfig, data, n: int, data_peak: float, data_kept: float) -> None:
    """The job's estimated memory against what is available (:mod:`dist_quant.runner.footprint`)."""

    available = available_mb()
    if cfg.force or available is None:
        return
    units = data.in_features + sum(cfg.hidden_sizes) + data.num_classes
    ranks = rank_memory_mb(cfg, n, units, data_peak, data_kept)
    need = job_memory_mb(ranks)
    if need > available:
        raise ConfigError("--workers", f"{cfg.workers} workers need about {need / 1024:.1f} GiB "
                          f"({len(ranks)} processes of {min(ranks):.0f} to {max(ranks):.0f} "
                          f"MiB and torchrun's agent), and {available / 1024:.1f} GiB is "
                          "available: use fewer --workers, or --force to start anyway")


def check_checkpoint(cfg: TrainConfig, data) -> None:
    import torch


    state = load_for_resume(cfg)
    check_data_identity(cfg, data)
    model = build_model(cfg, data.in_features, data.num_classes, torch.device("cpu")) \
        if cfg.task == "mnist1d-mlp" else Task.from_config(cfg, data).model("cpu")
    validate_state(state, cfg, model, latest_checkpoint(cfg.resume))


def check_data_identity(cfg: TrainConfig, data) -> None:
    """A resumed run reads the data it was trained on: the ``"data"`` its config.json
    recorded (the text task's hash and size) must be what this machine loads now."""
    try:
        saved = json.loads((Path(cfg.resume) / "config.json").read_text()).get("data")
    except (OSError, ValueError):
        return   # read_saved_config has refused an unreadable one already
    now = data.info
    if (saved or now) and (saved or {}).get("sha256") != (now or {}).get("sha256"):
        def said(info) -> str:
            return (f"{info.get('source')} sha256 {str(info.get('sha256'))[:16]} "
                    f"({info.get('bytes')} bytes)" if info else "no recorded data")
        raise ConfigError("--resume", f"{cfg.resume} was trained on {said(saved)}; this "
                          f"machine has {said(now)}: the data differ, the run cannot continue")


def preflight(cfg: TrainConfig, explicit: set[str] | None = None) -> TrainConfig:
    """Check ``cfg`` as a whole before launching (module docstring); return the config the
    processes run with."""

    cfg = cfg.validate()
    check_conflicts(cfg, explicit or set())
    check_device(cfg)
    check_run_dir(cfg)

    data, data_peak, data_kept = measured_load(lambda: check_data(cfg))
    if cfg.resume:
        check_checkpoint(cfg, data)
    if not cfg.run_dir:
        cfg = cfg.replace(run_dir=default_run_dir(cfg))
    if cfg.max_restarts and not cfg.checkpoint_every and cfg.method == "ps":
        cfg = cfg.replace(checkpoint_every=cfg.eval_every)

    shape = model_shape(cfg, data.in_features, data.num_classes)
    check_writable(cfg)
    check_disk(cfg, shape)
    if not cfg.simulate:
        check_memory(cfg, data, shape[0], data_peak, data_kept)
    return cfg
