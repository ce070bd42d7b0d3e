#!/bin/bash
# in.sh CMD [ARGS...]: runs CMD inside the container rig.sh booted, in all of
# its namespaces (mount, pid, net, uts, ipc, cgroup), with a clean
# environment. stdin, stdout, stderr and the exit status are CMD's; 125 when
# no container runs. CMD runs in no unit of the container's systemd: start
# anything that must outlive it with systemctl.
source "$(dirname "$(readlink -f "$0")")/common.sh"
L=$(leader) || { echo "in.sh: no container runs for RIG_HOME=$RIG_HOME (run rig.sh)" >&2; exit 125; }
[ $# -gt 0 ] || set -- /bin/bash
exec nsenter -t "$L" -a -- /usr/bin/env -i \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    LANG=C.UTF-8 SYSTEMD_PAGER=cat PAGER=cat SYSTEMD_COLORS=0 TERM=dumb "$@"
