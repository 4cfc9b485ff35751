#!/usr/bin/env bash
# The runs of benchmarks/workloads-2026-12-07: for each task, W = 4, seeds 0-2, the uplinks of
# issue "Beyond one MLP" (fp32, the 1-bit rule in buckets of 128, ps-fast's uplink, sign with
# error feedback: each on the star with an fp32 downlink), the whole ps-fast preset (not for
# the transformer: its worker momentum needs SGD), and DDP PowerSGD; every run to its budget
# (no early stop: the final quality is the budget's),
# evaluated every 25 steps, on the modelled clock at 10 Mbit/s.
# The PS methods run in one process (--simulate), DDP under torchrun.
#   benchmarks/workloads_record.sh OUT [TASKS]       (SEEDS=0,1,2; PS=1 / DDP=1: only those)
set -euo pipefail
out=${1:?OUT dir}
tasks=${2:-"mnist1d-mlp shapes-cnn text-transformer"}
seeds=${SEEDS:-0,1,2}
# ps-fast's uplink: scaled sign in buckets of 32, fp16 scales, error feedback on each worker's
# own momentum. AdamW keeps its moments on the server, so under the transformer's AdamW the
# worker momentum is left out (sign, buckets of 32, fp16 scales, error feedback), and the
# 1-bit Adam recipe (error feedback, variance frozen after 100 steps) is run beside it, with
# the 1-bit rule and with scaled sign (error feedback needs a contractive compressor). Budgets: 600 steps (MLP, CNN), 300 (the transformer: 2-3 s a step here).
UP="method=ps,compressor=sign,bucket_size=32,header_dtype=fp16,error_feedback=true"
UP+=",shift_rate=0,downlink=none,simulate=true"
ddp=(-m ddp-powersgd)
for task in $tasks; do
  ps=(-m ps-fp32:simulate=true -m ps-onebit:simulate=true -m ps-sign-ef:simulate=true)
  case $task in
    mnist1d-mlp) own=(--set steps=600 --set eval_every=25) ;;
    shapes-cnn) own=(--set eval_every=25) ;;      # the task's defaults: 600 steps, cosine
    text-transformer) own=(--set steps=300 --set eval_every=25) ;;   # AdamW 1e-3, batch 16
  esac
  if [ "$task" = text-transformer ]; then
    ps+=(-m "ps-fast-up:$UP"
         -m ps-onebit-adam:simulate=true,compressor=onebit,error_feedback=true,onebit_adam_warmup=100
         -m ps-sign-adam:simulate=true,compressor=sign,error_feedback=true,onebit_adam_warmup=100)
  else
    ps+=(-m "ps-fast-up:$UP,worker_momentum=true" -m ps-fast:simulate=true)
  fi
  m=()
  [ "${DDP:-0}" = 1 ] || m+=("${ps[@]}")
  [ "${PS:-0}" = 1 ] || m+=("${ddp[@]}")
  echo "== $task $(date -u +%FT%TZ) load: $(cut -d' ' -f1-3 /proc/loadavg)"
  dist-quant sweep "$out/$task" "${m[@]}" ${DRY:+--dry-run} --set task="$task" --set workers=4 --seeds "$seeds" \
    "${own[@]}" --set eval_lag=0 --set clock=dedicated --set rate=10 --no-progress || true
  echo "== $task done $(date -u +%FT%TZ) load: $(cut -d' ' -f1-3 /proc/loadavg)"
done
