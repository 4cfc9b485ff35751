"""The same points on the namespace cluster and as containers: time per step, side by side.

Run from the repository root (not part of the test suite)::

    python benchmarks/engines.py NETNS_SWEEP COMPOSE_SWEEP [--skip 10]

Each argument is a ``dist-quant sweep`` directory; points are matched by method label. For
each, the mean step time and its ``communicate`` phase (:func:`phase_share.phase_means`:
evaluation steps and the first ``--skip`` steps left out), the containers' figures over the
namespaces', the test loss of both (a synchronous job ends the same on both engines) and the
bytes on the wire per direction from ``wire.json``. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from phase_share import PHASES, phase_means  # noqa: E402


def points(sweep: Path) -> dict[str, Path]:
    """Method label -> run directory of every finished point."""
    out = {}
    for point in sorted(sweep.glob("*/point.json")):
        if (point.parent / "summary.json").is_file():
            out[json.loads(point.read_text())["label"]] = point.parent
    return out


def figures(run: Path, skip: int) -> dict[str, float]:
    means, kept = phase_means(run, skip)
    summary = json.loads((run / "summary.json").read_text())
    wire = json.loads((run / "wire.json").read_text())
    return {"step": sum(means[p] for p in PHASES), "communicate": means["communicate"],
            "kept": kept, "test_loss": summary["test_loss"],
            "wire_up": wire["wire_bytes_up"], "wire_down": wire["wire_bytes_down"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("netns", type=Path)
    ap.add_argument("compose", type=Path)
    ap.add_argument("--skip", type=int, default=10)
    args = ap.parse_args()
    a, b = points(args.netns), points(args.compose)
    print("| method | step, netns (ms) | step, compose (ms) | ratio | communicate, netns (ms) "
          "| communicate, compose (ms) | ratio | same test loss | wire MB up/down, netns "
          "| wire MB up/down, compose |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|---|")
    for label in sorted(set(a) & set(b)):
        x, y = figures(a[label], args.skip), figures(b[label], args.skip)
        print(f"| {label} | {1e3 * x['step']:.1f} | {1e3 * y['step']:.1f} | "
              f"{y['step'] / x['step']:.2f} | {1e3 * x['communicate']:.1f} | "
              f"{1e3 * y['communicate']:.1f} | {y['communicate'] / x['communicate']:.2f} | "
              f"{'yes' if x['test_loss'] == y['test_loss'] else 'no'} | "
              f"{x['wire_up'] / 1e6:.2f} / {x['wire_down'] / 1e6:.2f} | "
              f"{y['wire_up'] / 1e6:.2f} / {y['wire_down'] / 1e6:.2f} |")


if __name__ == "__main__":
    main()
