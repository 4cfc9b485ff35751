#!/usr/bin/env bash
# One host of a dist_quant cluster: shape this host's link with tc, then start its torchrun agent.
#
# The same script is the Docker entrypoint (docker-compose.yml) and what `dist-quant cluster`
# runs inside each network namespace, so the shaping and launch logic the tests exercise is the
# logic the containers run.
#
#   node.sh shape            shape $DQ_IFACE (both directions) and print the tc commands
#   node.sh launch [ARGS]    exec torchrun -m $DQ_MODULE ARGS for this host
#   node.sh run [ARGS]       shape, then launch (the container entrypoint)
#
# With DQ_LOG_DIR set (the container cluster sets it inside the run directory), `run` keeps
# this host's whole output (tc commands, torchrun's own lines and tracebacks) in
# DQ_LOG_DIR/HOSTNAME.log and prints only dist_quant's own lines (a failing rank's reason, the
# summary), or one line naming the log when torchrun failed without one; it writes the link's
# counters before the launch and after it (HOSTNAME.before.*, HOSTNAME.after.*: /proc/net/dev,
# tc's filter and qdisc statistics as JSON), and exits with the ranks' status as
# `dist-quant train` does: 0 done, 2 a bad option (checked once, before torchrun starts), 1
# anything else. SIGTERM and SIGINT reach torchrun, which stops its ranks.
#
# Environment (defaults in brackets):
#   DQ_IFACE [eth0]       the host's link
#   DQ_RATE_MBIT [0]      rate cap in Mbit/s in each direction; 0 = uncapped
#   DQ_LATENCY_MS [0]     one-way host-to-host latency; each link delays half of it per direction
#   DQ_LOSS_PCT [0]       packet loss on a host-to-host path (applied where packets arrive)
#   DQ_DILATE [1]         time dilation F (dist_quant.cluster.dilation): DQ_RATE_MBIT and
#                         DQ_LATENCY_MS are already the dilated ones; the burst is sized for
#                         the undilated rate (below)
#   DQ_QUEUE_FRAMES [1000]  rate limiter queue in full frames (as deep as a NIC queue)
#   DQ_ROLE               server | worker | colocated (exported as DIST_QUANT_ROLE for the
#                         training job; colocated: a worker that also serves a shard)
#   DQ_NNODES             number of hosts (torchrun agents) in the job
#   DQ_RDZV_HOST          address or name of the rendezvous host (the server; for ddp a worker)
#   DQ_RDZV_PORT [29400]  rendezvous port
#   DQ_RUN_ID [dq]        rendezvous id
#   DQ_MODULE [dist_quant.train]  module every torchrun process runs
#   DQ_TRAIN_ARGS []      more options for the module, split on spaces, after ARGS
#   DQ_PYTHON [python3]   interpreter
#   DQ_LOG_DIR []         where `run` keeps this host's log and counters (see above)
#
# Shaping (R = rate, L = latency, p = loss, B = burst, Q = queue bytes). Egress of the link:
#   tc qdisc add dev IFACE root handle 1: netem delay L/2ms limit 100000        (if L > 0)
#   tc qdisc add dev IFACE parent 1:1 handle 10: tbf rate Rmbit burst B limit Q
#     (the tbf is the root qdisc when there is no netem)
# Ingress of the link, redirected through an ifb device and shaped on its egress the same way
# (the first filter only counts pure TCP ACKs apart, in its action statistics):
#   ip link add ifb-dq type ifb; ip link set dev ifb-dq up
#   tc qdisc add dev IFACE handle ffff: ingress
#   tc filter add dev IFACE parent ffff: prio 1 protocol ip u32 match u16 52 0xffff at 2 \
#       match u8 6 0xff at 9 action mirred egress redirect dev ifb-dq
#   tc filter add dev IFACE parent ffff: prio 2 protocol all u32 match u32 0 0 \
#       action mirred egress redirect dev ifb-dq
#   tc qdisc add dev ifb-dq root handle 1: netem delay L/2ms loss p% limit 100000  (if L or p)
#   tc qdisc add dev ifb-dq parent 1:1 handle 10: tbf rate Rmbit burst B limit Q
# B = max(2 frames, 4 F ms at R) bytes (F = DQ_DILATE: 4 ms at the undilated rate R F, so the
# same bytes as undilated); Q = DQ_QUEUE_FRAMES full frames, in bytes (the same dilated). Also
# `ip link set dev IFACE gso_max_segs 1`, so that every packet the stack hands down is one
# wire frame: tbf meters and the byte counters count real frames with their headers.
set -euo pipefail

IFACE=${DQ_IFACE:-eth0}
IFB=ifb-dq
RATE=${DQ_RATE_MBIT:-0}
LATENCY=${DQ_LATENCY_MS:-0}
LOSS=${DQ_LOSS_PCT:-0}
QUEUE=${DQ_QUEUE_FRAMES:-1000}
DILATE=${DQ_DILATE:-1}

die() { echo "node.sh: $*" >&2; exit 2; }

