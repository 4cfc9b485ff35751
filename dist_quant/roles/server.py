"""The parameter server: its half of each synchronous step, and the loop that drives a run.

One step ``t`` at the server (:func:`run_server`, shared by the distributed job and the
single-process simulator; only the ``workers`` object that moves payloads differs):

1. receive the W uplink payloads (and telemetry; at evaluation steps the BN statistics);
2. ``g = decode_mean(payloads)``; a payload that is marked non-finite or fails validation is
   left out (``--on-nonfinite skip``: ``g`` is the mean of the others, the count is logged; if
   none is left the parameters and momentum stay as they are, and ``STUCK_STEPS`` such steps
   in a row end the run: a diverged model gives non-finite gradients everywhere) or ends the
   run (``abort``);
3. ``DecoupledMomentumSGD`` with the L2 term computed here (MATH 5a):
   ``m <- mu m + g``, ``theta <- theta - eta (m + lambda theta)``, decay on weights only unless
   ``--decay-all`` (``decay_param_groups``);
4. the downlink payload: ``--downlink none`` sends ``theta`` in fp32; a compressor ``C`` sends
   ``C(theta - r)`` and the server advances its copy of the workers' replica,
   ``r <- r + decode(C(theta - r))`` (the decode is deterministic, so every worker computes the
   same ``r``; what ``C`` dropped stays in ``theta - r`` and is sent at the next step);
5. at evaluation steps, evaluate ``theta`` on the test split (below), then tell the workers
   whether to continue and send the downlink payload.

BatchNorm policy. Each worker normalises with its own minibatch statistics in training and
keeps its own running statistics (they never travel on the training path). At every
evaluation the workers send their running means and variances uncompressed (counted as uplink
bytes); the server evaluates with their plain average. The shards are i.i.d. and the replicas
identical, so the average estimates the population statistics; the variance average leaves
out the spread of the workers' means, which is negligible next to the variance at these shard
sizes.

Phase times of a step (``metrics.jsonl``): the workers measure their ``compute``, ``encode``
and downlink decode and send them as telemetry; the server takes the slowest worker's for a
distributed run (the synchronous step waits for it) and the sum for the simulator (one
process does them in turn), and adds its own: ``decode`` += ``decode_mean``, ``update`` =
the optimizer step, ``encode`` += the downlink encode. ``communicate`` is the rest of the
server's step time: transfer plus waiting. Evaluation and checkpoints are outside the step.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from dist_quant.config import TrainConfig
from dist_quant.data import Dataset
from dist_quant.divergence import DivergenceMonitor
from dist_quant.errors import NonFiniteGradientError, PayloadError
from dist_quant.metrics import RunRecorder, read_metrics
from dist_quant.optim import DecoupledMomentumSGD, decay_param_groups
from dist_quant.progress import Progress, summary_line
from dist_quant.roles import common
from dist_quant.roles.schedule import is_checkpoint_step, is_eval_step
from dist_quant.roles.worker import RunAborted
from dist_quant.transport import (
    ABORT,
    CONTINUE,
    LAST,
    TAG_CONTROL,
    TAG_DOWN,
    TAG_PAYLOAD,
    TAG_STATS,
    TAG_TELEMETRY,
    TELEMETRY,
    Transport,
)

EVAL_CHUNK = 4096
SKIP_LINES = 10    # steps whose left-out payloads are printed; later ones are only counted
STUCK_STEPS = 10   # consecutive steps without any valid payload end the run


class Server:
    def __init__(self, cfg: TrainConfig, data: Dataset, device: torch.device):
        self.cfg, self.device = cfg, torch.device(device)
        self.model = common.build_model(cfg, data.in_features, data.num_classes, self.device)
        self.opt = DecoupledMomentumSGD(
            decay_param_groups(self.model, cfg.weight_decay, cfg.decay_all),
            lr=cfg.lr, momentum=cfg.momentum)
        self.up = common.uplink_compressor(cfg, stateful=False)
        self.down = common.downlink_compressor(cfg)
        self.gen = common.generator(self.device, cfg.seed, common.DOWNLINK)
        flat = common.flat_params(self.model)
        self.n = flat.numel()
        # buffers reused every step: theta gathered from the model (into the replica itself
        # when theta is what goes down: the body of the one downlink payload, sent as it is),
        # the mean gradient, the change sent down and its decode
        self.down_buf: torch.Tensor | None = None
        if cfg.downlink == "none":
            self.down_buf, self.replica = self.down.payload_buffer(self.n, self.device)
            self.replica.copy_(flat)
        else:
            self.replica = flat.clone()
        self.theta = self.replica if cfg.downlink == "none" else torch.empty_like(self.replica)
        self.params = common.ParamViews(self.model, self.theta, alias=True)  # updated in place
        self.g = torch.empty_like(self.replica)
        self.delta = torch.empty_like(self.replica)
        self.n_stats = common.bn_stats(self.model).numel()
        self.x_test, self.y_test = data.x_test.to(self.device), data.y_test.to(self.device)
        self.num_classes = data.num_classes
        self.step = 0

    def aggregate(self, payloads: torch.Tensor) -> tuple[torch.Tensor | None, list[str]]:
        """Mean of the valid rows' decodes (None if none is valid), and why rows were left out."""
        try:
            return self.up.decode_mean(payloads, out=self.g), []
        except (PayloadError, NonFiniteGradientError):
            pass
        good, bad = [], []
        for i in range(payloads.shape[0]):
            try:
                self.up.decode(payloads[i])
                good.append(i)
            except (PayloadError, NonFiniteGradientError) as err:
                bad.append(f"worker {i}: {err}")
        return (self.up.decode_mean(payloads[good], out=self.g) if good else None), bad

    @torch.no_grad()
    def update(self, g: torch.Tensor | None) -> None:
        if g is not None:
            common.set_flat_grads(self.model, g)
            self.opt.step()
        self.step += 1

    @torch.no_grad()
    def downlink(self) -> torch.Tensor:
        """The downlink payload (flat uint8); advances the tracked replica."""
        theta = self.params.store()
        if self.down_buf is not None:  # theta is the replica, the body of the payload: sent whole
            payload = self.down.seal(self.down_buf).to_tensor()
        else:
            change = torch.sub(theta, self.replica, out=self.delta)
            payload = self.down.encode(change, generator=self.gen).to_tensor()
            self.replica.add_(self.down.decode(payload, out=self.delta))
        return payload if payload.device == self.device else payload.to(self.device)

    @torch.no_grad()
    def evaluate(self, mean_stats: torch.Tensor | None) -> tuple[float, float]:
        """(test loss, test accuracy) of ``theta`` with the workers' averaged BN statistics."""
        if mean_stats is not None:
            common.load_bn_stats(self.model, mean_stats)
        self.model.eval()
        loss_sum, correct = 0.0, 0
        for i in range(0, len(self.y_test), EVAL_CHUNK):
            x, y = self.x_test[i:i + EVAL_CHUNK], self.y_test[i:i + EVAL_CHUNK]
            out = self.model(x)
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
        n = len(self.y_test)
        return loss_sum / n, correct / n

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step,
                "model": {k: v.to("cpu", copy=True) for k, v in self.model.state_dict().items()},
                "optimizer": self.opt.state_dict(), "replica": self.replica.to("cpu", copy=True),
                "generator": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.replica.copy_(state["replica"])
        self.gen.set_state(state["generator"])


