"""Real inputs for the checks: generated MNIST-1D, the project's MLP and its gradients."""

from __future__ import annotations

import torch
from torch import nn

from dist_quant.config import TrainConfig
from dist_quant.core.model import build_mlp
from dist_quant.data import Dataset, load_dataset
from dist_quant.verify.report import Context

HIDDEN = (64, 64)


def dataset(ctx: Context) -> Dataset:
    """MNIST-1D (generated, 40 features, 10 classes), 2048 training examples."""
    cfg = TrainConfig(dataset="mnist1d", train_size=2048, test_size=256, seed=ctx.seed)
    return ctx.cached("mnist1d", lambda: load_dataset(cfg))


def flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def worker_gradients(ctx: Context, workers: int, batch_size: int = 64) -> list[torch.Tensor]:
    """The flattened float32 gradient of one MLP (with BN, train mode) on one minibatch of each
    of ``workers`` disjoint shards, as workers of a data-parallel step would compute it."""
    def make() -> list[torch.Tensor]:
        ds = dataset(ctx)
        model = build_mlp(ds.in_features, HIDDEN, ds.num_classes, generator=ctx.generator(1))
        grads = []
        for r in range(workers):
            shard = ds.shard(r, workers)
            model.zero_grad()
            nn.functional.cross_entropy(model(shard.x_train[:batch_size]),
                                        shard.y_train[:batch_size]).backward()
            grads.append(flat_grad(model).detach().clone())
        return grads
    return ctx.cached(f"grads{workers}x{batch_size}", make)


def float64_mlp(ctx: Context, stream: int, hidden=(32, 32)) -> nn.Sequential:
    """A float64 MLP without BN or dropout, so that gradients are deterministic."""
    ds = dataset(ctx)
    return build_mlp(ds.in_features, hidden, ds.num_classes, batchnorm=False,
                     generator=ctx.generator(stream)).double()


def minibatch(ctx: Context, step: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Minibatch ``step`` of a fixed sweep through the training set (float64 inputs)."""
    ds = dataset(ctx)
    n = len(ds.y_train)
    i = (step * size) % (n - size)
    return ds.x_train[i:i + size].double(), ds.y_train[i:i + size]


def set_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
