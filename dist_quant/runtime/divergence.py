"""Detecting a diverged run, so that it ends with exit 1 and a hint instead of a summary.

The server feeds :class:`DivergenceMonitor` the mean training loss of every step (known as soon
as the uplink has arrived, before the parameters go down). With ``L0`` the first finite loss
of this process's run (before any update: about ``ln K`` for ``K`` classes for a fresh model;
a later mean could already hold the explosion), the run has diverged when

- the loss is not finite, or above ``FACTOR * L0``, at ``PATIENCE`` consecutive steps; or
- at the end, the test accuracy is at chance (at most ``1.5 / K``) while the test loss is
  above ``FACTOR * L0``.

A healthy run's loss stays below its start; a brief spike (a bad batch, a noisy quantised
step) lasts a step or two, far from ``PATIENCE``. The message names what to lower: the
learning rate always, the bucket size where whole-tensor or large buckets make the 1-bit
noise large (MATH: its variance grows with the range of each bucket), and error feedback
around a non-contractive compressor.
"""

from __future__ import annotations

import math

from dist_quant.compress import get_compressor
from dist_quant.config import TrainConfig

FACTOR = 10.0
PATIENCE = 20
LARGE_BUCKET = 1024


def uplink(cfg: TrainConfig, bucket_size: int):
    return get_compressor(cfg.compressor, bucket_size=bucket_size, bits=cfg.bits,
                          header_dtype=cfg.header_dtype, levels=cfg.qsgd_levels,
                          ratio=cfg.sparsity_ratio)


def smaller_buckets_help(cfg: TrainConfig, n: int = 1 << 16) -> bool:
    """Whether the uplink is unbiased and its variance bound omega(n) falls with the default
    bucket size: large or whole-tensor buckets of a min-max quantiser."""
    if cfg.bucket_size != 0 and cfg.bucket_size < LARGE_BUCKET:
        return False
    now, default = uplink(cfg, cfg.bucket_size), uplink(cfg, TrainConfig().bucket_size)
    if not now.unbiased or now.omega(n) is None or default.omega(n) is None:
        return False
    return default.omega(n) < now.omega(n)


def advice(cfg: TrainConfig) -> str:
    hints = [f"lower --lr (now {cfg.lr:g})"]
    if smaller_buckets_help(cfg):
        now = "0 = the whole gradient" if cfg.bucket_size == 0 else str(cfg.bucket_size)
        hints.append(f"lower --bucket-size (now {now}; {TrainConfig().bucket_size} is the "
                     "default)")
    if cfg.error_feedback and not uplink(cfg, cfg.bucket_size).contractive:
        hints.append("drop --error-feedback (it needs a contractive compressor such as sign)")
    return ", or ".join(hints)


class DivergenceMonitor:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.reference: float | None = None
        self.bad = 0

    def observe(self, step: int, loss: float) -> str | None:
        """The divergence message once the loss has been too high for PATIENCE steps."""
        if self.reference is None and math.isfinite(loss):
            self.reference = loss
            return None
        ref = self.reference
        too_high = not math.isfinite(loss) or (ref is not None and loss > FACTOR * ref)
        self.bad = self.bad + 1 if too_high else 0
        if self.bad < PATIENCE:
            return None
        start = f"{ref:.3g}" if ref is not None else "unknown"
        return (f"training diverged: the training loss was not finite or above {FACTOR:g}x its "
                f"start ({start}) for {PATIENCE} steps in a row (step {step}: {loss:.3g}); "
                f"{advice(self.cfg)}")

    def final(self, test_loss: float, test_accuracy: float, num_classes: int) -> str | None:
        """The divergence message when the run ends at chance with an exploded loss."""
        ref = self.reference
        exploded = not math.isfinite(test_loss) or (ref is not None and test_loss > FACTOR * ref)
        if not (exploded and test_accuracy <= 1.5 / max(num_classes, 1)):
            return None
        return (f"training diverged: test accuracy {100 * test_accuracy:.1f}% is at chance "
                f"({100 / max(num_classes, 1):.0f}%) and the test loss is {test_loss:.3g}; "
                f"{advice(self.cfg)}")
