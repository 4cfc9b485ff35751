"""The compute cost of each phase of a step, measured in CPU time, for the modelled clock.

:func:`measure` runs the core building blocks of a step on this machine, outside any run
(:mod:`dist_quant.core.model`, the data of :mod:`dist_quant.data`, the compressors of
:mod:`dist_quant.compress`, :mod:`dist_quant.core.optim`), each ``repeats`` times after one
warm-up, and keeps the median **thread CPU time** (``time.thread_time()``) of each phase: the
time this thread spent computing, which other processes on the machine do not inflate (wall
time does, once the runnable processes outnumber the cores). Phases, all for the whole model
of ``n`` parameters (a shard of ``n_s`` costs ``n_s / n`` of the coordinate-wise ones):

==============  ==============================================================================
``forward``     one worker's forward and loss on a batch of ``--batch-size`` examples
``backward``    its backward (the gradients of the ``n`` parameters)
``encode``      flattening the gradient and encoding it with the uplink compressor
``decode``      decoding one uplink payload into the server's mean (per row: a ``[W, bytes]``
                batch's ``decode_mean`` divided by W)
``update``      one ``DecoupledMomentumSGD`` step on the ``n`` parameters
``down_encode`` encoding the ``n`` parameters with the downlink compressor (``none``: fp32)
``down_decode`` decoding one downlink payload
``evaluate``    evaluating the model on the test split (forward in eval mode, loss, accuracy)
==============  ==============================================================================

For ``--method ddp`` the uplink compressor is the hook's: ``none`` costs nothing to encode or
decode (the allreduce sums in place), ``fp16`` is the fp16 compressor, ``onebit`` the
configured one (its downlink the same); PowerSGD's matrix products are not calibrated (0).
Wrappers around the uplink compressor (error feedback, worker momentum, shifts: a few vector
operations on ``n`` floats) are not measured.

Nothing here touches a run's random streams: the model, the batches and the compressors' draws
come from a generator of their own, and the thread setting is restored, so a run with the
modelled clock ends with the same parameters as without it. A calibration is a JSON object
(:func:`measure`, :func:`load`), written
as ``calibration.json`` beside ``config.json``; ``--calibration FILE`` (a calibration.json or a
run directory holding one) reuses it, so runs on different machines can share one.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from dist_quant.compress import get_compressor
from dist_quant.core.cnn import shapes_cnn
from dist_quant.core.model import build_mlp
from dist_quant.core.optim import decay_param_groups, make_optimizer
from dist_quant.core.transformer import ByteTransformer
from dist_quant.data.dataset import load_dataset
from dist_quant.data.shapes import load_shapes
from dist_quant.data.text import CONTEXT, load_text
from dist_quant.errors import ConfigError

PHASES = ("forward", "backward", "encode", "decode", "update", "down_encode", "down_decode",
          "evaluate")
REPEATS = 7
FILE = "calibration.json"
SEED = 0x0C10C4   # the calibration's own generator: no run stream is drawn from


def _compressors(config: dict[str, Any]) -> tuple[Any, Any]:
    """(uplink, downlink) compressors as the run's step uses them; None = nothing to code."""
    opts = dict(bits=config.get("bits", 2), header_dtype=config.get("header_dtype", "fp32"),
                levels=config.get("qsgd_levels", 4), ratio=config.get("sparsity_ratio", 0.01))
    up = get_compressor(config.get("compressor", "onebit"),
                        bucket_size=config.get("bucket_size", 128), **opts)
    down = get_compressor(config.get("downlink", "none"),
                          bucket_size=config.get("downlink_bucket_size", 128), **opts)
    if config.get("method") == "ddp":
        hook = config.get("ddp_hook", "none")
        if hook == "fp16":
            return get_compressor("fp16"), None
        if hook == "onebit":
            return up, up
        return None, None
    return up, down


