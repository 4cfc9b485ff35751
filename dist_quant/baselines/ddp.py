"""Baselines: torch DistributedDataParallel with gloo allreduce, as people train today.

``--method ddp`` runs W ranks, all workers (no server). Each rank trains the same model as the
parameter-server job, on the same data, with the same optimizer:

- model: the task's (:class:`dist_quant.ps.task.Task`, ``--task``), initial weights from
  ``(seed, INIT)`` (the PS server's init), dropout masks of rank ``r`` from
  ``(seed, r, DROPOUT)`` (PS worker ``r``'s), the task's loss and metric;
- data: shard ``r`` of ``W`` and ``worker_batches(len(shard), batch_size, seed, r)``, exactly
  what PS worker ``r`` draws;
- update: every rank applies the server's optimizer (``--optimizer``: ``DecoupledMomentumSGD``
  or ``AdamW``, :func:`dist_quant.core.optim.make_optimizer`) over ``decay_param_groups`` to
  the allreduced mean gradient (decay outside the moments, computed locally: the PS
  server's math). The
  allreduce result is bitwise the same on every rank, so the replicas stay equal.

``--ddp-hook`` picks the communication hook (all from ``torch.distributed.algorithms``):

- ``none``: ``default_hooks.allreduce_hook``, fp32 allreduce of each gradient bucket (the same
  arithmetic as DDP without a hook; registered so that its bytes can be counted);
- ``fp16``: ``default_hooks.fp16_compress_hook``, buckets cast to fp16, allreduced, cast back;
- ``powersgd``: ``powerSGD_hook.powerSGD_hook`` with ``matrix_approximation_rank =
  --powersgd-rank``, error feedback and warm start on (Vogels et al. 2019: the previous Q starts
  the next power iteration), ``start_powerSGD_iter = POWERSGD_START_ITER = 2``, the smallest
  torch accepts with error feedback: the paper compresses from the first step, and every
  vanilla step costs a full fp32 allreduce, which a bytes-to-target comparison would charge to
  PowerSGD. Matrices whose rank-r factors would not save 2x (``min_compression_rate``) and 1-D
  tensors (biases, BatchNorm scale and shift) travel uncompressed in one fp32 allreduce.
- ``onebit``: :func:`dist_quant.hooks.onebit_hook`, this project's compressed exchange on each
  bucket (compressed all-to-all of W slices, each rank averages its own, all-gather of the
  averages re-encoded with 4 bits), with the uplink settings of the config: ``--compressor``
  (onebit by default), ``--bucket-size``, ``--bits``, ``--header-dtype``, ``--error-feedback``
  and ``--seed`` (rank ``r`` draws from ``(seed, r, QUANTISER)`` and ``(seed, r, DOWNLINK)``).

Bytes (the ``metrics.jsonl`` fields). Every tensor a hook hands to ``torch.distributed.all_reduce``
is counted as it is handed over (:class:`AllreduceMeter`); this includes PowerSGD's P, Q and
uncompressed allreduces and its vanilla warm-up steps. gloo (torch 2.x, CPU tensors) runs
``gloo::allreduce`` with its default ring algorithm: the buffer of ``B`` bytes is cut into
segments, a reduce-scatter passes every segment through ``W - 1`` hops and an allgather passes
every reduced segment through ``W - 1`` hops. Whatever the segmentation, the ranks together
therefore send exactly ``2 (W - 1) B`` bytes per allreduce, each rank about ``2 (W - 1) B / W``.
We book the reduce-scatter half, ``(W - 1) B``, as ``bytes_up`` (contributions travelling to be
reduced, the role of the PS uplink) and the allgather half, ``(W - 1) B``, as ``bytes_down``
(reduced results travelling back, the PS downlink). Both are sums over all ranks, as for the
PS. W = 1 sends nothing. The ``onebit`` hook hands gloo no allreduce: its bytes are the payload
sizes its state counts (:class:`dist_quant.hooks.OneBitState`), the all-to-all booked as
``bytes_up`` and the all-gather as ``bytes_down``, both summed over all ranks (exact: every
rank computes every slice's payload size). Per-message transport headers are not payload (the
namespace cluster measures them on the wire). On CUDA (nccl) the same convention is kept:
NCCL's ring allreduce moves the same amounts, its tree algorithm does not. Checked against
the sockets: over a run, the TCP payload gloo's sockets send (``ss -ti`` ``bytes_sent``, all
ranks) exceeds the counted bytes by gloo's message headers only: 0.3 % for fp32 with the
default MLP, W = 3 (``tests/test_ddp.py`` bounds it by 2 %).

At each evaluation step the ranks send their BatchNorm running statistics to rank 0 with one
gloo ``gather`` (``(W - 1) * 4k`` bytes, counted up and in ``fp32_bytes_up``, as the PS counts
its workers' statistics); rank 0 evaluates with their plain average and then restores its own
statistics, so every rank keeps training with local statistics, as PS workers do. Not
counted, as for the PS (bookkeeping, not training payload): each step's loss, gathered to rank
0 while backward runs (the logged loss is the mean over ranks), and rank 0's continue/stop
broadcast at evaluation steps.

Phase times (seconds, on rank 0): ``communicate`` is the union of the intervals from each
allreduce call to its completion; ``encode``/``decode`` are the rest of the hooks' own time
(fp16 casts, PowerSGD's products and orthogonalisation; ``decode`` is what runs after the last
allreduce of a bucket); ``compute`` is forward + backward minus the hooks' time (gloo runs the
hooks on a separate thread, so where a bucket overlaps backward this split is an estimate; the
MLP here fits in one bucket, which DDP reduces after the whole backward); ``update`` is the
optimizer step.

Hangs. A peer that dies or stops answering ends every collective waiting on it after
``--timeout`` (gloo's own timeout, named by the rank). A collective that never starts, so that
no timeout of gloo's can fire (a hook blocked inside gloo's callbacks), is ended by
:class:`dist_quant.runtime.watchdog.StepWatchdog`: no step for twice ``--timeout`` ends the
rank with one line naming it and the step.

CPU time per phase (``cpu``, seconds of rank 0's training thread,
:mod:`dist_quant.runtime.phasetime`): ``compute`` is that thread's CPU over forward and
backward less what it spent inside the hooks' calls; ``encode`` the hooks' calls on it less the
collectives issued from them; ``communicate`` the CPU of issuing the collectives on it; ``update``
the optimizer step's. What runs on other threads is not counted: gloo's transfers, and every
hook continuation (``then``) run when a collective completes, hence ``decode`` is 0 (the onebit
hook's decodes, PowerSGD's second product run there). Evaluations: their eval lines.

``--slow-worker I=F``: rank ``I`` waits ``F - 1`` times its previous step's compute after the
forward and before backward, whose hooks communicate (under the namespace cluster a rank is
not tied to a host, so ``--worker-rate`` may cap another rank's link; the ring waits for
either alike).

Not supported for DDP: checkpoints and ``--resume`` (a baseline reruns in seconds),
``--inject-nonfinite`` and ``--on-nonfinite`` (a non-finite gradient propagates as it does in
plain DDP). ``--stop-accuracy`` ends the run at the first evaluation reaching it.

The run directory reads as the parameter server's (:mod:`dist_quant.runtime.metrics`): eval
lines add ``evaluated_at`` (their own step), the summary ``test_step`` and ``eval_lag`` (0), and
its ``compressor`` names what compresses the gradient as the parameter server's does: ``none``
(fp32), ``fp16``, ``powersgd``, or the onebit hook's ``--compressor`` (``ddp_hook`` says which
hook ran).

Launch: ``dist-quant train --method ddp --workers 4 --ddp-hook powersgd`` or
``torchrun --nproc-per-node 4 -m dist_quant.train --method ddp --ddp-hook fp16``.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from dist_quant.baselines.hooks import OneBitState, onebit_hook
from dist_quant.config import TrainConfig, stop_reached
from dist_quant.core import collective
from dist_quant.core.lr_schedule import schedule_from_config
from dist_quant.core.optim import decay_param_groups, make_optimizer
from dist_quant.data import worker_batches
from dist_quant.errors import ConfigError
from dist_quant.ps.common import DROPOUT, bn_stats, generator, load_bn_stats
from dist_quant.ps.schedule import is_eval_step
from dist_quant.ps.server import evaluate_model
from dist_quant.ps.task import Task
from dist_quant.runtime.metrics import RunRecorder
from dist_quant.runtime.phasetime import now, since
from dist_quant.runtime.progress import Progress, summary_line
from dist_quant.runtime.rank import default_run_dir, pick_device
from dist_quant.runtime.watchdog import StepWatchdog

POWERSGD_START_ITER = 2


def ring_allreduce_bytes(nbytes: int, world: int) -> tuple[int, int]:
    """(reduce-scatter, allgather) bytes all ranks together send for one ring allreduce of a
    buffer of ``nbytes``: ``((W - 1) B, (W - 1) B)``. See the module docstring."""
    return (world - 1) * nbytes, (world - 1) * nbytes


# --------------------------------------------------------------------------------------------
# counting and timing what the hooks hand to the transport


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


class AllreduceMeter:
    """Stands in for ``torch.distributed`` inside torch's hook modules: ``all_reduce`` counts
    ``numel * element_size`` of the tensor handed over and times the call to its completion;
    ``all_to_all_single`` (the onebit hook's moves, through :mod:`dist_quant.core.collective`) is
    timed only, its bytes being counted by the hook's state; every other attribute is
    torch.distributed's own. Install with :meth:`installed`.

    torch's hooks call ``dist.all_reduce`` through their module global ``dist`` (the PowerSGD
    hook from callbacks too, after the hook has returned), so replacing that global is the one
    place that sees every tensor they send, without re-deriving sizes from the algorithm.
    """

    _MODULES = (default_hooks, powerSGD_hook, collective)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.nbytes = 0
            self.calls = 0
            self.comm: list[list[float]] = []   # [issued, completed]
            self.hooks: list[list[float]] = []  # [hook called, bucket result ready]
            # CPU seconds of the thread that made the meter (training) inside hook calls and
            # inside collective calls (the issue; a collective a hook issues is in both)
            self.cpu_hooks = self.cpu_comm = 0.0
        self.owner = threading.get_ident()

    def all_reduce(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.nbytes += tensor.numel() * tensor.element_size()
            self.calls += 1
        return self._timed(dist.all_reduce, tensor, *args, **kwargs)

    def all_to_all_single(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed(dist.all_to_all_single, *args, **kwargs)

    def _timed(self, collective: Callable, *args: Any, **kwargs: Any) -> Any:
        start = now()
        span = [start.wall, float("nan")]
        with self._lock:
            self.comm.append(span)
        work = collective(*args, **kwargs)
        if work is None:  # synchronous call
            span[1] = time.perf_counter()
        else:
            work.get_future().add_done_callback(
                lambda _: span.__setitem__(1, time.perf_counter()))
        self._owner_cpu("cpu_comm", start)
        return work

    def _owner_cpu(self, field: str, start: Any) -> None:
        """Add the CPU since ``start`` to ``field`` if this is the training thread."""
        if threading.get_ident() == self.owner:
            spent = since(start).cpu
            with self._lock:
                setattr(self, field, getattr(self, field) + spent)

    def __getattr__(self, name: str) -> Any:
        return getattr(dist, name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[AllreduceMeter]:
        saved = [m.dist for m in self._MODULES]
        for m in self._MODULES:
            m.dist = self
        try:
            yield self
        finally:
            for m, d in zip(self._MODULES, saved, strict=True):
                m.dist = d

    def wrap(self, hook: Callable) -> Callable:
        """A DDP hook that runs ``hook`` and records when its bucket result is ready."""
        def timed_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future:
            start = now()
            span = [start.wall, float("nan")]
            with self._lock:
                self.hooks.append(span)

            def done(fut: torch.futures.Future) -> Any:
                span[1] = time.perf_counter()
                return fut.value()

            future = hook(state, bucket).then(done)
            self._owner_cpu("cpu_hooks", start)
            return future

        # DDP checks these annotations as objects (this module defers annotations to strings)
        timed_hook.__annotations__ = {"state": object, "bucket": dist.GradBucket,
                                      "return": torch.futures.Future[torch.Tensor]}
        return timed_hook

    def phases(self) -> dict[str, float]:
        """communicate / encode / decode seconds of what was recorded since the last reset;
        ``hooks``: the hooks' wall time; ``cpu_hooks``, ``cpu_comm``: the training thread's CPU
        inside the hook calls and the collective calls."""
        with self._lock:
            comm = [(a, b) for a, b in self.comm if b == b]
            hooks = [(a, b) for a, b in self.hooks if b == b]
            cpu_hooks, cpu_comm = self.cpu_hooks, self.cpu_comm
        communicate = _union_length(comm)
        hook_time = _union_length(hooks)
        last_comm_end = max((b for _, b in comm), default=None)
        decode = 0.0
        if last_comm_end is not None and hooks:
            decode = max(0.0, max(b for _, b in hooks) - last_comm_end)
        encode = max(0.0, hook_time - communicate - decode)
        return {"communicate": communicate, "encode": encode, "decode": decode,
                "hooks": hook_time, "cpu_hooks": cpu_hooks, "cpu_comm": cpu_comm}


# --------------------------------------------------------------------------------------------
# the hooks


def make_hook(cfg: TrainConfig, group: dist.ProcessGroup | None = None) -> tuple[Callable, Any]:
    """(hook, state) for ``register_comm_hook`` as chosen by ``cfg.ddp_hook``."""
    if cfg.ddp_hook == "none":
        return default_hooks.allreduce_hook, group
    if cfg.ddp_hook == "fp16":
        return default_hooks.fp16_compress_hook, group
    if cfg.ddp_hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=group, matrix_approximation_rank=cfg.powersgd_rank,
            start_powerSGD_iter=POWERSGD_START_ITER, use_error_feedback=True, warm_start=True,
            random_seed=cfg.seed)
        return powerSGD_hook.powerSGD_hook, state
    if cfg.ddp_hook == "onebit":
        state = OneBitState(process_group=group, compressor=cfg.compressor,
                            bucket_size=cfg.bucket_size, error_feedback=cfg.error_feedback,
                            seed=cfg.seed, bits=cfg.bits, header_dtype=cfg.header_dtype,
                            shift_rate=cfg.shift_rate)
        return onebit_hook, state
    raise ConfigError("--ddp-hook", f"must be none, fp16, powersgd or onebit; got "
                      f"{cfg.ddp_hook!r}")


def hook_bytes(state: Any) -> tuple[int, int]:
    """(up, down) bytes a hook's state counted so far, all ranks together; (0, 0) for the
    hooks whose bytes the :class:`AllreduceMeter` counts."""
    if isinstance(state, OneBitState):
        return state.world_up, state.world_down
    return 0, 0


def compressor_name(cfg: TrainConfig) -> str:
    """What compresses the gradient, named as the parameter server's ``compressor`` is:
    ``none`` (fp32 allreduce), ``fp16``, ``powersgd``, or the onebit hook's ``--compressor``."""
    if cfg.ddp_hook == "onebit":
        return cfg.compressor
    return cfg.ddp_hook


