"""The gradient statistics that decide how a task takes 1-bit compression, per ``--task``.

    python benchmarks/gradient_stats.py [--tasks mnist1d-mlp,shapes-cnn,text-transformer]
        [--after 0,100] [--seed 0] [--out DIR]

For each task (its own defaults, ``dist_quant.config.TASK_DEFAULTS``; W = 4 workers' batch of
``batch_size`` examples), the gradient of one worker's batch is taken at initialisation and
after ``--after`` steps of plain fp32 training in one process (the task's optimizer on the
batch of all four workers, as the synchronous fp32 run does), and described by:

- **layer scale spread**: the RMS of each parameter tensor's gradient, and max / min over the
  tensors (a 1-bit bucket that straddles two tensors spends its two levels on the larger);
- **kurtosis** of the whole gradient, ``E[(g - mean)^4] / var^2`` (3 for a Gaussian; heavy
  tails raise it);
- **one coordinate's share of a bucket's range**: in buckets of ``d`` consecutive coordinates
  (the compressors' order: the parameters flattened in model order), ``(range - range without
  its most extreme coordinate) / range``, median and 90th percentile over the buckets: the part
  of the two levels that one coordinate takes;
- **buckets across tensors**: the share of buckets of ``d`` whose coordinates come from more
  than one parameter tensor (where the layer scale spread enters a bucket);
- **the 1-bit rule's relative variance** ``omega_d = sum_i (g_i - min_B)(max_B - g_i) /
  ||g||^2`` (MATH.md 4c, the minimum-variance (a, b) per bucket B of ``d``) for d = 32 and 128:
  the variance the rule adds to the gradient, relative to its squared norm; averaging W
  workers' independent draws divides it by W.

Prints a markdown table and writes ``gradient_stats.json`` / ``.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from dist_quant.config import TrainConfig
from dist_quant.core.optim import decay_param_groups, make_optimizer
from dist_quant.ps.task import Task

WORKERS = 4
BUCKETS = (32, 128)


def flat_grad(model: torch.nn.Module) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    named = [(n, p.grad.detach().reshape(-1).double()) for n, p in model.named_parameters()
             if p.grad is not None]
    return torch.cat([g for _, g in named]), named


def bucket_stats(g: torch.Tensor, d: int) -> dict[str, float]:
    n = g.numel() // d * d
    b = g[:n].reshape(-1, d)
    lo, hi = b.min(1).values, b.max(1).values
    rng = hi - lo
    ok = rng > 0
    srt = b.sort(1).values
    # the range without its most extreme coordinate: drop the min or the max, whichever
    # shrinks the range more
    without = torch.minimum(srt[:, -1] - srt[:, 1], srt[:, -2] - srt[:, 0])
    share = ((rng - without) / rng.clamp_min(1e-300))[ok]
    omega = ((b - lo[:, None]) * (hi[:, None] - b)).sum() / (g[:n] ** 2).sum()
    return {"share_median": float(share.median()), "share_p90": float(share.quantile(0.9)),
            "omega": float(omega)}


def describe(model: torch.nn.Module) -> dict[str, object]:
    g, named = flat_grad(model)
    rms = {n: float(t.pow(2).mean().sqrt()) for n, t in named if t.numel() > 1}
    positive = [v for v in rms.values() if v > 0]
    centred = g - g.mean()
    kurt = float(centred.pow(4).mean() / centred.pow(2).mean() ** 2)
    out: dict[str, object] = {"params": g.numel(), "layers": len(rms),
                              "scale_spread": max(positive) / min(positive), "kurtosis": kurt,
                              "largest_layer": max(rms, key=rms.get),
                              "smallest_layer": min(rms, key=rms.get)}
    owner = torch.cat([torch.full((t.numel(),), k) for k, (_, t) in enumerate(named)])
    for d in BUCKETS:
        out[f"bucket{d}"] = bucket_stats(g, d)
        n = owner.numel() // d * d
        tensors = owner[:n].reshape(-1, d)
        out[f"bucket{d}"]["across"] = float((tensors.min(1).values != tensors.max(1).values)
                                            .double().mean())
    return out


def task_stats(task_name: str, after: list[int], seed: int) -> list[dict[str, object]]:
    cfg = TrainConfig(task=task_name, workers=WORKERS, seed=seed).with_task_defaults()
    task = Task.from_config(cfg)
    gen = torch.Generator().manual_seed(seed)
    model = task.model(torch.device("cpu"), gen)
    opt = make_optimizer(cfg, decay_param_groups(model, cfg.weight_decay))
    data = task.data
    rows, done = [], 0
    for target in sorted(after):
        while done < target:
            idx = torch.randint(len(data.y_train), (WORKERS * cfg.batch_size,), generator=gen)
            model.train()
            opt.zero_grad(set_to_none=True)
            with task.randomness(gen):
                task.loss_fn(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
            done += 1
        idx = torch.randint(len(data.y_train), (cfg.batch_size,), generator=gen)
        model.train()
        opt.zero_grad(set_to_none=True)
        with task.randomness(gen):
            loss = task.loss_fn(model(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        rows.append({"task": task_name, "after_steps": target, "batch": cfg.batch_size,
                     "loss": float(loss.detach()), **describe(model)})
        opt.zero_grad(set_to_none=True)
    return rows


def table(rows: list[dict[str, object]]) -> str:
    out = ["| task | after steps | params | layer scale spread (max/min RMS) | kurtosis | "
           "one coordinate's share of a bucket's range, d = 128 (median, p90) | same, d = 32 | "
           "omega_128 | omega_32 | buckets across tensors, d = 128, 32 |", "|" + "---|" * 10]
    for r in rows:
        b128, b32 = r["bucket128"], r["bucket32"]
        out.append(f"| {r['task']} | {r['after_steps']} | {r['params']:,} | "
                   f"{r['scale_spread']:.3g} | {r['kurtosis']:.3g} | "
                   f"{b128['share_median']:.2f}, {b128['share_p90']:.2f} | "
                   f"{b32['share_median']:.2f}, {b32['share_p90']:.2f} | "
                   f"{b128['omega']:.3g} | {b32['omega']:.3g} | "
                   f"{100 * b128['across']:.0f}%, {100 * b32['across']:.0f}% |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="mnist1d-mlp,shapes-cnn,text-transformer")
    ap.add_argument("--after", default="0,100")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [r for t in args.tasks.split(",")
            for r in task_stats(t, [int(a) for a in args.after.split(",")], args.seed)]
    text = table(rows)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gradient_stats.json").write_text(json.dumps(rows, indent=2) + "\n")
        (args.out / "gradient_stats.md").write_text(text + "\n")
    assert all(math.isfinite(float(r["kurtosis"])) for r in rows)


if __name__ == "__main__":
    main()
