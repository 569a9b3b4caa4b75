#!/bin/sh
# A two-node Slurm cluster simulated on this machine, for multi-node tests
# (as root; Debian's slurm-wlm and munge, as scripts/slurm-local.sh).
#
#   scripts/slurm-sim-cluster.sh up     two "nodes" = network namespaces
#                                       joined by a bridge in a third one,
#                                       slurmctld + slurmd on node0, slurmd on
#                                       node1; prints SLURM_CONF and NETNS
#   scripts/slurm-sim-cluster.sh down   stop exactly what 'up' started
#
# Each daemon runs in its node's network namespace with its own UTS
# namespace (hostname node0/node1) and a private /etc/hosts naming both;
# nothing touches the machine's own interfaces.  Clients run inside node0:
#   nsenter --net=/run/netns/${SIM_PREFIX}node0 env SLURM_CONF=... sbatch ...
set -eu

P="${SIM_PREFIX:-apppot-sim-}"
D="${SIM_DIR:-/run/apppot-slurm-sim}"  # root's, 0711 (see slurm-local.sh)
LOCAL="$(dirname "$0")/slurm-local.sh"
NET=192.168.77

up() {
    if [ "$(id -u)" != 0 ]; then
        echo "slurm-sim-cluster.sh: run as root" >&2; exit 1
    fi
    "$LOCAL" private-dir "$D" slurm-sim-cluster.sh || exit 1
    # the packages, and munge (one for both nodes: its socket is a file)
    "$LOCAL" munge "$D/munge"
    mkdir -p "$D/state" "$D/spool/node0" "$D/spool/node1" "$D/log"
    printf '127.0.0.1 localhost\n%s.1 node0\n%s.2 node1\n' $NET $NET > "$D/hosts"
    ip netns add "${P}switch"
    ip -n "${P}switch" link add br0 type bridge mcast_snooping 0
    ip -n "${P}switch" link set br0 up
    for k in 0 1; do
        ns="${P}node$k"
        ip netns add "$ns"
        ip -n "$ns" link add eth0 type veth peer name "port$k" netns "${P}switch"
        ip -n "$ns" addr add "$NET.$((k + 1))/24" dev eth0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
        ip -n "$ns" route add 224.0.0.0/4 dev eth0
        ip -n "${P}switch" link set "port$k" master br0 up
    done
    cat > "$D/slurm.conf" <<EOC
ClusterName=apppotsim
SlurmctldHost=node0($NET.1)
$("$LOCAL" common-conf)
JobAcctGatherType=jobacct_gather/none
SlurmdParameters=config_overrides
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.%n.log
NodeName=node0 NodeAddr=$NET.1 CPUs=2 RealMemory=4000 State=UNKNOWN
NodeName=node1 NodeAddr=$NET.2 CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=sim Nodes=node[0-1] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOC
    # nsenter, not 'ip netns exec': that remounts /sys and hides the
    # cgroup mounts slurmd needs
    nsenter --net="/run/netns/${P}node0" unshare --uts --mount sh -c \
        "mount --bind $D/hosts /etc/hosts && hostname node0 &&
         slurmctld -f $D/slurm.conf && slurmd -f $D/slurm.conf"
    nsenter --net="/run/netns/${P}node1" unshare --uts --mount sh -c \
        "mount --bind $D/hosts /etc/hosts && hostname node1 &&
         slurmd -f $D/slurm.conf"
    i=0
    until [ "$(nsenter --net="/run/netns/${P}node0" env SLURM_CONF="$D/slurm.conf" \
              sinfo -h -N -o %T 2>/dev/null | grep -c idle)" = 2 ]; do
        i=$((i + 1))
        if [ $i -gt 60 ]; then
            echo "slurm-sim-cluster.sh: nodes did not become idle; see $D/log" >&2
            exit 1
        fi
        sleep 0.5
    done
    echo "NETNS=${P}node0"
    echo "SLURM_CONF=$D/slurm.conf"
}

down() {
    rc=0
    "$LOCAL" owned-dir "$D" slurm-sim-cluster.sh || rc=$?
    [ $rc != 1 ] || exit 1  # never trust pid files in someone else's dir
    if [ $rc = 0 ]; then
        for pidfile in "$D/slurmd.node1.pid" "$D/slurmd.node0.pid" \
                "$D/slurmctld.pid" "$D/munge/munged.pid"; do
            "$LOCAL" stop "$pidfile"
        done
    fi
    for ns in "${P}node0" "${P}node1" "${P}switch"; do
        ip netns del "$ns" 2>/dev/null || true
    done
    [ $rc != 0 ] || rm -rf "$D"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
