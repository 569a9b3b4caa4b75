#!/bin/sh
# Produce a real Slurm accounting log (sacct --parsable2) as a sample input
# for the cluster simulation (as root; Debian 12 packages).
#
#   scripts/make-sacct-sample.sh [OUTPUT]
#
# OUTPUT defaults to apppot_mpi/orchestrator/samples/slurm-sacct.txt in this
# repository.  The script
#   1. installs mariadb-server, slurmdbd, slurm-wlm and munge if missing;
#   2. starts a private MariaDB (127.0.0.1:3407 plus its own unix socket), a
#      private slurmdbd (port 6829) and a private single-node slurmctld +
#      slurmd (ports 6827/6828, cluster "sample", partition "batch" with 4
#      CPUs and no oversubscription) and a private munged (own key and
#      socket, so munged daemons of other tests are neither used nor hit);
#   3. submits ~100 deterministic sleep jobs in 4 bursts, cancels two of them
#      while they are pending, waits until every job has ended and its record
#      is in the database, and writes one sacct line per job (allocations
#      only) to OUTPUT;
#   4. stops exactly the daemons it started (by pid file, TERM then KILL) and
#      removes its work directory (kept on failure, or with SACCT_GEN_KEEP=1).
#
# Nothing else on the machine is touched: the daemons use their own ports,
# config files, state, pid and log files, all under a new private work
# directory (mktemp -d /var/tmp/apppot-sacct-gen.XXXXXX, printed; or
# $SACCT_GEN_DIR, which must not exist yet: root makes it, mode 0711, so no
# local user can have planted files or symlinks in it), and every client
# command gets SLURM_CONF
# pointing at the private slurm.conf.  Slurm daemons on the default ports
# (6817/6818) are left alone.  A run takes about 12.5 minutes.
#
# Note: on Debian, installing mariadb-server/slurmdbd tries to start the
# system services; containers usually forbid that with /usr/sbin/policy-rc.d
# (exit 101).  Where no such policy exists, the packages' own services are
# started by apt, not by this script, and are not stopped by it.
set -eu

REPO=$(cd "$(dirname "$0")/.." && pwd)
W="${SACCT_GEN_DIR:-}"  # made below
OUT="${1:-$REPO/apppot_mpi/orchestrator/samples/slurm-sacct.txt}"
HOST=$(hostname -s)
MYPORT=3407
SEED=7                        # fixed seed of the workload generator

# Times are printed in UTC in sacct's ISO format.
export TZ=UTC
unset SLURM_TIME_FORMAT SACCT_FORMAT SQUEUE_FORMAT SQUEUE_SORT \
    SBATCH_PARTITION SBATCH_ACCOUNT SBATCH_TIMELIMIT 2>/dev/null || true

die() { echo "make-sacct-sample.sh: $*" >&2; exit 1; }
say() { echo "make-sacct-sample.sh: $*" >&2; }

[ "$(id -u)" = 0 ] || die "run as root"
case "$W" in
    ""|/?*/?*) ;;
    *) die "SACCT_GEN_DIR must be an absolute path at least two levels deep" ;;
esac

