#!/bin/bash
# rig.sh [--rebuild]: boots Debian trixie's systemd (257) as PID 1 in a
# systemd-nspawn container, also on a host whose own init is not systemd,
# and returns once `systemctl is-system-running` says running or degraded.
#
# The rootfs (mmdebstrap minbase + systemd, dbus, procps, from the host's
# Debian mirror) is built once and cached in $RIG_HOME/rootfs; it is rebuilt
# when the package list below changes, or with --rebuild. The container
# boots it as a read-only lower layer (--volatile=overlay): what a test
# writes inside is gone at down.sh. It shares the host's network, so a
# socket unit's 127.0.0.1:PORT is the host's.
#
# Prints the host pid of the container's PID 1 on stdout, nothing else.
# RIG_BIND_RO="host:container ..." adds read-only bind mounts (the tests
# bind the freshly built binaries at /opt/baton). A container that still
# runs from an earlier boot (a test process that was killed) is powered off
# first. Needs root, and systemd-nspawn, mmdebstrap and nsenter on the host
# (Debian: apt-get install --no-install-recommends systemd-container
# mmdebstrap; .ci/run does).
set -euo pipefail
source "$(dirname "$(readlink -f "$0")")/common.sh"
SUITE=trixie
PKGS=systemd,systemd-sysv,dbus,procps
T0=$(date +%s%N)
log() { echo "[rig +$(( ($(date +%s%N) - T0) / 1000000 ))ms] $*" >&2; }
die() { log "$*"; exit 1; }

[ "$(id -u)" = 0 ] || die "rig.sh needs root"
for tool in systemd-nspawn mmdebstrap nsenter flock pgrep; do
    command -v "$tool" >/dev/null || die "$tool is missing: apt-get install --no-install-recommends systemd-container mmdebstrap util-linux procps"
done
mkdir -p "$RIG_HOME"
[ -O "$RIG_HOME" ] && [ ! -L "$RIG_HOME" ] || die "$RIG_HOME is not a directory of root's"
mkdir -p "$STATE" "$LOGS"
# One rig.sh at a time per RIG_HOME: the build and the state files are shared.
exec 9>"$RIG_HOME/lock"
flock 9

if leader >/dev/null; then
    log "a container from an earlier boot still runs: powering it off"
    "$RIG_DIR/down.sh"
fi

mirror() {
    local m=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        m=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$m" ] && [ -f /etc/apt/sources.list ]; then
        m=$(awk '/^deb / && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^http/) {print $i; exit}}' /etc/apt/sources.list)
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

if [ "${1:-}" = --rebuild ] || [ "$(cat "$ROOTFS/.rig" 2>/dev/null)" != "$SUITE $PKGS" ]; then
    log "building the $SUITE rootfs (minbase + $PKGS) from $(mirror); log: $LOGS/mmdebstrap.log"
    rm -rf "$ROOTFS.tmp"
    # The empty machine-id makes each boot make its own; the apt timers would
    # only wake up inside a test.
    mmdebstrap --variant=minbase --include="$PKGS" \
        --customize-hook='echo rig > "$1/etc/hostname"' \
        --customize-hook=': > "$1/etc/machine-id"' \
        --customize-hook='for u in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer; do ln -sf /dev/null "$1/etc/systemd/system/$u"; done' \
        "$SUITE" "$ROOTFS.tmp" "$(mirror)" >"$LOGS/mmdebstrap.log" 2>&1 \
        || { rm -rf "$ROOTFS.tmp"; tail -20 "$LOGS/mmdebstrap.log" >&2; die "mmdebstrap failed"; }
    echo "$SUITE $PKGS" > "$ROOTFS.tmp/.rig"
    rm -rf "$ROOTFS"
    mv "$ROOTFS.tmp" "$ROOTFS"
    log "rootfs built: $(du -sh "$ROOTFS" | cut -f1)"
fi

# nspawn goes into cgroups of its own (cgroup2, and name=systemd on a hybrid
# host), so that the container's cgroups can be removed after it; the
# container sees a pure cgroup2 tree either way.
CGROUPS=()
if [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then
    CGROUPS+=("/sys/fs/cgroup/rig-$RIG_NAME")
else
    [ "$(stat -fc %T /sys/fs/cgroup/unified 2>/dev/null)" = cgroup2fs ] && CGROUPS+=("/sys/fs/cgroup/unified/rig-$RIG_NAME")
    [ -d /sys/fs/cgroup/systemd ] && CGROUPS+=("/sys/fs/cgroup/systemd/rig-$RIG_NAME")
fi
for d in "${CGROUPS[@]}"; do mkdir -p "$d"; done
printf '%s\n' "${CGROUPS[@]}" > "$STATE/cgroups"

# --register=no --keep-unit: there is no host systemd to register with or to
# make a scope unit.
args=(-D "$ROOTFS" -M "$RIG_NAME" --register=no --keep-unit -b --console=read-only --volatile=overlay)
for b in ${RIG_BIND_RO:-}; do args+=(--bind-ro="$b"); done
log "systemd-nspawn ${args[*]}"
(
    for d in "${CGROUPS[@]}"; do echo "$BASHPID" > "$d/cgroup.procs"; done
    export SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1
    exec systemd-nspawn "${args[@]}" </dev/null >"$LOGS/console.log" 2>&1 9>&-
) &
NP=$!
echo "$NP" > "$STATE/nspawn.pid"

deadline=$(( $(date +%s) + ${RIG_BOOT_TIMEOUT:-60} ))
until LP=$(pgrep -P "$NP" -x systemd); do
    kill -0 "$NP" 2>/dev/null || { tail -20 "$LOGS/console.log" >&2; die "systemd-nspawn exited"; }
    [ "$(date +%s)" -le "$deadline" ] || { "$RIG_DIR/down.sh"; die "no container PID 1 appeared"; }
    sleep 0.05
done
echo "$LP" > "$STATE/leader.pid"
state=""
until case "$state" in running|degraded) true ;; *) false ;; esac; do
    kill -0 "$NP" 2>/dev/null || { tail -30 "$LOGS/console.log" >&2; die "the container died while booting"; }
    [ "$(date +%s)" -le "$deadline" ] || { "$RIG_DIR/down.sh"; die "boot timed out (state '$state')"; }
    sleep 0.1
    # --wait returns once the boot is over, or at the timeout.
    state=$("$RIG_DIR/in.sh" timeout 5 systemctl is-system-running --wait 2>/dev/null || true)
done
log "booted $RIG_NAME ($state): $("$RIG_DIR/in.sh" systemctl --version | head -1)"
[ "$state" = running ] || "$RIG_DIR/in.sh" systemctl --failed --no-legend >&2
echo "$LP"
