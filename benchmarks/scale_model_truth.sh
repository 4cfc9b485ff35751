#!/usr/bin/env bash
# Ground truth and load for benchmarks/scale-model-2026-12-07 (root: the namespace cluster).
#   benchmarks/scale_model_truth.sh OUT
# 1. W = 1 (a server and one worker; onebit up, sign down; batch 2048) on the namespace cluster
#    at 1 and 10 Mbit/s and uncapped, each re-timed afterwards on the modelled clock of the same
#    link by scale_model_truth.py (the cluster's --rate is its real link: --clock dedicated
#    belongs to --simulate).
# 2. The modelled run of W = 4, 10 Mbit/s, ps-colocated, seed 0 alone, then with two
#    CPU-bound processes beside it (killed afterwards).
set -euo pipefail
out=${1:?OUT dir}
load() { echo "load $(cut -d' ' -f1-3 /proc/loadavg) at $(date -u +%FT%TZ)"; }
job=(--workers 1 --batch-size 2048 --downlink sign --steps 1000 --eval-every 25 --eval-lag 0
     --stop-accuracy 0.68 --seed 0 --no-progress)
for r in 1 10; do
  load; dist-quant cluster "${job[@]}" --rate "$r" --run-dir "$out/truth/w1-${r}mbit"; load
done
load; dist-quant cluster "${job[@]}" --run-dir "$out/truth/w1-uncapped"; load
sweep=(-m ps-colocated:simulate=true --set workers=4 --set batch_size=512 --seeds 0
       --set steps=1000 --set eval_every=25 --set stop_accuracy=0.68 --set clock=dedicated
       --set rate=10 --no-progress)
load; dist-quant sweep "$out/load/alone" "${sweep[@]}"; load
python -c 'while True: pass' & a=$!
python -c 'while True: pass' & b=$!
trap 'kill "$a" "$b" 2>/dev/null || true' EXIT
sleep 5
load; dist-quant sweep "$out/load/two-busy" "${sweep[@]}"; load
