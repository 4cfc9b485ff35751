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

Tasks of ``--task`` (:meth:`Task.from_config`): ``mnist1d-mlp`` (the MLP of ``--hidden`` on
``--dataset``, built as it always was), ``shapes-cnn`` (:mod:`dist_quant.core.cnn` on
:mod:`dist_quant.data.shapes`) and ``text-transformer`` (:mod:`dist_quant.core.transformer`
on :mod:`dist_quant.data.text`, metric ``next_byte_accuracy``). The last two are built as a
custom model is (:meth:`Task.custom`: seeds, randomness and the checks below).

Loss and metric. The default loss is the mean cross-entropy and the default metric accuracy;
both read the classes from the output's last dimension, so a model that predicts every
position (``[batch, tokens, classes]`` against targets ``[batch, tokens]``) is scored per
token (an output ``[batch, classes]`` gives exactly what ``F.cross_entropy`` and
``argmax(1)`` give). Before anything starts, one forward pass of a fresh replica on the first
training rows (training mode, the loss) and on the first test rows (eval mode, the loss and
the metric) must give a finite scalar loss and a metric convertible to a float; else a
ValueError in one line says which call failed and why.

Buffers (policy, decided on that forward pass). The parameters travel (flat,
``model.parameters()`` order, float32); buffers never do on the training path.

- BatchNorm's running means and variances, and any other floating-point buffer that a
  training forward changes, are *averaged*: every worker keeps its own, and at each
  evaluation they travel uncompressed to the evaluating rank, which evaluates with their plain
  mean (:mod:`dist_quant.ps.server`); BatchNorm's ``num_batches_tracked`` stays each
  replica's own.
- A buffer that the training forward leaves unchanged (a causal mask, a positional table,
  persistent or not) is *constant*: every replica builds the same, and nothing is
  synchronised. A buffer that changes only later in training would be taken for a constant:
  such a model must change it on its first forward.
- Refused in one line (ValueError naming it): a buffer that a training forward changes and that
  is not floating point (it cannot be averaged), other than ``num_batches_tracked``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dist_quant.core.cnn import shapes_cnn
from dist_quant.core.transformer import ByteTransformer
from dist_quant.data import Dataset, load_dataset
from dist_quant.data.dataset import check_batch_fits
from dist_quant.data.shapes import load_shapes
from dist_quant.data.text import CONTEXT, load_text
from dist_quant.ps import common

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
PROBE_ROWS = 2   # rows of the forward pass that checks model, loss and metric before launch


def accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The fraction of predictions whose largest output (over the last dimension, the
    classes) is the target class: per row for ``[batch, classes]``, per token for
    ``[batch, tokens, classes]``."""
    return (output.argmax(-1) == target).double().mean()


def next_byte_accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The text task's metric: the fraction of positions whose most likely next byte is the
    actual one (:func:`accuracy` per token)."""
    return accuracy(output, target)


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy with the classes in the last dimension: ``F.cross_entropy`` itself
    for ``[batch, classes]``, the mean over every token for ``[batch, ..., classes]``."""
    if output.ndim <= 2:
        return F.cross_entropy(output, target)
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


# TrainConfig fields of the built-in MLP and datasets: a custom model's run records none
MLP_FIELDS = ("dataset", "data_dir", "hidden", "keep_prob", "batchnorm", "init")


@dataclass(frozen=True)
class Task:
    """``build(device, dropout_generator)`` returns a fresh model with the run's initial
    weights; ``loss_fn(output, target)`` is the mean training loss; ``metric(output, target)``
    the mean evaluation metric of a batch (recorded as ``test_accuracy``); ``global_rng``:
    the model draws its randomness from the global generator (see the module docstring);
    ``kind``: ``"mlp"`` (the configured MLP), a ``--task`` name, or ``"custom"`` (a
    :func:`dist_quant.fit` model), written to ``config.json`` so that ``dist-quant train
    --resume`` refuses a custom run."""

    build: Callable[[torch.device, torch.Generator | None], nn.Module]
    data: Dataset
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy
    metric: Callable[[torch.Tensor, torch.Tensor], Any] = accuracy
    global_rng: bool = False
    kind: str = "mlp"

    @classmethod
    def from_config(cls, cfg: Any, data: Dataset | None = None) -> Task:
        """The task of ``cfg.task`` (what ``dist-quant train`` runs): by default the MLP of
        ``cfg`` on ``cfg.dataset``."""
        task = getattr(cfg, "task", "mnist1d-mlp")
        if task == "shapes-cnn":
            return cls.custom(shapes_cnn, data or load_shapes(cfg.train_size, cfg.test_size),
                              cfg.seed, kind=task)
        if task == "text-transformer":
            data = data or load_text()
            check_batch_fits(len(data.y_train), cfg.workers, cfg.batch_size)
            return cls.custom(text_model, data, cfg.seed, metric=next_byte_accuracy, kind=task)
        if task != "mnist1d-mlp":
            raise ValueError(f"unknown task {task!r}")
        if data is None:
            data = load_dataset(cfg)

        def build(device: torch.device, dropout_generator: torch.Generator | None = None):
            return common.build_model(cfg, data.in_features, data.num_classes, device,
                                      dropout_generator=dropout_generator)

        return cls(build, data)

    @classmethod
    def custom(cls, model_fn: Callable[[], nn.Module], data: Dataset, seed: int,
               loss_fn: Callable | None = None, metric: Callable | None = None,
               kind: str = "custom") -> Task:
        """A task of any model: ``model_fn()`` is checked once here (:func:`check_model`,
        then :func:`probe`: one forward pass, which also sorts the buffers)."""
        if not callable(model_fn):
            raise TypeError(f"model_fn must be a zero-argument callable returning a "
                            f"torch.nn.Module; got {type(model_fn).__name__}")
        averaged: list[str] = []

        def fresh() -> nn.Module:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(common.derive_seed(seed, common.INIT))
                return check_model(model_fn())

        def build(device: torch.device, dropout_generator: torch.Generator | None = None):
            model = fresh()
            setattr(model, common.AVERAGED, tuple(averaged))
            return model.to(device)

        loss_fn, metric = loss_fn or cross_entropy, metric or accuracy
        averaged.extend(probe(fresh(), data, loss_fn, metric))
        return cls(build, data, loss_fn, metric, global_rng=True, kind=kind)

    def recorded_config(self, cfg: Any) -> dict[str, Any]:
        """``cfg`` as ``config.json`` records it: a custom model's run leaves out the fields of
        the built-in MLP and dataset (``MLP_FIELDS``), which did not apply to it."""
        config = cfg.to_dict()
        if self.kind in ("mlp", "mnist1d-mlp"):
            return config
        dropped = (*MLP_FIELDS, "task") if self.kind == "custom" else MLP_FIELDS
        return {k: v for k, v in config.items() if k not in dropped}

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


def text_model() -> nn.Module:
    """The text task's transformer (:mod:`dist_quant.core.transformer`) for its context."""
    return ByteTransformer(CONTEXT)


