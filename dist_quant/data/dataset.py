"""The in-memory dataset every role trains on, and how it is split among workers.

``load_dataset(cfg)`` reads ``cfg.dataset``:

- ``mnist1d``: generated (:mod:`dist_quant.data.mnist1d`), ``cfg.train_size``/``cfg.test_size``;
- ``teacher``: generated (:mod:`dist_quant.data.teacher`), same sizes;
- ``mnist``: the four IDX files in ``cfg.data_dir`` (:mod:`dist_quant.data.idx`), all examples;
- ``*.npz``: ``x``, ``y``, ``x_test``, ``y_test`` (:mod:`dist_quant.data.npz`), all examples.

The data do not depend on the training seed ``cfg.seed``: generated sets use the fixed data
seed 42 (the MNIST-1D paper's), so runs with different training seeds see the same examples
and their results compare. The training examples are put in one fixed random order (same
seed), so that shards of files sorted by label are still i.i.d.

Inputs are flattened to ``[N, D]`` float32 and standardised with training statistics only:
``(x - mean_j) / max(std_j, 0.01 * mean(std))`` per feature ``j``. The floor makes constant
features (MNIST's border pixels) exactly 0 and keeps nearly constant ones from being blown up.

Sharding: worker ``r`` of ``W`` (0-based) gets the training examples ``r, r + W, r + 2W, ...``
of that order: disjoint, covering all of them, sizes differing by at most one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dist_quant.data.idx import load_mnist
from dist_quant.data.mnist1d import make_mnist1d
from dist_quant.data.npz import load_npz
from dist_quant.data.teacher import NUM_CLASSES, make_teacher
from dist_quant.errors import ConfigError

DATA_SEED = 42


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: torch.Tensor   # float32 [N, D]
    y_train: torch.Tensor   # int64 [N]
    x_test: torch.Tensor    # float32 [M, D]
    y_test: torch.Tensor    # int64 [M]
    num_classes: int
    # what identifies data read from elsewhere (the text task's hash and sizes), recorded in
    # config.json under "data" and checked on --resume; None for generated data
    info: dict[str, Any] | None = None

    @property
    def in_features(self) -> int:
        return int(self.x_train.shape[1])

    def shard(self, rank_index: int, num_workers: int) -> Dataset:
        """Worker ``rank_index`` (0-based) of ``num_workers``: every ``num_workers``-th example.

        The test split is shared, not sharded.
        """
        if num_workers < 1:
            raise ConfigError("--workers", f"must be >= 1; got {num_workers}")
        if not 0 <= rank_index < num_workers:
            raise ValueError(f"worker index {rank_index} is outside 0..{num_workers - 1}")
        if len(self.y_train) < num_workers:
            raise ConfigError("--workers", f"{num_workers} workers but only {len(self.y_train)} "
                              "training examples")
        idx = torch.arange(rank_index, len(self.y_train), num_workers)
        return Dataset(f"{self.name}[{rank_index}/{num_workers}]", self.x_train[idx],
                       self.y_train[idx], self.x_test, self.y_test, self.num_classes)


def check_batch_fits(n_train: int, workers: int, batch_size: int) -> None:
    """ConfigError(--batch-size) unless every worker's shard holds ``batch_size`` examples.

    The smallest shard of ``n_train`` examples over ``workers`` holds ``n_train // workers``;
    the message gives that figure, the largest batch size that fits.
    """
    smallest = n_train // workers
    if batch_size > smallest:
        hint = (f"use --batch-size {smallest} or less" if smallest >= 1
                else "use fewer --workers")
        raise ConfigError("--batch-size", f"{batch_size} exceeds the {smallest} examples of the "
                          f"smallest worker shard ({n_train} training examples over {workers} "
                          f"workers); {hint}")


def standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.maximum(std, 0.01 * std.mean() if std.mean() > 0 else 1.0)
    return (x_train - mean) / std, (x_test - mean) / std


def from_arrays(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                y_test: np.ndarray, num_classes: int | None = None,
                shuffle_seed: int | None = DATA_SEED) -> Dataset:
    """Flatten, standardise, optionally put the training set in a fixed random order."""
    x_train = np.asarray(x_train, dtype=np.float64).reshape(len(x_train), -1)
    x_test = np.asarray(x_test, dtype=np.float64).reshape(len(x_test), -1)
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(x_train))
        x_train, y_train = x_train[order], np.asarray(y_train)[order]
    x_train, x_test = standardise(x_train, x_test)
    if num_classes is None:
        num_classes = int(max(np.max(y_train), np.max(y_test))) + 1
    return Dataset(name, torch.from_numpy(x_train.astype(np.float32)),
                   torch.from_numpy(np.asarray(y_train, dtype=np.int64)),
                   torch.from_numpy(x_test.astype(np.float32)),
                   torch.from_numpy(np.asarray(y_test, dtype=np.int64)), num_classes)


def load_dataset(cfg: Any) -> Dataset:
    """The dataset named by ``cfg.dataset`` (see the module docstring)."""
    name = cfg.dataset
    if name == "mnist1d":

        return from_arrays(name, *make_mnist1d(cfg.train_size, cfg.test_size, DATA_SEED),
                           num_classes=10, shuffle_seed=None)
    if name == "teacher":

        return from_arrays(name, *make_teacher(cfg.train_size, cfg.test_size, DATA_SEED),
                           num_classes=NUM_CLASSES, shuffle_seed=None)
    if name == "mnist":

        if not cfg.data_dir:
            raise ConfigError("--data-dir", "--dataset mnist needs the directory of the IDX files")
        return from_arrays(name, *load_mnist(cfg.data_dir), num_classes=10,
                           shuffle_seed=DATA_SEED)
    if name.endswith(".npz"):

        return from_arrays(name, *load_npz(name), shuffle_seed=DATA_SEED)
    raise ConfigError("--dataset", f"must be mnist1d, teacher, mnist or a path to an .npz; "
                      f"got {name!r}")
