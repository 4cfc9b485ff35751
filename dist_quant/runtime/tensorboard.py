"""TensorBoard event files beside ``metrics.jsonl`` (``--tensorboard`` or
``DIST_QUANT_TENSORBOARD=1``).

Every step and evaluation line that :class:`~dist_quant.runtime.metrics.RunRecorder` writes is also
written as scalars through ``torch.utils.tensorboard.SummaryWriter`` into the run directory
(``tensorboard --logdir RUN_DIR``), at the line's step:

- step lines: ``train/loss``, ``train/lr``, ``bytes/up``, ``bytes/down``, ``bytes/cum_up``,
  ``bytes/cum_down``, ``time/<phase>`` for each phase of ``time`` (and ``time/overlap``,
  ``time/overlap_down`` where recorded), ``train/skipped``, ``train/staleness`` where a line
  has one;
- eval lines: ``test/loss``, ``test/accuracy``, ``bytes/eval_cum_up``, ``bytes/eval_cum_down``.

The numbers are the lines' numbers (TensorBoard stores float32). It needs the ``tensorboard``
package (the ``tensorboard`` extra: ``pip install 'dist-quant[tensorboard]'``); asking for it
without the package is refused before the run starts (:func:`check_available`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dist_quant.config import TENSORBOARD_ENV as ENV  # noqa: F401 (re-exported)
from dist_quant.config import tensorboard_missing as missing  # noqa: F401 (re-exported)
from dist_quant.config import tensorboard_requested as requested


def step_scalars(rec: dict[str, Any]) -> dict[str, float]:
    """The scalars of one ``metrics.jsonl`` line, by tag."""
    if rec.get("kind") == "eval":
        return {"test/loss": rec["test_loss"], "test/accuracy": rec["test_accuracy"],
                "bytes/eval_cum_up": rec["cum_bytes_up"],
                "bytes/eval_cum_down": rec["cum_bytes_down"]}
    out = {"train/loss": rec["loss"], "bytes/up": rec["bytes_up"],
           "bytes/down": rec["bytes_down"], "bytes/cum_up": rec["cum_bytes_up"],
           "bytes/cum_down": rec["cum_bytes_down"], "train/skipped": rec.get("skipped", 0)}
    if "lr" in rec:
        out["train/lr"] = rec["lr"]
    for phase, seconds in rec.get("time", {}).items():
        out[f"time/{phase}"] = seconds
    for key in ("time_overlap", "time_overlap_down"):
        if key in rec:
            out[f"time/{key[5:]}"] = rec[key]
    if "staleness" in rec:
        out["train/staleness"] = rec["staleness"]
    return {k: float(v) for k, v in out.items()}


class EventWriter:
    """Writes each recorded line's scalars into ``run_dir``'s event file."""

    def __init__(self, run_dir: str | Path, purge_step: int | None = None):
        why = missing()
        if why:
            raise RuntimeError(f"--tensorboard {why}")
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run drops the events past its checkpoint, as metrics.jsonl drops its lines
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)

    def record(self, rec: dict[str, Any]) -> None:
        for tag, value in step_scalars(rec).items():
            self.writer.add_scalar(tag, value, global_step=int(rec["step"]))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def open_writer(run_dir: str | Path, config: dict[str, Any],
                resume_step: int | None = None) -> EventWriter | None:
    """An :class:`EventWriter` if the run asked for one, else None."""
    if not requested(config):
        return None
    return EventWriter(run_dir, None if resume_step is None else resume_step + 1)


def read_scalars(run_dir: str | Path) -> dict[str, dict[int, float]]:
    """Every scalar of the run directory's event files: ``{tag: {step: value}}`` (the last
    value written for a step wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
