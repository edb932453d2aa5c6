#!/usr/bin/env bash
# A single-node SLURM cluster on this machine (Debian's slurm-wlm + munge), for testing the sbatch templates.
#
#   scripts/slurm_localhost.sh          # install if missing, configure, start; waits until the node is idle
#   scripts/slurm_localhost.sh stop     # stop slurmd, slurmctld and munged (started by this script)
#   scripts/slurm_localhost.sh status   # sinfo, or a non-zero exit when the cluster is not up
#
# Idempotent: a running, idle cluster with the same configuration is left alone. Needs root (apt-get, daemons).
# The node is named after `hostname -s` and has this machine's CPUs and memory; one partition `debug`.
# No cgroups: ProctrackType=proctrack/linuxproc, TaskPlugin=task/none. No accounting (sacct is unavailable).
# Exit status: 0 when the node is idle (or stopped), 1 with a message on stderr when the cluster cannot start.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/slurm
RUN_DIR=/run/slurm
MUNGE_KEY=/etc/munge/munge.key
WAIT_SECONDS=${SLURM_LOCALHOST_WAIT:-60}

die() {
    echo "slurm_localhost: error: $*" >&2
    exit 1
}

log() { echo "slurm_localhost: $*" >&2; }

need_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (installs packages, writes $CONF, starts daemons)"
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
        command -v munged >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "slurm-wlm/munge are not installed and there is no apt-get to install them"
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || die "apt-get update failed"
    apt-get install -y -qq slurm-wlm munge >&2 || die "apt-get install slurm-wlm munge failed"
}

node_line() {
    # slurmd -C reports the hardware exactly as slurmd will see it (CPUs, sockets, cores, threads, RealMemory).
    local name line cpus mem
    name=$(hostname -s)
    line=$(slurmd -C 2>/dev/null | grep '^NodeName=' || true)
    if [[ -n $line ]]; then
        # Keep a little memory back so a rounding difference never drains the node ("Low RealMemory").
        mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$line")
        line=$(sed -e "s/^NodeName=[^ ]*/NodeName=$name/" -e "s/RealMemory=[0-9]*/RealMemory=$((mem * 95 / 100))/" \
            <<<"$line")
        echo "$line State=UNKNOWN"
    else
        cpus=$(nproc)
        mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.95)}' /proc/meminfo)
        echo "NodeName=$name CPUs=$cpus RealMemory=$mem State=UNKNOWN"
    fi
}

write_config() {
    local name tmp
    name=$(hostname -s)
    mkdir -p "$CONF_DIR" "$LOG_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd" "$RUN_DIR"
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
# Written by scripts/slurm_localhost.sh: a single-node test cluster on $name.
ClusterName=localhost
SlurmctldHost=$name
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerParameters=sched_interval=2
MinJobAge=300
KillWait=30
InactiveLimit=0
Waittime=0
$(node_line)
PartitionName=debug Nodes=$name Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 1 # unchanged
    fi
    install -m 0644 "$tmp" "$CONF"
    rm -f "$tmp"
    log "wrote $CONF"
    return 0
}

start_munge() {
    if [[ ! -s $MUNGE_KEY ]]; then
        log "generating $MUNGE_KEY"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom bs=1 count=1024 of="$MUNGE_KEY" status=none
        fi
    fi
    local owner=root
    id munge >/dev/null 2>&1 && owner=munge
    chown "$owner:$owner" "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown "$owner:$owner" /run/munge /var/log/munge /var/lib/munge
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    log "starting munged"
    if [[ $owner == munge ]]; then
        runuser -u munge -- munged --force || die "munged did not start (see /var/log/munge/munged.log)"
    else
        munged --force || die "munged did not start (see /var/log/munge/munged.log)"
    fi
    for _ in $(seq 20); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.5
    done
    die "munge does not answer (munge -n | unmunge fails; see /var/log/munge/munged.log)"
}

start_slurm() {
    local changed=$1
    if [[ $changed == 1 ]]; then
        # New configuration: restart whatever runs (an earlier configuration of this script).
        stop_daemon slurmd "$RUN_DIR/slurmd.pid"
        stop_daemon slurmctld "$RUN_DIR/slurmctld.pid"
    fi
    if ! pid_alive "$RUN_DIR/slurmctld.pid"; then
        log "starting slurmctld (log $LOG_DIR/slurmctld.log)"
        slurmctld || die "slurmctld did not start; see $LOG_DIR/slurmctld.log"
    fi
    if ! pid_alive "$RUN_DIR/slurmd.pid"; then
        log "starting slurmd (log $LOG_DIR/slurmd.log)"
        slurmd || die "slurmd did not start; see $LOG_DIR/slurmd.log"
    fi
}

wait_idle() {
    local name state deadline
    name=$(hostname -s)
    deadline=$((SECONDS + WAIT_SECONDS))
    while ((SECONDS < deadline)); do
        state=$(sinfo -h -n "$name" -o '%T' 2>/dev/null | head -n1 || true)
        case $state in
        idle | mixed | allocated | completing)
            log "node $name is $state; partition debug is up"
            return 0
            ;;
        drain* | down*)
            # A node that was down before (e.g. the daemons were killed) comes back once slurmd registers.
            scontrol update nodename="$name" state=resume >/dev/null 2>&1 || true
            ;;
        esac
        sleep 1
    done
    sinfo -N -l >&2 || true
    tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    die "node $name did not become idle within ${WAIT_SECONDS}s (state: ${state:-unknown})"
}

stop_daemon() {
    local name=$1 pidfile=$2 pid
    pid_alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    log "stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
}

cmd_start() {
    need_root
    install_packages
    local changed=0
    write_config && changed=1
    start_munge
    start_slurm "$changed"
    wait_idle
}

cmd_stop() {
    need_root
    stop_daemon slurmd "$RUN_DIR/slurmd.pid"
    stop_daemon slurmctld "$RUN_DIR/slurmctld.pid"
    if [[ -s /run/munge/munged.pid ]]; then
        stop_daemon munged /run/munge/munged.pid
    fi
}

case ${1:-start} in
start) cmd_start ;;
stop) cmd_stop ;;
status) sinfo ;;
-h | --help | help) sed -n '2,11p' "$0" ;;
*) die "unknown command '$1' (start, stop, status)" ;;
esac
