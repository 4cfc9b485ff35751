"""The server side's policies beyond one shard's arithmetic: bad payloads, and evaluation.

The arithmetic of a server's step is :class:`~dist_quant.ps.shard.ShardServer` (decode and
average, ``DecoupledMomentumSGD`` with the L2 term computed at the server (MATH 5a), the
downlink); the order of the step's pieces is :mod:`dist_quant.ps.sync_step`.

Bad payloads. A payload that is marked non-finite or fails validation is left out of its
shard (``--on-nonfinite skip``: the shard's ``g`` is the mean of the other rows; the first
``SKIP_LINES`` such steps are printed, all are counted) or ends the run (``abort``). A shard
left without any valid row keeps its parameters and momentum, and ``STUCK_STEPS`` such steps
in a row end the run: a diverged model gives non-finite gradients everywhere.

BatchNorm policy. Each worker normalises with its own minibatch statistics in training and
keeps its own running statistics (they never travel on the training path). At every
evaluation the workers send their running means and variances uncompressed (counted as uplink
bytes); the evaluating rank evaluates with their plain average (:func:`evaluate_model`). The
shards are i.i.d. and the replicas identical, so the average estimates the population
statistics; the variance average leaves out the spread of the workers' means, which is
negligible next to the variance at these shard sizes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dist_quant.ps import common
from dist_quant.ps.task import accuracy

EVAL_CHUNK = 4096
SKIP_LINES = 10    # steps whose left-out payloads are printed; later ones are only counted
STUCK_STEPS = 10   # consecutive steps without any valid payload end the run


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, x_test: torch.Tensor, y_test: torch.Tensor,
                   mean_stats: torch.Tensor | None, loss_fn: Callable = F.cross_entropy,
                   metric: Callable = accuracy) -> tuple[float, float]:
    """(test loss, test metric) of ``model`` in eval mode, after loading the workers'
    averaged BN statistics ``mean_stats`` (None: keep the ones it has). ``loss_fn`` and
    ``metric`` give batch means; chunks of ``EVAL_CHUNK`` rows are weighted by their size, so
    both are means over the whole test split (the metric is accuracy unless the task says)."""
    if mean_stats is not None:
        common.load_bn_stats(model, mean_stats)
    model.eval()
    loss_sum, metric_sum = 0.0, 0.0
    for i in range(0, len(y_test), EVAL_CHUNK):
        x, y = x_test[i:i + EVAL_CHUNK], y_test[i:i + EVAL_CHUNK]
        out = model(x)
        loss_sum += float(loss_fn(out, y)) * len(y)
        metric_sum += float(metric(out, y)) * len(y)
    n = len(y_test)
    return loss_sum / n, metric_sum / n