run() { echo "$*"; "$@"; }

is_number() { [[ $2 =~ ^[0-9]+([.][0-9]+)?$ ]] || die "$1 must be a number >= 0; got '$2'"; }

positive() { awk -v x="$1" 'BEGIN { exit !(x > 0) }'; }

# shape_egress DEV RATE_MBIT DELAY_MS LOSS_PCT: the qdiscs on DEV's egress
shape_egress() {
    local dev=$1 rate=$2 delay=$3 loss=$4 mtu burst parent="root handle 1:"
    tc qdisc del dev "$dev" root 2>/dev/null || true
    if positive "$delay" || positive "$loss"; then
        local netem=(netem delay "${delay}ms" limit 100000)
        positive "$loss" && netem+=(loss "${loss}%")
        if ! run tc qdisc add dev "$dev" root handle 1: "${netem[@]}"; then
            echo "node.sh: the netem qdisc (sch_netem) is missing from this kernel: latency and" \
                 "loss cannot be emulated; load it (modprobe sch_netem) or use latency 0 and" \
                 "loss 0" >&2
            exit 3
        fi
        parent="parent 1:1 handle 10:"
    fi
    if positive "$rate"; then
        mtu=$(cat "/sys/class/net/$IFACE/mtu")
        burst=$(awk -v r="$rate" -v m="$mtu" -v d="$DILATE" \
            'BEGIN { b = r * 1e6 / 8 * 0.004 * d; f = 2 * (m + 14); printf "%d", (b > f ? b : f) }')
        # shellcheck disable=SC2086  # $parent is several words on purpose
        run tc qdisc add dev "$dev" $parent tbf rate "${rate}mbit" burst "$burst" \
            limit $((QUEUE * (mtu + 14)))
    fi
}

shape() {
    is_number DQ_RATE_MBIT "$RATE"
    is_number DQ_LATENCY_MS "$LATENCY"
    is_number DQ_LOSS_PCT "$LOSS"
    is_number DQ_DILATE "$DILATE"
    awk -v d="$DILATE" 'BEGIN { exit !(d >= 1) }' || die "DQ_DILATE must be >= 1; got $DILATE"
    [[ $QUEUE =~ ^[1-9][0-9]*$ ]] ||
        die "DQ_QUEUE_FRAMES must be a positive integer; got '$QUEUE'"
    awk -v p="$LOSS" 'BEGIN { exit !(p < 100) }' || die "DQ_LOSS_PCT must be < 100; got $LOSS"
    [[ -e /sys/class/net/$IFACE ]] || die "no interface $IFACE (set DQ_IFACE)"
    local half
    half=$(awk -v l="$LATENCY" 'BEGIN { printf "%g", l / 2 }')
    run ip link set dev "$IFACE" gso_max_segs 1
    shape_egress "$IFACE" "$RATE" "$half" 0
    # ingress: everything through the ifb device (also when uncapped, so that pure ACKs are
    # counted alike); filter 1 catches pure TCP ACKs (IPv4 length 52, protocol 6) only to
    # count them apart from data in its action statistics
    ip link del "$IFB" 2>/dev/null || true
    tc qdisc del dev "$IFACE" ingress 2>/dev/null || true
    run ip link add "$IFB" type ifb
    run ip link set dev "$IFB" up
    run tc qdisc add dev "$IFACE" handle ffff: ingress
    run tc filter add dev "$IFACE" parent ffff: prio 1 protocol ip u32 \
        match u16 52 0xffff at 2 match u8 6 0xff at 9 action mirred egress redirect dev "$IFB"
    run tc filter add dev "$IFACE" parent ffff: prio 2 protocol all u32 match u32 0 0 \
        action mirred egress redirect dev "$IFB"
    shape_egress "$IFB" "$RATE" "$half" "$LOSS"
}

# the torchrun command line of this host (after its checks) in the array TORCHRUN
torchrun_argv() {
    local addr rdzv_addr is_host=0 extra=()
    [[ -n ${DQ_NNODES:-} ]] || die "DQ_NNODES (number of hosts) is not set"
    [[ -n ${DQ_RDZV_HOST:-} ]] || die "DQ_RDZV_HOST (rendezvous host) is not set"
    [[ -z ${DQ_ROLE:-} || $DQ_ROLE =~ ^(server|worker|colocated)$ ]] ||
        die "DQ_ROLE must be server or worker (or colocated); got '$DQ_ROLE'"
    addr=$(ip -4 -o addr show dev "$IFACE" | awk '{ split($4, a, "/"); print a[1]; exit }')
    [[ -n $addr ]] || die "$IFACE has no IPv4 address"
    rdzv_addr=$(getent ahostsv4 "$DQ_RDZV_HOST" | awk '{ print $1; exit }') ||
        die "cannot resolve DQ_RDZV_HOST=$DQ_RDZV_HOST"
    [[ $rdzv_addr == "$addr" ]] && is_host=1
    # every rank's gloo sockets on this link (not loopback), one thread per process
    export GLOO_SOCKET_IFNAME=$IFACE OMP_NUM_THREADS=1
    [[ -n ${DQ_ROLE:-} ]] && export DIST_QUANT_ROLE=$DQ_ROLE
    [[ -n ${DQ_TRAIN_ARGS:-} ]] && read -ra extra <<< "$DQ_TRAIN_ARGS"
    IS_HOST=$is_host EXTRA=("${extra[@]}")
    TORCHRUN=("${DQ_PYTHON:-python3}" -m torch.distributed.run \
        --nnodes "$DQ_NNODES" --nproc-per-node 1 --max-restarts 0 \
        --rdzv-backend c10d --rdzv-endpoint "$DQ_RDZV_HOST:${DQ_RDZV_PORT:-29400}" \
        --rdzv-id "${DQ_RUN_ID:-dq}" --rdzv-conf "is_host=$is_host" --local-addr "$addr" \
        -m "${DQ_MODULE:-dist_quant.train}" "$@" "${extra[@]}")
}

