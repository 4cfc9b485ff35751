"""What the compression noise costs in steps: the convergence record (``--simulate``, no link).

Each method runs ``--steps`` synchronous steps in one process (the single-process reference of
the parameter-server job: the same parameters as the distributed run, bit for bit), evaluating
every ``--eval-every`` steps without stopping, once per seed. The record gives, per method, the
uplink's bits per coordinate (one payload of the whole vector, headers and the fixed payload
header included), the downlink's, the first evaluated step at or above ``--target`` per seed
and their mean, and the final accuracy per seed and its mean.

    python benchmarks/convergence_record.py --out benchmarks/convergence-DATE \\
        --seeds 0,1,2 --steps 1000 [--only LABEL ...] [--stop-at-target]

Writes ``results.jsonl`` (one line per method and seed, appended as each run ends, so an
interrupted record keeps what it has and a rerun skips what is there) and ``table.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from dist_quant.config import TrainConfig
from dist_quant.runner.simulate import run_simulate
from dist_quant.runtime.metrics import read_metrics

FP16 = {"header_dtype": "fp16"}
METHODS: dict[str, dict] = {
    "fp32": {"compressor": "none"},
    # what closes the gap (at most 2.1 bits per coordinate up)
    "kbit 2 b512 fp16": {"compressor": "kbit", "bits": 2, "bucket_size": 512, **FP16},
    "sign b32 fp16 + EF, worker momentum": {"compressor": "sign", "bucket_size": 32,
                                            "error_feedback": True, "worker_momentum": True,
                                            **FP16},
    "sign b16 fp16 + EF": {"compressor": "sign", "bucket_size": 16, "error_feedback": True,
                           **FP16},
    # the cited ones
    "onebit b128": {"compressor": "onebit", "bucket_size": 128},
    "onebit b512": {"compressor": "onebit", "bucket_size": 512},
    "sign b128 + EF": {"compressor": "sign", "bucket_size": 128, "error_feedback": True},
    "sign b128 + EF21 shifts": {"compressor": "sign", "bucket_size": 128, "shift_rate": "1"},
    "kbit 2 b128": {"compressor": "kbit", "bits": 2, "bucket_size": 128},
    "onebit b128 fp16 + DIANA shifts (auto)": {"compressor": "onebit", "bucket_size": 128,
                                               "shift_rate": "auto", **FP16},
    "qsgd s=4 b128": {"compressor": "qsgd", "qsgd_levels": 4, "bucket_size": 128},
    "top-1% + EF": {"compressor": "topk", "sparsity_ratio": 0.01, "error_feedback": True},
}


def run_one(label: str, seed: int, steps: int, eval_every: int, target: float,
            stop: bool = False) -> dict:
    cfg = TrainConfig(**{**METHODS[label], "steps": steps, "eval_every": eval_every,
                         "seed": seed, "simulate": True, "progress": False,
                         "stop_accuracy": target if stop else 0.0}).validate()
    run_dir = Path(tempfile.mkdtemp(prefix="convergence-"))
    try:
        summary = run_simulate(cfg, torch.device("cpu"), str(run_dir / "run"))
        evals = [r for r in read_metrics(run_dir / "run") if r["kind"] == "eval"]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    hit = next((r["step"] for r in evals if r["test_accuracy"] >= target), None)
    n = summary["params"]
    return {"label": label, "seed": seed, "steps": steps, "eval_every": eval_every,
            "target": target, "steps_to_target": hit, "steps_run": summary["steps"],
            # the accuracy after all --steps (None when the run stopped at the target)
            "final_accuracy": None if summary.get("stopped_early") else summary["test_accuracy"],
            "bits_up": 8 * summary["payload_nbytes_up"] / n,
            "bits_down": 8 * summary["payload_nbytes_down"] / n,
            "config": METHODS[label]}


def table(rows: list[dict]) -> str:
    out = ["| method | bits/coord up | steps to target per seed | mean | final accuracy per "
           "seed | mean |", "|---|---:|---|---:|---|---:|"]
    for label in METHODS:
        mine = sorted((r for r in rows if r["label"] == label), key=lambda r: r["seed"])
        if not mine:
            continue
        hits = [r["steps_to_target"] for r in mine]
        accs = [r["final_accuracy"] for r in mine]
        mean = (f"{sum(hits) / len(hits):.0f}" if all(h is not None for h in hits) else "-")
        shown = ", ".join("-" if a is None else f"{100 * a:.1f}" for a in accs)
        full = [a for a in accs if a is not None]
        acc_mean = f"{100 * sum(full) / len(full):.1f}%" if len(full) == len(accs) else "-"
        out.append(f"| {label} | {mine[0]['bits_up']:.3f} | "
                   f"{', '.join('never' if h is None else str(h) for h in hits)} | {mean} | "
                   f"{shown} | {acc_mean} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--target", type=float, default=0.68)
    ap.add_argument("--only", action="append", choices=list(METHODS))
    ap.add_argument("--stop-at-target", action="store_true",
                    help="stop each run at the target (steps to target only, no final accuracy)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    rows = ([json.loads(x) for x in results.read_text().splitlines() if x.strip()]
            if results.exists() else [])
    done = {(r["label"], r["seed"]) for r in rows}
    for label in args.only or METHODS:
        for seed in (int(s) for s in args.seeds.split(",")):
            if (label, seed) in done:
                continue
            row = run_one(label, seed, args.steps, args.eval_every, args.target,
                          args.stop_at_target)
            rows.append(row)
            with results.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps({k: row[k] for k in ("label", "seed", "steps_to_target",
                                                   "final_accuracy")}), flush=True)
    (out / "table.md").write_text(table(rows))


if __name__ == "__main__":
    main()
