"""``staleness.png``: how old the gradients of asynchronous runs were, and whose they were.

Reads the ``update`` lines of ``metrics.jsonl`` (one per gradient that arrived; written by
``--consistency ssp|async`` and ``--backup-workers``, :mod:`dist_quant.ps.async_rank`). One row
per link; left, the share of the applied gradients at each staleness (the updates that landed
between a gradient's read and its write), the mean in the legend; right, the share of the
applied gradients each worker computed, and dotted the share it sent that was dropped. Seeds of
one method are pooled. Synchronous runs record no such lines and are left out.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from dist_quant.plot.runs import Run
from dist_quant.runtime.metrics import read_metrics


def gradient_lines(run: Run) -> list[dict]:
    return [r for r in read_metrics(run.path) if r.get("kind") == "update"]


def pooled(runs: list[Run]) -> dict[str, dict]:
    """Per label: staleness counts, applied and dropped gradients per worker."""
    out: dict[str, dict] = {}
    for run in runs:
        lines = gradient_lines(run)
        if not lines:
            continue
        label = run.label.split(" #")[0]
        entry = out.setdefault(label, {"staleness": Counter(), "applied": Counter(),
                                       "dropped": Counter()})
        for r in lines:
            if r["applied"] is None:
                entry["dropped"][r["worker"]] += 1
            else:
                entry["staleness"][r["staleness"]] += 1
                entry["applied"][r["worker"]] += 1
    return out


def staleness_figure(groups: dict[str, list[Run]], out: Path) -> Path | None:
    """Draw ``out/staleness.png`` (None when no run recorded its gradients)."""
    data = {cap: pooled(runs) for cap, runs in groups.items()}
    data = {cap: d for cap, d in data.items() if d}
    if not data:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(data), 2, figsize=(11, 3.6 * len(data)), squeeze=False)
    for row, (cap, per_label) in enumerate(data.items()):
        left, right = axes[row]
        width = 0.8 / max(1, len(per_label))
        for k, (label, d) in enumerate(sorted(per_label.items())):
            total = sum(d["staleness"].values())
            xs = sorted(d["staleness"])
            mean = sum(s * n for s, n in d["staleness"].items()) / max(1, total)
            line, = left.plot(xs, [d["staleness"][s] / total for s in xs], marker="o",
                              markersize=3, label=f"{label} (mean {mean:.2f})")
            workers = sorted(set(d["applied"]) | set(d["dropped"]))
            sent = sum(d["applied"].values()) + sum(d["dropped"].values())
            pos = [w + (k - (len(per_label) - 1) / 2) * width for w in workers]
            right.bar(pos, [d["applied"][w] / sent for w in workers], width,
                      color=line.get_color())
            right.bar(pos, [d["dropped"][w] / sent for w in workers], width,
                      bottom=[d["applied"][w] / sent for w in workers], fill=False,
                      edgecolor=line.get_color(), linestyle=":")
        left.set_xlabel("staleness (updates between read and write)")
        left.set_ylabel("share of applied gradients")
        left.set_title(cap)
        left.legend(fontsize=7, loc="upper right")
        right.set_xticks(sorted({w for d in per_label.values()
                                 for w in (*d["applied"], *d["dropped"])}))
        right.set_xlabel("worker")
        right.set_ylabel("share of gradients sent (dotted: dropped)")
        right.set_title(f"{cap}: gradients per worker")
    fig.tight_layout()
    path = Path(out) / "staleness.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
