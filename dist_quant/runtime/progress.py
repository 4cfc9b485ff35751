"""The progress bar of rank 0 and the one-line summary that ends every run.

On a terminal the bar is redrawn in place (at most ten times a second) on stderr::

    [####......] 270/600  train loss 1.234  test acc 61.3%  up 0.61 MB  down 5.39 MB  0:12, ETA 0:15

``train loss`` is the training loss of the step (the mean over the workers' minibatches),
``test acc`` the latest evaluation's; then the time elapsed and the ETA, which extrapolates the
steps run so far. A dilated cluster run (``--dilate F``) draws both in dilated time: the
machine's seconds / F (:mod:`dist_quant.cluster.dilation`).

Elsewhere (logs, pipes) one such line is printed per evaluation instead; ``DIST_QUANT_TTY=1``
in the environment means a terminal (the launcher sets it for the ranks when its own stderr
is one: their stderr reaches it through a pipe). The bar is hand-made rather than click's or
tqdm's because it must draw the same line from a process whose stream is a pipe, and print one
clean line per evaluation (not per redraw) when nobody watches. The summary line goes to
stdout, names the method the same way for the parameter server and DDP, and says when the run
stopped before ``--steps``::

    ps onebit: test accuracy 72.4% | up 0.71 MB, down 89.9 MB | uplink 1/30.5 of fp32 (3.28%) | ...
    ddp fp32: test accuracy 73.0% | up 101.2 MB, down 99.8 MB | uplink 1/1.0 of fp32 (100.00%) | ...
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, TextIO

MB = 1e6
WIDTH = 10


class Progress:
    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None,
                 dilate: float = 1.0):
        self.total, self.enabled = int(total), bool(enabled)
        self.dilate = float(dilate)   # elapsed and ETA are the wall seconds / dilate
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() or os.environ.get("DIST_QUANT_TTY") == "1"
        self.last_draw = 0.0
        self.last_acc = float("nan")
        self.drawn = False
        self.started = time.monotonic()
        self.first_step: int | None = None   # the step before the first one drawn (a resume)
        self.latest = 0

    def line(self, step: int, loss: float, acc: float, up: int, down: int) -> str:
        done = int(WIDTH * step / max(self.total, 1))
        acc_text = "  -  " if math.isnan(acc) else f"{100 * acc:.1f}%"
        self.seen(step)
        elapsed = (time.monotonic() - self.started) / self.dilate
        ran = self.latest - self.first_step
        eta = clock(elapsed / ran * (self.total - self.latest)) if ran > 0 else "-"
        return (f"[{'#' * done}{'.' * (WIDTH - done)}] {step:>{len(str(self.total))}}/"
                f"{self.total}  train loss {loss:.3f}  test acc {acc_text}  up {up / MB:.2f} MB"
                f"  down {down / MB:.2f} MB  {clock(elapsed)}, ETA {eta}")

    def seen(self, step: int) -> None:
        """Note a step that ran (the ETA extrapolates from the first to the latest)."""
        if self.first_step is None:
            self.first_step = step - 1
        # a lagged evaluation's line names an earlier step than the latest: time from that
        self.latest = max(self.latest, step)

    def update(self, step: int, loss: float, acc: float, up: int, down: int) -> None:
        if not self.enabled:
            return
        self.seen(step)
        new_eval = not (math.isnan(acc) or acc == self.last_acc) or step == self.total
        self.last_acc = acc
        if self.tty:
            now = time.monotonic()
            if now - self.last_draw >= 0.1 or step == self.total:
                self.stream.write("\r" + self.line(step, loss, acc, up, down))
                self.stream.flush()
                self.last_draw, self.drawn = now, True
        elif new_eval:
            self.stream.write(self.line(step, loss, acc, up, down) + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def clock(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def method_name(summary: dict[str, Any]) -> str:
    """The method of a run in a few words, the same way for both jobs: ``ps onebit``,
    ``ps sign, downlink kbit``, ``ddp fp32``, ``ddp powersgd``, ``ddp onebit`` (the hook)."""
    def name(compressor: str) -> str:
        return "fp32" if compressor == "none" else compressor

    words = f"{summary.get('method', 'ps')} {name(summary.get('compressor', 'none'))}"
    if summary.get("downlink", "none") != "none":
        words += f", downlink {name(summary['downlink'])}"
    return words


def summary_line(summary: dict[str, Any]) -> str:
    """The method, then accuracy, MB up and down and the uplink's ratio to fp32, in one line."""
    up, down = summary["bytes_up"], summary["bytes_down"]
    fp32_up, fp32_down = summary["fp32_bytes_up"], summary["fp32_bytes_down"]
    ratio = up / fp32_up if fp32_up else float("nan")
    quality = f"test accuracy {100 * summary['test_accuracy']:.1f}%"
    if "test_bits_per_byte" in summary:   # the text task
        quality = (f"next-byte accuracy {100 * summary['test_accuracy']:.1f}%, "
                   f"{summary['test_bits_per_byte']:.3f} bits/byte")
    parts = [quality,
             f"up {up / MB:.2f} MB, down {down / MB:.2f} MB",
             f"uplink 1/{1 / ratio:.1f} of fp32 ({100 * ratio:.2f}%)" if ratio else "uplink 0",
             f"downlink {100 * down / fp32_down:.1f}% of fp32" if fp32_down else "",
             f"{summary['steps']} steps, {summary['workers']} workers, "
             f"{summary['params']} params, {summary['wall_seconds']:.1f} s"]
    if summary.get("clock") == "dedicated":   # the modelled cluster's time beside this machine's
        at = summary.get("model_time_to_target")
        parts.append(f"modelled {summary['model_seconds']:.1f} s on {summary['model_link']}"
                     + (f", to target {at:.1f} s" if at is not None else "")
                     + (f", hosts x{summary['host_speed']:g}"
                        if summary.get("host_speed", 1) != 1 else ""))
    if "staleness_mean" in summary:  # an asynchronous run: how old, and whose, its gradients
        applied = summary["applied_per_worker"]
        share = "/".join(f"{100 * a / max(1, sum(applied)):.0f}" for a in applied)
        dropped = sum(summary["dropped_per_worker"])
        mode = summary["consistency"] + (
            f" K={summary['staleness_bound']}" if summary["consistency"] == "ssp" else
            f" B={summary['backup_workers']}" if summary.get("backup_workers") else "")
        parts.append(f"{mode}: staleness {summary['staleness_mean']:.2f} "
                     f"mean, applied {share}% per worker"
                     + (f", {dropped} dropped" if dropped else ""))
        lost = summary.get("lost_workers") or []
        if lost:
            parts.append("lost " + ", ".join(f"worker {d['worker']} at step {d['step']}"
                                             for d in lost)
                         + f": ended with {summary['workers_at_end']} workers")
    if summary.get("stopped_early"):
        at = summary.get("stop_eval_step")
        lagged = f" at the evaluation of step {at}" if at not in (None, summary["steps"]) else ""
        which = "--stop-loss" if summary.get("stop_loss") else "--stop-accuracy"
        parts.append(f"stopped early at step {summary['steps']}: {which} reached"
                     + lagged)
    return f"{method_name(summary)}: " + " | ".join(p for p in parts if p)
