#!/usr/bin/env bash
# Prepare this machine to run dist_quant's container cluster (docker-compose.yml), from nothing.
#
#   launch/docker-host.sh [up]    engine + compose, a running daemon, the image dist-quant:latest
#   launch/docker-host.sh check   say in one line what is missing (exit 1) or that all is there
#   launch/docker-host.sh stop    stop the daemon this script started (none other)
#
# Idempotent; run as root on Debian or Ubuntu. Each step is skipped when its result is there:
#
# 1. Engine and compose from the distribution's packages (docker.io, docker-compose) when
#    `docker` or both `docker compose` and `docker-compose` are missing.
# 2. A daemon when none answers: `dockerd` with overlay2 where an overlay mount works on
#    /var/lib/docker's filesystem, else vfs (inside some containers and VMs), logging to
#    $DQ_STATE/dockerd.log. Its own bridges use 10.0.0.0/8 addresses (--bip, address pools), so
#    no container network takes a range of the machine's own networks.
# 3. The image $DQ_IMAGE (dist-quant:latest), rebuilt only when the files it is built from
#    changed (their hash, taken once per call, is the image's label dist-quant.source; a file
#    changed while the image builds is named at the end, not mistaken for a stale image):
#    - base: python:3.11-slim where a container registry answers, else a Debian base made with
#      `debootstrap --variant=minbase` from the mirror apt uses here, with python3, venv, gcc and
#      iproute2 already in it (cached in $DQ_CACHE), so the build needs no network;
#    - Python packages from a wheelhouse filled on this machine with `pip download` (torch's CPU
#      build where pip's configuration serves it, numpy, click, setuptools), installed in the
#      build with `pip install --no-index`: pip inside a build may not reach or trust the index.
#
# Environment: DQ_IMAGE [dist-quant:latest], DQ_BASE [auto | an image name], DQ_TORCH_SPEC
# [torch==2.13.0], DQ_CACHE [~/.cache/dist-quant/docker], DQ_STATE [/run/dist-quant-docker].
# Exit status: 0 ready, 1 something could not be prepared (the line says what), 2 usage.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=${DQ_IMAGE:-dist-quant:latest}
BASE=${DQ_BASE:-auto}
TORCH_SPEC=${DQ_TORCH_SPEC:-torch==2.13.0}
CACHE=${DQ_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dist-quant/docker}
STATE=${DQ_STATE:-/run/dist-quant-docker}
WHEELHOUSE=$REPO/launch/wheelhouse
SLIM=python:3.11-slim
DEBIAN_BASE=dist-quant-base:bookworm
SUITE=bookworm

say() { echo "docker-host: $*" >&2; }
fail() { say "$*"; exit 1; }

compose_cmd() {
    if docker compose version >/dev/null 2>&1; then echo "docker compose"
    elif command -v docker-compose >/dev/null 2>&1; then echo "docker-compose"
    else return 1; fi
}

daemon_answers() { timeout 10 docker info >/dev/null 2>&1; }

# the hash of everything the image runs (Dockerfile, packaging, sources, node.sh; the README
# is copied in only because the package metadata names it)
source_hash() {
    (cd "$REPO" && find Dockerfile pyproject.toml launch/node.sh dist_quant \
        -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | LC_ALL=C sort -z |
        xargs -0 sha256sum; echo "$TORCH_SPEC") | sha256sum | cut -c1-16
}

# the hash this call works against: taken once, so that a build and its check see the same
# sources even if a file changes while the image builds (that change is then named, below)
SOURCE=""

image_label() {
    docker image inspect -f '{{ index .Config.Labels "dist-quant.source" }}' "$IMAGE" 2>/dev/null
}

image_current() {
    local label
    label=$(image_label) || return 1
    [[ $label == "${SOURCE:-$(source_hash)}" ]]
}

