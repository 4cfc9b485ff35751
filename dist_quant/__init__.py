"""dist_quant: data-parallel training with 1-bit unbiased gradient quantisation.

Workers quantise gradients to one bit per coordinate (unbiased stochastic rounding with the
minimum-variance scale and offset), a parameter server reconstructs, averages and applies SGD
whose momentum acts on the stochastic gradient only. See README.md.

The supported library surface is ``__all__``: the training API :func:`fit` (any
``torch.nn.Module`` and data through the parameter server), the compressors and their
registry, the optimizer with its coupled equivalent and parameter groups, the learning-rate
schedule, the training configuration, and the errors. Everything else (roles, transport, cluster) is
internal and may change.

Each name is imported on first use (PEP 562), so that importing a submodule such as
``dist_quant.train`` (the command line) does not import torch before its options are checked;
``from dist_quant import fit`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dist_quant.version import __version__  # noqa: F401

if TYPE_CHECKING:  # the same names for type checkers and editors
    from dist_quant.api import fit
    from dist_quant.compress import (
        Compressor,
        ErrorFeedback,
        Payload,
        available_compressors,
        get_compressor,
    )
    from dist_quant.config import TrainConfig
    from dist_quant.core.lr_schedule import LRSchedule
    from dist_quant.core.optim import (
        CoupledSettings,
        DecoupledMomentumSGD,
        coupled_equivalent,
        coupled_sgd,
        decay_param_groups,
    )
    from dist_quant.errors import (
        ConfigError,
        NonFiniteGradientError,
        PayloadError,
        WireRangeError,
    )
    from dist_quant.hooks import OneBitState, onebit_hook

# public name -> the module that defines it
_HOMES = {
    "fit": "dist_quant.api",
    "Compressor": "dist_quant.compress",
    "ErrorFeedback": "dist_quant.compress",
    "Payload": "dist_quant.compress",
    "available_compressors": "dist_quant.compress",
    "get_compressor": "dist_quant.compress",
    "TrainConfig": "dist_quant.config",
    "LRSchedule": "dist_quant.core.lr_schedule",
    "CoupledSettings": "dist_quant.core.optim",
    "DecoupledMomentumSGD": "dist_quant.core.optim",
    "coupled_equivalent": "dist_quant.core.optim",
    "coupled_sgd": "dist_quant.core.optim",
    "decay_param_groups": "dist_quant.core.optim",
    "ConfigError": "dist_quant.errors",
    "NonFiniteGradientError": "dist_quant.errors",
    "PayloadError": "dist_quant.errors",
    "WireRangeError": "dist_quant.errors",
    "OneBitState": "dist_quant.hooks",
    "onebit_hook": "dist_quant.hooks",
}

__all__ = [
    "Compressor",
    "ConfigError",
    "CoupledSettings",
    "DecoupledMomentumSGD",
    "ErrorFeedback",
    "LRSchedule",
    "NonFiniteGradientError",
    "OneBitState",
    "Payload",
    "PayloadError",
    "TrainConfig",
    "WireRangeError",
    "available_compressors",
    "coupled_equivalent",
    "coupled_sgd",
    "decay_param_groups",
    "fit",
    "get_compressor",
    "onebit_hook",
]


def __getattr__(name: str) -> Any:
    """A name of ``__all__``, imported from its module the first time it is asked for."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value   # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
