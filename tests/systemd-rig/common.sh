# common.sh: what rig.sh, in.sh and down.sh share. Sourced, never run.
#
# RIG_HOME holds everything the rig writes: the cached rootfs, the state of
# the one container booted from it, and its logs. It defaults to
# target/systemd-rig in this repository, so `cargo clean` removes it. The
# machine name is derived from RIG_HOME, so two clones (or worktrees) on one
# host boot containers that do not collide (nspawn's cgroups and its
# /run/systemd/nspawn entries are named after the machine).
RIG_DIR=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
RIG_HOME=${RIG_HOME:-$(readlink -f "$RIG_DIR/../..")/target/systemd-rig}
RIG_NAME=baton-$(printf '%s' "$RIG_HOME" | md5sum | cut -c1-8)
STATE=$RIG_HOME/state
LOGS=$RIG_HOME/logs
ROOTFS=$RIG_HOME/rootfs

# The pid of the container's PID 1 (as the host sees it), if it runs.
leader() {
    local p
    p=$(cat "$STATE/leader.pid" 2>/dev/null) || return 1
    [ -n "$p" ] && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = systemd ] && echo "$p"
}