install_engine() {
    local pkgs=()
    command -v docker >/dev/null 2>&1 && command -v dockerd >/dev/null 2>&1 || pkgs+=(docker.io)
    compose_cmd >/dev/null || pkgs+=(docker-compose)
    [[ ${#pkgs[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null || fail "no apt-get: install ${pkgs[*]} by hand"
    [[ $(id -u) -eq 0 ]] || fail "installing ${pkgs[*]} needs root"
    say "installing ${pkgs[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
        --no-install-recommends "${pkgs[@]}" iptables >/dev/null ||
        fail "apt-get install ${pkgs[*]} failed"
}

storage_driver() {
    local root=/var/lib/docker probe
    mkdir -p "$root"
    probe=$(mktemp -d "$root/.overlay-probe.XXXXXX")
    mkdir -p "$probe"/{l,u,w,m}
    if mount -t overlay overlay -o "lowerdir=$probe/l,upperdir=$probe/u,workdir=$probe/w" \
        "$probe/m" 2>/dev/null; then
        umount "$probe/m"; rm -rf "$probe"; echo overlay2
    else
        rm -rf "$probe"; echo vfs
    fi
}

start_daemon() {
    daemon_answers && return 0
    [[ $(id -u) -eq 0 ]] || fail "no Docker daemon answers, and starting one needs root"
    mkdir -p "$STATE"
    local driver
    driver=$(storage_driver)
    say "starting dockerd (storage driver $driver; log $STATE/dockerd.log)"
    setsid dockerd --storage-driver "$driver" --bip 10.199.0.1/24 \
        --default-address-pool base=10.200.0.0/16,size=24 \
        --pidfile "$STATE/dockerd.pid" >"$STATE/dockerd.log" 2>&1 < /dev/null &
    echo $! > "$STATE/started.pid"
    for _ in $(seq 60); do daemon_answers && return 0; sleep 1; done
    fail "dockerd did not answer within 60 s; see $STATE/dockerd.log"
}

stop_daemon() {
    local pid
    [[ -f $STATE/started.pid ]] || { say "no daemon started by this script"; return 0; }
    pid=$(cat "$STATE/started.pid")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        say "stopped dockerd ($pid)"
    fi
    rm -f "$STATE/started.pid"
}

# the first Debian mirror of apt's own configuration (deb822 or one-line form)
apt_mirror() {
    local uri
    uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
        awk '/^URIs:/ && $2 ~ /debian\/?$/ { print $2; exit }')
    [[ -n $uri ]] || uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        awk '$1 == "deb" && $2 ~ /debian\/?$/ { print $2; exit }')
    [[ -n $uri ]] || fail "no Debian mirror in apt's sources: set DQ_BASE to an image you have"
    echo "$uri"
}

debian_base() {
    docker image inspect "$DEBIAN_BASE" >/dev/null 2>&1 && return 0
    local tarball=$CACHE/base-$SUITE-$(uname -m).tar root
    if [[ ! -s $tarball ]]; then
        command -v debootstrap >/dev/null || {
            say "installing debootstrap"
            apt-get update -q >/dev/null
            DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
                debootstrap >/dev/null || fail "apt-get install debootstrap failed"
        }
        root=$(mktemp -d)
        say "making a $SUITE base with debootstrap (about a minute)"
        debootstrap --variant=minbase \
            --include=python3,python3-venv,iproute2,gcc,libc6-dev,ca-certificates \
            "$SUITE" "$root" "$(apt_mirror)" > "$CACHE/debootstrap.log" 2>&1 ||
            { rm -rf "$root"; fail "debootstrap failed; see $CACHE/debootstrap.log"; }
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
        tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        rm -rf "$root"
    fi
    docker import "$tarball" "$DEBIAN_BASE" >/dev/null || fail "docker import of $tarball failed"
}

pick_base() {
    if [[ $BASE != auto ]]; then echo "$BASE"; return; fi
    if docker image inspect "$SLIM" >/dev/null 2>&1 ||
        timeout 60 docker pull -q "$SLIM" >/dev/null 2>&1; then
        echo "$SLIM"
    else
        say "no container registry answers: building on a Debian base"
        debian_base
        echo "$DEBIAN_BASE"
    fi
}

fill_wheelhouse() {
    local python=python3 stamp=$WHEELHOUSE/.spec
    [[ -f $stamp && $(cat "$stamp") == "$TORCH_SPEC" ]] && ls "$WHEELHOUSE"/torch-*.whl \
        >/dev/null 2>&1 && return 0
    command -v pip3 >/dev/null || python3 -m pip --version >/dev/null 2>&1 ||
        fail "no pip on this machine to fill the wheelhouse (apt-get install python3-pip)"
    say "filling the wheelhouse ($TORCH_SPEC, numpy, click, setuptools)"
    rm -f "$WHEELHOUSE"/*.whl
    "$python" -m pip download -q --only-binary=:all: --python-version 3.11 \
        -d "$WHEELHOUSE" "$TORCH_SPEC" "numpy>=1.24" "click>=8.1" "setuptools>=68" wheel \
        > "$CACHE/pip-download.log" 2>&1 ||
        fail "pip download failed; see $CACHE/pip-download.log"
    echo "$TORCH_SPEC" > "$stamp"
}

build_image() {
    if image_current; then say "image $IMAGE is current"; return 0; fi
    local base
    base=$(pick_base)
    fill_wheelhouse
    say "building $IMAGE from $base (a few minutes the first time)"
    docker build -q -t "$IMAGE" --build-arg BASE="$base" --build-arg TORCH_SPEC="$TORCH_SPEC" \
        --label "dist-quant.source=$SOURCE" "$REPO" > "$CACHE/build.log" 2>&1 ||
        fail "docker build failed; see $CACHE/build.log"
}

check() {
    command -v docker >/dev/null 2>&1 ||
        fail "no container engine: run launch/docker-host.sh"
    compose_cmd >/dev/null || fail "no docker compose nor docker-compose: run launch/docker-host.sh"
    daemon_answers || fail "no Docker daemon answers: run launch/docker-host.sh"
    docker image inspect "$IMAGE" >/dev/null 2>&1 ||
        fail "no image $IMAGE: run launch/docker-host.sh"
    image_current || fail "image $IMAGE is older than the sources: run launch/docker-host.sh"
    say "ready: $(compose_cmd), image $IMAGE"
}

mkdir -p "$CACHE"
case ${1:-up} in
    up) SOURCE=$(source_hash); install_engine; start_daemon; build_image; check
        [[ $(source_hash) == "$SOURCE" ]] ||
            say "the sources changed while this ran: $IMAGE holds them as they were at its start; run launch/docker-host.sh again to take the change" ;;
    check) check ;;
    stop) stop_daemon ;;
    *) echo "usage: launch/docker-host.sh [up | check | stop]" >&2; exit 2 ;;
esac
