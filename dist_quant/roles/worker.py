"""A worker: its half of each synchronous step, and the loop that runs it over the transport.

Worker ``i`` of ``W`` holds its shard of the training set, a replica of the model, its own
quantiser and dropout generators (seeded from ``(seed, i)``), its batch sampler and, with
``--error-feedback``, its residual. One step (:meth:`Worker.step_up`, then
:meth:`Worker.receive_downlink`):

1. draw the next minibatch of its shard; forward in training mode (BatchNorm normalises with
   this minibatch's statistics and updates the worker's own running statistics);
2. backward the data loss only (mean cross-entropy; the L2 term lives at the server, MATH 5);
3. flatten every gradient into one vector ``g`` and encode it with its own generator; a
   non-finite ``g`` is never quantised: the worker sends ``nonfinite_payload`` instead, of the
   same size;
4. receive the downlink payload and, at the start of the next step, update the replica: with
   ``--downlink none`` the payload is the server's parameters in fp32; otherwise it is the
   compressed change ``C(theta - r)`` and the replica becomes ``r + decode(C(theta - r))``,
   exactly what the server computes for its copy ``r``, so all replicas stay identical and
   what compression dropped is sent at the next step.

The same :class:`Worker` object serves the distributed run (:func:`run_worker`) and the
single-process simulator.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from dist_quant.config import TrainConfig
from dist_quant.data import Dataset, worker_batches
from dist_quant.errors import NonFiniteGradientError
from dist_quant.roles import common
from dist_quant.roles.schedule import is_checkpoint_step, is_eval_step
from dist_quant.transport import (
    ABORT,
    LAST,
    LOST,
    TAG_CONTROL,
    TAG_DOWN,
    TAG_PAYLOAD,
    TAG_STATS,
    TAG_TELEMETRY,
    Transport,
)


class RunAborted(RuntimeError):
    """The server ended the run (``--on-nonfinite abort`` or a diverged model)."""


class Worker:
    def __init__(self, cfg: TrainConfig, data: Dataset, index: int, device: torch.device):
        self.cfg, self.index, self.device = cfg, int(index), torch.device(device)
        shard = data.shard(index, cfg.workers)
        self.x, self.y = shard.x_train.to(self.device), shard.y_train.to(self.device)
        self.sampler = worker_batches(len(self.y), cfg.batch_size, cfg.seed, index)
        self.gen = common.generator(self.device, cfg.seed, index, common.QUANTISER)
        self.dropout_gen = common.generator(self.device, cfg.seed, index, common.DROPOUT)
        self.model = common.build_model(cfg, data.in_features, data.num_classes, self.device,
                                        dropout_generator=self.dropout_gen)
        flat = common.flat_params(self.model)
        self.n = flat.numel()
        self.n_stats = common.bn_stats(self.model).numel()
        self.comp = common.uplink_compressor(cfg, stateful=True)
        self.down = common.downlink_compressor(cfg)
        # the downlink is received into one reused buffer; with --downlink none its body is the
        # replica itself, so receiving is decoding (what is left is the header's validation)
        if cfg.downlink == "none":
            self.inbox, self.replica = self.down.payload_buffer(self.n, self.device)
            self.replica.copy_(flat)
        else:
            self.inbox = torch.empty(self.down.payload_nbytes(self.n), dtype=torch.uint8,
                                     device=self.device)
            self.replica = flat.clone()
        # the model's parameters are views of the replica: they read each downlink in place
        self.params = common.ParamViews(self.model, self.replica, alias=True)
        self.decoded = torch.empty_like(self.replica)  # reused downlink decode (compressed)
        self.nonfinite_at = cfg.nonfinite_at
        self.step = 0
        self.pending: torch.Tensor | None = None  # downlink payload not yet decoded

    # ---- one step ---------------------------------------------------------------------------
    def compute(self) -> tuple[torch.Tensor, float]:
        """Gradient of the data loss on the next minibatch, flattened; and the loss."""
        idx = self.sampler.next().to(self.device)
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.x[idx]), self.y[idx])
        loss.backward()
        g = common.flat_grads(self.model)
        if self.nonfinite_at == (self.index, self.step + 1):
            g[0] = float("nan")
        return g, float(loss.detach())

    def encode(self, g: torch.Tensor) -> torch.Tensor:
        """The uplink payload as a flat uint8 tensor (a non-finite marker if ``g`` is)."""
        try:
            payload = self.comp.encode(g, generator=self.gen)
        except NonFiniteGradientError as err:
            payload = self.comp.nonfinite_payload(self.n, err.count)
        data = payload.to_tensor()
        return data if data.device == self.device else data.to(self.device)

    def step_up(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the pending downlink, compute and encode one step.

        Returns (payload uint8, telemetry float64 ``[loss, decode s, compute s, encode s]``);
        ``decode`` is this worker's decoding of the previous step's downlink.
        """
        t0 = time.perf_counter()
        self._apply_pending()
        t1 = time.perf_counter()
        g, loss = self.compute()
        t2 = time.perf_counter()
        payload = self.encode(g)
        t3 = time.perf_counter()
        self.step += 1
        telemetry = torch.tensor([loss, t1 - t0, t2 - t1, t3 - t2], dtype=torch.float64,
                                 device=self.device)
        return payload, telemetry

    def receive_downlink(self, payload: torch.Tensor) -> None:
        """Keep the downlink payload; it is decoded at the start of the next step (or before a
        checkpoint), so its decode time is billed to the worker, not to the link."""
        self.pending = payload

    def _apply_pending(self) -> None:
        if self.pending is None:
            return
        if self.cfg.downlink == "none" and self.pending is self.inbox:  # received in place
            self.down.check(self.pending)
        elif self.cfg.downlink == "none":  # the parameters themselves: decoded into the replica
            self.down.decode(self.pending, out=self.replica)
        else:
            self.replica.add_(self.down.decode(self.pending, out=self.decoded))
        self.pending = None
        self.params.load()

    def bn_stats(self) -> torch.Tensor:
        return common.bn_stats(self.model)

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit for bit (the replica is in ``model``)."""
        self._apply_pending()
        return {"index": self.index, "step": self.step,
                "model": {k: v.to("cpu", copy=True) for k, v in self.model.state_dict().items()},
                "generator": self.gen.get_state(),
                "dropout_generator": self.dropout_gen.get_state(),
                "sampler": self.sampler.state_dict(),
                "compressor": _on(self.comp.state_dict(), torch.device("cpu"))
                if hasattr(self.comp, "state_dict") else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["index"]) != self.index:
            raise ValueError(f"worker {self.index} was given the state of worker {state['index']}")
        self.step = int(state["step"])
        self.pending = None
        self.model.load_state_dict(state["model"])
        self.params.store()  # into the same replica buffer
        self.gen.set_state(state["generator"])
        self.dropout_gen.set_state(state["dropout_generator"])
        self.sampler.load_state_dict(state["sampler"])
        if hasattr(self.comp, "load_state_dict"):
            self.comp.load_state_dict(_on(state["compressor"], self.device))


def run_worker(cfg: TrainConfig, worker: Worker, transport: Transport) -> None:
    """The worker's side of the distributed loop (mirrors :func:`roles.server.run_server`)."""
    if cfg.resume:
        worker.load_state_dict(transport.recv_blob("resume state"))
    n_down = worker.down.payload_nbytes(worker.n)
    for step in range(worker.step + 1, cfg.steps + 1):
        payload, telemetry = worker.step_up()
        transport.send_to_server(payload, TAG_PAYLOAD, "gradient payload", counted=True)
        transport.send_to_server(telemetry, TAG_TELEMETRY, "telemetry")
        if is_eval_step(cfg, step) and worker.n_stats:
            transport.send_to_server(worker.bn_stats(), TAG_STATS, "BatchNorm statistics",
                                     counted=True)
        control = int(transport.recv_from_server(1, torch.int64, TAG_CONTROL, "control")[0])
        if control >= LOST:
            raise transport.lost_error(control)
        if control == ABORT:
            raise RunAborted(f"the server aborted the run at step {step} (see its message)")
        worker.receive_downlink(transport.recv_from_server(n_down, torch.uint8, TAG_DOWN,
                                                           "parameters payload", counted=True,
                                                           out=worker.inbox))
        if is_checkpoint_step(cfg, step, last=control == LAST):
            transport.send_blob(worker.state_dict(), "worker state")
        if control == LAST:
            break


def _on(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it (nested dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _on(v, device) for k, v in obj.items()}
    return obj


def replica_of(model: torch.nn.Module, state: dict[str, Any]) -> torch.Tensor:
    """The flat parameters held in a worker state (``model.parameters()`` order)."""
    return torch.cat([state["model"][name].reshape(-1) for name, _ in model.named_parameters()])