running() {  # running PIDFILE: is the process named in PIDFILE alive?
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop_pidfile() {  # stop_pidfile PIDFILE SECONDS: TERM, wait, then KILL
    if [ -s "$1" ]; then
        pid=$(cat "$1")
        if kill "$pid" 2>/dev/null; then
            i=0
            while kill -0 "$pid" 2>/dev/null && [ $i -lt $(($2 * 10)) ]; do
                sleep 0.1; i=$((i + 1))
            done
            if kill -0 "$pid" 2>/dev/null; then
                say "pid $pid ($1) ignored TERM; sending KILL"
                kill -9 "$pid" 2>/dev/null || true
            fi
        fi
        rm -f "$1"
    fi
}

port_free() {  # port_free PORT: nothing listens on TCP PORT
    ! ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
}

# ---------------------------------------------------------------- cleanup
# Runs on every exit: cancel our jobs that are still queued or running, then
# stop slurmd, slurmctld, slurmdbd, MariaDB and munged, each by the pid in
# its own pid file.
OK=0
cleanup() {
    set +e
    if running "$W/slurmctld.pid" && [ -s "$W/submitted.txt" ]; then
        ids=$(awk '{print $2}' "$W/submitted.txt")
        if [ -n "$(squeue -h -o %i -j "$(echo $ids | tr ' ' ,)" 2>/dev/null)" ]; then
            say "cancelling our unfinished jobs"
            # shellcheck disable=SC2086
            scancel $ids 2>/dev/null
            i=0
            while [ -n "$(squeue -h -o %i 2>/dev/null)" ] && [ $i -lt 30 ]; do
                sleep 1; i=$((i + 1))
            done
        fi
    fi
    stop_pidfile "$W/slurmd.pid" 10
    stop_pidfile "$W/slurmctld.pid" 10
    stop_pidfile "$W/slurmdbd.pid" 10
    stop_pidfile "$MY/mysqld.pid" 30
    stop_pidfile "$MUNGE/munged.pid" 5
    if [ "$OK" = 1 ] && [ "${SACCT_GEN_KEEP:-0}" != 1 ]; then
        rm -rf "$W"
    else
        say "work directory kept: $W (logs in $W/log, $MY/mariadb.log)"
    fi
}

# ------------------------------------------------------------ preflight
# Refuse to run when one of our ports is taken (an earlier, interrupted run
# still going?); the work directory is always a new one.
for p in 6827 6828 6829 $MYPORT; do
    port_free $p || die "TCP port $p is in use"
done

# A new directory only root can write: mktemp's random name, or mkdir of
# $SACCT_GEN_DIR failing if anything (a planted symlink too) is there.
if [ -z "$W" ]; then
    W=$(mktemp -d /var/tmp/apppot-sacct-gen.XXXXXX)
elif ! mkdir -m 700 -- "$W" 2>/dev/null; then
    die "SACCT_GEN_DIR $W exists (or cannot be made); give a new path"
fi
chmod 711 "$W"  # munged and mariadbd reach their own subdirectories
say "work directory: $W"
CONF="$W/slurm.conf"
MY="$W/mysql"                 # MariaDB: datadir, socket, pid file, log
MUNGE="$W/munge"              # munged: key, socket, pid file, log
MYSOCK="$MY/mysqld.sock"
# Every Slurm client command below talks to the private daemons only.
export SLURM_CONF="$CONF"
mkdir -p "$W/state" "$W/spool" "$W/log" "$W/jobs" "$MY/data"
trap cleanup EXIT

# ------------------------------------------------------------- packages
missing=
for pkg in mariadb-server slurmdbd slurm-wlm munge; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | \
            grep -q 'install ok installed'; then
        missing="$missing $pkg"
    fi
done
if [ -n "$missing" ]; then
    say "installing$missing"
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends $missing >/dev/null
fi

trap 'exit 130' INT TERM HUP

# ---------------------------------------------------------------- munge
# A private munged: its own key, socket, pid, log and seed files in $MUNGE.
# Daemons, slurmstepd and clients find its socket through AuthInfo=socket=
# (slurm.conf, slurmdbd.conf) and, for connections to slurmdbd, through
# AccountingStoragePass (slurm.conf).  Not the shared /run/munge socket that
# scripts/slurm-local.sh munge would give: other Slurm tests on this machine
# start and stop their munged there at any time, and a run that reused one
# lost all authentication midway when its owner stopped it.
mkdir -p "$MUNGE"
dd if=/dev/urandom of="$MUNGE/munge.key" bs=1024 count=1 2>/dev/null
chown -R munge:munge "$MUNGE"
chmod 755 "$MUNGE"   # munged: socket dir searchable by all, not writable
chmod 400 "$MUNGE/munge.key"
runuser -u munge -- /usr/sbin/munged --socket="$MUNGE/munge.socket" \
    --key-file="$MUNGE/munge.key" --pid-file="$MUNGE/munged.pid" \
    --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munged.seed"
i=0
until munge -n -S "$MUNGE/munge.socket" 2>/dev/null | \
        unmunge -S "$MUNGE/munge.socket" >/dev/null 2>&1; do
    i=$((i + 1))
    [ $i -le 40 ] || die "munged did not start; see $MUNGE/munged.log"
    sleep 0.5
done

# -------------------------------------------------------------- MariaDB
# Private instance: own datadir, socket, pid file and error log, TCP only on
# 127.0.0.1:3407 (slurmdbd's MySQL plugin connects by host and port).
chown -R mysql:mysql "$MY"
mariadb-install-db --no-defaults --user=mysql --datadir="$MY/data" \
    --auth-root-authentication-method=socket --skip-test-db \
    > "$W/log/mariadb-install-db.log" 2>&1 ||
    { cat "$W/log/mariadb-install-db.log" >&2; die "mariadb-install-db failed"; }
setsid mariadbd --no-defaults --user=mysql --datadir="$MY/data" \
    --socket="$MYSOCK" --pid-file="$MY/mysqld.pid" \
    --port=$MYPORT --bind-address=127.0.0.1 --skip-name-resolve \
    --log-error="$MY/mariadb.log" \
    --innodb-buffer-pool-size=1024M --innodb-log-file-size=64M \
    --innodb-lock-wait-timeout=900 \
    </dev/null >/dev/null 2>&1 &
i=0
until mariadb-admin --no-defaults --socket="$MYSOCK" -u root ping \
        >/dev/null 2>&1 && [ -s "$MY/mysqld.pid" ]; do
    i=$((i + 1))
    [ $i -le 120 ] || die "MariaDB did not start; see $MY/mariadb.log"
    sleep 0.5
done
# a random password for slurmdbd's database user, kept in slurmdbd.conf only
DBPASS=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
mariadb --no-defaults --socket="$MYSOCK" -u root <<EOF
CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DBPASS';
CREATE DATABASE slurm_acct_db;
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF

# ------------------------------------------------------------ slurm.conf
cat > "$CONF" <<EOF
ClusterName=sample
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=6827
SlurmdPort=6828
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6829
# for connections to slurmdbd, Slurm takes the munge socket from here
AccountingStoragePass=$MUNGE/munge.socket
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=$W/state
SlurmdSpoolDir=$W/spool
SlurmctldPidFile=$W/slurmctld.pid
SlurmdPidFile=$W/slurmd.pid
SlurmctldLogFile=$W/log/slurmctld.log
SlurmdLogFile=$W/log/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=4 RealMemory=8000 State=UNKNOWN
PartitionName=batch Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

# --------------------------------------------------------------- slurmdbd
# slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF; it holds
# the database password, so root-only (mode 600, owner = SlurmUser root).
(umask 077; cat > "$W/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6829
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYPORT
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
PidFile=$W/slurmdbd.pid
LogFile=$W/log/slurmdbd.log
DebugLevel=info
EOF
)
chown root:root "$W/slurmdbd.conf"
chmod 600 "$W/slurmdbd.conf"
slurmdbd
i=0
until sacctmgr -n list cluster >/dev/null 2>&1; do
    i=$((i + 1))
    [ $i -le 40 ] || die "slurmdbd did not answer; see $W/log/slurmdbd.log"
    sleep 1
done
# register the cluster (this also creates account root with user root,
# the association our jobs run under) before slurmctld first connects
sacctmgr -i add cluster sample >/dev/null

# ------------------------------------------------------ slurmctld, slurmd
slurmctld -f "$CONF"
slurmd -f "$CONF"
i=0
until sinfo -h -o %T 2>/dev/null | grep -q -E '^(idle|mixed|allocated)'; do
    scontrol update nodename="$HOST" state=resume 2>/dev/null || true
    i=$((i + 1))
    [ $i -le 120 ] || die "node did not become idle; see $W/log"
    sleep 0.5
done

# ------------------------------------------------------------- workload
# One line per job: k burst cpus seconds timelimit(min) kind.  A Park-Miller
# generator (seed $SEED) instead of awk's rand(): its sequence is the same in
# mawk and gawk (installing mariadb-server pulls in gawk and switches the awk
# alternative).  Mix: 72% 1 CPU, 20% 2, 8% 4; 80% run 5-10 s, 16% 12-26 s,
# 4% 60-120 s.  Jobs 9, 48, 79 sleep 100-120 s under a 1-minute limit
# (TIMEOUT); 23 and 91 exit 1 after their sleep (FAILED); 40 and 85, the
# last of bursts 1 and 3, are cancelled while pending.  Time limits are what
# a user would ask for: the next of 2/5/10 min above twice the run time,
# sometimes one step more.
awk -v seed=$SEED '
function rnd() { s = (16807 * s) % 2147483647; return s / 2147483647 }
BEGIN {
    s = seed; for (i = 0; i < 10; i++) rnd()
    for (k = 1; k <= 100; k++) {
        b = k <= 40 ? 1 : k <= 65 ? 2 : k <= 85 ? 3 : 4
        u = rnd(); c = u < 0.72 ? 1 : u < 0.92 ? 2 : 4
        u = rnd(); v = rnd()
        if (u < 0.80) d = 5 + int(6 * v)
        else if (u < 0.96) d = 12 + int(15 * v)
        else d = 60 + int(61 * v)
        kind = "ok"
        if (k == 9 || k == 48 || k == 79) { kind = "timeout"; d = 100 + int(21 * v) }
        if (k == 23 || k == 91) kind = "fail"
        if (k == 40 || k == 85) kind = "cancel"
        need = kind == "timeout" ? 0 : 2 * d
        t = need <= 120 ? 2 : need <= 300 ? 5 : 10
        if (kind == "timeout") t = 1
        else if (rnd() < 0.3) t = t == 2 ? 5 : t == 5 ? 10 : 30
        print k, b, c, d, t, kind
    }
}' > "$W/workload.txt"

# Bursts start 0, 180, 330 and 480 s after the first submission; within a
# burst jobs go in back to back, so the queue builds up and then drains.
START=$(date +%Y-%m-%dT%H:%M:%S)
T0=$(date +%s)
: > "$W/submitted.txt"
for b in 1 2 3 4; do
    case $b in 1) at=0 ;; 2) at=180 ;; 3) at=330 ;; 4) at=480 ;; esac
    now=$(date +%s)
    [ $((T0 + at)) -le "$now" ] || sleep $((T0 + at - now))
    say "burst $b at +$(( $(date +%s) - T0 ))s"
    awk -v b=$b '$2 == b' "$W/workload.txt" |
    while read -r k _b c d t kind; do
        if [ "$kind" = fail ]; then cmd="sleep $d; exit 1"; else cmd="sleep $d"; fi
        id=$(sbatch --parsable -J "sim-$k" -p batch -n 1 -c "$c" -t "$t" \
            -D "$W/jobs" -o "$W/jobs/%x.%j.out" --wrap "$cmd")
        echo "$k $id $kind $b" >> "$W/submitted.txt"
    done
    # a user thinks better of the burst's last job half a minute later
    sleep 30
    awk -v b=$b '$3 == "cancel" && $4 == b {print $2}' "$W/submitted.txt" |
    while read -r id; do
        st=$(squeue -h -j "$id" -o %T 2>/dev/null || true)
        [ "$st" = PENDING ] || say "job $id is $st, not PENDING, when cancelled"
        scancel "$id"
    done