launch() {
    torchrun_argv "$@"
    exec "${TORCHRUN[@]}"
}

# counters WHEN: the link's byte counters and tc statistics into DQ_LOG_DIR/HOST.WHEN.*
counters() {
    local base=$DQ_LOG_DIR/$(hostname).$1
    cat /proc/net/dev > "$base.netdev"
    tc -s -j filter show dev "$IFACE" parent ffff: > "$base.filter.json" 2>/dev/null || true
    tc -s -j qdisc show > "$base.qdisc.json" 2>/dev/null || true
}

# dist_quant's own lines among torchrun's: a rank's reason, a payload left out
OWN='dist_quant( rank [0-9]+)?: |step [0-9]+: left out '

# Under `--exit-code-from`, the first container to leave stops the others and ends compose's
# output: a host other than the rendezvous host waits (at most 60 s) until the rendezvous host
# has left the network (its name no longer resolves; where DQ_RDZV_HOST is an address, until its
# agent's port closes), so that the job's status, files and last lines are the rendezvous host's.
outlive_host() {
    [[ $IS_HOST == 1 ]] && return 0
    local port=${DQ_RDZV_PORT:-29400}
    for _ in $(seq 600); do
        if [[ $DQ_RDZV_HOST =~ ^[0-9.]+$ ]]; then
            (exec 3<>"/dev/tcp/$DQ_RDZV_HOST/$port") 2>/dev/null || return 0
        else
            getent ahostsv4 "$DQ_RDZV_HOST" > /dev/null || return 0
        fi
        sleep 0.1
    done
}

# reason LOG: the last of dist_quant's own lines in LOG, else its last line
reason() { grep -E "^($OWN)" "$1" | tail -n 1 | grep . || tail -n 1 "$1"; }

# run_logged ARGS: shape and launch with the whole output in the host's log (see the top)
run_logged() {
    local log child code cause
    mkdir -p "$DQ_LOG_DIR"
    log=$DQ_LOG_DIR/$(hostname).log
    : > "$log"
    shape >> "$log" 2>&1 || { code=$?; tail -n 1 "$log" >&2; exit "$code"; }
    torchrun_argv "$@" 2>> "$log" || { code=$?; tail -n 1 "$log" >&2; exit "$code"; }
    # bad options: one line, from the rendezvous host only, before any torchrun starts
    if [[ ${DQ_MODULE:-dist_quant.train} == dist_quant.train ]] &&
        ! "${DQ_PYTHON:-python3}" -m dist_quant.cluster.check "$@" "${EXTRA[@]}" \
            2>> "$log"; then
        [[ $IS_HOST == 1 ]] && reason "$log" >&2
        outlive_host
        exit 2
    fi
    counters before
    trap 'kill -TERM "$child" 2>/dev/null' TERM INT
    "${TORCHRUN[@]}" > >(tee -a "$log" | grep --line-buffered -E "^(test accuracy|$OWN)") \
        2> >(tee -a "$log" | grep --line-buffered -E "^($OWN)" >&2) &
    child=$!
    while true; do
        code=0
        wait "$child" || code=$?
        kill -0 "$child" 2>/dev/null || break   # else a trapped signal ended the wait
    done
    counters after
    outlive_host
    if [[ $code -ne 0 ]]; then
        # the first failed rank's own status (torchrun itself exits 1 for any failure)
        cause=$(awk '/Root Cause/ { f = 1 } f && /exitcode *:/ { print $3; exit }' "$log")
        [[ $cause == 2 ]] && code=2
        grep -qE "^($OWN)" "$log" ||
            echo "node.sh: $(hostname): torchrun exited with status $code; log $log" >&2
    fi
    exit "$code"
}

case ${1:-} in
    shape) shape ;;
    launch) shift; launch "$@" ;;
    run) shift; if [[ -n ${DQ_LOG_DIR:-} ]]; then run_logged "$@"; else shape; launch "$@"; fi ;;
    *) die "usage: node.sh shape | launch [ARGS...] | run [ARGS...]" ;;
esac
