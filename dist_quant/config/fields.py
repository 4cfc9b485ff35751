"""The fields of a training run's configuration: one per command-line option, each with its
default, its help and its group (the heading it is listed under in ``--help``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from dist_quant.config.checks import ConfigChecks
from dist_quant.config.choices import (
    _DEFAULT_STALENESS,
    BACKENDS,
    CLOCKS,
    COMPRESSION,
    CONSISTENCY,
    DATA,
    DDP,
    DDP_HOOKS,
    DEVICES,
    EVAL_LAG,
    HEADER_DTYPES,
    INITS,
    JOB,
    LR_SCHEDULES,
    METHODS,
    MODELLED,
    ON_NONFINITE,
    OPTIMIZER,
    OPTIMIZERS,
    OUTPUT,
    RUNTIME,
    SERVER,
    TASK_DEFAULTS,
    TASKS,
    TESTING,
    _worker_at,
)
from dist_quant.errors import ConfigError


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class TrainConfig(ConfigChecks):
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

    def with_task_defaults(self, given: set[str] | frozenset[str] = frozenset()) -> TrainConfig:
        """This config with its ``--task``'s own defaults (``TASK_DEFAULTS``) for the fields
        not in ``given`` (the options a command line or a sweep point set itself)."""
        own = {k: v for k, v in TASK_DEFAULTS.get(self.task, {}).items() if k not in given}
        return self.replace(**own) if own else self

    def to_argv(self, defaults: bool = False) -> list[str]:
        """The command-line options that reproduce this config: the non-default fields (and
        every field its task has a default of: a value equal to the MLP's default is then
        given, not replaced by the task's), or every field with ``defaults=True``."""
        argv: list[str] = []
        keep = TASK_DEFAULTS.get(self.task, {})
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == f.default and not defaults and f.name not in keep:
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