done

# ----------------------------------------------------------- wait, dump
NJOBS=$(wc -l < "$W/submitted.txt")
# (an squeue that fails is not an empty queue: retry, give up after 5)
i=0; fails=0
while :; do
    if q=$(squeue -h -o %i); then
        fails=0
        [ -n "$q" ] || break
    else
        fails=$((fails + 1))
        [ $fails -lt 5 ] || die "squeue keeps failing; see $W/log"
    fi
    i=$((i + 1))
    [ $i -le 180 ] || die "jobs still queued after 15 more minutes"
    sleep 5
done
say "queue empty at +$(( $(date +%s) - T0 ))s"
# the job-end records reach slurmdbd asynchronously: wait until all are in
FMT=JobID,JobName,Partition,User,Submit,Start,End,Elapsed,AllocCPUS,NNodes,State,ExitCode,Timelimit
i=0
while :; do
    done_=$(sacct -n -P -X -a -S "$START" -o State | \
        grep -c -v -E '^(PENDING|RUNNING|REQUEUED|SUSPENDED)' || true)
    [ "$done_" -lt "$NJOBS" ] || break
    i=$((i + 1))
    [ $i -le 60 ] || die "only $done_ of $NJOBS job records in the database"
    sleep 2
done
sacct --parsable2 --allusers --allocations --starttime "$START" \
    --format=$FMT > "$W/sacct.txt"

# ---------------------------------------------------------------- checks
lines=$(($(wc -l < "$W/sacct.txt") - 1))
[ "$lines" = "$NJOBS" ] || die "sacct has $lines jobs, $NJOBS were submitted"
for s in COMPLETED TIMEOUT CANCELLED FAILED; do
    cut -d'|' -f11 "$W/sacct.txt" | grep -q "^$s" || die "no $s job in the log"
done
mkdir -p "$(dirname "$OUT")"
cp "$W/sacct.txt" "$OUT"
say "wrote $OUT: $NJOBS jobs, $(( $(date +%s) - T0 ))s after the first submission"
cut -d'|' -f11 "$OUT" | tail -n +2 | sed 's/ by .*//' | sort | uniq -c >&2
OK=1