# --------------------------------------------------------------------------------------------
# the training loop


@dataclass
class DDPResult:
    """What :func:`train_ddp` returns on every rank (summary only on rank 0)."""

    model: nn.Module
    steps: int
    summary: dict[str, Any] | None = None


def _check(cfg: TrainConfig, world: int) -> None:
    if cfg.method != "ddp":
        raise ConfigError("--method", f"run_ddp runs --method ddp; got {cfg.method!r}")
    if world != cfg.workers:
        raise ConfigError("--workers", f"the DDP world has {world} ranks but --workers is "
                          f"{cfg.workers}; launch W ranks, all workers (no server)")
    if cfg.resume:
        raise ConfigError("--resume", "DDP baselines write no checkpoints and cannot resume")
    if cfg.inject_nonfinite:
        raise ConfigError("--inject-nonfinite", "applies to --method ps only")


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             chunk: int = 4096) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` in eval mode on ``(x, y)``."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), chunk):
        out = model(x[i:i + chunk])
        loss += float(nn.functional.cross_entropy(out, y[i:i + chunk], reduction="sum"))
        correct += int((out.argmax(1) == y[i:i + chunk]).sum())
    model.train()
    return loss / len(y), correct / len(y)


def _gather_to_rank0(t: torch.Tensor, world: int, async_op: bool = False) -> tuple[Any, list]:
    out = [torch.empty_like(t) for _ in range(world)] if dist.get_rank() == 0 else None
    return dist.gather(t, out, dst=0, async_op=async_op), out


def train_ddp(cfg: TrainConfig) -> DDPResult:
    """Train on this rank of an initialised process group; see the module docstring."""

    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    _check(cfg, world)
    device = pick_device(cfg)  # the PS job's rule: cuda:LOCAL_RANK when asked or available
    if rank == 0 and not cfg.run_dir:
        cfg = cfg.replace(run_dir=default_run_dir(cfg))

    task = Task.from_config(cfg)
    ds = task.data
    shard = ds.shard(rank, world)
    x_train, y_train = shard.x_train.to(device), shard.y_train.to(device)
    x_test, y_test = ds.x_test.to(device), ds.y_test.to(device)
    sampler = worker_batches(len(shard.y_train), cfg.batch_size, cfg.seed, rank)
    dropout_gen = generator(device, cfg.seed, rank, DROPOUT)
    model = task.model(device, dropout_generator=dropout_gen)
    n_params = sum(p.numel() for p in model.parameters())
    n_stats = bn_stats(model).numel()
    # Replicas start equal by construction (same INIT seed): no start-up broadcast. BatchNorm
    # running statistics stay local (no buffer sync in forward), averaged at evaluation.
    ddp = DistributedDataParallel(model, init_sync=False, forward_sync_buffers=False,
                                  **bucket_options(model, cfg))
    meter = AllreduceMeter()
    hook, state = make_hook(cfg)
    ddp.register_comm_hook(state, meter.wrap(hook))
    opt = make_optimizer(cfg, decay_param_groups(model, cfg.weight_decay, cfg.decay_all),
                         schedule=schedule_from_config(cfg))

    recorder = RunRecorder(cfg.run_dir, task.recorded_config(cfg), model=task.kind,
                           metric=task.metric_name, data=task.data.info) \
        if rank == 0 else None
    progress = Progress(cfg.steps, enabled=cfg.progress and rank == 0)
    test_loss = test_acc = float("nan")
    evals, step, last_eval = 0, 0, None
    hooked = hook_bytes(state)
    slow, last_compute = cfg.slow_factors.get(rank, 1.0), 0.0
    try:
        with meter.installed(), StepWatchdog(f"rank {rank}", 2 * cfg.timeout) as watch:
            for step in range(1, cfg.steps + 1):
                idx = sampler.next().to(device)
                x, y = x_train[idx], y_train[idx]
                meter.reset()
                t0 = now()
                with task.randomness(dropout_gen):
                    loss = task.loss_fn(ddp(x), y)
                if slow > 1.0:  # --slow-worker: before backward, whose hooks communicate
                    time.sleep((slow - 1.0) * last_compute)
                # telemetry (not counted): the loss travels to rank 0 while backward runs
                loss_work, losses = _gather_to_rank0(loss.detach().double().reshape(1), world,
                                                     async_op=True)
                loss.backward()  # returns once every bucket's hook future is complete
                t1 = now()
                opt.step()
                opt.zero_grad(set_to_none=True)
                t2 = now()
                loss_work.wait()

                up, down = ring_allreduce_bytes(meter.nbytes, world)
                counted = hook_bytes(state)
                up, down = up + counted[0] - hooked[0], down + counted[1] - hooked[1]
                hooked = counted
                ph = meter.phases()
                work, update = t1 - t0, t2 - t1
                compute = max(0.0, work.wall - ph["hooks"])
                last_compute = max(0.0, compute - (slow - 1.0) * last_compute)  # without the wait
                times = {"compute": compute, "encode": ph["encode"],
                         "communicate": ph["communicate"], "decode": ph["decode"],
                         "update": update.wall}
                cpu = {"compute": max(0.0, work.cpu - ph["cpu_hooks"]),
                       "encode": max(0.0, ph["cpu_hooks"] - ph["cpu_comm"]),
                       "communicate": ph["cpu_comm"], "decode": 0.0, "update": update.cpu}
                with_stats = is_eval_step(cfg, step)
                stats = None
                if with_stats and n_stats:
                    # counted: every rank's BatchNorm statistics go to rank 0 (W - 1 sends)
                    _, stats = _gather_to_rank0(bn_stats(model), world)
                    up += (world - 1) * 4 * n_stats
                stop = False
                if recorder is not None:
                    rec = recorder.step(step, float(torch.cat(losses).mean()), up, down, times,
                                        cpu=cpu)
                    if with_stats:
                        evals, last_eval = evals + 1, step
                        te = now()
                        test_loss, test_acc = _evaluate_with_mean_stats(model, x_test, y_test,
                                                                        stats, task)
                        # evaluated at its own step, as an unlagged parameter-server run
                        recorder.eval(step, test_loss, test_acc, extra={"evaluated_at": step},
                                      spent=since(te))
                        stop = stop_reached(cfg, test_loss, test_acc)
                    progress.update(step, rec["loss"], test_acc, recorder.cum_up,
                                    recorder.cum_down)
                if with_stats:
                    # control (not counted): rank 0 tells everyone whether to go on
                    flag = torch.tensor([int(stop)], device=device)
                    dist.broadcast(flag, src=0)
                    if flag.item():
                        break
                watch.beat(step)
    finally:
        progress.close()

    summary = None
    if recorder is not None:
        grad_up, grad_down = ring_allreduce_bytes(4 * n_params, world)
        summary = recorder.summary(
            test_accuracy=test_acc, test_loss=test_loss,
            fp32_bytes_up=step * grad_up + evals * (world - 1) * 4 * n_stats,
            fp32_bytes_down=step * grad_down, steps=step, workers=world, params=n_params,
            compressor=compressor_name(cfg), method="ddp", ddp_hook=cfg.ddp_hook,
            test_step=last_eval, eval_lag=0,
            powersgd_rank=cfg.powersgd_rank if cfg.ddp_hook == "powersgd" else None,
            powersgd_start_iter=POWERSGD_START_ITER if cfg.ddp_hook == "powersgd" else None,
            **(_onebit_summary(cfg, state) if cfg.ddp_hook == "onebit" else {}),
            allreduce="all-to-all+all-gather" if cfg.ddp_hook == "onebit" else "gloo-ring",
            stop_accuracy=cfg.stop_accuracy,
            **({"stop_loss": cfg.stop_loss} if cfg.stop_loss else {}),
            stopped_early=step < cfg.steps)
        recorder.close()
        print(summary_line(summary), flush=True)
    return DDPResult(model=model, steps=step, summary=summary)


def _onebit_summary(cfg: TrainConfig, state: OneBitState) -> dict[str, Any]:
    rate, fp32_bytes, sent = state.compression_stats()
    return {"hook_compressor": cfg.compressor, "bucket_size": cfg.bucket_size,
            "error_feedback": cfg.error_feedback, "allgather_bits": state.allgather_bits,
            "rank0_bytes_sent": sent, "rank0_fp32_bytes": fp32_bytes}


def _evaluate_with_mean_stats(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                              stats: list[torch.Tensor] | None,
                              task: Task | None = None) -> tuple[float, float]:
    """Evaluate with the ranks' averaged BatchNorm statistics, then restore rank 0's own (it
    keeps training with them, as every PS worker does). The MLP is scored as it always was
    (:func:`evaluate`); another task with its loss and metric, as the PS scores it."""
    def score() -> tuple[float, float]:
        if task is None or task.kind == "mlp":
            return evaluate(model, x, y)
        try:
            return evaluate_model(model, x, y, None, task.loss_fn, task.metric)
        finally:
            model.train()

    if stats is None:
        return score()
    own = bn_stats(model)
    load_bn_stats(model, torch.stack(stats).mean(0))
    try:
        return score()
    finally:
        load_bn_stats(model, own)


def bucket_options(model: nn.Module, cfg: TrainConfig) -> dict[str, Any]:
    """PowerSGD on gloo: the whole model in one DDP bucket. torch's hook waits, inside the
    callback of its first allreduce, for the allreduce of P; gloo runs callbacks on its work
    threads (two), so with two buckets both threads wait there and none is left to run the
    allreduces they wait for: every rank hangs for good, and no collective times out, since
    none started (a 360,288-parameter transformer, 1.4 MB, made two buckets under DDP's 1 MB
    first bucket). One bucket costs the overlap of communication with backward, which gloo on
    CPU barely has."""
    if cfg.ddp_hook != "powersgd" or dist.get_backend() != "gloo":
        return {}
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"bucket_cap_mb": max(25, math.ceil(size / 2**20) + 1)}


def run_ddp(cfg: TrainConfig) -> None:
    """Entry point called by ``dist_quant.train`` on every rank after ``init_process_group``."""
    train_ddp(cfg)
