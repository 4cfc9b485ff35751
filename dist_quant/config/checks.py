"""What makes a configuration valid: every check of :meth:`TrainConfig.validate
<dist_quant.config.TrainConfig.validate>`, each raising :class:`~dist_quant.errors.ConfigError`
that names the option and the allowed range, before any process starts.

The checks that import the compressors or the data (hence torch) run last, so that every other
bad option is refused without loading torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from dist_quant.config.choices import (
    _DEFAULT_STALENESS,
    BUILTIN_DATASETS,
    MAX_RESTARTS,
    MAX_TIMEOUT,
    MLP_TASK_FIELDS,
    MODEL_FIELDS,
    TASKS,
    _worker_at,
    tensorboard_missing,
    tensorboard_requested,
)
from dist_quant.errors import ConfigError


class ConfigChecks:
    """The checks of :class:`~dist_quant.config.TrainConfig`, a base of it: ``self`` is the
    config whose fields are checked."""

    def validate(self) -> ConfigChecks:
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
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in MLP_TASK_FIELDS:
            if getattr(self, name) != defaults[name]:
                bad(name, f"describes the MLP of --task {TASKS[0]}; --task {self.task} "
                    "builds its own model and data")
        if self.task == "text-transformer":
            for name in ("train_size", "test_size"):
                if getattr(self, name) != defaults[name]:
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
                     if getattr(self, f) != type(self).__dataclass_fields__[f].default]
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
