"""A model without BatchNorm trained through ``dist_quant.fit``, with a custom loss and metric.

Not a test module: ``tests/test_api.py`` imports it for the single-process reference and runs
it under torchrun (``fit_job.py RUN_DIR STEPS [OPTION=JSON ...]``) for the distributed run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from cnn_shapes import make_bars  # noqa: E402

import dist_quant  # noqa: E402

OPTIONS = dict(workers=2, colocate=True, compressor="onebit", bucket_size=32, batch_size=16,
               lr=0.05, eval_every=3, checkpoint_every=3, progress=False, timeout=60.0)


def plain() -> nn.Module:
    """No BatchNorm, no buffers; dropout from the global generator."""
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 12), nn.Tanh(), nn.Dropout(0.25),
                         nn.Linear(12, 4))


def smoothed(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target, label_smoothing=0.1)


def top2(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output.topk(2, dim=1).indices == target[:, None]).any(1).float().mean()


def data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    return make_bars(160, seed=1), make_bars(50, seed=2)


def run(run_dir: str, steps: int, loss_fn=smoothed, metric=top2, **extra) -> dict | None:
    train, test = data()
    return dist_quant.fit(plain, train, test, loss_fn=loss_fn, metric=metric,
                          **{**OPTIONS, "run_dir": run_dir, "steps": steps, **extra})


if __name__ == "__main__":
    torch.set_num_threads(1)
    extra = {k: json.loads(v) for k, v in (a.split("=", 1) for a in sys.argv[3:])}
    run(sys.argv[1], int(sys.argv[2]), **extra)
