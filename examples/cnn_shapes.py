"""A small CNN on generated images, trained with the 1-bit uplink through ``dist_quant.fit``.

    torchrun --standalone --nproc-per-node 5 examples/cnn_shapes.py    # 4 workers + 1 server
    python examples/cnn_shapes.py --simulate                           # one process, same result
    python examples/cnn_shapes.py --simulate --compressor none         # the fp32 reference
"""

import argparse

import numpy as np
import torch
from torch import nn

import dist_quant

SIZE, CLASSES = 16, 4


def make_bars(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy SIZE x SIZE images of one short bar anywhere in the frame; the label is its
    orientation (0, 45, 90 or 135 degrees, each jittered by up to 9 degrees)."""
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


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.1), nn.Linear(32 * 4 * 4, CLASSES))


def main(argv: list[str] | None = None, **options) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--compressor", default="onebit")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--simulate", action="store_true")
    parser.add_argument("--run-dir", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one thread per rank (torchrun sets OMP_NUM_THREADS=1 too)
    summary = dist_quant.fit(
        cnn, make_bars(4000, seed=1), make_bars(2000, seed=2),
        workers=args.workers, compressor=args.compressor, bucket_size=128, steps=args.steps,
        batch_size=64, lr=0.05, lr_schedule="cosine", eval_every=100, seed=args.seed,
        simulate=args.simulate, run_dir=args.run_dir, **options)
    if summary is not None:  # the leading rank (fit has printed the summary line)
        print(f"run directory {summary['run_dir']}")
    return summary


if __name__ == "__main__":
    main()
