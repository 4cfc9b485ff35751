"""The one validated, frozen configuration of a training run.

Every field is one command-line option (``--field-name``, underscores become dashes) of both
``dist-quant train`` and ``python -m dist_quant.train``; the help text is the field's ``help``
metadata. ``TrainConfig.validate`` raises :class:`dist_quant.errors.ConfigError` naming the option
and the allowed range, before any process starts.

Fields that move the bandwidth/accuracy trade-off: ``compressor``, ``bucket_size``, ``bits``,
``qsgd_levels``, ``sparsity_ratio``, ``error_feedback`` and ``downlink`` (fewer bytes, more
gradient noise); ``workers`` and ``batch_size`` (more data per step, more payloads per step).

Every field has a ``group``: the heading it is listed under in ``--help`` (``GROUPS``, in
order), in every command that takes the options (``train``, ``cluster``, ``sweep``'s
``--set``). The testing aids (group ``TESTING``: ``--inject-nonfinite WORKER:STEP``, a NaN
gradient; ``--inject-loss WORKER:K``, a worker that leaves an asynchronous run) are accepted
everywhere but left out of ``--help``.
"""

from dist_quant.config.choices import *  # noqa: F403
from dist_quant.config.choices import (  # noqa: F401
    TENSORBOARD_ENV,
    tensorboard_missing,
    tensorboard_requested,
)
from dist_quant.config.cli import (  # noqa: F401
    GroupedCommand,
    GroupedOption,
    SetFieldsCommand,
    click_options,
    field_groups,
)
from dist_quant.config.fields import TrainConfig, stop_reached  # noqa: F401
