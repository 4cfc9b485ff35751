"""dist_quant: data-parallel training with 1-bit unbiased gradient quantisation.

Workers quantise gradients to one bit per coordinate (unbiased stochastic rounding with the
minimum-variance scale and offset), a parameter server reconstructs, averages and applies SGD
whose momentum acts on the stochastic gradient only. See README.md.
"""

__version__ = "0.1.0"

from dist_quant.compress import available_compressors, get_compressor  # noqa: E402
from dist_quant.errors import ConfigError, NonFiniteGradientError, PayloadError  # noqa: E402
from dist_quant.hooks import OneBitState, onebit_hook  # noqa: E402
from dist_quant.optim import DecoupledMomentumSGD  # noqa: E402

__all__ = [
    "ConfigError",
    "DecoupledMomentumSGD",
    "NonFiniteGradientError",
    "OneBitState",
    "PayloadError",
    "available_compressors",
    "get_compressor",
    "onebit_hook",
]
