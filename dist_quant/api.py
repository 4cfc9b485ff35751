"""``dist_quant.fit``: the parameter-server job for any model and data.

::

    summary = dist_quant.fit(model_fn, (x_train, y_train), (x_test, y_test),
                             workers=4, compressor="onebit", steps=300, simulate=True)

``fit`` builds a :class:`~dist_quant.ps.task.Task` (the model factory, the data, the loss
and the metric) and runs the same roles as ``dist-quant train``
(:mod:`dist_quant.ps.start`), which builds the same kind of object from its config (the
MLP on ``--dataset``). Where it runs:

- ``simulate=True``: every rank in this process (:func:`dist_quant.runner.simulate.run_simulate`);
- in a torchrun job (``RANK`` and ``WORLD_SIZE`` set, e.g.
  ``torchrun --standalone --nproc-per-node 5 script.py`` for 4 workers and one server): this
  process's rank; the process group is created (and destroyed) here unless one exists.

Both end with the same parameters bit for bit on the same device type and seed, and write the
same run directory (``config.json``, ``metrics.jsonl``, ``checkpoints/``, ``summary.json``).
The summary is returned by the rank that leads (the server of shard 0: rank 0 in the default
placement, this process with ``simulate=True``), with ``run_dir`` added (where the run wrote);
every other rank gets None. The leading rank prints the run's one-line summary, as
``dist-quant train`` does.

Options are the fields of :class:`~dist_quant.config.TrainConfig` (``workers``, ``servers``,
``colocate``, ``compressor``, ``bucket_size``, ``downlink``, ``steps``, ``batch_size``,
``lr``, ``lr_schedule``, ``seed``, ``run_dir``, ``checkpoint_every``, ``resume``, ...),
validated as on the command line: a bad value raises :class:`~dist_quant.errors.ConfigError`
naming it, a keyword that is no field a :class:`TypeError` naming it and its close matches.
The fields that describe the built-in MLP and dataset (``FIT_FIXED``) are given by
``model_fn`` and the data and are refused; ``train_size`` and ``test_size`` are recorded from
the data. ``method`` must be ``ps``. With ``resume=RUN_DIR`` (and the same options, more
``steps``) the run continues from the latest checkpoint bit for bit; ``run_dir`` defaults to it.

Data: each of ``train`` and ``test`` is a pair of tensors ``(x, y)`` with as many rows, or a
map-style dataset (``len`` and ``ds[i] -> (x_i, y_i)``), stacked once into tensors. Inputs are
used as given (no standardisation); worker i trains on rows ``i, i + W, ...`` of ``train``.
``loss_fn(output, y)`` is the mean training loss (default cross-entropy), ``metric(output, y)``
the mean evaluation metric of a batch (default accuracy; both default ones read the classes
from the output's last dimension, so per-token outputs ``[batch, tokens, classes]`` work),
recorded as ``test_accuracy`` (and compared with ``stop_accuracy``; the loss with
``stop_loss``); one forward pass on a batch checks that model, loss and metric fit before
anything starts; ``config.json`` names it (``"metric"``) and leaves out the
``FIT_FIXED`` fields other than ``train_size`` and ``test_size``. The model's randomness, its
buffers and their limits: see :mod:`dist_quant.ps.task`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable
from typing import Any

import torch

from dist_quant.config import TrainConfig
from dist_quant.data import Dataset
from dist_quant.errors import ConfigError
from dist_quant.ps.task import MLP_FIELDS, Task
from dist_quant.runner.simulate import run_simulate
from dist_quant.runtime.checkpoint import load_for_resume
from dist_quant.runtime.rank import default_run_dir, pick_device

# TrainConfig fields of the built-in MLP and datasets: given by model_fn and the data instead
FIT_FIXED = (*MLP_FIELDS, "task", "train_size", "test_size")


def fit(model_fn: Callable[[], torch.nn.Module], train: Any, test: Any, *,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        metric: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
        **options: Any) -> dict[str, Any] | None:
    """Train ``model_fn()`` on ``train`` with the parameter server; evaluate on ``test``.

    Returns the run's summary on the leading rank, None on the others (see the module
    docstring for where it runs, the options and the data).
    """
    unknown_keyword(options)
    for name in FIT_FIXED:
        if name in options:
            raise ConfigError("--" + name.replace("_", "-"), "is given by model_fn and the data "
                              "in fit; leave it out")
    x, y = as_tensors(train, "train")
    x_test, y_test = as_tensors(test, "test")
    values = dict(options)
    if values.get("resume") and not values.get("run_dir"):
        values["run_dir"] = values["resume"]
    cfg = TrainConfig.from_dict({**values, "train_size": len(y),
                                 "test_size": len(y_test)}).validate()
    if cfg.method != "ps":
        raise ConfigError("--method", "fit runs the parameter-server job (ps); got "
                          f"{cfg.method!r}")
    if cfg.resume:

        load_for_resume(cfg)  # refuses an incompatible continuation before anything starts
    classes = int(max(y.max(), y_test.max())) + 1 if not y.is_floating_point() else 0
    task = Task.custom(model_fn, Dataset("fit", x, y, x_test, y_test, classes), cfg.seed,
                       loss_fn, metric)
    if cfg.simulate:
        return _run_here(cfg, task)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _run_rank(cfg, task, workers_explicit="workers" in options)
    raise ConfigError("--simulate", "fit runs in a torchrun job (torchrun --nproc-per-node "
                      f"{cfg.world_size} script.py) or in this process with simulate=True")


def unknown_keyword(options: dict[str, Any]) -> None:
    """TypeError, as Python words it, for a keyword that is no option of :func:`fit`."""
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    for name in options:
        if name not in fields:
            close = difflib.get_close_matches(name, [*fields, "loss_fn", "metric"], n=3,
                                              cutoff=0.8)
            hint = (f". Did you mean {' or '.join(repr(c) for c in close)}?" if close else
                    " (the options are the fields of dist_quant.TrainConfig)")
            raise TypeError(f"fit() got an unexpected keyword argument {name!r}{hint}")


def as_tensors(data: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of a pair of tensors or arrays, or of a map-style dataset (stacked)."""
    if isinstance(data, tuple | list) and len(data) == 2 and not isinstance(data[0], tuple):
        x, y = (torch.as_tensor(t) for t in data)
    elif hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        items = [data[i] for i in range(len(data))]
        if not items or not all(isinstance(it, tuple | list) and len(it) == 2 for it in items):
            raise ValueError(f"{name}: a dataset must be non-empty and give (x, y) pairs")
        x = torch.stack([torch.as_tensor(a) for a, _ in items])
        y = torch.stack([torch.as_tensor(b) for _, b in items])
    else:
        raise TypeError(f"{name} must be a pair of tensors (x, y) or a map-style dataset; got "
                        f"{type(data).__name__}")
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise ValueError(f"{name}: x has {len(x) if x.ndim else 0} rows but y has "
                         f"{len(y) if y.ndim else 0}; they must have as many, at least one")
    if len(y) == 0:
        raise ValueError(f"{name} is empty")
    return x, y


def _run_here(cfg: TrainConfig, task: Task) -> dict[str, Any]:

    return run_simulate(cfg, pick_device(cfg), cfg.run_dir or default_run_dir(cfg), task)


def _run_rank(cfg: TrainConfig, task: Task, workers_explicit: bool) -> dict[str, Any] | None:
    """This torchrun process's rank, as ``python -m dist_quant.train`` runs it."""
    # a process entry point: `-m dist_quant.train` imports this package first, so importing
    # the module at the top would load it a second time as __main__'s twin
    from dist_quant.train import run_distributed

    return run_distributed(cfg, workers_explicit, task)
