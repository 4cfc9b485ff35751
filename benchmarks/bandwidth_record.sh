#!/usr/bin/env bash
# The dated bandwidth record of issue 8 (sharded and colocated servers, the 1-bit DDP hook):
# namespace cluster (needs root), MNIST-1D, target 68%, links uncapped / 100 / 10 Mbit/s,
# W = 4 and 8, seven methods, three seeds per point; then the scaling runs (communication per
# step against W = 2, 4, 8 at 10 Mbit/s, and uncapped to measure what is not the cap's, short)
# and the plots and reports of both.
#
#   benchmarks/bandwidth_record.sh                 # the whole record (hours on 2 cores)
#   STAGES=scaling benchmarks/bandwidth_record.sh  # only the scaling runs and their plot
#
# Every stage is a resumable `dist-quant sweep`: run the script again after an interruption and
# only the points not done yet run. Run it on a quiet machine: time to target is wall time.
# Overrides (environment): DATE (default today, UTC), RUNS (sweep directories), OUT (the
# record's folder), SEEDS, RATES, WORKERS, SCALING_WORKERS, SCALING_RATES, SCALING_STEPS, STAGES (any of
# "record scaling plot"), GLOBAL_BATCH, METHODS / SCALING_METHODS (space-separated -m specs), SWEEP_FLAGS
# (extra sweep options: "--dry-run" lists the points and whether they are done; "--set
# steps=20" shortens every run of a trial).
set -euo pipefail

DATE=${DATE:-$(date -u +%F)}
RUNS=${RUNS:-runs/bandwidth-$DATE}
OUT=${OUT:-benchmarks/bandwidth-$DATE}
SEEDS=${SEEDS:-0,1,2}
RATES=${RATES:-none,100,10}
WORKERS=${WORKERS:-4,8}
SCALING_WORKERS=${SCALING_WORKERS:-2,4,8}
SCALING_RATES=${SCALING_RATES:-10,none}
SCALING_STEPS=${SCALING_STEPS:-60}
STAGES=${STAGES:-record scaling plot}
TARGET=0.68
# the star's best setting of the 2026-11-26 record
STAR='ps-onebit-updown:header_dtype=fp16,downlink_bucket_size=512'
METHODS=${METHODS:-ddp-fp32 ddp-fp16 ddp-powersgd ddp-onebit $STAR ps-sharded ps-colocated}
SCALING_METHODS=${SCALING_METHODS:-ddp-fp32 $STAR ps-sharded ps-colocated}

flags() { for m in $1; do printf -- '-m\n%s\n' "$m"; done; }
mapfile -t RECORD_M < <(flags "$METHODS")
mapfile -t SCALING_M < <(flags "$SCALING_METHODS")

has() { [[ " $STAGES " == *" $1 "* ]]; }

# The global batch stays GLOBAL_BATCH examples per step whatever W (512 per worker at W = 4,
# as in the 2026-11-26 record; at W = 8, 512 would exceed a worker's 500-example shard), so
# every W takes the same optimisation path and only the communication differs.
GLOBAL_BATCH=${GLOBAL_BATCH:-2048}

if has record; then
    for w in ${WORKERS//,/ }; do
        dist-quant sweep "$RUNS/record" --cluster "${RECORD_M[@]}" --rate "$RATES" \
            --set workers="$w" --set batch_size=$((GLOBAL_BATCH / w)) --seeds "$SEEDS" \
            --set eval_every=25 --set stop_accuracy=$TARGET --no-progress ${SWEEP_FLAGS:-}
    done
fi
if has scaling; then
    # no early stop: every run makes the same SCALING_STEPS steps
    for w in ${SCALING_WORKERS//,/ }; do
        dist-quant sweep "$RUNS/scaling" --cluster "${SCALING_M[@]}" --rate "$SCALING_RATES" \
            --set workers="$w" --set batch_size=$((GLOBAL_BATCH / w)) --seeds "$SEEDS" \
            --set steps="$SCALING_STEPS" --set eval_every="$SCALING_STEPS" \
            --set stop_accuracy=0 --no-progress ${SWEEP_FLAGS:-}
    done
fi
if has plot; then
    if [[ -d "$RUNS/record" ]]; then
        dist-quant plot "$RUNS/record" --out "$OUT" --target $TARGET
    fi
    if [[ -d "$RUNS/scaling" ]]; then
        dist-quant plot "$RUNS/scaling" --out "$OUT/scaling"
    fi
fi
