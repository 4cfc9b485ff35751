#!/usr/bin/env bash
# What a lost worker costs: ps-tolerant (async on the star) with W = 4 on the namespace cluster
# (needs root) at 10 Mbit/s, run as is and with worker 3's host going down at step STEP (every
# process of the host's namespace killed with SIGKILL) under --min-workers 3. Seeds 0-2.
#
#   benchmarks/lost_worker_record.sh [RUNS]      # default runs/lost-worker-DATE
#   dist-quant plot RUNS --target 0.68 --out OUT
#
# Overrides (environment): SEEDS (default "0 1 2"), STEP (default 100).
set -euo pipefail

RUNS=${1:-runs/lost-worker-$(date -u +%F)}
SEEDS=${SEEDS:-0 1 2}
STEP=${STEP:-100}
OPTS=(--workers 4 --rate 10 --compressor onebit --bucket-size 128 --header-dtype fp16
      --downlink sign --downlink-bucket-size 512 --consistency async --momentum 0.5 --lr 1.0
      --eval-every 25 --stop-accuracy 0.68 --steps 1000 --no-progress)
export OMP_NUM_THREADS=1
mkdir -p "$RUNS"
uptime
for s in $SEEDS; do
    dist-quant cluster "${OPTS[@]}" --seed "$s" --run-dir "$RUNS/even-s$s" > "$RUNS/even-s$s.out" 2>&1
    echo "even s$s: exit $?"
    run=$RUNS/lost-s$s
    dist-quant cluster "${OPTS[@]}" --min-workers 3 --seed "$s" --run-dir "$run" \
        > "$RUNS/lost-s$s.out" 2>&1 &
    job=$!
    until [[ -f $run/metrics.jsonl ]] && grep -q "\"step\": $STEP," "$run/metrics.jsonl"; do
        kill -0 "$job" 2> /dev/null || { echo "lost s$s: the job ended before step $STEP"; exit 1; }
        sleep 0.2
    done
    ns=$(ip netns list | awk '{ print $1 }' | grep -- "^dq$job-.*-w4$")
    kill -9 $(ip netns pids "$ns")
    code=0
    wait "$job" || code=$?
    echo "lost s$s: exit $code"
done
uptime
