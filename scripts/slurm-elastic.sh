#!/bin/sh
# An elastic Slurm cluster on this machine, for apppot-orchestrator's tests
# and demo (as root; Debian's slurm-wlm and munge, as scripts/slurm-local.sh).
#
#   scripts/slurm-elastic.sh up     a network namespace with a bridge
#                                   (10.254.0.1/24), slurmctld in it, and a
#                                   partition 'cloud' of N predeclared nodes
#                                   (apppot-n1.. at 10.254.0.11..) that are
#                                   DOWN until an appliance running slurmd
#                                   joins as that node; prints NETNS,
#                                   SLURM_CONF, BRIDGE and STATE
#   scripts/slurm-elastic.sh down   stop exactly what 'up' started
#
# Nothing touches the machine's own interfaces: the appliances' tap devices
# go on the bridge inside the namespace.  slurmd in an appliance fetches
# slurm.conf from slurmctld (configless).  Clients run inside the namespace:
#   ip netns exec apppot-elastic env SLURM_CONF=... sbatch -p cloud ...
set -eu

NS="${ELASTIC_NETNS:-apppot-elastic}"
D="${ELASTIC_DIR:-/run/apppot-slurm-elastic}"  # root's, 0711 (slurm-local.sh)
LOCAL="$(dirname "$0")/slurm-local.sh"
N="${ELASTIC_NODES:-3}"
NET=10.254.0
HOST=$(hostname -s)

up() {
    if [ "$(id -u)" != 0 ]; then
        echo "slurm-elastic.sh: run as root" >&2; exit 1
    fi
    "$LOCAL" private-dir "$D" slurm-elastic.sh || exit 1
    "$LOCAL" munge "$D/munge"
    if [ -s "$D/slurmctld.pid" ] && kill -0 "$(cat "$D/slurmctld.pid")" 2>/dev/null; then
        report; return
    fi
    mkdir -p "$D/state" "$D/log" "$D/orchestrator"
    # A run killed before 'down' leaves its namespace: reuse the name only
    # when nothing runs in it any more
    if [ -e "/run/netns/$NS" ]; then
        if [ -n "$(ip netns pids "$NS" 2>/dev/null)" ]; then
            echo "slurm-elastic.sh: namespace $NS is in use" \
                "(hint: scripts/slurm-elastic.sh down, or set ELASTIC_NETNS)" >&2
            exit 1
        fi
        ip netns del "$NS"
    fi
    ip netns add "$NS"
    ip -n "$NS" link set lo up
    ip -n "$NS" link add br0 type bridge
    ip -n "$NS" addr add "$NET.1/24" dev br0
    ip -n "$NS" link set br0 up
    nodes=""
    k=1
    while [ $k -le "$N" ]; do
        nodes="$nodes
NodeName=apppot-n$k NodeAddr=$NET.$((10 + k)) CPUs=1 RealMemory=200 State=DOWN Reason=no_appliance"
        k=$((k + 1))
    done
    cat > "$D/slurm.conf" <<EOC
ClusterName=apppotelastic
SlurmctldHost=$HOST($NET.1)
SlurmctldParameters=enable_configless
$("$LOCAL" common-conf)
JobAcctGatherType=jobacct_gather/none
SlurmdTimeout=60
SchedulerParameters=sched_interval=5
StateSaveLocation=$D/state
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$D/slurmctld.pid
SlurmctldLogFile=$D/log/slurmctld.log
$nodes
PartitionName=cloud Nodes=apppot-n[1-$N] Default=YES MaxTime=INFINITE State=UP
EOC
    # nsenter, not 'ip netns exec' (that remounts /sys)
    nsenter --net="/run/netns/$NS" slurmctld -f "$D/slurm.conf"
    i=0
    until nsenter --net="/run/netns/$NS" env SLURM_CONF="$D/slurm.conf" \
            sinfo -h >/dev/null 2>&1; do
        i=$((i + 1))
        if [ $i -gt 60 ]; then
            echo "slurm-elastic.sh: slurmctld did not answer; see $D/log" >&2
            exit 1
        fi
        sleep 0.5
    done
    report
}

report() {
    echo "NETNS=$NS"
    echo "SLURM_CONF=$D/slurm.conf"
    echo "BRIDGE=br0"
    echo "STATE=$D/orchestrator"
}

down() {
    rc=0
    "$LOCAL" owned-dir "$D" slurm-elastic.sh || rc=$?
    [ $rc != 1 ] || exit 1  # never trust pid files in someone else's dir
    if [ $rc = 0 ]; then
        # nodes outlive the orchestrator (a restart adopts them): stop them
        # where 'run' ran them, in the namespace with the cluster's conf
        if [ -s "$D/orchestrator/orchestrator.json" ]; then
            nsenter --net="/run/netns/$NS" env SLURM_CONF="$D/slurm.conf" \
                "$(dirname "$0")/../.venv/bin/apppot-orchestrator" shutdown \
                --state-dir "$D/orchestrator" >/dev/null || true
        fi
        "$LOCAL" stop "$D/slurmctld.pid"
        "$LOCAL" stop "$D/munge/munged.pid"
    fi
    ip netns del "$NS" 2>/dev/null || true
    [ $rc != 0 ] || rm -rf "$D"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
