"""What the server and the workers build identically: seeds, the model, the compressors, and
the flat views of parameters, gradients and BatchNorm statistics.

Seeds. Every generator is seeded from ``SeedSequence([seed, *tags])``: the initial weights from
``(seed, INIT)`` (the same on every rank, so all replicas start equal), worker ``i``'s quantiser
from ``(seed, i, QUANTISER)`` and its dropout masks from ``(seed, i, DROPOUT)``, the server's
downlink quantiser from ``(seed, DOWNLINK)``. ``i`` is the worker index 0..W-1 (not the global
rank), so the simulator and any rank layout draw the same numbers. The global RNG is never used.

Flat order. Parameters are flattened in ``model.parameters()`` order; this is the order of the
coordinates in every payload. :class:`ParamViews` ties a model's parameters to one flat vector
once, so that the per-step copies between them make no pass over the module tree and build no
views or temporaries.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from dist_quant.compress import get_compressor
from dist_quant.compress.momentum import AdamMomentum, WorkerMomentum
from dist_quant.compress.shift import ShiftedServer, ShiftedWorker, parse_shift_rate
from dist_quant.config import TrainConfig
from dist_quant.core.model import build_mlp

INIT, QUANTISER, DROPOUT, DOWNLINK = 0x1417, 0x9A47, 0xD209, 0xD0A1
# attribute of a task's model naming the buffers averaged at evaluation (dist_quant.ps.task);
# a model without it (the MLP) averages its BatchNorm running means and variances
AVERAGED = "dist_quant_averaged"


def derive_seed(seed: int, *tags: int) -> int:
    """A 63-bit seed from the run seed and integer tags (independent streams per tag tuple)."""
    state = np.random.SeedSequence([int(seed), *map(int, tags)]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def generator(device: torch.device, seed: int, *tags: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *tags))


def build_model(cfg: TrainConfig, in_features: int, num_classes: int, device: torch.device,
                dropout_generator: torch.Generator | None = None) -> nn.Sequential:
    """The MLP with its initial weights drawn from ``(seed, INIT)`` on the CPU, then moved."""
    model = build_mlp(in_features, cfg.hidden_sizes, num_classes, keep_prob=cfg.keep_prob,
                      batchnorm=cfg.batchnorm, init=cfg.init,
                      generator=generator(torch.device("cpu"), cfg.seed, INIT),
                      dropout_generator=dropout_generator)
    return model.to(device)


def uplink_compressor(cfg: TrainConfig, stateful: bool):
    """The uplink compressor; ``stateful`` adds error feedback when configured (workers only:
    the server decodes with the stateless inner compressor, the payloads are the same)."""
    comp = get_compressor(cfg.compressor, bucket_size=cfg.bucket_size, bits=cfg.bits,
                          header_dtype=cfg.header_dtype, levels=cfg.qsgd_levels,
                          ratio=cfg.sparsity_ratio,
                          error_feedback=cfg.error_feedback and stateful)
    return wrap_uplink(cfg, comp, stateful)


def wrap_uplink(cfg: TrainConfig, comp, stateful: bool):
    """Shifts (``--shift-rate``: the worker's shift, or the server's copies of every worker's)
    and worker momentum (``--worker-momentum``, or 1-bit Adam's with
    ``--onebit-adam-warmup``; workers only) around the uplink compressor."""
    rate = parse_shift_rate(cfg.shift_rate)
    if rate is None or rate > 0:
        comp = ShiftedWorker(comp, rate) if stateful else ShiftedServer(comp, rate)
    if cfg.worker_momentum and stateful:
        comp = WorkerMomentum(comp, cfg.momentum)
    if getattr(cfg, "onebit_adam_warmup", 0) and stateful:
        comp = AdamMomentum(comp, cfg.momentum, cfg.onebit_adam_warmup)
    return comp


def downlink_compressor(cfg: TrainConfig):
    return get_compressor(cfg.downlink, bucket_size=cfg.downlink_bucket_size, bits=cfg.bits,
                          header_dtype=cfg.header_dtype, levels=cfg.qsgd_levels,
                          ratio=cfg.sparsity_ratio)


def num_params(model: nn.Module) -> int:
    """The length of the flat parameter vector (what the shards split)."""
    return sum(p.numel() for p in model.parameters())


def flat_params(model: nn.Module) -> torch.Tensor:
    """The parameters in ``model.parameters()`` order as one new flat tensor."""
    return parameters_to_vector(p.detach() for p in model.parameters())


class ParamViews:
    """A model's parameters and matching views of one flat vector ``flat`` (same device and
    dtype, ``model.parameters()`` order), built once: :meth:`load` copies ``flat`` into the
    parameters, :meth:`store` the parameters into ``flat``. The parameters must stay the same
    tensors (``load_state_dict`` copies into them, so it keeps them) and ``flat`` the same buffer
    (update it in place).

    With ``alias=True`` the parameters become those views (their values are first copied into
    ``flat``): the model then reads and updates ``flat`` itself, and ``load``/``store`` have
    nothing left to copy. Every in-place update of a parameter (optimizer steps,
    ``load_state_dict``) is then an update of ``flat``, and the reverse."""

    def __init__(self, model: nn.Module, flat: torch.Tensor, alias: bool = False):
        self.params = list(model.parameters())
        self.flat = flat
        self.views = []
        offset = 0
        for p in self.params:
            self.views.append(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        if offset != flat.numel():
            raise ValueError(f"the flat vector holds {flat.numel()} values, the model "
                             f"{offset} parameters")
        self.aliased = False
        if alias:
            self.store()
            with torch.no_grad():
                for p, v in zip(self.params, self.views, strict=True):
                    p.data = v
            self.aliased = True

    @torch.no_grad()
    def load(self) -> None:
        if self.aliased:
            return
        for p, v in zip(self.params, self.views, strict=True):
            p.copy_(v)

    @torch.no_grad()
    def store(self) -> torch.Tensor:
        if not self.aliased:
            for p, v in zip(self.params, self.views, strict=True):
                v.copy_(p)
        return self.flat


def flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1)
                      for p in model.parameters()])


def set_flat_grads(model: nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    for p in model.parameters():
        p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype).clone()
        offset += p.numel()


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def averaged_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The buffers averaged over the workers at evaluation, in order: those the task named
    (``AVERAGED``), else every BatchNorm's running mean and variance."""
    names = getattr(model, AVERAGED, None)
    if names is None:
        return [t for m in bn_layers(model) for t in (m.running_mean, m.running_var)]
    return [model.get_buffer(name) for name in names]


def bn_stats(model: nn.Module) -> torch.Tensor:
    """The averaged buffers (:func:`averaged_buffers`: BatchNorm's running means and
    variances, and a task's other changing buffers), concatenated (float32)."""
    parts = [t.reshape(-1).float() for t in averaged_buffers(model)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float32,
                                                      device=next(model.parameters()).device)


@torch.no_grad()
def load_bn_stats(model: nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    for t in averaged_buffers(model):
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
