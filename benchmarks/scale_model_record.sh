#!/usr/bin/env bash
# The runs of benchmarks/scale-model-2026-12-07 ("where compression pays"): one run per
# (W, method, seed) with a global batch of 2048 (batch_size = 2048 / W), stopped at 68% test
# accuracy; the PS methods in one process (--simulate), the DDP baselines under torchrun; every
# run on the modelled clock (--clock dedicated at 10 Mbit/s; `dist-quant retime` re-times the
# recorded steps for the other links and host speeds).
#   benchmarks/scale_model_record.sh OUT "4 8 16 32" [SEEDS]   (METHODS=... to pick methods)
set -euo pipefail
out=${1:?OUT dir}
ws=${2:-"4 8 16 32 64"}
seeds=${3:-0}
methods=${METHODS:-"ddp-fp32 ddp-powersgd ps-colocated:simulate=true ps-fast:simulate=true"}
for w in $ws; do
  m=()
  for method in $methods; do m+=(-m "$method"); done
  echo "== W=$w $(date -u +%FT%TZ) load: $(cut -d' ' -f1-3 /proc/loadavg)"
  dist-quant sweep "$out/w$w" "${m[@]}" --set workers="$w" --set batch_size=$((2048 / w)) \
    --seeds "$seeds" --set steps=1000 --set eval_every=25 --set stop_accuracy=0.68 \
    --set clock=dedicated --set rate=10 --no-progress || true
  echo "== W=$w done $(date -u +%FT%TZ) load: $(cut -d' ' -f1-3 /proc/loadavg)"
done
