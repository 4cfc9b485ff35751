"""What the report says about where its runs came from: the machine, the commit and the
``dist-quant sweep`` commands that would run them again.

The commands are rebuilt from the runs themselves, for runs a sweep wrote (``point.json``):
one command per sweep directory and per worker count and batch size (as
``benchmarks/bandwidth_record.sh`` runs them); each method is ``-m LABEL`` plus the fields in
which its config differs from its preset (or from the defaults, for a label that is no preset);
fields every method shares are ``--set``; seeds, link rates, latencies and losses are the
values the runs hold.
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import Any

from dist_quant.config import TrainConfig
from dist_quant.plot.runs import Run
from dist_quant.presets import PRESETS

NOT_A_SETTING = {"seed", "workers", "batch_size", "run_dir", "progress", "resume"}


def wrapped(command: str, width: int = 92) -> str:
    """A command line broken between its options (`` \\`` continuations) into lines of about
    ``width`` characters; an option stays with its value."""
    words = shlex.split(command)
    pieces, i = [], 0
    while i < len(words):
        if words[i].startswith("-") and i + 1 < len(words) and not words[i + 1].startswith("-"):
            pieces.append(shlex.join(words[i:i + 2]))
            i += 2
        else:
            pieces.append(shlex.quote(words[i]))
            i += 1
    lines, line = [], pieces[0]
    for piece in pieces[1:]:
        if len(line) + 1 + len(piece) > width:
            lines.append(line + " \\")
            line = "    " + piece
        else:
            line += " " + piece
    return "\n".join([*lines, line])


def value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ";".join(map(str, value))
    return str(value)


def own_fields(run: Run) -> dict[str, Any]:
    """The run's config fields that differ from its preset (or the defaults)."""

    defaults = dataclasses.asdict(TrainConfig())
    base = {**defaults, **PRESETS.get((run.point or {}).get("preset") or "", {})}
    return {k: v for k, v in run.config.items()
            if k in defaults and k not in NOT_A_SETTING
            and value_text(v) != value_text(base[k])}


def link_values(values: list[Any], none: str = "none") -> str:
    return ",".join(none if v is None else f"{v:g}" for v in dict.fromkeys(values))


def sweep_commands(runs: list[Run], order: list[str]) -> list[str]:
    """``dist-quant sweep`` command lines that run ``runs`` again; none where a run has no
    ``point.json`` (it did not come from a sweep)."""
    if not runs or any(r.point is None for r in runs):
        return []
    out = []
    by_dir: dict[Any, list[Run]] = {}
    for run in runs:
        by_dir.setdefault(run.path.parent, []).append(run)
    for sweep_dir, members in by_dir.items():
        settings = sorted({(int(r.config["workers"]), r.config.get("batch_size"))
                           for r in members})
        for workers, batch in settings:
            mine = [r for r in members
                    if (int(r.config["workers"]), r.config.get("batch_size")) == (workers, batch)]
            out.append(_command(sweep_dir, mine, workers, batch, order))
    return out


def _command(sweep_dir, runs: list[Run], workers: int, batch, order: list[str]) -> str:
    first: dict[str, Run] = {}
    for run in runs:
        first.setdefault(run.method, run)
    methods = [m for m in order if m in first] + [m for m in first if m not in order]
    own = {m: own_fields(first[m]) for m in methods}
    shared = dict(set.intersection(*(set((k, value_text(v)) for k, v in o.items())
                                     for o in own.values())))
    parts = ["dist-quant", "sweep", str(sweep_dir)]
    if any(r.point.get("runner") == "cluster" for r in runs):
        parts.append("--cluster")
    for m in methods:
        fields = ",".join(f"{k}={value_text(v)}" for k, v in own[m].items() if k not in shared)
        label = first[m].point["label"]
        parts += ["-m", f"{label}:{fields}" if fields or first[m].point.get("preset") is None
                  else label]
    parts += ["--rate", link_values([r.point.get("rate_mbit") for r in runs])]
    latencies = [float(r.point.get("latency_ms") or 0.0) for r in runs]
    if any(latencies):
        parts += ["--latency", link_values(latencies)]
    losses = [float(r.point.get("loss_pct") or 0.0) for r in runs]
    if any(losses):
        parts += ["--loss", link_values(losses)]
    parts += ["--set", f"workers={workers}"]
    if batch is not None:
        parts += ["--set", f"batch_size={batch}"]
    parts += ["--seeds", ",".join(str(s) for s in sorted({r.config.get("seed", 0) for r in runs}))]
    for k, v in sorted(shared.items()):
        parts += ["--set", f"{k}={v}"]
    return shlex.join(parts)


def counted(values: list[str]) -> list[str]:
    """Each distinct value once, with how many runs hold it where they differ."""
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    if len(counts) == 1:
        return list(counts)
    return [f"{v} ({n} run{'s' if n > 1 else ''})" for v, n in counts.items()]


def machines(runs: list[Run]) -> list[str]:
    """The machines the runs name (config.json ``machine``)."""
    found = []
    for run in runs:
        m = run.meta.get("machine")
        found.append(f"{m.get('cpu', '?')}, {m.get('logical_cpus', '?')} logical CPUs" if m
                     else "not recorded (written before config.json named the CPU)")
    return counted(found)


def commits(runs: list[Run]) -> list[str]:
    return counted([str(r.meta.get("git_commit") or "not recorded")[:12] for r in runs])


def versions(runs: list[Run]) -> list[str]:
    out = []
    for run in runs:
        v = run.meta.get("versions") or {}
        out.append(", ".join(f"{k} {v[k]}" for k in sorted(v)) or "not recorded")
    return counted(out)
