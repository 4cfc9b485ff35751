"""The one validated, frozen configuration of a training run.

Every field is one command-line option (``--field-name``, underscores become dashes) of both
``dist-quant train`` and ``python -m dist_quant.train``; the help text is the field's ``help``
metadata. ``TrainConfig.validate`` raises :class:`dist_quant.errors.ConfigError` naming the option
and the allowed range, before any process starts.

Fields that move the bandwidth/accuracy trade-off: ``compressor``, ``bucket_size``, ``bits``,
``qsgd_levels``, ``sparsity_ratio``, ``error_feedback`` and ``downlink`` (fewer bytes, more
gradient noise); ``workers`` and ``batch_size`` (more data per step, more payloads per step).

Every field has a ``group``: the heading it is listed under in ``--help`` (``GROUPS``, in
order), in every command that takes the options (``train``, ``cluster``, ``sweep``'s
``--set``). The testing aids (group ``TESTING``: ``--inject-nonfinite WORKER:STEP``, a NaN
gradient; ``--inject-loss WORKER:K``, a worker that leaves an asynchronous run) are accepted
everywhere but left out of ``--help``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from dist_quant.errors import ConfigError

METHODS = ("ps", "ddp")
DDP_HOOKS = ("none", "fp16", "powersgd", "onebit")
HEADER_DTYPES = ("fp32", "fp16")
INITS = ("he", "lecun", "double")
BACKENDS = ("auto", "gloo", "nccl")
DEVICES = ("auto", "cpu", "cuda")
ON_NONFINITE = ("skip", "abort")
LR_SCHEDULES = ("constant", "step", "cosine")
CONSISTENCY = ("sync", "ssp", "async")
CLOCKS = ("wall", "dedicated")
# the options of the modelled cluster (--clock dedicated); the real clusters have their own
LINK_FIELDS = ("rate", "latency", "mtu", "worker_rate")
MODEL_FIELDS = (*LINK_FIELDS, "host_speed", "calibration")
BUILTIN_DATASETS = ("mnist1d", "teacher", "mnist")
# --task: what is trained (dist_quant.ps.task); the first is the default, the MLP on --dataset
TASKS = ("mnist1d-mlp", "shapes-cnn", "text-transformer")
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


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


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


@dataclass(frozen=True)
class TrainConfig:
    # --- what runs -------------------------------------------------------------------------
    method: str = _opt("ps", "ps: parameter server with compressed payloads; ddp: torch DDP "
                       "allreduce baseline (see --ddp-hook).", choices=METHODS, group=JOB)
    workers: int = _opt(4, "Number of worker processes W (the server is an extra rank 0).",
                        group=JOB)
    servers: int = _opt(1, "Dedicated parameter servers S (--method ps): the flat parameters "
                        "are split into S contiguous shards on uplink bucket boundaries, "
                        "balanced by size; server s owns shard s. 1 = one server (the star).",
                        group=SERVER)
    colocate: bool = _opt(False, "No dedicated server: each of the W workers also serves 1/W "
                          "of the parameters (compressed all-to-all up, all-gather down). "
                          "Needs --servers 1.", group=SERVER)
    overlap: bool = _opt(False, "Send each shard's uplink payload as soon as backward has "
                         "produced its gradients (last layers first), and start the next "
                         "forward on the first layers as soon as their downlink shard has "
                         "arrived; same parameters as without it. Needs several shards "
                         "(--servers > 1 or --colocate) to hide much.", group=SERVER)
    consistency: str = _opt("sync", "When the server applies a gradient and a worker may go "
                            "on: sync (every step waits for the W gradients), ssp (each "
                            "gradient is applied as soon as a worker reads the parameters; a "
                            "worker may start step t once every worker has finished step "
                            "t - K - 1, K = --staleness) or async (no bound). Star and "
                            "dedicated sharded servers only.", choices=CONSISTENCY, group=SERVER)
    staleness: int = _opt(_DEFAULT_STALENESS, "K of --consistency ssp: how many steps a "
                          "worker may run ahead of the slowest (0 = sync).", group=SERVER)
    staleness_lr: bool = _opt(False, "ssp and async: divide each gradient by its staleness "
                              "(at least 1) before it is applied, i.e. lr / staleness "
                              "(Zhang et al. 2016).", group=SERVER)
    backup_workers: int = _opt(0, "B of --consistency sync: each step uses the first W - B "
                               "gradients to arrive and drops the others (Chen et al. 2016).",
                               group=SERVER)
    # --- uplink compression ----------------------------------------------------------------
    compressor: str = _opt("onebit", "Uplink compressor: none (fp32), fp16, bf16, onebit, kbit, "
                           "sign; baselines qsgd (--qsgd-levels), terngrad, topk (with "
                           "--error-feedback) and randk (--sparsity-ratio).", group=COMPRESSION)
    bucket_size: int = _opt(128, "Coordinates per header (the (a, b) of onebit/kbit, the scale of "
                            "sign/qsgd/terngrad); 0 = the whole flattened gradient (the "
                            "per-tensor rule).", group=COMPRESSION)
    bits: int = _opt(2, "Bits per coordinate for the kbit compressor (1..8).", group=COMPRESSION)
    header_dtype: str = _opt("fp32", "Type of the (a, b) headers on the wire; fp16 rounds outward "
                             "so the decode stays unbiased.", choices=HEADER_DTYPES,
                             group=COMPRESSION)
    error_feedback: bool = _opt(False, "Wrap the uplink compressor in error feedback. It needs a "
                                "contractive compressor (sign); around stochastic 1-bit "
                                "rounding the carried error grows and long runs diverge.",
                                group=COMPRESSION)
    worker_momentum: bool = _opt(False, "Each worker keeps the momentum of its own gradient "
                                 "and compresses that (with --error-feedback: DGC's momentum "
                                 "correction); the server averages and steps with no momentum "
                                 "of its own. Same method without compression.", group=COMPRESSION)
    shift_rate: str = _opt("0", "Shifted compression: each worker sends C(g - h) and both sides "
                           "move the shift h by ALPHA times the decode (DIANA with an unbiased "
                           "compressor, EF21 with sign/topk and 1); 0 = off, auto = "
                           "1 / (1 + omega) (1 for sign/topk).", group=COMPRESSION)
    qsgd_levels: int = _opt(4, "Levels s of the qsgd compressor (1..32767): 1 + bit_length(s) "
                            "bits per coordinate, plus the bucket's norm.", group=COMPRESSION)
    sparsity_ratio: float = _opt(0.01, "Fraction of the coordinates that topk and randk send, "
                                 "in (0, 1]: 64 x ratio bits per coordinate.", group=COMPRESSION)
    # --- downlink --------------------------------------------------------------------------
    downlink: str = _opt("none", "Downlink compressor: none sends fp32 parameters; any other "
                         "compressor sends the compressed change of the workers' replica, its "
                         "error carried to the next step (so it must be contractive: sign, "
                         "fp16, bf16, kbit with --bits >= 2).", group=COMPRESSION)
    downlink_bucket_size: int = _opt(128, "Bucket size of the downlink compressor.",
                                     group=COMPRESSION)
    # --- data and model --------------------------------------------------------------------
    task: str = _opt("mnist1d-mlp", "What is trained: mnist1d-mlp (the MLP of --hidden on "
                     "--dataset), shapes-cnn (a small CNN with BatchNorm on generated 16x16 "
                     "images of a bar, 4 orientations; --train-size/--test-size images), "
                     "text-transformer (a causal byte-level transformer on the text of "
                     "Python's documentation topics; its metric is next-byte accuracy).",
                     choices=TASKS, group=DATA)
    dataset: str = _opt("mnist1d", "mnist1d (generated), teacher (synthetic), mnist (IDX files "
                        "in --data-dir) or a path to an .npz with x, y, x_test, y_test.",
                        group=DATA)
    data_dir: str = _opt("", "Directory holding the MNIST IDX files (for --dataset mnist).",
                         group=DATA)
    train_size: int = _opt(4000, "Training examples to generate (mnist1d, teacher).", group=DATA)
    test_size: int = _opt(1000, "Test examples to generate (mnist1d, teacher).", group=DATA)
    hidden: str = _opt("192,192", "Hidden layer widths, comma separated.", group=DATA)
    keep_prob: float = _opt(0.8, "Dropout KEEP probability p in (0, 1] (1 disables dropout; "
                            "torch's Dropout takes the drop probability 1 - p).", group=DATA)
    batchnorm: bool = _opt(True, "BatchNorm after every hidden Linear.", group=DATA)
    init: str = _opt("he", "Hidden weight init: he (2/fan_in), lecun (1/fan_in), double "
                     "(4/fan_in).", choices=INITS, group=DATA)
    # --- optimisation ----------------------------------------------------------------------
    steps: int = _opt(1000, "Synchronous steps to run.", group=JOB)
    batch_size: int = _opt(512, "Minibatch size per worker (at most its shard: train_size / W).",
                           group=OPTIMIZER)
    lr: float = _opt(0.2, "Learning rate eta (the peak of --lr-schedule).", group=OPTIMIZER)
    lr_schedule: str = _opt("constant", "Learning-rate schedule after the warmup: constant, step "
                            "(times --lr-gamma every --lr-step-size steps) or cosine (to 0 at "
                            "the last step).", choices=LR_SCHEDULES, group=OPTIMIZER)
    warmup_steps: int = _opt(0, "Linear warmup: the learning rate rises from lr / N to lr over "
                             "the first N steps (0 = none).", group=OPTIMIZER)
    lr_step_size: int = _opt(300, "Steps between two decays of the step schedule.", group=OPTIMIZER)
    lr_gamma: float = _opt(0.1, "Factor of each decay of the step schedule, in (0, 1].",
                           group=OPTIMIZER)
    momentum: float = _opt(0.9, "Momentum mu on the stochastic gradient only (0 <= mu < 1).",
                           group=OPTIMIZER)
    weight_decay: float = _opt(5e-4, "L2 coefficient lambda, applied at the server outside "
                               "momentum.", group=OPTIMIZER)
    decay_all: bool = _opt(False, "Also decay biases and BatchNorm parameters.", group=OPTIMIZER)
    optimizer: str = _opt("sgd", "The update (on the server, or every DDP rank): sgd (momentum "
                          "on the gradient, L2 outside it) or adamw (Adam with decoupled weight "
                          "decay; --momentum is its beta1).", choices=OPTIMIZERS, group=OPTIMIZER)
    beta2: float = _opt(0.999, "adamw: decay rate of the second moment, in [0, 1).",
                        group=OPTIMIZER)
    adam_eps: float = _opt(1e-8, "adamw: epsilon added to the root of the second moment.",
                           group=OPTIMIZER)
    onebit_adam_warmup: int = _opt(0, "adamw, parameter server: the 1-bit Adam recipe. After "
                                   "N steps of AdamW on the (compressed) gradients the second "
                                   "moment is frozen and every worker sends its own momentum, "
                                   "compressed with error feedback (needs --error-feedback); "
                                   "0 = off.", group=OPTIMIZER)
    seed: int = _opt(0, "Run seed; worker r's generator is seeded from (seed, r).", group=JOB)
    # --- DDP baseline ----------------------------------------------------------------------
    ddp_hook: str = _opt("none", "Communication hook for --method ddp: none (fp32 allreduce), "
                         "fp16 (torch fp16_compress_hook), powersgd, onebit (this project's "
                         "compressed all-to-all + all-gather, with --compressor, --bucket-size, "
                         "--bits, --header-dtype, --error-feedback).", choices=DDP_HOOKS, group=DDP)
    powersgd_rank: int = _opt(2, "Matrix approximation rank of the PowerSGD hook.", group=DDP)
    # --- run bookkeeping -------------------------------------------------------------------
    run_dir: str = _opt("", "Directory for config.json, metrics.jsonl, summary.json and "
                        "checkpoints (default: runs/<time>-<method>).", group=OUTPUT)
    eval_every: int = _opt(100, "Evaluate on the test split every N steps (and at the end).",
                           group=OUTPUT)
    eval_lag: int = _opt(EVAL_LAG, "Synchronous parameter server: the parameters of an "
                         "evaluation at step s reach the evaluating rank in N pieces, one per "
                         "step, beside training; it is evaluated at step s + N, whose control "
                         "carries its --stop-accuracy decision (the run stops there). 0 = "
                         "gather and evaluate before step s ends (every rank waits). The last "
                         "step and checkpoint steps finish their evaluations at once.",
                         group=SERVER)
    checkpoint_every: int = _opt(0, "Write a checkpoint every N steps (0 = only at the end).",
                                 group=RUNTIME)
    resume: str = _opt("", "Run directory whose latest checkpoint the run continues from.",
                       group=JOB)
    keep_checkpoints: int = _opt(3, "Keep the K newest checkpoints of the run, delete older "
                                 "ones (0 = keep all).", group=RUNTIME)
    max_restarts: int = _opt(0, "Restart the job up to N times after a process fails "
                             "(torchrun's elastic restarts); each restart continues from the "
                             "latest checkpoint (--checkpoint-every defaults to --eval-every).",
                             group=RUNTIME)
    # --- processes and faults --------------------------------------------------------------
    backend: str = _opt("auto", "torch.distributed backend; auto = nccl on CUDA, else gloo.",
                        choices=BACKENDS, group=RUNTIME)
    device: str = _opt("auto", "auto = cuda when available, else cpu.", choices=DEVICES,
                       group=RUNTIME)
    timeout: float = _opt(60.0, "Process-group timeout in seconds: a dead peer ends the run "
                          "after at most this long.", group=RUNTIME)
    min_workers: int = _opt(0, "--consistency async: a lost worker (its process ended, its "
                            "host went down, or it stopped answering within --timeout) is "
                            "dropped and named, and the run goes on while at least N workers "
                            "remain; 0 = W: a lost worker ends the run, as in every other "
                            "mode.", group=SERVER)
    on_nonfinite: str = _opt("skip", "A non-finite or invalid worker payload: skip it (the step "
                             "uses the other workers) or abort the run.", choices=ON_NONFINITE,
                             group=RUNTIME)
    progress: bool = _opt(True, "Show a progress bar on rank 0.", group=OUTPUT)
    force: bool = _opt(False, "Start the job even when preflight estimates that its processes "
                       "need more memory than is available.", group=RUNTIME)
    # --- experiments and testing aids ------------------------------------------------------
    simulate: bool = _opt(False, "Run the W workers and the server in one process (the "
                          "single-process reference; same parameters as the distributed run).",
                          group=JOB)
    stop_accuracy: float = _opt(0.0, "Stop once test accuracy at an evaluation reaches this "
                                "fraction (0..1); 0 = run all steps. For time-to-target sweeps.",
                                group=JOB)
    stop_loss: float = _opt(0.0, "Stop once the test loss at an evaluation is at or below this "
                            "value (nats; > 0); 0 = run all steps. With --stop-accuracy, the "
                            "first of the two ends the run.", group=JOB)
    tensorboard: bool = _opt(False, "Also write the step and evaluation scalars as TensorBoard "
                             "event files in the run directory (needs the tensorboard package; "
                             "DIST_QUANT_TENSORBOARD=1 does the same).", group=OUTPUT)
    inject_nonfinite: str = _opt("", "Testing aid: WORKER:STEP makes worker WORKER (0-based) "
                                 "hold a NaN gradient at step STEP (1-based); empty = never.",
                                 group=TESTING)
    inject_loss: str = _opt("", "Testing aid of the asynchronous modes: WORKER:K makes worker "
                            "WORKER (0-based) leave the run instead of computing its K-th "
                            "gradient (1-based): its process ends and its links close, as a "
                            "lost host's would; empty = never.", group=TESTING)
    slow_worker: str = _opt("", "I=FACTOR (repeatable, or I=F,J=G): worker I (0-based) computes "
                            "FACTOR times slower: it waits FACTOR - 1 times its measured "
                            "compute after each backward. Wall time only; --simulate takes "
                            "its arrival order from it.", repeatable=True, group=RUNTIME)
    # --- the modelled clock (dist_quant.runtime.clock) -----------------------------------
    clock: str = _opt("wall", "Which time the run reports: wall (this machine's) or dedicated "
                      "(also, in every step and evaluation line, model_wall and model_time: "
                      "the step composed as if every rank had a host of its own on the links "
                      "below, from CPU-time costs calibrated at the start; for ssp, async "
                      "and backup workers, with --simulate, also the arrival order).",
                      choices=CLOCKS, group=MODELLED)
    rate: float = _opt(0.0, "--clock dedicated: every host's link in Mbit/s, each direction "
                       "(0 = uncapped).", group=MODELLED)
    latency: float = _opt(0.0, "--clock dedicated: one-way host-to-host latency in ms.",
                        group=MODELLED)
    mtu: int = _opt(1500, "--clock dedicated: the links' MTU in bytes.", group=MODELLED)
    worker_rate: str = _opt("", "--clock dedicated: I=MBIT (repeatable): worker I's own link "
                            "in Mbit/s; the other hosts keep --rate.", repeatable=True,
                            group=MODELLED)
    host_speed: float = _opt(1.0, "--clock dedicated: the modelled hosts compute X times "
                             "faster than the CPU that measured the calibration.",
                             group=MODELLED)
    calibration: str = _opt("", "--clock dedicated: a calibration.json (or a run directory "
                            "holding one) to use instead of measuring one at the start, so "
                            "that runs on different machines share one.",
                            group=MODELLED)
    replay: str = _opt("", "With --simulate: a run directory of --consistency ssp|async or "
                       "--backup-workers whose recorded arrival order the simulation follows "
                       "(it then ends with that run's parameters, bit for bit).", group=JOB)

    # ------------------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Check every field; raise ConfigError naming the option. Returns self."""
        def bad(name: str, msg: str) -> None:
            raise ConfigError("--" + name.replace("_", "-"), msg)

        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                bad(f.name, f"must be one of {', '.join(choices)}; got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                bad(f.name, f"must be a finite number; got {value}")
        if self.seed < 0:
            bad("seed", f"must be >= 0; got {self.seed}")
        if not 1 <= self.workers <= 256:
            bad("workers", f"must be in 1..256; got {self.workers}")
        if not 1 <= self.servers <= 64:
            bad("servers", f"must be in 1..64; got {self.servers}")
        if self.method != "ps" and (self.servers != 1 or self.colocate):
            bad("servers" if self.servers != 1 else "colocate",
                "places the parameter-server job's shards (--method ps only)")
        if self.colocate and self.servers != 1:
            bad("colocate", f"makes every worker a server (S = W); leave --servers at 1, "
                f"got {self.servers}")
        if self.bucket_size < 0:
            bad("bucket_size", f"must be >= 0 (0 = whole tensor); got {self.bucket_size}")
        if tensorboard_requested({"tensorboard": self.tensorboard}) and tensorboard_missing():
            bad("tensorboard", tensorboard_missing())
        if self.worker_momentum and self.method != "ps":
            bad("worker_momentum", "applies to the parameter-server job only (--method ps)")
        if self.downlink_bucket_size < 0:
            bad("downlink_bucket_size", f"must be >= 0; got {self.downlink_bucket_size}")
        if not 1 <= self.bits <= 8:
            bad("bits", f"must be in 1..8; got {self.bits}")
        if not (0.0 < self.keep_prob <= 1.0):
            bad("keep_prob", f"is a keep probability, must be in (0, 1]; got {self.keep_prob}")
        try:
            widths = self.hidden_sizes
        except ValueError:
            bad("hidden", f"must be comma-separated positive integers; got {self.hidden!r}")
        if any(w <= 0 for w in widths):
            bad("hidden", f"widths must be positive; got {self.hidden!r}")
        if self.steps < 1:
            bad("steps", f"must be >= 1; got {self.steps}")
        if self.batch_size < 1:
            bad("batch_size", f"must be >= 1; got {self.batch_size}")
        if not self.lr > 0:
            bad("lr", f"must be > 0; got {self.lr}")
        if not 0 <= self.warmup_steps <= self.steps:
            bad("warmup_steps", f"must be in 0..--steps ({self.steps}); got {self.warmup_steps}")
        if self.lr_step_size < 1:
            bad("lr_step_size", f"must be >= 1; got {self.lr_step_size}")
        if not 0.0 < self.lr_gamma <= 1.0:
            bad("lr_gamma", f"must be in (0, 1]; got {self.lr_gamma}")
        if not 1 <= self.qsgd_levels <= 32767:
            bad("qsgd_levels", f"must be in 1..32767; got {self.qsgd_levels}")
        if not 0.0 < self.sparsity_ratio <= 1.0:
            bad("sparsity_ratio", f"is a fraction of the coordinates, must be in (0, 1]; got "
                f"{self.sparsity_ratio}")
        if not 0.0 <= self.momentum < 1.0:
            bad("momentum", f"must be in [0, 1); got {self.momentum}")
        if self.weight_decay < 0:
            bad("weight_decay", f"must be >= 0; got {self.weight_decay}")
        if self.train_size < 10 or self.test_size < 10:
            bad("train_size" if self.train_size < 10 else "test_size", "must be >= 10")
        if self.eval_every < 1:
            bad("eval_every", f"must be >= 1; got {self.eval_every}")
        if self.eval_lag < 0:
            bad("eval_lag", f"must be >= 0 steps (0 = evaluate at the step itself); got "
                f"{self.eval_lag}")
        if self.checkpoint_every < 0:
            bad("checkpoint_every", f"must be >= 0; got {self.checkpoint_every}")
        if self.powersgd_rank < 1:
            bad("powersgd_rank", f"must be >= 1; got {self.powersgd_rank}")
        if not 0 < self.timeout <= MAX_TIMEOUT:
            bad("timeout", f"must be in (0, {MAX_TIMEOUT:g}] seconds; got {self.timeout}")
        if self.keep_checkpoints < 0:
            bad("keep_checkpoints", f"must be >= 0 (0 = keep all); got {self.keep_checkpoints}")
        if not 0 <= self.max_restarts <= MAX_RESTARTS:
            bad("max_restarts", f"must be in 0..{MAX_RESTARTS}; got {self.max_restarts}")
        if self.dataset not in BUILTIN_DATASETS and not self.dataset.endswith(".npz"):
            bad("dataset", f"must be one of {', '.join(BUILTIN_DATASETS)} or a path to an .npz; "
                f"got {self.dataset!r}")
        if self.dataset.endswith(".npz") and not Path(self.dataset).is_file():
            bad("dataset", f"file not found: {self.dataset}")
        if self.dataset == "mnist" and not self.data_dir:
            bad("data_dir", "--dataset mnist needs --data-dir, the directory of the four MNIST "
                "IDX files")
        if self.dataset == "mnist" and not Path(self.data_dir).is_dir():
            bad("data_dir", f"directory not found: {self.data_dir!r}")
        if self.resume and not Path(self.resume).is_dir():
            bad("resume", f"run directory not found: {self.resume}")
        if not 0.0 <= self.stop_accuracy <= 1.0:
            bad("stop_accuracy", f"is a fraction, must be in [0, 1]; got {self.stop_accuracy}")
        if self.stop_loss < 0:
            bad("stop_loss", f"must be >= 0 (0 = off); got {self.stop_loss}")
        self._validate_task(bad)
        self._validate_optimizer(bad)
        self._validate_worker_at("inject_nonfinite", "STEP", bad)
        if self.simulate and self.method != "ps":
            bad("simulate", "runs the parameter-server job only (--method ps)")
        self._validate_consistency(bad)
        self._validate_clock(bad)
        # the checks below import the compressors and the data (torch): every other option
        # is refused before them, in well under a second
        try:
            from dist_quant.compress.shift import parse_shift_rate  # torch: checked last

            rate = parse_shift_rate(self.shift_rate)
        except ValueError as err:
            bad("shift_rate", str(err))
        if (rate is None or rate > 0) and self.error_feedback:
            bad("shift_rate", "and --error-feedback both correct the compression error; "
                "use one")
        if (rate is None or rate > 0) and self.compressor in ("none",):
            bad("shift_rate", "needs a compressor (--compressor none sends the gradient exactly)")
        if (rate is None or rate > 0) and self.method == "ddp" and self.ddp_hook != "onebit":
            bad("shift_rate", "applies to the parameter server and --ddp-hook onebit only")
        if self.dataset in ("mnist1d", "teacher") and self.task != "text-transformer":
            from dist_quant.data.dataset import check_batch_fits  # torch: checked last

            check_batch_fits(self.train_size, self.workers, self.batch_size)
        self._validate_compressors()
        return self

    def _validate_task(self, bad) -> None:
        """Another ``--task`` than the MLP's leaves the MLP's and its dataset's fields alone."""
        if self.task == TASKS[0]:
            return
        for name in MLP_TASK_FIELDS:
            if getattr(self, name) != _FIELD_DEFAULTS[name]:
                bad(name, f"describes the MLP of --task {TASKS[0]}; --task {self.task} "
                    "builds its own model and data")
        if self.task == "text-transformer":
            for name in ("train_size", "test_size"):
                if getattr(self, name) != _FIELD_DEFAULTS[name]:
                    bad(name, "does not apply to --task text-transformer: its train and "
                        "validation splits are fixed by the text")

    def _validate_optimizer(self, bad) -> None:
        if not 0.0 <= self.beta2 < 1.0:
            bad("beta2", f"must be in [0, 1); got {self.beta2}")
        if not self.adam_eps > 0:
            bad("adam_eps", f"must be > 0; got {self.adam_eps}")
        if self.onebit_adam_warmup < 0:
            bad("onebit_adam_warmup", f"must be >= 0 steps (0 = off); got "
                f"{self.onebit_adam_warmup}")
        if self.optimizer == "adamw" and self.worker_momentum:
            bad("worker_momentum", "applies to --optimizer sgd (adamw keeps its moments on "
                "the server; see --onebit-adam-warmup)")
        if not self.onebit_adam_warmup:
            return
        if self.optimizer != "adamw":
            bad("onebit_adam_warmup", "is a recipe of --optimizer adamw")
        if self.method != "ps":
            bad("onebit_adam_warmup", "applies to the parameter-server job only (--method ps)")
        if self.consistency != "sync" or self.backup_workers:
            bad("onebit_adam_warmup", "needs synchronous steps (--consistency sync, no "
                "--backup-workers): the workers switch at the step the server freezes")
        if not self.error_feedback:
            bad("onebit_adam_warmup", "compresses the momentum with error feedback; add "
                "--error-feedback")

    def _validate_worker_at(self, name: str, count: str, bad) -> None:
        """A testing aid's ``WORKER:N`` (``--inject-nonfinite``, ``--inject-loss``)."""
        value = getattr(self, name)
        if not value:
            return
        try:
            worker, n = _worker_at(value)
        except ValueError:
            bad(name, f"must be WORKER:{count}; got {value!r}")
        if not (0 <= worker < self.workers and n >= 1):
            bad(name, f"needs 0 <= WORKER < {self.workers} and {count} >= 1; got {value!r}")

    def _validate_consistency(self, bad) -> None:
        """--consistency, --staleness, --backup-workers, --slow-worker and --replay."""
        if self.consistency != "sync":
            where = ("--method ddp allreduces in lockstep" if self.method == "ddp" else
                     "colocated servers stay synchronous" if self.colocate else
                     "--overlap pipelines the synchronous step" if self.overlap else "")
            if where:
                bad("consistency", f"{self.consistency} needs the parameter server's star or "
                    f"dedicated servers; {where} (use --consistency sync)")
        if self.staleness_lr and self.consistency == "sync":
            bad("staleness_lr", "scales stale gradients of --consistency ssp|async; a "
                "synchronous step has none")
        if self.staleness < 0:
            bad("staleness", f"must be >= 0 (0 = sync); got {self.staleness}")
        if self.staleness != _DEFAULT_STALENESS and self.consistency != "ssp":
            bad("staleness", f"bounds --consistency ssp only; got --consistency "
                f"{self.consistency}")
        if self.backup_workers:
            if not 0 < self.backup_workers < self.workers:
                bad("backup_workers", f"must be in 0..W - 1 = {self.workers - 1}; got "
                    f"{self.backup_workers}")
            if self.consistency != "sync" or self.method != "ps" or self.colocate \
                    or self.overlap:
                bad("backup_workers", "drops the late gradients of a synchronous step: it "
                    "needs --consistency sync on the star or dedicated servers, without "
                    "--overlap")
        try:
            factors = self.slow_factors
        except ValueError:
            bad("slow_worker", f"must be I=FACTOR[,I=FACTOR...]; got {self.slow_worker!r}")
        for i, f in factors.items():
            if not 0 <= i < self.workers:
                bad("slow_worker", f"worker {i} does not exist: workers are 0..{self.workers - 1}")
            if not (math.isfinite(f) and 1.0 <= f <= 1000.0):
                bad("slow_worker", f"FACTOR must be in [1, 1000]; got {f:g} for worker {i}")
        if self.asynchronous and self.shift_rate.strip() not in ("0", "0.0"):
            bad("shift_rate", "keeps one shift per worker in the lockstep of a synchronous "
                "step; the asynchronous modes (--consistency ssp|async, --backup-workers) "
                "refuse it")
        if not 0 <= self.min_workers <= self.workers:
            bad("min_workers", f"must be in 1..W = {self.workers} (0 = W); got "
                f"{self.min_workers}")
        if self.min_alive < self.workers and self.consistency != "async":
            bad("min_workers", "drops a lost worker under --consistency async only (sync, "
                "ssp and backup workers wait for every worker)")
        self._validate_worker_at("inject_loss", "K", bad)
        if self.inject_loss and not self.asynchronous:
            bad("inject_loss", "is a testing aid of the asynchronous modes (--consistency "
                "ssp|async, --backup-workers)")
        if self.replay and not self.simulate:
            bad("replay", "replays a recorded arrival order in one process: add --simulate")
        if self.replay and not Path(self.replay, "metrics.jsonl").is_file():
            bad("replay", f"{self.replay} holds no metrics.jsonl: not a run directory")

    def _validate_clock(self, bad) -> None:
        """--clock and the modelled cluster's options (the mathematics:
        ``dist_quant.runtime.clock``)."""
        try:
            rates = self.link_rates
        except ValueError:
            bad("worker_rate", f"must be I=MBIT[,J=MBIT...]; got {self.worker_rate!r}")
        if self.clock == "wall":
            given = [f for f in MODEL_FIELDS
                     if getattr(self, f) != TrainConfig.__dataclass_fields__[f].default]
            if given:
                bad(given[0], "describes the modelled cluster of --clock dedicated; add "
                    "--clock dedicated (or, for real links, use dist-quant cluster)")
            return
        if self.rate < 0:
            bad("rate", f"must be >= 0 Mbit/s (0 = uncapped); got {self.rate:g}")
        if not self.rate and not rates:
            bad("clock", "dedicated needs the modelled links: give --rate MBIT (and "
                "--worker-rate I=MBIT for uneven ones)")
        if self.latency < 0:
            bad("latency", f"must be >= 0 ms; got {self.latency:g}")
        if not 576 <= self.mtu <= 65535:
            bad("mtu", f"must be in 576..65535; got {self.mtu}")
        for i, r in rates.items():
            if not 0 <= i < self.workers:
                bad("worker_rate", f"worker {i} does not exist: workers are "
                    f"0..{self.workers - 1}")
            if not (math.isfinite(r) and r > 0):
                bad("worker_rate", f"MBIT must be > 0; got {r:g} for worker {i}")
        if not self.host_speed > 0:
            bad("host_speed", f"must be > 0 (X times this CPU); got {self.host_speed:g}")
        if self.asynchronous and not self.simulate:
            bad("clock", "dedicated gives --consistency ssp|async and --backup-workers the "
                "arrival order of the modelled cluster: add --simulate (a distributed run's "
                "order is the network's)")
        if self.calibration:
            path = Path(self.calibration)
            path = path / "calibration.json" if path.is_dir() else path
            try:
                cal = json.loads(path.read_text())
                ok = isinstance(cal.get("seconds"), dict) and int(cal.get("params", 0)) > 0
            except (OSError, ValueError, AttributeError, TypeError) as err:
                bad("calibration", f"cannot read a calibration from {path}: {err}")
            if not ok:
                bad("calibration", f"{path} is not a calibration (\"seconds\" per phase, "
                    "\"params\")")

    @property
    def link_rates(self) -> dict[int, float]:
        """``{worker: Mbit/s}`` of ``--worker-rate`` (ValueError when malformed)."""
        out: dict[int, float] = {}
        for item in filter(None, (t.strip() for t in self.worker_rate.split(","))):
            worker, sep, rate = item.partition("=")
            if not sep or int(worker) in out:
                raise ValueError(item)
            out[int(worker)] = float(rate)
        return out

    @property
    def asynchronous(self) -> bool:
        """Whether the run follows arrivals (:mod:`dist_quant.ps.async_rank`) rather than the
        lockstep of :mod:`dist_quant.ps.sync_step`: ssp, async, or backup workers."""
        return self.consistency != "sync" or self.backup_workers > 0

    @property
    def slow_factors(self) -> dict[int, float]:
        """``{worker: factor}`` of ``--slow-worker`` (ValueError when malformed)."""
        out: dict[int, float] = {}
        for item in filter(None, (t.strip() for t in self.slow_worker.split(","))):
            worker, sep, factor = item.partition("=")
            if not sep or int(worker) in out:
                raise ValueError(item)
            out[int(worker)] = float(factor)
        return out

    def _validate_compressors(self) -> None:
        # torch comes with the compressors: checked last, after every other option
        from dist_quant.compress import available_compressors, get_compressor

        names = available_compressors()
        if self.compressor not in names:
            raise ConfigError("--compressor", f"must be one of {', '.join(names)}; "
                              f"got {self.compressor!r}")
        if self.downlink not in names:
            raise ConfigError("--downlink", f"must be one of {', '.join(names)}; "
                              f"got {self.downlink!r}")
        down = get_compressor(self.downlink, bucket_size=self.downlink_bucket_size,
                              bits=self.bits, header_dtype=self.header_dtype,
                              levels=self.qsgd_levels, ratio=self.sparsity_ratio)
        if not down.feedback_stable:  # the replica error is carried into the next step
            raise ConfigError("--downlink", f"{self.downlink}: an unbiased stochastic "
                              "compressor cannot carry the replica error (it amplifies it "
                              "every step and diverges); use sign (1 bit + a scale per bucket, "
                              "contractive), topk, or kbit with --bits >= 2")

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return tuple(int(w) for w in self.hidden.split(",") if w.strip())

    @property
    def num_shards(self) -> int:
        """How many shards the parameters are split into: W colocated, else ``servers``."""
        return self.workers if self.colocate else self.servers

    @property
    def world_size(self) -> int:
        """Processes of the job: W (ddp, colocated), W + S (dedicated servers)."""
        if self.method == "ddp" or self.colocate:
            return self.workers
        return self.workers + self.servers

    def workers_in(self, world: int) -> int:
        """W for a world of ``world`` processes (inverse of :attr:`world_size`)."""
        if self.method == "ddp" or self.colocate:
            return world
        return world - self.servers

    @property
    def lost_at(self) -> tuple[int, int] | None:
        """(worker index, gradient) of ``--inject-loss``, or None."""
        return _worker_at(self.inject_loss)

    @property
    def min_alive(self) -> int:
        """The fewest workers an asynchronous run goes on with (``--min-workers``, 0 = W)."""
        return self.min_workers or self.workers

    @property
    def nonfinite_at(self) -> tuple[int, int] | None:
        """(worker index, step) of ``--inject-nonfinite``, or None."""
        return _worker_at(self.inject_nonfinite)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError("--" + sorted(unknown)[0].replace("_", "-"), "unknown option")
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_argv(self, defaults: bool = False) -> list[str]:
        """The command-line options that reproduce this config: the non-default fields, or
        every field with ``defaults=True``."""
        argv: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == f.default and not defaults:
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                argv.append(flag if value else "--no-" + f.name.replace("_", "-"))
            else:
                argv += [flag, str(value)]
        return argv


def stop_reached(config: Any, test_loss: float, test_accuracy: float) -> bool:
    """Whether an evaluation ends the run early: its metric at ``--stop-accuracy`` or above,
    or its loss at ``--stop-loss`` or below (either that is set; ``config``: a TrainConfig or
    its dict)."""
    get = config.get if isinstance(config, dict) else lambda k, d: getattr(config, k, d)
    acc, loss = float(get("stop_accuracy", 0.0) or 0.0), float(get("stop_loss", 0.0) or 0.0)
    return (0 < acc <= test_accuracy) or (loss > 0 and test_loss <= loss)


# every field's default, for the checks that need to know whether a field was changed
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


class GroupedOption(click.Option):
    """A click option listed under the heading ``group`` by :class:`GroupedCommand`."""

    def __init__(self, *args: Any, group: str = OTHER, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.group = group


class GroupedCommand(click.Command):
    """A command whose ``--help`` lists its options under headings: its own (in order of
    appearance), those of ``GROUPS``, then ``Other options``; hidden options (the testing aids)
    are left out."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None and isinstance(param, click.Option):  # arguments: in Usage
                rows.setdefault(getattr(param, "group", OTHER), []).append(record)
        own = [heading for heading in rows if heading not in (*GROUPS, OTHER)]  # first
        for heading in (*own, *GROUPS, OTHER):
            if rows.get(heading):
                with formatter.section(heading):
                    formatter.write_dl(rows[heading])


class SetFieldsCommand(GroupedCommand):
    """A command that takes config fields as ``--set FIELD=VALUE``: its ``--help`` ends with
    the fields under the same headings as ``train --help`` (testing aids left out)."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_options(ctx, formatter)
        with formatter.section("Fields of --set (the options of train, by group)"):
            formatter.write_dl([(heading, ", ".join(names))
                                for heading, names in field_groups().items()])


def field_groups(cls: type = TrainConfig) -> dict[str, list[str]]:
    """``{heading: [field, ...]}`` in the order of ``GROUPS``, testing aids left out."""
    out: dict[str, list[str]] = {heading: [] for heading in GROUPS}
    for f in dataclasses.fields(cls):
        if f.metadata["group"] != TESTING:
            out[f.metadata["group"]].append(f.name)
    return {heading: names for heading, names in out.items() if names}


def click_options(cls: type = TrainConfig, exclude: tuple[str, ...] = ()):
    """Decorator adding one click option per config field (the CLI stays a thin mapping),
    each under its field's ``group`` (use with ``cls=GroupedCommand``); testing aids hidden;
    ``exclude``: fields a command leaves out (it has options of its own by those names)."""

    def decorate(fn):
        for f in reversed(dataclasses.fields(cls)):
            if f.name in exclude:
                continue
            dashed = f.name.replace("_", "-")
            group = f.metadata["group"]
            kwargs: dict[str, Any] = {"default": f.default, "show_default": True,
                                      "help": f.metadata.get("help", ""), "cls": GroupedOption,
                                      "group": group, "hidden": group == TESTING}
            if isinstance(f.default, bool):
                fn = click.option(f"--{dashed}/--no-{dashed}", f.name, **kwargs)(fn)
                continue
            if f.metadata.get("repeatable"):  # given several times: joined with commas
                fn = click.option(f"--{dashed}", f.name, multiple=True, default=(),
                                  help=kwargs["help"], callback=_joined, cls=GroupedOption,
                                  group=group, hidden=group == TESTING)(fn)
                continue
            if f.metadata.get("choices"):
                kwargs["type"] = click.Choice(f.metadata["choices"])
            else:
                kwargs["type"] = type(f.default)
            fn = click.option(f"--{dashed}", f.name, **kwargs)(fn)
        return fn

    return decorate


def _joined(ctx: Any, param: Any, values: tuple[str, ...]) -> str:
    """A repeatable option's values as one comma-separated string (the config's form)."""
    return ",".join(v for v in values if v)
