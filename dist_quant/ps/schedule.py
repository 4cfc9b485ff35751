"""When a step evaluates and when it checkpoints: both sides of a link compute it alike."""

from __future__ import annotations

from dist_quant.config import TrainConfig


def is_eval_step(cfg: TrainConfig, step: int) -> bool:
    """Every ``eval_every`` steps and at the last step."""
    return step % cfg.eval_every == 0 or step == cfg.steps


def is_checkpoint_step(cfg: TrainConfig, step: int, last: bool) -> bool:
    """Every ``checkpoint_every`` steps (if > 0) and at the step the run ends."""
    return last or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0)


def eval_pieces(n: int, lag: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` of the ``max(lag, 1)`` contiguous, near-equal pieces in which a shard of
    ``n`` coordinates travels to the evaluating rank (piece ``j`` of an evaluation at step
    ``s`` at the start of step ``s + 1 + j``); a piece is empty when ``n < lag`` (nothing is
    sent for it)."""
    k = max(lag, 1)
    cuts = [n * j // k for j in range(k + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def pieces_upto(lag: int, eval_step: int, step: int, settle: bool) -> int:
    """How many pieces of the evaluation of ``eval_step`` have been sent once ``step`` has sent
    its own: one more at the start of each step after ``eval_step``, or all of them when
    ``step`` settles (after its control: the run ends or a checkpoint is taken there)."""
    k = max(lag, 1)
    return k if settle else min(k, step - eval_step)


def wants_stats(cfg: TrainConfig, lockstep: bool, completed: int) -> bool:
    """Whether a worker released after ``completed`` steps of an asynchronous run sends its
    BatchNorm statistics with its next gradient: when that gradient counts towards an
    evaluation step (lockstep), or may (else: the next two steps), so that an evaluation finds
    recent statistics of every worker that has sent since."""
    t = completed + 1
    return is_eval_step(cfg, t) or (not lockstep and is_eval_step(cfg, t + 1))
