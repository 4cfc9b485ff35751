"""The values a configuration may take, the headings its options are listed under, and the
small parsers the checks and the fields share."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

METHODS = ("ps", "ddp")
DDP_HOOKS = ("none", "fp16", "powersgd", "onebit")
HEADER_DTYPES = ("fp32", "fp16")
INITS = ("he", "lecun", "double")
BACKENDS = ("auto", "gloo", "nccl")
DEVICES = ("auto", "cpu", "cuda")
ON_NONFINITE = ("skip", "abort")
LR_SCHEDULES = ("constant", "step", "cosine")
# the consistency modes: the built-in ones; dist_quant.ps.consistency.register_policy adds one
CONSISTENCY = ["sync", "ssp", "async"]
CLOCKS = ("wall", "dedicated")
# the options of the modelled cluster (--clock dedicated); the real clusters have their own
LINK_FIELDS = ("rate", "latency", "mtu", "worker_rate")
MODEL_FIELDS = (*LINK_FIELDS, "host_speed", "calibration")
BUILTIN_DATASETS = ("mnist1d", "teacher", "mnist")
# --task: what is trained (dist_quant.ps.task); the first is the default, the MLP on --dataset
TASKS = ("mnist1d-mlp", "shapes-cnn", "text-transformer")
# each task's own defaults: what a command line or a sweep point of that --task takes for the
# options it does not give (the MLP's defaults diverge on these models: lr 0.2 drove both to a
# loss in the hundreds within 20 steps). The CNN's are the example's (examples/cnn_shapes.py);
# the transformer's, AdamW at 1e-3 on batches of 16 windows, were chosen by a scan of lr
# 1e-3 / 3e-3 and SGD 0.1 over 300 steps (benchmarks/workloads-2026-12-07).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "shapes-cnn": {"batch_size": 64, "lr": 0.05, "lr_schedule": "cosine", "steps": 600},
    "text-transformer": {"batch_size": 16, "optimizer": "adamw", "lr": 0.001,
                         "weight_decay": 0.01, "steps": 600, "eval_every": 50},
}
# the fields that describe the MLP and its dataset: another --task leaves them at their defaults
MLP_TASK_FIELDS = ("dataset", "data_dir", "hidden", "keep_prob", "batchnorm", "init")
OPTIMIZERS = ("sgd", "adamw")
MAX_TIMEOUT = 7 * 24 * 3600.0   # seconds; a finite bound, so a hung peer always ends the run
MAX_RESTARTS = 100
# --eval-lag: pieces (= steps) an evaluation's parameter gather is spread over; why 8 is in
# the docstring of dist_quant.ps.evallag ("Evaluation off the critical path")
EVAL_LAG = 8


_DEFAULT_STALENESS = 2

# the headings of --help, in order; every field is in one (its ``group``)
JOB = "Job"
DATA = "Data and model"
OPTIMIZER = "Optimizer"
COMPRESSION = "Compression"
SERVER = "Parameter server"
DDP = "DDP"
LINKS = "Cluster links"   # the options of `dist-quant cluster` and a sweep's links
MODELLED = "Modelled clock"   # --simulate on a modelled cluster (--clock dedicated)
RUNTIME = "Runtime and faults"
OUTPUT = "Output"
GROUPS = (JOB, DATA, OPTIMIZER, COMPRESSION, SERVER, DDP, LINKS, MODELLED, RUNTIME, OUTPUT)
TESTING = "Testing aids"   # accepted, not listed in --help
OTHER = "Other options"


def _worker_at(value: str) -> tuple[int, int] | None:
    """``WORKER:N`` as two ints (None when empty; ValueError when malformed)."""
    if not value:
        return None
    worker, n = value.split(":")
    return int(worker), int(n)


TENSORBOARD_ENV = "DIST_QUANT_TENSORBOARD"   # =1: event files for every run (--tensorboard)


def tensorboard_requested(config: dict[str, Any] | None = None) -> bool:
    """Whether a run asks for event files: the config's ``tensorboard`` or the variable."""
    return bool((config or {}).get("tensorboard")) or os.environ.get(TENSORBOARD_ENV, "") == "1"


def tensorboard_missing() -> str | None:
    """Why event files cannot be written here (None: they can)."""
    if importlib.util.find_spec("tensorboard") is None:
        return ("needs the tensorboard package (pip install 'dist-quant[tensorboard]', or "
                "pip install tensorboard)")
    return None
