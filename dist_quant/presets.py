"""Named methods: the settings that a sweep's ``--method NAME`` and a figure's method label stand
for.

Each preset maps onto :class:`~dist_quant.config.TrainConfig` fields; a sweep point starts from
the defaults, applies its preset, then its own ``field=value`` settings. Where a preset's
settings come from a measurement, the comment names the record.
"""

from __future__ import annotations

from typing import Any

from dist_quant.config import TrainConfig

_DEFAULTS = TrainConfig()
# the best 1-bit setting of the bandwidth record (benchmarks/bandwidth-2026-11-26)
_RECOMMENDED = {"method": "ps", "compressor": "onebit", "bucket_size": _DEFAULTS.bucket_size,
                "error_feedback": False, "header_dtype": "fp16", "downlink": "sign",
                "downlink_bucket_size": 512}
PRESETS: dict[str, dict[str, Any]] = {
    "ps-fp32": {"method": "ps", "compressor": "none", "error_feedback": False,
                "downlink": "none"},
    "ps-onebit-whole": {"method": "ps", "compressor": "onebit", "bucket_size": 0,
                        "error_feedback": False, "downlink": "none"},
    "ps-onebit": {"method": "ps", "compressor": "onebit", "bucket_size": _DEFAULTS.bucket_size,
                  "error_feedback": False, "downlink": "none"},
    "ps-sign-ef": {"method": "ps", "compressor": "sign", "error_feedback": True,
                   "downlink": "none"},
    "ps-onebit-updown": {"method": "ps", "compressor": "onebit", "error_feedback": False,
                         "downlink": "sign"},
    "ps-qsgd": {"method": "ps", "compressor": "qsgd", "error_feedback": False,
                "downlink": "none"},
    "ps-terngrad": {"method": "ps", "compressor": "terngrad", "error_feedback": False,
                    "downlink": "none"},
    "ps-topk-ef": {"method": "ps", "compressor": "topk", "error_feedback": True,
                   "downlink": "none"},
    "ps-randk": {"method": "ps", "compressor": "randk", "error_feedback": False,
                 "downlink": "none"},
    "ps-sharded": {**_RECOMMENDED, "servers": 2, "colocate": False},
    "ps-colocated": {**_RECOMMENDED, "servers": 1, "colocate": True},
    # the fewest steps at <= 2.1 bits up (benchmarks/convergence-2026-12-06, README)
    "ps-fast": {"method": "ps", "compressor": "sign", "bucket_size": 32, "header_dtype": "fp16",
                "error_feedback": True, "worker_momentum": True, "shift_rate": "0",
                "downlink": "kbit", "bits": 4, "downlink_bucket_size": 512, "servers": 1,
                "colocate": True, "overlap": False},
    "ps-tolerant": {**_RECOMMENDED, "servers": 1, "colocate": False, "consistency": "async",
                    "momentum": 0.5, "lr": 1.0},
    "ddp-fp32": {"method": "ddp", "ddp_hook": "none"},
    "ddp-fp16": {"method": "ddp", "ddp_hook": "fp16"},
    "ddp-powersgd": {"method": "ddp", "ddp_hook": "powersgd"},
    "ddp-onebit": {"method": "ddp", "ddp_hook": "onebit", "compressor": "onebit",
                   "bucket_size": _DEFAULTS.bucket_size, "error_feedback": False},
}
