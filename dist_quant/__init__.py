"""dist_quant: data-parallel training with 1-bit unbiased gradient quantisation.

Workers quantise gradients to one bit per coordinate (unbiased stochastic rounding with the
minimum-variance scale and offset), a parameter server reconstructs, averages and applies SGD
whose momentum acts on the stochastic gradient only. See README.md.

The supported library surface is ``__all__``: the training API :func:`fit` (any
``torch.nn.Module`` and data through the parameter server), the compressors and their
registry, the optimizer with its coupled equivalent and parameter groups, the learning-rate
schedule, the training configuration, and the errors. Everything else (roles, transport, cluster) is
internal and may change.
"""

from dist_quant.api import fit  # noqa: E402
from dist_quant.compress import (  # noqa: E402
    Compressor,
    ErrorFeedback,
    Payload,
    available_compressors,
    get_compressor,
)
from dist_quant.config import TrainConfig  # noqa: E402
from dist_quant.core.lr_schedule import LRSchedule  # noqa: E402
from dist_quant.core.optim import (  # noqa: E402
    CoupledSettings,
    DecoupledMomentumSGD,
    coupled_equivalent,
    coupled_sgd,
    decay_param_groups,
)
from dist_quant.errors import (  # noqa: E402
    ConfigError,
    NonFiniteGradientError,
    PayloadError,
    WireRangeError,
)
from dist_quant.hooks import OneBitState, onebit_hook  # noqa: E402
from dist_quant.version import __version__  # noqa: E402, F401

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