class Workers(Protocol):
    """The server's view of its W workers (remote over a transport, or in-process)."""

    sequential: bool   # True when the workers' phases run one after another (simulator)
    bytes_up: int
    bytes_down: int

    def uplink(self, with_stats: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                torch.Tensor | None]: ...

    def downlink(self, control: int, payload: torch.Tensor | None) -> None: ...

    def collect_states(self) -> list[dict[str, Any]]: ...

    def restore_states(self, states: list[dict[str, Any]]) -> None: ...


class RemoteWorkers:
    """Workers in other processes, reached through a :class:`Transport`."""

    sequential = False

    def __init__(self, transport: Transport, n_up: int, n_down: int, n_stats: int):
        self.t, self.n_up, self.n_down, self.n_stats = transport, n_up, n_down, n_stats

    @property
    def bytes_up(self) -> int:
        return self.t.bytes_up

    @property
    def bytes_down(self) -> int:
        return self.t.bytes_down

    def uplink(self, with_stats: bool):
        payloads = self.t.recv_from_workers(self.n_up, torch.uint8, TAG_PAYLOAD,
                                            "gradient payload", counted=True)
        telemetry = self.t.recv_from_workers(len(TELEMETRY), torch.float64, TAG_TELEMETRY,
                                             "telemetry")
        stats = None
        if with_stats and self.n_stats:
            stats = self.t.recv_from_workers(self.n_stats, torch.float32, TAG_STATS,
                                             "BatchNorm statistics", counted=True)
        return payloads, telemetry, stats

    def downlink(self, control: int, payload: torch.Tensor | None) -> None:
        self.t.send_to_workers(torch.tensor([control], dtype=torch.int64), TAG_CONTROL, "control")
        if payload is not None:
            self.t.send_to_workers(payload, TAG_DOWN, "parameters payload", counted=True)

    def collect_states(self) -> list[dict[str, Any]]:
        return self.t.recv_blobs("worker state")

    def restore_states(self, states: list[dict[str, Any]]) -> None:
        self.t.send_blobs(states, "resume state")