def measure(config: dict[str, Any], repeats: int = REPEATS) -> dict[str, Any]:
    """The median thread CPU seconds of each phase (``PHASES``) for the run ``config`` (a
    ``config.json`` config of the built-in MLP), and ``params``, ``repeats``, ``threads``.
    Measured on one intra-op thread (the CPU time of one thread is then all the work; with
    several, the others' share is not counted and the caller's spinning is), the process's
    setting restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(config, repeats)
    finally:
        torch.set_num_threads(threads)


def _measure(config: dict[str, Any], repeats: int) -> dict[str, Any]:
    needed = ("batch_size",) if config.get("task") in ("shapes-cnn", "text-transformer") \
        else ("hidden", "dataset", "batch_size")
    missing = [k for k in needed if k not in config]
    if missing:
        raise ConfigError("--clock", "dedicated models the built-in tasks only (the config has "
                          f"no {missing[0]}); give --calibration FILE for another model")
    gen = torch.Generator().manual_seed(SEED)
    model, data = _task(config, gen)
    params = [p for p in model.parameters()]
    n = sum(p.numel() for p in params)
    opt = make_optimizer(SimpleNamespace(**{
        "optimizer": "sgd", "lr": 0.2, "momentum": 0.9, "beta2": 0.999, "adam_eps": 1e-8,
        "onebit_adam_warmup": 0, **{k: v for k, v in config.items() if k in (
            "optimizer", "lr", "momentum", "beta2", "adam_eps")}}),
        decay_param_groups(model, config.get("weight_decay", 5e-4)))
    up, down = _compressors(config)
    rows = max(int(config.get("workers", 1)), 1)
    batch = min(int(config["batch_size"]), data.x_train.shape[0])
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    clock = time.thread_time
    for rep in range(repeats + 1):
        idx = torch.randint(data.x_train.shape[0], (batch,), generator=gen)
        x, y = data.x_train[idx], data.y_train[idx]
        model.train()
        opt.zero_grad(set_to_none=True)
        t0 = clock()
        loss = _cross_entropy(model(x), y)
        t1 = clock()
        loss.backward()
        t2 = clock()
        g = torch.cat([p.grad.reshape(-1) for p in params])
        payload = None if up is None else up.encode(g, generator=gen)
        t3 = clock()
        if payload is not None:
            batch_rows = payload.to_tensor().unsqueeze(0).expand(rows, -1).contiguous()
            t4 = clock()
            up.decode_mean(batch_rows)
            t5 = clock()
        else:
            t4 = t5 = 0.0
        t6 = clock()
        opt.step()
        t7 = clock()
        with torch.no_grad():
            theta = torch.cat([p.detach().reshape(-1) for p in params])
            t8 = clock()
            down_payload = None if down is None else down.encode(theta, generator=gen)
            t9 = clock()
            if down_payload is not None:
                down.decode(down_payload)
            t10 = clock()
            model.eval()
            t11 = clock()
            out = model(data.x_test)
            _cross_entropy(out, data.y_test).item()
            (out.argmax(-1) == data.y_test).double().mean().item()
            t12 = clock()
        if rep == 0:   # warm-up: first calls allocate and pick kernels
            continue
        for phase, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, (t5 - t4) / rows, t7 - t6,
                                      t9 - t8, t10 - t9, t12 - t11), strict=True):
            times[phase].append(max(dt, 0.0))
    return {"seconds": {p: statistics.median(v) for p, v in times.items()}, "params": n,
            "repeats": repeats, "threads": 1,
            "measured": "thread CPU time, median"}


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _task(config: dict[str, Any], gen: torch.Generator) -> tuple[torch.nn.Module, Any]:
    """The model and data of the run's ``--task`` (weights drawn from the calibration's own
    seed: only the costs matter)."""
    task = config.get("task", "mnist1d-mlp")
    if task in ("shapes-cnn", "text-transformer"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            if task == "shapes-cnn":
                return shapes_cnn(), load_shapes(config.get("train_size", 4000),
                                                 config.get("test_size", 1000))
            return ByteTransformer(CONTEXT), load_text()
    data = load_dataset(SimpleNamespace(
        dataset=config["dataset"], train_size=config.get("train_size", 4000),
        test_size=config.get("test_size", 1000), data_dir=config.get("data_dir", "")))
    hidden = [int(h) for h in str(config["hidden"]).split(",") if h.strip()]
    model = build_mlp(data.in_features, hidden, data.num_classes,
                      keep_prob=config.get("keep_prob", 1.0),
                      batchnorm=config.get("batchnorm", True), init=config.get("init", "he"),
                      generator=gen, dropout_generator=gen)
    return model, data


def check(calibration: Any, where: str = "--calibration") -> dict[str, Any]:
    """``calibration`` if it is one (every phase a number >= 0, ``params`` > 0), else
    ConfigError naming ``where``."""
    try:
        seconds = calibration["seconds"]
        ok = all(float(seconds[p]) >= 0 for p in PHASES) and int(calibration["params"]) > 0
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(where, f"not a calibration: needs \"seconds\" with {', '.join(PHASES)} "
                          "(CPU seconds >= 0) and \"params\" > 0")
    return calibration


def load(path: str | Path) -> dict[str, Any]:
    """A calibration from ``path``: a calibration.json, or a run directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE
    try:
        return check(json.loads(path.read_text()))
    except (OSError, ValueError) as err:
        raise ConfigError("--calibration", f"cannot read a calibration from {path}: {err}") \
            from None


def for_run(config: dict[str, Any]) -> dict[str, Any]:
    """The calibration of a run: loaded from ``--calibration`` if given, else measured."""
    given = config.get("calibration", "")
    if given:
        return {**load(given), "source": str(given)}
    return {**measure(config), "source": "measured"}
