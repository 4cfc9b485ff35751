"""Learning-rate schedules: the factor that multiplies each parameter group's base lr at update t.

``t = 1, 2, ..., T`` counts the steps (``T = --steps``), ``w = --warmup-steps``::

    warmup       t <= w:  f(t) = t / w                                  (linear, f(w) = 1)
    constant     t >  w:  f(t) = 1
    step         t >  w:  f(t) = gamma ** floor((t - w - 1) / step_size)
    cosine       t >  w:  f(t) = (1 + cos(pi (t - w - 1) / (T - w))) / 2

so the first update after the warmup uses the full lr, the step schedule multiplies it by
``gamma`` every ``step_size`` updates, and the cosine reaches ``(1 + cos(pi (T - w - 1) /
(T - w))) / 2``, just above 0, at the last update.

:class:`~dist_quant.core.optim.DecoupledMomentumSGD` takes a schedule and applies it itself (``lr_t
=
base_lr f(t)``), so the parameter server and the DDP baseline, which both build that optimizer,
follow the same one; ``metrics.jsonl`` records ``lr`` (the base lr times ``f(t)``) on every step
line. ``t`` is the step number: a parameter-server step that leaves out every payload of a shard
(``--on-nonfinite skip`` with no valid payload) applies no update there but still moves that
shard's schedule on (``DecoupledMomentumSGD.skip_step``), so every shard stays on the step. Use the
decoupled optimizer under a schedule: torch's coupled SGD reproduces it only with a momentum that
changes with the learning rate (MATH 5d).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dist_quant.errors import ConfigError

KINDS = ("constant", "step", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    """A schedule over ``total_steps`` updates; ``factor(t)`` for ``t >= 1`` (see the module
    docstring). The default is the constant schedule without warmup: ``factor(t) = 1``."""

    kind: str = "constant"
    total_steps: int = 1
    warmup_steps: int = 0
    step_size: int = 1
    gamma: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError("--lr-schedule", f"must be one of {', '.join(KINDS)}; got "
                              f"{self.kind!r}")
        if self.total_steps < 1:
            raise ConfigError("--steps", f"must be >= 1; got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ConfigError("--warmup-steps", f"must be in 0..{self.total_steps}; got "
                              f"{self.warmup_steps}")
        if self.step_size < 1:
            raise ConfigError("--lr-step-size", f"must be >= 1; got {self.step_size}")
        if not 0.0 < self.gamma <= 1.0:
            raise ConfigError("--lr-gamma", f"must be in (0, 1]; got {self.gamma}")

    def factor(self, t: int) -> float:
        """The multiplier of the base learning rate at update ``t`` (1-based)."""
        if t < 1:
            raise ValueError(f"updates count from 1; got {t}")
        w = self.warmup_steps
        if t <= w:
            return t / w
        if self.kind == "step":
            return self.gamma ** ((t - w - 1) // self.step_size)
        if self.kind == "cosine":
            span = max(self.total_steps - w, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(t - w - 1, span) / span))
        return 1.0

    @property
    def is_constant(self) -> bool:
        return self.kind == "constant" and self.warmup_steps == 0


def schedule_from_config(cfg: Any) -> LRSchedule:
    """The schedule of a :class:`~dist_quant.config.TrainConfig` (or its dict)."""
    get = (cfg if isinstance(cfg, dict) else cfg.to_dict()).get  # old runs lack the fields
    return LRSchedule(kind=get("lr_schedule", "constant"), total_steps=int(get("steps", 1)),
                      warmup_steps=int(get("warmup_steps", 0)),
                      step_size=int(get("lr_step_size", 1)), gamma=float(get("lr_gamma", 1.0)))


def lr_at(cfg: Any, t: int) -> float:
    """The learning rate of update ``t`` under ``cfg``: ``lr * factor(t)``."""
    lr = cfg["lr"] if isinstance(cfg, dict) else cfg.lr
    return lr * schedule_from_config(cfg).factor(t)
