#!/usr/bin/env bash
# The dated stragglers record of issue 17: W = 4 workers on the namespace cluster (needs root),
# 10 Mbit/s links, MNIST-1D, target 68%, three cases:
#
#   even         every link at 10 Mbit/s, every worker at its own speed
#   slowlink     worker 1 on a 1 Mbit/s link (--worker-rate 1=1)
#   slowcompute  worker 1 computing 4 times slower (--slow-worker 1=4)
#
# Methods: the parameter server's 1-bit uplink with the star's best downlink (sign in buckets of
# 512, fp16 headers) under sync, backup workers B = 1, ssp K = 2 and 8, async, and the preset
# ps-tolerant; DDP fp32, DDP PowerSGD and this project's 1-bit DDP hook on the same links.
#
#   benchmarks/stragglers_record.sh                # seeds 0-2 (hours on 2 cores)
#   SEEDS=0 benchmarks/stragglers_record.sh        # one seed first
#
# Every case is a resumable `dist-quant sweep`: run the script again after an interruption and
# only the points not done yet run. Overrides (environment): DATE (default today, UTC), RUNS,
# OUT, SEEDS, CASES (any of "even slowlink slowcompute"), STAGES ("record plot"), METHODS
# (space-separated -m specs), SWEEP_FLAGS (e.g. "--dry-run").
set -euo pipefail

DATE=${DATE:-$(date -u +%F)}
RUNS=${RUNS:-runs/stragglers-$DATE}
OUT=${OUT:-benchmarks/stragglers-$DATE}
SEEDS=${SEEDS:-0,1,2}
CASES=${CASES:-even slowlink slowcompute}
STAGES=${STAGES:-record plot}
TARGET=0.68
# the star's best setting of the 2026-11-26 record
STAR='header_dtype=fp16,downlink_bucket_size=512'
METHODS=${METHODS:-"ps-sync:$STAR ps-backup1:$STAR,backup_workers=1
ps-ssp2:$STAR,consistency=ssp,staleness=2 ps-ssp8:$STAR,consistency=ssp,staleness=8
ps-async:$STAR,consistency=async ps-tolerant ddp-fp32 ddp-powersgd ddp-onebit"}
# the labels other than presets start from ps-onebit-updown (1-bit up, sign down)
flags() {
    for m in $1; do
        case $m in
            ps-tolerant|ddp-*) printf -- '-m\n%s\n' "$m" ;;
            *) printf -- '-m\n%s\n' "${m%%:*}:method=ps,compressor=onebit,downlink=sign,${m#*:}" ;;
        esac
    done
}
mapfile -t METHOD_FLAGS < <(flags "$METHODS")

has() { [[ " $STAGES " == *" $1 "* ]]; }

case_flags() {
    case $1 in
        even) ;;
        slowlink) echo "--worker-rate 1=1" ;;
        slowcompute) echo "--slow-worker 1=4" ;;
        *) echo "unknown case $1" >&2; exit 2 ;;
    esac
}

if has record; then
    for c in $CASES; do
        # shellcheck disable=SC2046  # the case's options are several words
        dist-quant sweep "$RUNS/$c" --cluster "${METHOD_FLAGS[@]}" --rate 10 $(case_flags "$c") \
            --set workers=4 --set eval_every=25 --set stop_accuracy=$TARGET --seeds "$SEEDS" \
            --no-progress ${SWEEP_FLAGS:-}
    done
fi
if has plot; then
    for c in $CASES; do
        if [[ -d "$RUNS/$c" ]]; then
            dist-quant plot "$RUNS/$c" --out "$OUT/$c" --target $TARGET
        fi
    done
    python benchmarks/stragglers_table.py "$RUNS" --target $TARGET > "$OUT/table.md"
fi