def fp32_bytes(cfg: TrainConfig, n: int, n_stats: int, steps: int, evals: int) -> tuple[int, int]:
    """What fp32 payloads (the ``none`` compressor) would have carried up and down."""
    from dist_quant.compress import get_compressor

    fp32 = get_compressor("none").payload_nbytes(n)
    up = steps * cfg.workers * fp32 + evals * cfg.workers * 4 * n_stats
    return up, steps * cfg.workers * fp32


def run_server(cfg: TrainConfig, server: Server, workers: Workers, run_dir: str) -> dict[str, Any]:
    """Drive the run from ``server.step`` to the end; return the summary (also written)."""
    from dist_quant.checkpoint import load_for_resume, save_checkpoint

    start = 0
    if cfg.resume:
        state = load_for_resume(cfg)
        server.load_state_dict(state["server"])
        workers.restore_states(state["workers"])
        start = server.step
    recorder = RunRecorder(run_dir, cfg.to_dict(), resume_step=start if cfg.resume else None)
    up_size, down_size = server.up.payload_nbytes(server.n), server.down.payload_nbytes(server.n)
    combine = torch.sum if workers.sequential else torch.amax
    progress = Progress(cfg.steps, enabled=cfg.progress)
    test_loss = test_acc = float("nan")
    evals = sum(1 for r in read_metrics(run_dir) if r["kind"] == "eval")  # kept when resuming
    step = start
    skipped_steps = stuck = 0
    monitor = DivergenceMonitor(cfg)
    try:
        for step in range(start + 1, cfg.steps + 1):
            with_stats = is_eval_step(cfg, step)
            up0, down0 = workers.bytes_up, workers.bytes_down
            t0 = time.perf_counter()
            payloads, telemetry, stats = workers.uplink(with_stats)
            t1 = time.perf_counter()
            g, bad = server.aggregate(payloads)
            t2 = time.perf_counter()
            if bad:
                _report_bad(cfg, step, bad, workers, printed=skipped_steps)
                skipped_steps += 1
            stuck = 0 if g is not None else stuck + 1
            if stuck >= STUCK_STEPS:
                workers.downlink(ABORT, None)
                raise RunAborted(f"no valid payload for {stuck} consecutive steps (up to step "
                                 f"{step}): training diverged; lower --lr")
            if (diverged := monitor.observe(step, float(telemetry[:, 0].mean()))) is not None:
                workers.downlink(ABORT, None)
                raise RunAborted(diverged)
            server.update(g)
            t3 = time.perf_counter()
            down = server.downlink()
            t4 = time.perf_counter()
            last = step == cfg.steps
            if with_stats:
                evals += 1
                test_loss, test_acc = server.evaluate(None if stats is None else stats.mean(0))
                last = last or 0 < cfg.stop_accuracy <= test_acc
            t5 = time.perf_counter()
            workers.downlink(LAST if last else CONTINUE, down)
            t6 = time.perf_counter()

            tel = combine(telemetry[:, 1:].cpu(), dim=0).tolist()   # decode, compute, encode
            times = {"compute": tel[1], "encode": tel[2] + (t4 - t3),
                     "decode": tel[0] + (t2 - t1), "update": t3 - t2}
            wall = (t4 - t0) + (t6 - t5)
            times["communicate"] = max(0.0, wall - sum(times.values()))
            rec = recorder.step(step, float(telemetry[:, 0].mean()),
                                workers.bytes_up - up0, workers.bytes_down - down0, times,
                                skipped=len(bad))
            if with_stats:
                recorder.eval(step, test_loss, test_acc)
            progress.update(step, rec["loss"], test_acc, recorder.cum_up, recorder.cum_down)
            if is_checkpoint_step(cfg, step, last):
                states = workers.collect_states()
                _check_replicas(server, states)
                save_checkpoint(run_dir, step, {"format": 1, "step": step,
                                                "config": cfg.to_dict(),
                                                "server": server.state_dict(), "workers": states},
                                keep=cfg.keep_checkpoints)
            if last:
                break
    finally:
        progress.close()
    if (diverged := monitor.final(test_loss, test_acc, server.num_classes)) is not None:
        raise RunAborted(diverged)
    fp32_up, fp32_down = fp32_bytes(cfg, server.n, server.n_stats, step, evals)
    summary = recorder.summary(
        test_accuracy=test_acc, test_loss=test_loss, fp32_bytes_up=fp32_up,
        fp32_bytes_down=fp32_down, steps=step, workers=cfg.workers, params=server.n,
        compressor=cfg.compressor, method=cfg.method, bucket_size=cfg.bucket_size,
        downlink=cfg.downlink, payload_nbytes_up=up_size, payload_nbytes_down=down_size,
        simulate=cfg.simulate, stopped_early=step < cfg.steps)
    recorder.close()
    print(summary_line(summary), flush=True)
    return summary


def _report_bad(cfg: TrainConfig, step: int, bad: list[str], workers: Workers,
                printed: int) -> None:
    """Abort, or print one line for each of the first ``SKIP_LINES`` steps with bad payloads."""
    if cfg.on_nonfinite == "abort":
        workers.downlink(ABORT, None)
        raise RunAborted(f"step {step}: {'; '.join(bad)} (--on-nonfinite abort)")
    if printed < SKIP_LINES:
        more = " (from now on only counted in metrics.jsonl)" if printed == SKIP_LINES - 1 else ""
        print(f"step {step}: left out {len(bad)} of {cfg.workers} payloads: {'; '.join(bad)}"
              f"{more}", file=sys.stderr, flush=True)


def _check_replicas(server: Server, states: list[dict[str, Any]]) -> None:
    """Every worker's replica must equal the server's tracked copy bit for bit."""
    from dist_quant.roles.worker import replica_of

    for i, state in enumerate(states):
        if not torch.equal(replica_of(server.model, state).to(server.device), server.replica):
            raise RuntimeError(f"worker {i}'s replica differs from the server's tracked copy")

