"""Generated images for the ``shapes-cnn`` task: one short bar per image, labelled by its
orientation.

``make_bars(n, seed)`` draws ``n`` images of ``SIZE x SIZE`` pixels (float32 ``[n, 1, S, S]``)
and their labels (int64 ``[n]``, 0..3). Label ``k`` is a bar at angle ``pi (k / 4 + u)`` with
``u ~ U(-0.05, 0.05)`` (0, 45, 90 or 135 degrees, each jittered by up to 9 degrees), of half
length ``U(2.5, 4.5)`` pixels, centred at ``U(4, S - 4)`` in both coordinates. A pixel at
distance ``d`` from the bar (the segment) has intensity ``exp(-d^2)``, plus i.i.d.
``N(0, 0.5^2)`` noise. All draws come from ``numpy.random.default_rng(seed)``, so a seed fixes
the set.

``load_shapes(train_size, test_size)``: the training images from seed 1, the test images from
seed 2 (fixed: the data do not depend on the run's seed), used as drawn (no standardisation:
the noise already makes them zero-mean up to the bar).
"""

from __future__ import annotations

import numpy as np
import torch

from dist_quant.data.dataset import Dataset

SIZE, CLASSES = 16, 4
TRAIN_SEED, TEST_SEED = 1, 2


def make_bars(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy images and their orientation labels (module docstring)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    angle = np.pi * (y / CLASSES + rng.uniform(-0.05, 0.05, n))
    direction = np.stack([np.sin(angle), np.cos(angle)], -1)[:, None, None]   # (row, col)
    half = rng.uniform(2.5, 4.5, n)[:, None, None]                          # half length
    centre = rng.uniform(4, SIZE - 4, (n, 2))[:, None, None]
    grid = np.stack(np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij"), -1)
    rel = grid[None] - centre                                               # [n, S, S, 2]
    t = np.clip((rel * direction).sum(-1), -half, half)                     # along the bar
    dist2 = ((rel - t[..., None] * direction) ** 2).sum(-1)                 # to the bar
    x = np.exp(-dist2) + rng.normal(0.0, 0.5, (n, SIZE, SIZE))
    return torch.tensor(x[:, None], dtype=torch.float32), torch.tensor(y)


def load_shapes(train_size: int, test_size: int) -> Dataset:
    """The ``shapes-cnn`` task's data (module docstring)."""
    x, y = make_bars(train_size, TRAIN_SEED)
    x_test, y_test = make_bars(test_size, TEST_SEED)
    return Dataset("shapes", x, y, x_test, y_test, CLASSES)
