"""Where a run's checkpoints lie and which one is current: ``<run_dir>/checkpoints/``, its
``step_<t>.pt`` files and the ``latest`` file naming the current one.

Only reading: writing and loading are :mod:`dist_quant.runtime.checkpoint`'s. Kept apart so that
a failed write (:mod:`dist_quant.runtime.diskfault`) can name the newest complete checkpoint
without importing the code that writes them.
"""

from __future__ import annotations

import re
from pathlib import Path

from dist_quant.errors import ConfigError

CHECKPOINT_NAME = re.compile(r"step_(\d+)\.pt")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_files(directory: Path) -> list[Path]:
    """The ``step_<t>.pt`` files of a checkpoint directory, oldest step first."""
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := CHECKPOINT_NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint ``latest`` names; ConfigError(--resume) when there is none."""
    latest = checkpoint_dir(run_dir) / "latest"
    if not latest.is_file():
        raise ConfigError("--resume", f"no checkpoint in {run_dir} (missing {latest})")
    name = latest.read_text(errors="replace").strip()
    if not CHECKPOINT_NAME.fullmatch(name):
        raise ConfigError("--resume", f"{latest} holds {name[:80]!r}, not the name of a "
                          "checkpoint file of its directory (step_<t>.pt)")
    path = latest.parent / name
    if not path.is_file():
        raise ConfigError("--resume", f"{latest} names {path.name}, which does not exist")
    return path
