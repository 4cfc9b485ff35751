"""What is trained: the model, the data, the loss and the evaluation metric.

A :class:`Task` is handed to every role (workers, servers, the leader) instead of each of them
building the MLP and loading the configured dataset itself. ``dist-quant train`` makes it from
its config (:meth:`Task.from_config`: the MLP of ``--hidden`` on ``--dataset``);
:func:`dist_quant.fit` from any ``torch.nn.Module`` factory and tensors
(:meth:`Task.custom`). Both then run the same step (:mod:`dist_quant.ps.start`).

Seeds of a custom model. ``model_fn()`` is called with the global CPU generator seeded from
``(seed, INIT)`` and restored afterwards, so every rank (and every virtual rank of the
simulator) builds the same initial weights. A custom model draws its dropout masks from the
global generator; each worker's training forward runs with that generator seeded from one draw
of the worker's own dropout generator ``(seed, i, DROPOUT)`` (then restored), so the masks
depend on the worker and the step only: the simulator and a distributed run draw the same,
and a checkpoint (which holds the dropout generator) resumes them.

Buffers. The parameters travel (flat, ``model.parameters()`` order, float32); of the buffers
only BatchNorm's running statistics are handled (averaged over the workers at evaluation,
:mod:`dist_quant.ps.server`). A model with any other buffer is refused with a ValueError
naming it, since its value would silently differ between the workers and the server.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dist_quant.data import Dataset, load_dataset
from dist_quant.ps import common

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The fraction of rows whose largest output is the target class."""
    return (output.argmax(1) == target).double().mean()


# TrainConfig fields of the built-in MLP and datasets: a custom model's run records none
MLP_FIELDS = ("dataset", "data_dir", "hidden", "keep_prob", "batchnorm", "init")


@dataclass(frozen=True)
class Task:
    """``build(device, dropout_generator)`` returns a fresh model with the run's initial
    weights; ``loss_fn(output, target)`` is the mean training loss; ``metric(output, target)``
    the mean evaluation metric of a batch (recorded as ``test_accuracy``); ``global_rng``:
    the model draws its randomness from the global generator (see the module docstring);
    ``kind``: ``"mlp"`` (the configured MLP) or ``"custom"`` (a :func:`dist_quant.fit` model),
    written to ``config.json`` so that ``dist-quant train --resume`` refuses a custom run."""

    build: Callable[[torch.device, torch.Generator | None], nn.Module]
    data: Dataset
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    metric: Callable[[torch.Tensor, torch.Tensor], Any] = accuracy
    global_rng: bool = False
    kind: str = "mlp"

    @classmethod
    def from_config(cls, cfg: Any, data: Dataset | None = None) -> Task:
        """The MLP of ``cfg`` on ``cfg.dataset`` (what ``dist-quant train`` runs)."""
        if data is None:
            data = load_dataset(cfg)

        def build(device: torch.device, dropout_generator: torch.Generator | None = None):
            return common.build_model(cfg, data.in_features, data.num_classes, device,
                                      dropout_generator=dropout_generator)

        return cls(build, data)

    @classmethod
    def custom(cls, model_fn: Callable[[], nn.Module], data: Dataset, seed: int,
               loss_fn: Callable | None = None, metric: Callable | None = None) -> Task:
        """A task of any model: ``model_fn()`` is checked once here (see :func:`check_model`)."""
        if not callable(model_fn):
            raise TypeError(f"model_fn must be a zero-argument callable returning a "
                            f"torch.nn.Module; got {type(model_fn).__name__}")

        def build(device: torch.device, dropout_generator: torch.Generator | None = None):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(common.derive_seed(seed, common.INIT))
                model = model_fn()
            return check_model(model).to(device)

        task = cls(build, data, loss_fn or F.cross_entropy, metric or accuracy, global_rng=True,
                   kind="custom")
        task.build(torch.device("cpu"))
        return task

    def recorded_config(self, cfg: Any) -> dict[str, Any]:
        """``cfg`` as ``config.json`` records it: a custom model's run leaves out the fields of
        the built-in MLP and dataset (``MLP_FIELDS``), which did not apply to it."""
        config = cfg.to_dict()
        if self.kind == "mlp":
            return config
        return {k: v for k, v in config.items() if k not in MLP_FIELDS}

    @property
    def metric_name(self) -> str:
        """The metric's name, as ``config.json`` records it (``"accuracy"`` by default)."""
        return getattr(self.metric, "__name__", type(self.metric).__name__)

    def model(self, device: torch.device, dropout_generator: torch.Generator | None = None
              ) -> nn.Module:
        return self.build(torch.device(device), dropout_generator)

    @contextlib.contextmanager
    def randomness(self, generator: torch.Generator) -> Iterator[None]:
        """The scope of one training forward: for a custom model, the global generator seeded
        from one draw of ``generator`` (restored on leaving); nothing for the MLP, whose
        dropout draws from ``generator`` itself."""
        if not self.global_rng:
            yield
            return
        seed = int(torch.randint(0, 2**62, (1,), generator=generator,
                                 device=generator.device))
        devices = [generator.device] if generator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield


def check_model(model: Any) -> nn.Module:
    """``model`` if the parameter server can train it: a Module with trainable float32
    parameters and no buffers besides BatchNorm's; else TypeError or ValueError saying why."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_fn must return a torch.nn.Module; it returned "
                        f"{type(model).__name__}")
    params = dict(model.named_parameters())
    if not params:
        raise ValueError("the model has no parameters to train")
    for name, p in params.items():
        if p.dtype != torch.float32:
            raise ValueError(f"parameter {name!r} is {p.dtype}; the parameter server trains "
                             "float32 parameters")
        if not p.requires_grad:
            raise ValueError(f"parameter {name!r} does not require grad; frozen parameters "
                             "are not supported (make it a buffer of a BatchNorm or leave it "
                             "out of the model)")
    modules = dict(model.named_modules())
    for name, _ in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        if not (isinstance(modules[owner], nn.modules.batchnorm._BatchNorm)
                and leaf in BN_BUFFERS):
            raise ValueError(f"buffer {name!r} is not supported: only BatchNorm's running "
                             "statistics are kept in step across the workers and the server")
    return model