def check_model(model: Any) -> nn.Module:
    """``model`` if the parameter server can train it: a Module with trainable float32
    parameters; else TypeError or ValueError saying why (its buffers: :func:`probe`)."""
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
    return model


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def probe(model: nn.Module, data: Dataset, loss_fn: Callable, metric: Callable) -> list[str]:
    """One forward pass of ``model`` (a fresh replica, changed by it) on the first
    ``PROBE_ROWS`` training rows (training mode: the loss) and test rows (eval mode: the loss
    and the metric), under a forked global generator. Returns the names of the buffers to
    average (module docstring, in ``named_buffers`` order); ValueError in one line when a
    call fails, the loss is not a finite scalar, the metric no number, or a buffer is refused."""
    def call(what: str, fn: Callable, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 (any failure here is the same mismatch)
            raise ValueError(f"the model, loss and metric do not fit the data: {what} failed "
                             f"on a batch of {PROBE_ROWS}: {_first_line(err)}") from None

    modules = dict(model.named_modules())
    before = {name: b.detach().clone() for name, b in model.named_buffers()}
    x, y = data.x_train[:PROBE_ROWS], data.y_train[:PROBE_ROWS]
    x_test, y_test = data.x_test[:PROBE_ROWS], data.y_test[:PROBE_ROWS]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        model.train()
        out = call("model(x_train)", model, x)
        loss = call("loss_fn(model(x_train), y_train)", loss_fn, out, y)
        changed = [name for name, b in model.named_buffers()
                   if b.shape != before[name].shape or not torch.equal(b, before[name])]
        model.eval()
        out = call("model(x_test)", model, x_test)
        call("loss_fn(model(x_test), y_test)", loss_fn, out, y_test)
        value = call("metric(model(x_test), y_test)", metric, out, y_test)
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
        raise ValueError(f"the loss must be a scalar tensor (the batch mean); loss_fn gave "
                         f"{type(loss).__name__}{tuple(getattr(loss, 'shape', ()))}")
    try:
        float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"the metric must give one number per batch (its mean); it gave "
                         f"{type(value).__name__}{tuple(getattr(value, 'shape', ()))}") from None
    averaged = []
    for name, b in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        is_bn = isinstance(modules[owner], nn.modules.batchnorm._BatchNorm) \
            and leaf in BN_BUFFERS
        if is_bn and leaf != "num_batches_tracked":
            averaged.append(name)
        elif name in changed and not is_bn:
            if not b.is_floating_point():
                raise ValueError(f"buffer {name!r} ({b.dtype}) changes in a training forward "
                                 "and cannot be averaged over the workers; keep it constant, "
                                 "make it floating point, or compute it in forward")
            averaged.append(name)
    return averaged
