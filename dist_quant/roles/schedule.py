"""When a step evaluates and when it checkpoints: both sides of a link compute it alike."""

from __future__ import annotations

from dist_quant.config import TrainConfig


def is_eval_step(cfg: TrainConfig, step: int) -> bool:
    """Every ``eval_every`` steps and at the last step."""
    return step % cfg.eval_every == 0 or step == cfg.steps


def is_checkpoint_step(cfg: TrainConfig, step: int, last: bool) -> bool:
    """Every ``checkpoint_every`` steps (if > 0) and at the step the run ends."""
    return last or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0)
