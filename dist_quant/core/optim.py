"""SGD with L2 regularisation whose momentum acts on the stochastic gradient only (MATH 5).

Loss ``L(theta) + (lambda/2) ||theta||^2``. The server knows ``g_r = lambda theta`` exactly, so
only the stochastic gradient ``g`` of ``L`` is quantised, sent and averaged into momentum:

    (5a) decoupled:  m <- mu m + g;           theta <- theta - eta (m + lambda theta)
    (5b) coupled:    v <- mu' v + g + lambda' theta;   theta <- theta - eta' v   (torch SGD)

The exponentially weighted buffer ``m <- mu m + (1 - mu) g`` is ``(1 - mu)`` times the one above,
i.e. (5a) with ``eta' = eta (1 - mu)`` and ``lambda' = lambda / (1 - mu)``.

(5c) Both are second-order recurrences in theta; with constant hyperparameters

    decoupled: theta_{t+1} = (1 + mu - eta lambda) theta_t - mu (1 - eta lambda) theta_{t-1}
                             - eta g_t
    coupled:   theta_{t+1} = (1 + mu' - eta' lambda') theta_t - mu' theta_{t-1} - eta' g_t

coincide for ``eta' = eta``, ``mu' = mu (1 - eta lambda)``, ``lambda' = lambda (1 - mu)``
(``coupled_equivalent``). The first step matches only if the coupled buffer starts at
``v_init = lambda theta_0 / (1 - eta lambda)``; from a zero buffer the gap
``e_t = theta_t - theta'_t`` obeys the homogeneous recurrence, whose roots are ``mu`` and
``1 - eta lambda``: ``e_t = e_1 ((1 - eta lambda)^t - mu^t) / (1 - eta lambda - mu)`` with
``e_1 = -eta lambda mu theta_0`` (for identical gradients).

(5d) Under a learning-rate schedule the coupled rule needs ``mu'_t = mu (1 - eta_{t-1} lambda)``,
changing with the schedule: no fixed coupled setting reproduces the decoupled rule. So the
schedule (:mod:`dist_quant.core.lr_schedule`) belongs to ``DecoupledMomentumSGD``, which applies it
itself: ``eta_t = eta f(t)`` in the rule above, nothing else changes.

AdamW (Loshchilov & Hutter 2019, "Decoupled weight decay regularization"; :class:`AdamW`).
With ``g_t`` the (averaged) stochastic gradient of ``L`` only, ``beta1, beta2 in [0, 1)``:

    (A1) m_t = beta1 m_{t-1} + (1 - beta1) g_t,        v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
    (A2) theta_t = theta_{t-1} (1 - eta_t lambda)
                   - eta_t (m_t / (1 - beta1^t)) / (sqrt(v_t / (1 - beta2^t)) + eps)

with ``m_0 = v_0 = 0`` (the divisions undo that start's bias). The decay multiplies theta
before the Adam step and never enters ``m`` or ``v`` (decoupled: with L2 in the gradient, a
coordinate with a large ``v`` would be decayed less). This is ``torch.optim.AdamW``'s
arithmetic, step for step.

1-bit Adam (Tang et al. 2021; ``freeze_after = K > 0``). Adam's ``v`` is not linear in the
gradient, so a compressed gradient's error enters it squared and error feedback cannot undo
it; after a warm-up ``v`` changes slowly. So: steps ``t <= K`` are (A1, A2); from ``t = K + 1``
on ``v`` stays ``v_K`` (and its correction ``1 - beta2^K``), and the gradient given to the
step is taken to be the momentum itself, ``m_t := u_t``: the mean of the workers' own
momenta ``m_i <- beta1 m_i + (1 - beta1) g_i`` (kept from step 1, so the mean of the ``m_i``
is (A1)'s ``m`` of the mean gradient), each compressed with error feedback
(:class:`dist_quant.compress.momentum.AdamMomentum`). (A2) is then linear in ``u``: the
momentum-SGD step with a fixed per-coordinate preconditioner ``1 / (sqrt(v_K-hat) + eps)``,
through which error feedback's delayed correction passes unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dist_quant.core.lr_schedule import LRSchedule
from dist_quant.errors import ConfigError


def _check(lr: float, momentum: float, weight_decay: float) -> None:
    if not lr > 0:
        raise ConfigError("--lr", f"learning rate must be > 0, got {lr}")
    if not 0.0 <= momentum < 1.0:
        raise ConfigError("--momentum", f"momentum must be in [0, 1), got {momentum}")
    if not weight_decay >= 0:
        raise ConfigError("--weight-decay", f"weight decay must be >= 0, got {weight_decay}")


class DecoupledMomentumSGD(torch.optim.Optimizer):
    """Momentum on the stochastic gradient only, L2 applied outside momentum (MATH 5a)::

        m     <- momentum * m + grad
        theta <- theta - lr * (m + weight_decay * theta)

    ``weight_decay`` may differ per parameter group (see ``decay_param_groups``). The buffer
    ``m`` (state ``"momentum_buffer"``) starts at zero, so the first step uses ``m = grad``.
    Works in any float dtype; ``state_dict``/``load_state_dict`` round-trip exactly.

    ``schedule`` (an :class:`~dist_quant.core.lr_schedule.LRSchedule`) sets each group's ``lr`` to
    ``base_lr * schedule.factor(t)`` before update ``t``; ``base_lr`` is the group's lr at
    construction and ``t`` counts this optimizer's steps (both kept in the param groups, so a
    checkpoint resumes the schedule where it was). After a step, ``group["lr"]`` is the lr that
    step used. :meth:`skip_step` counts a step that applies no update (a parameter-server step
    with no valid gradient), so ``t`` stays the step number.
    """

    def __init__(
        self, params: Iterable, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
        schedule: LRSchedule | None = None,
    ):
        _check(lr, momentum, weight_decay)
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        for group in self.param_groups:
            _check(group["lr"], group["momentum"], group["weight_decay"])
        self.schedule = None if schedule is None or schedule.is_constant else schedule
        if self.schedule is not None:
            for group in self.param_groups:
                group.setdefault("base_lr", group["lr"])
                group.setdefault("updates", 0)

    def _advance(self) -> None:
        if self.schedule is not None:
            for group in self.param_groups:
                group["updates"] += 1
                group["lr"] = group["base_lr"] * self.schedule.factor(group["updates"])

    def skip_step(self) -> None:
        """Count a step without an update: the schedule moves on, parameters and momentum stay."""
        self._advance()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._advance()
        for group in self.param_groups:
            lr, mu, lam = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("DecoupledMomentumSGD does not support sparse gradients")
                m = p.grad
                if mu != 0.0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = p.grad.detach().clone()
                    else:
                        state["momentum_buffer"].mul_(mu).add_(p.grad)
                    m = state["momentum_buffer"]
                # theta - lr (m + lam theta), with lam theta taken before the update
                if lam != 0.0:
                    p.mul_(1.0 - lr * lam)
                p.add_(m, alpha=-lr)
        return loss


class AdamW(torch.optim.Optimizer):
    """(A1, A2) of the module docstring; with ``freeze_after = K > 0`` the 1-bit Adam recipe
    (steps after the K-th take the incoming "gradient" as the momentum, ``v`` frozen).

    State per parameter: ``exp_avg`` (m), ``exp_avg_sq`` (v), ``step`` (updates of m: the
    ``t`` of ``1 - beta1^t``) and ``variance_step`` (updates of v: the ``t`` of
    ``1 - beta2^t``; it stops at K). Each group keeps ``updates``: the optimizer's steps,
    :meth:`skip_step` included (a parameter-server step with no valid gradient), which the
    schedule and the freeze read, and ``base_lr``. ``schedule`` as in
    :class:`DecoupledMomentumSGD`. ``state_dict``/``load_state_dict`` round-trip exactly.
    """

    def __init__(
        self, params: Iterable, lr: float, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8, weight_decay: float = 0.0, schedule: LRSchedule | None = None,
        freeze_after: int = 0,
    ):
        _check(lr, betas[0], weight_decay)
        if not 0.0 <= betas[1] < 1.0:
            raise ConfigError("--beta2", f"must be in [0, 1), got {betas[1]}")
        if not eps > 0:
            raise ConfigError("--adam-eps", f"must be > 0, got {eps}")
        if freeze_after < 0:
            raise ConfigError("--onebit-adam-warmup", f"must be >= 0, got {freeze_after}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps,
                                  "weight_decay": weight_decay})
        self.schedule = None if schedule is None or schedule.is_constant else schedule
        self.freeze_after = int(freeze_after)
        for group in self.param_groups:
            group.setdefault("base_lr", group["lr"])
            group.setdefault("updates", 0)

    def _advance(self) -> None:
        for group in self.param_groups:
            group["updates"] += 1
            if self.schedule is not None:
                group["lr"] = group["base_lr"] * self.schedule.factor(group["updates"])

    def skip_step(self) -> None:
        """Count a step without an update: the schedule and the freeze move on, parameters
        and moments stay."""
        self._advance()

    def frozen(self, group: dict) -> bool:
        """Whether the group's current step runs with ``v`` frozen (1-bit Adam, after K)."""
        return 0 < self.freeze_after < group["updates"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._advance()
        for group in self.param_groups:
            lr, lam, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            frozen = self.frozen(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["variance_step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                if lam != 0.0:
                    p.mul_(1.0 - lr * lam)
                if frozen:   # the workers' momentum, v as it was at step K
                    m.copy_(p.grad)
                else:
                    m.lerp_(p.grad, 1.0 - beta1)
                    v.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                    state["variance_step"] += 1
                bias1 = 1.0 - beta1 ** state["step"]
                bias2 = 1.0 - beta2 ** state["variance_step"]
                denom = (v.sqrt() / bias2 ** 0.5).add_(eps)
                p.addcdiv_(m, denom, value=-lr / bias1)
        return loss


def make_optimizer(cfg: Any, groups: list[dict], schedule: LRSchedule | None = None,
                   momentum: float | None = None) -> torch.optim.Optimizer:
    """The optimizer of ``cfg.optimizer`` (a TrainConfig or anything with its fields) over
    ``groups`` (:func:`decay_param_groups`): :class:`DecoupledMomentumSGD` with
    ``momentum`` (default ``cfg.momentum``) or :class:`AdamW` with ``beta1 = cfg.momentum``,
    ``cfg.beta2``, ``cfg.adam_eps`` and ``freeze_after = cfg.onebit_adam_warmup``."""
    if getattr(cfg, "optimizer", "sgd") == "adamw":
        return AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, cfg.beta2), eps=cfg.adam_eps,
                     schedule=schedule, freeze_after=cfg.onebit_adam_warmup)
    return DecoupledMomentumSGD(groups, lr=cfg.lr,
                                momentum=cfg.momentum if momentum is None else momentum,
                                schedule=schedule)


def decay_param_groups(
    model: nn.Module, weight_decay: float, decay_all: bool = False,
) -> list[dict]:
    """Parameter groups with ``weight_decay`` on weights and 0 on biases and BatchNorm
    parameters (their scale and shift), unless ``decay_all``. Empty groups are left out.
    Each group carries a ``"name"`` ("decay" or "no_decay")."""
    if not weight_decay >= 0:
        raise ConfigError("--weight-decay", f"weight decay must be >= 0, got {weight_decay}")
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        is_norm = isinstance(module, nn.modules.batchnorm._NormBase)
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            exempt = not decay_all and (is_norm or name == "bias")
            (no_decay if exempt else decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


@dataclass(frozen=True)
class CoupledSettings:
    """Settings of torch's coupled ``SGD`` equivalent to the decoupled rule (MATH 5c).

    ``lr``, ``momentum``, ``weight_decay`` go to ``torch.optim.SGD``; ``decoupled_weight_decay``
    is the ``lambda`` of the decoupled rule they came from, needed for the buffer start.
    """

    lr: float
    momentum: float
    weight_decay: float
    decoupled_weight_decay: float

    def initial_buffer(self, theta0: torch.Tensor) -> torch.Tensor:
        """``v_init = lambda theta_0 / (1 - lr lambda)``: with it even the first step agrees."""
        lam = self.decoupled_weight_decay
        return theta0.detach() * (lam / (1.0 - self.lr * lam))

    def sgd_options(self) -> dict:
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay}


def coupled_equivalent(lr: float, momentum: float, weight_decay: float) -> CoupledSettings:
    """``lr' = lr``, ``momentum' = momentum (1 - lr wd)``, ``wd' = wd (1 - momentum)``."""
    _check(lr, momentum, weight_decay)
    if not lr * weight_decay < 1.0:
        raise ConfigError("--weight-decay", f"lr * weight_decay must be < 1 for the coupled "
                          f"equivalent, got {lr} * {weight_decay} = {lr * weight_decay}")
    return CoupledSettings(
        lr=lr,
        momentum=momentum * (1.0 - lr * weight_decay),
        weight_decay=weight_decay * (1.0 - momentum),
        decoupled_weight_decay=weight_decay,
    )


@torch.no_grad()
def seed_momentum_buffers(sgd: torch.optim.SGD, settings: list[CoupledSettings]) -> None:
    """Set the momentum buffer of every parameter of ``sgd`` (one ``settings`` per param group)
    to ``initial_buffer(theta)`` at its current value. torch's SGD then applies
    ``v <- mu' v + g + lambda' theta`` already on its first step."""
    if len(settings) != len(sgd.param_groups):
        raise ValueError(f"need one CoupledSettings per param group: {len(settings)} given, "
                         f"{len(sgd.param_groups)} groups")
    for group, s in zip(sgd.param_groups, settings, strict=True):
        for p in group["params"]:
            sgd.state[p]["momentum_buffer"] = s.initial_buffer(p).clone()


def coupled_sgd(
    params: Iterable, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
    seed_buffers: bool = True,
) -> torch.optim.SGD:
    """A ``torch.optim.SGD`` that reproduces ``DecoupledMomentumSGD(params, lr, momentum,
    weight_decay)``: each param group (with its own ``weight_decay``) gets its coupled settings,
    and with ``seed_buffers`` the buffers start at ``v_init`` of the parameters' current values."""
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    settings = [coupled_equivalent(g.get("lr", lr), g.get("momentum", momentum),
                                   g.get("weight_decay", weight_decay)) for g in groups]
    sgd_groups = [{**{k: v for k, v in g.items() if k not in ("lr", "momentum",
                                                            "weight_decay")},
                   **s.sgd_options()} for g, s in zip(groups, settings, strict=True)]
    sgd = torch.optim.SGD(sgd_groups, lr=lr)
    if seed_buffers:
        seed_momentum_buffers(sgd, settings)
    return sgd
