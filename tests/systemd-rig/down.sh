#!/bin/bash
# down.sh: powers off the container rig.sh booted (nspawn turns SIGTERM into
# an orderly shutdown), SIGKILLs its PID 1 after 20 s, then removes the
# cgroups rig.sh made. Signals only the pids recorded in $RIG_HOME/state;
# does nothing when nothing runs. Every test calls it, passing or failing.
source "$(dirname "$(readlink -f "$0")")/common.sh"
NP=$(cat "$STATE/nspawn.pid" 2>/dev/null)
LP=$(cat "$STATE/leader.pid" 2>/dev/null)
alive() { [ -n "$1" ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]; }
gone() { # gone PID COMM SECONDS: waits (in 0.1 s steps) until it has exited
    local i
    for ((i = 0; i < $3 * 10; i++)); do alive "$1" "$2" || return 0; sleep 0.1; done
    return 1
}
if alive "$NP" systemd-nspawn; then
    kill -TERM "$NP"
    if ! gone "$NP" systemd-nspawn 20; then
        echo "down.sh: the container did not power off within 20 s: SIGKILL" >&2
        alive "$LP" systemd && kill -KILL "$LP"   # the whole pid namespace goes with it
        gone "$NP" systemd-nspawn 5 || kill -KILL "$NP"
    fi
elif alive "$LP" systemd; then
    kill -KILL "$LP"
fi
if [ -f "$STATE/cgroups" ]; then
    while read -r d; do
        [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
        [ -d "$d" ] && echo "down.sh: could not remove $d" >&2
    done < "$STATE/cgroups"
fi
rm -rf "/run/systemd/nspawn/propagate/$RIG_NAME" 2>/dev/null
rm -f "$STATE/nspawn.pid" "$STATE/leader.pid" "$STATE/cgroups"
exit 0
