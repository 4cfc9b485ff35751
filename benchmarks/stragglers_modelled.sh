#!/usr/bin/env bash
# The stragglers question on the modelled clock (--clock dedicated): sync PS against
# ps-tolerant, W = 4 on 10 Mbit/s links, with every link even and with worker 1 on a 1 Mbit/s
# link; time to 68% in modelled time, seeds 0-2. Every run takes the calibration of one first
# run, so the methods and cases differ by their steps and bytes only, not by the load of the
# moment each calibrated itself.
#
#   benchmarks/stragglers_modelled.sh [OUT]
set -euo pipefail
OUT=${1:-runs/stragglers-modelled}
SEEDS=${SEEDS:-0,1,2}
STAR='method=ps,compressor=onebit,downlink=sign,header_dtype=fp16,downlink_bucket_size=512'
COMMON=(--set simulate=true --set clock=dedicated --set rate=10 --set workers=4
        --set eval_every=25 --set stop_accuracy=0.68 --seeds "$SEEDS" --no-progress)
# one calibration for every run
if [ ! -f "$OUT/calibration/calibration.json" ]; then
    dist-quant train --simulate --clock dedicated --rate 10 --workers 4 --steps 2 \
        --eval-every 1 --run-dir "$OUT/calibration" --no-progress
fi
CAL=(--set "calibration=$OUT/calibration")
dist-quant sweep "$OUT/even" -m "ps-sync:$STAR" -m ps-tolerant "${COMMON[@]}" "${CAL[@]}"
dist-quant sweep "$OUT/slowlink" -m "ps-sync:$STAR" -m ps-tolerant "${COMMON[@]}" "${CAL[@]}" \
    --set "worker_rate=1=1"
# the table: modelled time to 68% (the summary's model_time_to_target) per case, method, seed
python - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
rows = {}
for s in sorted(Path(sys.argv[1]).glob("*/*/summary.json")):
    case, point = s.parent.parent.name, json.loads((s.parent / "point.json").read_text())
    summary = json.loads(s.read_text())
    seed = json.loads((s.parent / "config.json").read_text())["config"]["seed"]
    rows.setdefault((case, point["label"]), []).append(
        (seed, summary["steps"], summary.get("model_time_to_target"),
         summary["model_seconds"] / max(1, summary["steps"])))
print("| case | method | seeds | steps to 68% | modelled s to 68% (mean [min-max]) | modelled ms/step |")
print("|---|---|---|---|---|---|")
for (case, label), runs in sorted(rows.items()):
    times = [t for _, _, t, _ in runs if t is not None]
    span = (f"{statistics.mean(times):.2f} [{min(times):.2f}-{max(times):.2f}]"
            if times else "not reached")
    print(f"| {case} | {label} | {len(runs)} | {'/'.join(str(s) for _, s, _, _ in runs)} "
          f"| {span} | {1000 * statistics.mean(m for *_, m in runs):.1f} |")
PY
