#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (CI and local checks of `--plugin SLURMGraph` and of
# the job-array recipe). Run as root. Idempotent: a second call finds the running cluster and returns.
#
#   ci/slurm/start-local-slurm.sh          # install (if needed), configure, start, wait for the node
#   ci/slurm/start-local-slurm.sh --stop   # stop slurmd, slurmctld and munged started by this script
#
# No systemd is needed: the daemons are started directly. Process tracking is proctrack/linuxproc
# and task/none (no cgroups: containers and sandboxes rarely allow them), no accounting, everything
# runs as root. Environment: SLURM_START_TIMEOUT (seconds to wait for the node, default 60),
# SLURM_REAL_MEMORY_MB (memory the node announces, default 2048 or less when the machine has less).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARKER="# written by arborseg ci/slurm/start-local-slurm.sh"
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
RUN=/run/arborseg-slurm
TIMEOUT=${SLURM_START_TIMEOUT:-60}

say() { printf '[start-local-slurm] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

print_logs() {
    local f
    for f in "$LOGS/slurmctld.log" "$LOGS/slurmd.log" /var/log/munge/munged.log; do
        [ -f "$f" ] || continue
        printf '\n----- last lines of %s -----\n' "$f" >&2
        tail -n 40 "$f" >&2 || true
    done
}

alive() {  # alive PIDFILE: the process named in the pid file runs
    local pid
    pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

stop_daemon() {  # stop_daemon NAME PIDFILE: stop the process of the pid file and wait until it is gone
    local pid
    pid=$(cat "$2" 2>/dev/null) || pid=""
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        say "stopping $1 (pid $pid)"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 75); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            say "$1 (pid $pid) did not stop within 15 s; killing it"
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$2"
}

if [ "${1:-}" = "--stop" ]; then
    stop_daemon slurmd "$RUN/slurmd.pid"
    stop_daemon slurmctld "$RUN/slurmctld.pid"
    stop_daemon munged /run/munge/munged.pid
    exit 0
fi

[ "$(id -u)" = 0 ] || die "run me as root (the daemons of the local cluster run as root)"

# --- 1. packages --------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    say "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# --- 2. munge -------------------------------------------------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    say "creating a munge key"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! alive /run/munge/munged.pid || ! munge -n </dev/null | unmunge >/dev/null 2>&1; then
    stop_daemon munged /run/munge/munged.pid
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 1 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
    munge -n </dev/null | unmunge >/dev/null 2>&1 || { print_logs; die "munged does not answer"; }
fi

# --- 3. slurm.conf --------------------------------------------------------------------------------
NODE=$(hostname -s 2>/dev/null || true)
NODE=${NODE:-localhost}
getent hosts "$NODE" >/dev/null || NODE=localhost
# the real topology, so that slurmd does not drain the node for "low socket*core*thread count"
HW=$(slurmd -C 2>/dev/null | head -n 1 | grep -oE '(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+' \
     | tr '\n' ' ')
[ -n "$HW" ] || HW="CPUs=$(nproc)"
MEM_TOTAL_MB=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
MEM_MB=${SLURM_REAL_MEMORY_MB:-2048}
[ "$MEM_MB" -lt "$MEM_TOTAL_MB" ] || MEM_MB=$(( MEM_TOTAL_MB / 2 ))

if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; move it away first (it is not overwritten)"
fi
install -d -m 0755 "$CONF_DIR" "$STATE" "$SPOOL" "$LOGS" "$RUN"
NEW_CONF=$(mktemp)
cat >"$NEW_CONF" <<EOF
$MARKER
ClusterName=arborseg-ci
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/backfill
# short jobs with dependencies (one per Nipype step): look for startable jobs every second
SchedulerParameters=bf_interval=1,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# jobs keep the nice value of the submitting command (a CI machine shared with other work)
PropagatePrioProcess=1
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=60
KillWait=10
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 $HW RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
CHANGED=0
if ! cmp -s "$NEW_CONF" "$CONF"; then
    say "writing $CONF (node $NODE: ${HW}RealMemory=$MEM_MB)"
    install -m 0644 "$NEW_CONF" "$CONF"
    CHANGED=1
fi
rm -f "$NEW_CONF"

# --- 4. daemons -----------------------------------------------------------------------------------
if [ "$CHANGED" = 1 ]; then  # a new configuration: restart what runs with the old one
    stop_daemon slurmd "$RUN/slurmd.pid"
    stop_daemon slurmctld "$RUN/slurmctld.pid"
fi
if ! alive "$RUN/slurmctld.pid"; then
    say "starting slurmctld"
    /usr/sbin/slurmctld -i || { print_logs; die "slurmctld did not start"; }
fi
if ! alive "$RUN/slurmd.pid"; then
    say "starting slurmd"
    /usr/sbin/slurmd -N "$NODE" || { print_logs; die "slurmd did not start"; }
fi

# --- 5. wait until the node takes jobs ------------------------------------------------------------
deadline=$(( $(date +%s) + TIMEOUT ))
state=""
while :; do
    state=$(sinfo --noheader --nodes="$NODE" --format=%T 2>/dev/null | head -n 1 || true)
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|unknown*|"")
            # a node left down by an earlier, failed start: put it back in service
            [ -z "$state" ] || scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
        say "node $NODE is '${state:-not reported}' after ${TIMEOUT}s"
        sinfo -N -l >&2 || true
        scontrol show node "$NODE" >&2 || true
        print_logs
        die "the local SLURM cluster did not come up"
    fi
    sleep 1
done
say "SLURM is up: node $NODE is $state ($(sinfo --version))"
