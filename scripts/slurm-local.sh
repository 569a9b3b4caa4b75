#!/bin/sh
# A single-host Slurm from Debian's packages, for tests and demos (as root).
#
#   scripts/slurm-local.sh up     install slurm-wlm + munge, start munged,
#                                 slurmctld, slurmd; prints the SLURM_CONF
#   scripts/slurm-local.sh down   stop exactly what 'up' started
#
# State lives in $SLURM_LOCAL_DIR (default /run/apppot-slurm): root's, mode
# 0711 (munged, as user munge, reaches its subdirectory; nobody else can
# list or create anything there); an existing one that is anything else (a
# symlink, another owner, a looser mode) is refused, so no local user can
# plant files or symlinks where root writes.  The node declares 4 CPUs
# (oversubscribed on small machines) so 4-task jobs run.
# Memory accounting: jobacct_gather/linux counts RSS, or PSS with
# SLURM_LOCAL_ACCT=pss (JobAcctGatherParams=UsePss); 'up' is a no-op while
# the daemons run, so 'down' first to switch.
set -eu

DIR="${SLURM_LOCAL_DIR:-/run/apppot-slurm}"
CONF="$DIR/slurm.conf"
HOST=$(hostname -s)
ACCT="${SLURM_LOCAL_ACCT:-rss}"

DIR_MODE=711  # what private_dir makes and accepts

# private_dir DIR NAME: make DIR root's with DIR_MODE, or accept an existing
# one only if it is exactly that (never a symlink: stat does not follow
# one); else say why (as NAME) and fail.
private_dir() {
    mkdir -m "$DIR_MODE" -- "$1" 2>/dev/null || true
    owned_dir "$1" "$2"
}

# owned_dir DIR NAME: 0 if DIR is root's with DIR_MODE; 3 if it does not
# exist; else a one-line refusal (as NAME) and 1.
owned_dir() {
    if [ ! -e "$1" ] && [ ! -L "$1" ]; then
        return 3
    fi
    got=$(stat -c '%F, owner %u, mode %a' -- "$1")
    if [ "$got" != "directory, owner 0, mode $DIR_MODE" ]; then
        echo "$2: refusing state directory $1 ($got; it must be a" \
             "directory of root's with mode $DIR_MODE: remove it or give" \
             "another path)" >&2
        return 1
    fi
}

running() {  # running PIDFILE: is the daemon we started still there?
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

packages() {
    if [ "$(id -u)" != 0 ]; then
        echo "slurm-local.sh: run as root" >&2; exit 1
    fi
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends slurm-wlm munge >/dev/null
    fi
}

munge_up() {  # munge_up DIR: start munged (pid file in DIR) unless one runs
    mkdir -p "$1"
    chown munge:munge "$1"
    chmod 700 "$1"
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge && chown munge:munge /run/munge
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && \
            ! running "$1/munged.pid"; then
        runuser -u munge -- /usr/sbin/munged --pid-file "$1/munged.pid" \
            --log-file "$1/munged.log"
    fi
}

common_conf() {  # slurm.conf lines every cluster of these scripts shares
    cat <<EOC
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
EOC
}

up() {
    packages
    private_dir "$DIR" slurm-local.sh || exit 1
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    munge_up "$DIR/munge"
    case "$ACCT" in
        rss) params= ;;
        pss) params=JobAcctGatherParams=UsePss ;;
        *) echo "slurm-local.sh: SLURM_LOCAL_ACCT must be rss or pss" >&2
           exit 2 ;;
    esac
    if running "$DIR/slurmctld.pid" && running "$DIR/slurmd.pid"; then
        echo "SLURM_CONF=$CONF"
        return
    fi
    cat > "$CONF" <<EOF
ClusterName=apppot
SlurmctldHost=$HOST(127.0.0.1)
$(common_conf)
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
$params
SlurmdParameters=config_overrides
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=4 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    slurmctld -f "$CONF"
    slurmd -f "$CONF"
    export SLURM_CONF="$CONF"
    i=0
    until sinfo -h -o %T 2>/dev/null | grep -q -E '^(idle|mixed|allocated)'; do
        scontrol update nodename="$HOST" state=resume 2>/dev/null || true
        i=$((i + 1))
        if [ $i -gt 60 ]; then
            echo "slurm-local.sh: node did not become idle; see $DIR/log" >&2
            exit 1
        fi
        sleep 0.5
    done
    echo "SLURM_CONF=$CONF"
}

stop_pidfile() {
    if [ -s "$1" ]; then
        pid=$(cat "$1")
        kill "$pid" 2>/dev/null || true
        i=0
        while kill -0 "$pid" 2>/dev/null && [ $i -lt 50 ]; do
            sleep 0.1; i=$((i + 1))
        done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$1"
    fi
}

down() {
    rc=0
    owned_dir "$DIR" slurm-local.sh || rc=$?
    [ $rc != 1 ] || exit 1  # never trust pid files in someone else's dir
    if [ $rc = 0 ]; then
        stop_pidfile "$DIR/slurmd.pid"
        stop_pidfile "$DIR/slurmctld.pid"
        stop_pidfile "$DIR/munge/munged.pid"
    fi
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    munge) packages; munge_up "$2" ;;  # for slurm-sim-cluster.sh
    stop) stop_pidfile "$2" ;;         # for slurm-sim-cluster.sh
    common-conf) common_conf ;;        # for the other cluster scripts
    private-dir) private_dir "$2" "$3" ;;  # DIR NAME, for the others too
    owned-dir) owned_dir "$2" "$3" ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
