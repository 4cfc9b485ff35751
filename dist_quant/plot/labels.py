"""Short, stable names for runs, read from the ``"config"`` object of ``config.json``.

``method_label`` names the method: ``"PS onebit b512"``, ``"PS onebit whole"`` (bucket 0, the
per-tensor rule), ``"PS 2bit b512"``, ``"PS sign+EF"``, ``"PS onebit b512 up+down"`` (the downlink
uses the uplink compressor and bucket size), ``"PS onebit b512 down sign"`` (a ``sign`` downlink in
buckets of the uplink's size; ``"down sign b128"`` when they differ), ``"PS fp32"``,
``"PS onebit b128 ... S=2"`` (S dedicated servers), ``"PS onebit b128 ... colocated"`` (every
worker serves a shard), ``"DDP fp32"``, ``"DDP fp16"``, ``"DDP PowerSGD r2"``, ``"DDP onebit b128"``
(the onebit hook, named by its compressor as the PS uplink is, ``+EF`` with error feedback); the
baselines ``"PS QSGD s4 b128"``, ``"PS TernGrad b128"``, ``"PS top-1%+EF"``, ``"PS rand-1%"``.
Each compressor names itself (``Compressor.label``, :mod:`dist_quant.compress.base`), so a new
compressor is labelled without a change here. ``run_labels`` adds ``key=value`` for the config
fields that tell apart runs sharing a name (a seed, a worker count, a learning rate).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

from dist_quant.compress import get_compressor
from dist_quant.compress.base import Compressor, bucket_label, ratio_label  # noqa: F401
from dist_quant.config import TrainConfig
from dist_quant.errors import ConfigError

DDP_HOOKS = {"none": "DDP fp32", "fp16": "DDP fp16"}
# fields that never change what was trained
BOOKKEEPING = {"run_dir", "resume", "progress", "checkpoint_every", "eval_every", "backend",
               "device", "timeout", "data_dir"}


def resolved(config: dict[str, Any]) -> dict[str, Any]:
    """The config with the defaults of this version for any field an older run did not record."""
    return {**dataclasses.asdict(TrainConfig()), **config}


def _compressor(name: str, bucket_size: int, bits: int, levels: int = 4,
                ratio: float = 0.01) -> Compressor | None:
    """The compressor a run's config names, or None when this version cannot build it (a name
    or an option it does not know)."""
    try:
        return get_compressor(name, bucket_size=bucket_size, bits=bits, levels=levels,
                              ratio=ratio)
    except ConfigError:
        return None


def compressor_label(name: str, bucket_size: int, bits: int, levels: int = 4,
                     ratio: float = 0.01) -> str:
    """The compressor's own label (``Compressor.label``); its name where it cannot be built."""
    comp = _compressor(name, bucket_size, bits, levels, ratio)
    return name if comp is None else comp.label


def _floating(name: str) -> bool:
    comp = _compressor(name, 0, 2)
    return comp is not None and comp.floating


def method_label(config: dict[str, Any]) -> str:
    c = resolved(config)
    if c["method"] == "ddp":
        if c["ddp_hook"] == "powersgd":
            return f"DDP PowerSGD r{c['powersgd_rank']}"
        if c["ddp_hook"] == "onebit":
            label = "DDP " + compressor_label(c["compressor"], c["bucket_size"], c["bits"])
            return label + ("+EF" if c["error_feedback"] else "")
        return DDP_HOOKS.get(c["ddp_hook"], f"DDP {c['ddp_hook']}")
    label = "PS " + compressor_label(c["compressor"], c["bucket_size"], c["bits"],
                                     c["qsgd_levels"], c["sparsity_ratio"])
    if c["error_feedback"]:
        label += "+EF"
    if c["header_dtype"] != "fp32" and not _floating(c["compressor"]):
        label += f" {c['header_dtype']} headers"
    if c["downlink"] != "none":
        down = compressor_label(c["downlink"], c["downlink_bucket_size"], c["bits"],
                                c["qsgd_levels"], c["sparsity_ratio"])
        same_bucket = (c["downlink_bucket_size"] == c["bucket_size"]
                       or _floating(c["downlink"]))
        if c["downlink"] == c["compressor"] and same_bucket:
            label += " up+down"
        else:
            if down == c["downlink"] and not same_bucket:  # a name without its bucket (sign)
                down += f" {bucket_label(c['downlink_bucket_size'])}"
            label += f" down {down}"
    return label + topology_label(c)


def topology_label(c: dict[str, Any]) -> str:
    """`` colocated``, `` S=2`` for sharded servers, nothing for the star."""
    if c.get("colocate"):
        return " colocated"
    return f" S={c['servers']}" if c.get("servers", 1) > 1 else ""


def run_labels(configs: list[dict[str, Any]], ignore: frozenset[str] = frozenset(),
               number: bool = True, names: list[str] | None = None) -> list[str]:
    """``names`` (default: ``method_label`` of each config), made unique by the fields in
    which equal names differ (but ``ignore``); identical configs are numbered ``#1, #2`` when
    ``number``."""
    labels = list(names) if names is not None else [method_label(c) for c in configs]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        groups[label].append(i)
    out = list(labels)
    for label, members in groups.items():
        if len(members) < 2:
            continue
        full = [resolved(configs[i]) for i in members]
        keys = sorted({k for f in full for k in f} - BOOKKEEPING - ignore)
        keys = [k for k in keys if len({repr(f.get(k)) for f in full}) > 1]
        for i, f in zip(members, full, strict=True):
            extra = " ".join(f"{k}={f.get(k)}" for k in keys)
            out[i] = f"{label} {extra}" if extra else label
    if not number:
        return out
    counts = {label: out.count(label) for label in out}
    seen: dict[str, int] = defaultdict(int)
    for i, label in enumerate(list(out)):  # identical configs (a repeated run): number them
        if counts[label] > 1:
            seen[label] += 1
            out[i] = f"{label} #{seen[label]}"
    return out


# the metric each --task records as test_accuracy, as a figure's axis names it
METRIC_LABELS = {"text-transformer": "next-byte accuracy (%)",
                 "shapes-cnn": "test accuracy, 4 orientations (%)"}


def metric_label(configs: list[dict[str, Any]]) -> str:
    """The y-axis label of ``test_accuracy`` for runs of these configs: the task's metric
    (``METRIC_LABELS``; the MLP's and a fit model's: test accuracy), or a neutral one when
    the runs mix tasks."""
    labels = {METRIC_LABELS.get(c.get("task", ""), "test accuracy (%)") for c in configs}
    return labels.pop() if len(labels) == 1 else "test metric (%)"

