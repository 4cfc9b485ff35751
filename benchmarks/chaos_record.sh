#!/usr/bin/env bash
# The chaos acceptance: synchronous jobs with 3 random faults each must end equal to the
# undisturbed run, bit for bit (LOCAL jobs on this machine's torchrun: kill, stop; NETNS jobs
# on the namespace cluster, needs root: stop, partition), and asynchronous jobs that lose a
# worker's host under --min-workers must end equal to the replay of their record.
#
#   benchmarks/chaos_record.sh [RUNS]        # default runs/chaos-DATE
#
# Overrides (environment): LOCAL (default "1 2 3 4 5 6 7": chaos seeds of the local sync
# jobs), NETNS (default "8 9 10"), ASYNC (default "1 2 3 4 5"), STEPS (default 300).
# One line per job: its seed, exit status and seconds; the job's own lines in RUNS/*.log.
set -uo pipefail

RUNS=${1:-runs/chaos-$(date -u +%F)}
LOCAL=${LOCAL:-1 2 3 4 5 6 7}
NETNS=${NETNS:-8 9 10}
ASYNC=${ASYNC:-1 2 3 4 5}
STEPS=${STEPS:-300}
TINY=(--hidden 7,5 --train-size 120 --test-size 30 --batch-size 4 --bucket-size 5
      --steps "$STEPS" --eval-every 50)
export OMP_NUM_THREADS=1
mkdir -p "$RUNS"
uptime
job() {   # NAME SEED ARGS...
    local name=$1 seed=$2 t0 code=0
    shift 2
    t0=$(date +%s)
    dist-quant chaos --chaos-seed "$seed" --run-dir "$RUNS/$name" "$@" > "$RUNS/$name.log" 2>&1 ||
        code=$?
    echo "$name: exit $code, $(( $(date +%s) - t0 )) s; $(tail -n 1 "$RUNS/$name.log")"
}
for s in $LOCAL; do
    job "sync-local-s$s" "$s" --workers 2 "${TINY[@]}" --timeout 20 --max-restarts 3
done
for s in $NETNS; do
    job "sync-netns-s$s" "$s" --engine netns --rate 100 --workers 2 "${TINY[@]}" --timeout 30 \
        --max-restarts 3
done
for s in $ASYNC; do
    job "async-netns-s$s" "$s" --engine netns --rate 100 --workers 3 --consistency async \
        --min-workers 2 "${TINY[@]}" --timeout 30
done
uptime
