#!/usr/bin/env bash
# A single-node SLURM cluster on this machine (Debian's slurm-wlm + munge), for testing the sbatch templates.
#
#   scripts/slurm_localhost.sh          # install if missing, configure, start; waits until the node is idle
#   scripts/slurm_localhost.sh stop     # stop slurmd, slurmctld and munged (started by this script)
#   scripts/slurm_localhost.sh status   # sinfo, or a non-zero exit when the cluster is not up
#
# SLURM_LOCALHOST_VIRTUAL_NODES=N (default 0) adds N more nodes, bgslurm1..N, in partition `virtual`: each a slurmd
# on a virtual host of scripts/virtual_nodes.sh (its own address, hostname, /dev/shm, spool, pid and log folders),
# so `sbatch --partition=virtual --nodes=2` runs a real two-node job on this one machine.
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
VIRTUAL_NODES=${SLURM_LOCALHOST_VIRTUAL_NODES:-0}
VIRTUAL_NODES_SCRIPT=$(dirname "$(readlink -f "$0")")/virtual_nodes.sh
VIRTUAL_STATE=$STATE_DIR/virtual # <node>/{run,spool,log}: what each virtual slurmd keeps apart

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
    # A virtual node ($1 with address $2) sees the same hardware: the nodes share this machine.
    local name=${1:-$(hostname -s)} addr=${2:-} line cpus mem
    line=$(slurmd -C 2>/dev/null | grep '^NodeName=' || true)
    if [[ -n $line ]]; then
        # Keep a little memory back so a rounding difference never drains the node ("Low RealMemory").
        mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$line")
        line=$(sed -e "s/^NodeName=[^ ]*/NodeName=$name/" -e "s/RealMemory=[0-9]*/RealMemory=$((mem * 95 / 100))/" \
            <<<"$line")
    else
        cpus=$(nproc)
        mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.95)}' /proc/meminfo)
        line="NodeName=$name CPUs=$cpus RealMemory=$mem"
    fi
    echo "$line${addr:+ NodeAddr=$addr} State=UNKNOWN"
}

virtual_node_names() {
    local i
    for ((i = 1; i <= VIRTUAL_NODES; i++)); do echo "bgslurm$i"; done
}

virtual_node_lines() {
    # NodeName lines and the partition for the virtual nodes (made here: the addresses go into the config).
    ((VIRTUAL_NODES > 0)) || return 0
    local names name addr
    mapfile -t names < <(virtual_node_names)
    bash "$VIRTUAL_NODES_SCRIPT" up "${names[@]}" >"$STATE_DIR/virtual_nodes.list" ||
        die "could not make the virtual nodes (scripts/virtual_nodes.sh up ${names[*]})"
    while read -r name addr; do node_line "$name" "$addr"; done <"$STATE_DIR/virtual_nodes.list"
    echo "PartitionName=virtual Nodes=$(IFS=,; echo "${names[*]}") MaxTime=INFINITE State=UP"
}

write_config() {
    local name tmp
    name=$(hostname -s)
    mkdir -p "$CONF_DIR" "$LOG_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd" "$RUN_DIR"
    local virtual
    virtual=$(virtual_node_lines)
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
$virtual
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
        runuser -u munge -- munged --force 9>&- || die "munged did not start (see /var/log/munge/munged.log)"
    else
        munged --force 9>&- || die "munged did not start (see /var/log/munge/munged.log)"
    fi
    for _ in $(seq 20); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.5
    done
    die "munge does not answer (munge -n | unmunge fails; see /var/log/munge/munged.log)"
}

virtual_pidfile() { echo "$VIRTUAL_STATE/$1/run/slurmd.pid"; }

stop_virtual_slurmds() {
    local pidfile
    for pidfile in "$VIRTUAL_STATE"/*/run/slurmd.pid; do
        [[ -e $pidfile ]] && stop_daemon "slurmd of $(basename "$(dirname "$(dirname "$pidfile")")")" "$pidfile"
    done
    return 0
}

start_virtual_slurmds() {
    local name
    for name in $(virtual_node_names); do
        pid_alive "$(virtual_pidfile "$name")" && continue
        mkdir -p "$VIRTUAL_STATE/$name"/{run,spool,log}
        log "starting slurmd on virtual node $name (log $VIRTUAL_STATE/$name/log/slurmd.log)"
        VIRTUAL_NODE_BINDS="$VIRTUAL_STATE/%n/run:$RUN_DIR $VIRTUAL_STATE/%n/spool:$STATE_DIR/slurmd $VIRTUAL_STATE/%n/log:$LOG_DIR" \
            bash "$VIRTUAL_NODES_SCRIPT" exec "$name" slurmd 9>&- ||
            die "slurmd did not start on virtual node $name; see $VIRTUAL_STATE/$name/log/slurmd.log"
    done
}

start_slurm() {
    local changed=$1
    if [[ $changed == 1 ]]; then
        # New configuration: restart whatever runs (an earlier configuration of this script).
        stop_virtual_slurmds
        stop_daemon slurmd "$RUN_DIR/slurmd.pid"
        stop_daemon slurmctld "$RUN_DIR/slurmctld.pid"
    fi
    if ! pid_alive "$RUN_DIR/slurmctld.pid"; then
        log "starting slurmctld (log $LOG_DIR/slurmctld.log)"
        slurmctld 9>&- || die "slurmctld did not start; see $LOG_DIR/slurmctld.log"
    fi
    if ! pid_alive "$RUN_DIR/slurmd.pid"; then
        log "starting slurmd (log $LOG_DIR/slurmd.log)"
        slurmd 9>&- || die "slurmd did not start; see $LOG_DIR/slurmd.log"
    fi
    start_virtual_slurmds
}

wait_idle() {
    local name
    for name in "$(hostname -s)" $(virtual_node_names); do wait_node_idle "$name"; done
}

wait_node_idle() {
    local name=$1 state deadline
    deadline=$((SECONDS + WAIT_SECONDS))
    while ((SECONDS < deadline)); do
        state=$(sinfo -h -n "$name" -o '%T' 2>/dev/null | head -n1 || true)
        case $state in
        idle | mixed | allocated | completing)
            log "node $name is $state"
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
    tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" "$VIRTUAL_STATE/$name/log/slurmd.log" >&2 2>/dev/null || true
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
    stop_virtual_slurmds
    stop_daemon slurmd "$RUN_DIR/slurmd.pid"
    stop_daemon slurmctld "$RUN_DIR/slurmctld.pid"
    if [[ -s /run/munge/munged.pid ]]; then
        stop_daemon munged /run/munge/munged.pid
    fi
}

with_lock() {
    # Callers running at once (parallel test workers, two shells) take turns: the second finds the cluster up.
    # The daemons started under the lock get fd 9 closed (9>&-), or they would hold the lock for good.
    need_root
    mkdir -p "$RUN_DIR"
    exec 9>"$RUN_DIR/slurm_localhost.lock"
    flock 9
    "$@"
}

case ${1:-start} in
start) with_lock cmd_start ;;
stop) with_lock cmd_stop ;;
status) sinfo ;;
-h | --help | help) sed -n '2,15p' "$0" ;;
*) die "unknown command '$1' (start, stop, status)" ;;
esac
