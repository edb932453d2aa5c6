#!/usr/bin/env bash
# Shared launch logic of slurm/{pretrain,finetune,evaluate}.sbatch. Not submitted on its own.
#
# Sourced by a template (batch shell, one per job start): resolves the config, the MLflow run and the rendezvous,
# then runs ONE task per node with srun; each task runs this file again (`launch.sh node`), which starts torchrun,
# and torchrun starts PROCS_PER_NODE ranks (c10d rendezvous on the first node of the allocation).
#
# Preemption: `#SBATCH --signal=B:USR1@N` sends SIGUSR1 to the batch shell N seconds before the time limit. The
# trap below passes it to the srun step; srun hands it to every task, and the node wrapper passes it to the ranks
# (torchrun itself ignores it: its default action would kill the launcher). The trainer's ranks agree, save a
# checkpoint and exit 0; then, while the newest checkpoint is short of optim.max_steps, the batch shell runs
# `scontrol requeue`, and the next start resumes from the checkpoint in the same MLflow run.
#
# Variables (set by the template; see slurm/README.md): CONFIG OVERRIDES MODULE MODE CHECKPOINT_DIR
# MLFLOW_TRACKING_URI VENV REPO_DIR GPUS_PER_NODE PROCS_PER_NODE CPU_PROCS_PER_NODE MAX_RESTARTS EXTRA_TORCHRUN_ARGS
# CONTAINER_EXEC SRUN_ARGS.

# ---------------------------------------------------------------------------------------------- node side (srun task)
biomedgpt_node_main() {
    set -euo pipefail
    local child="" rc
    # torchrun (and, until the trainer installs its handler, its ranks) ignore USR1; this wrapper forwards it.
    local -a extra=()
    read -r -a extra <<<"${EXTRA_TORCHRUN_ARGS:-}"
    (
        trap '' USR1
        exec "$BIOMEDGPT_PYTHON" -m torch.distributed.run \
            --nnodes="$NNODES" --nproc_per_node="$PROCS_PER_NODE" \
            --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID" \
            --max_restarts=0 ${extra[@]+"${extra[@]}"} \
            -m "$MODULE" "${BIOMEDGPT_ARGS[@]}"
    ) &
    child=$!
    # shellcheck disable=SC2317  # invoked by the traps
    biomedgpt_forward() {
        local sig=$1 workers
        workers=$(pgrep -P "$child" || true) # the ranks are torchrun's children
        echo "[launch.sh node $(hostname -s)] SIG$sig -> ranks ${workers//$'\n'/ }" >&2
        # shellcheck disable=SC2086  # a list of pids
        if [[ -n $workers ]]; then kill -s "$sig" $workers 2>/dev/null || true; fi
        if [[ $sig == TERM ]]; then kill -s TERM "$child" 2>/dev/null || true; fi
    }
    trap 'biomedgpt_forward USR1' USR1
    trap 'biomedgpt_forward TERM' TERM
    while :; do
        rc=0
        wait "$child" || rc=$?
        kill -0 "$child" 2>/dev/null || break # else a trap interrupted the wait
    done
    exit "$rc"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    [[ ${1:-} == node ]] || {
        echo "launch.sh is sourced by slurm/*.sbatch; submit one of those (see slurm/README.md)" >&2
        exit 2
    }
    read -r -a BIOMEDGPT_ARGS <<<"${BIOMEDGPT_ARGS_STR:-}"
    biomedgpt_node_main
fi

# --------------------------------------------------------------------------------------------- batch side (sourced)
biomedgpt_log() { echo "[launch.sh $(date '+%F %T')] $*"; }

biomedgpt_die() {
    echo "[launch.sh] error: $*" >&2
    exit 2
}

biomedgpt_batch_main() {
    : "${SLURM_JOB_ID:?launch.sh runs inside a SLURM job (sbatch slurm/pretrain.sbatch)}"
    local launch_sh="$REPO_DIR/slurm/launch.sh"
    export REPO_DIR MODULE PROCS_PER_NODE NNODES MASTER_ADDR MASTER_PORT EXTRA_TORCHRUN_ARGS
    # A container runtime in front of every python command of the batch shell and of each node's task.
    local -a container=() srun_args=()
    read -r -a container <<<"${CONTAINER_EXEC:-}"
    read -r -a srun_args <<<"${SRUN_ARGS:-}"
    export BIOMEDGPT_NO_PROGRESS=${BIOMEDGPT_NO_PROGRESS:-1} # a tqdm bar does not belong in a log file
    export PYTHONUNBUFFERED=1

    # Python: the venv's, else whatever python is first on PATH (a module or conda env activated by the user).
    if [[ -n ${VENV:-} && -x $VENV/bin/python ]]; then
        BIOMEDGPT_PYTHON=$VENV/bin/python
        export PATH="$VENV/bin:$PATH"
    else
        [[ -z ${VENV:-} ]] || biomedgpt_log "warning: VENV=$VENV has no bin/python; using $(command -v python3)"
        BIOMEDGPT_PYTHON=$(command -v python3 || command -v python)
    fi
    export BIOMEDGPT_PYTHON

    # Topology: one srun task per node; torchrun starts PROCS_PER_NODE ranks on each.
    NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))} # same rule as biomedgpt.runtime.launcher_env
    if [[ -z ${GPUS_PER_NODE:-} ]]; then
        GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
        if [[ -z $GPUS_PER_NODE && -n ${SLURM_JOB_GPUS:-} ]]; then # --gres=gpu:N sets only the GPU ids, "0,1,2,3"
            local -a gpu_ids=()
            IFS=, read -r -a gpu_ids <<<"$SLURM_JOB_GPUS"
            GPUS_PER_NODE=${#gpu_ids[@]}
        fi
        GPUS_PER_NODE=${GPUS_PER_NODE:-0}
        GPUS_PER_NODE=${GPUS_PER_NODE##*:} # "a100:8" -> 8
    fi
    if [[ -z ${PROCS_PER_NODE:-} ]]; then
        if ((GPUS_PER_NODE > 0)); then PROCS_PER_NODE=$GPUS_PER_NODE; else PROCS_PER_NODE=${CPU_PROCS_PER_NODE:-1}; fi
    fi
    local cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / PROCS_PER_NODE > 0 ? cpus / PROCS_PER_NODE : 1))}

    # The module's arguments: --config CONFIG, then OVERRIDES (whitespace-separated key=value), then the checkpoint dir.
    local -a overrides=()
    read -r -a overrides <<<"${OVERRIDES:-}"
    [[ -z ${CHECKPOINT_DIR:-} ]] || overrides+=("checkpoint.dir=$CHECKPOINT_DIR")
    [[ -z ${MLFLOW_TRACKING_URI:-} ]] || export MLFLOW_TRACKING_URI
    BIOMEDGPT_ARGS_STR="--config $CONFIG ${overrides[*]}"
    export BIOMEDGPT_ARGS_STR

    biomedgpt_log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) start $((${SLURM_RESTART_COUNT:-0} + 1)) on $SLURM_JOB_NODELIST:" \
        "$NNODES node(s) x $PROCS_PER_NODE rank(s) (GPUs per node: $GPUS_PER_NODE, CPUs per task: $cpus," \
        "OMP_NUM_THREADS=$OMP_NUM_THREADS), rendezvous $MASTER_ADDR:$MASTER_PORT"
    biomedgpt_log "python -m $MODULE $BIOMEDGPT_ARGS_STR"
    BIOMEDGPT_SIGNALLED=""
    BIOMEDGPT_SRUN_PID=""
    # shellcheck disable=SC2317  # invoked by the traps
    biomedgpt_on_signal() {
        local sig=$1
        biomedgpt_log "batch shell got SIG$sig; passing it to the ranks (they save a checkpoint and exit 0)"
        BIOMEDGPT_SIGNALLED=$sig
        [[ -z $BIOMEDGPT_SRUN_PID ]] || kill -s "$sig" "$BIOMEDGPT_SRUN_PID" 2>/dev/null || true
    }
    trap 'biomedgpt_on_signal USR1' USR1
    trap 'biomedgpt_on_signal TERM' TERM


    ${container[@]+"${container[@]}"} "$BIOMEDGPT_PYTHON" -c \
        'import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)' "$MODULE" 2>/dev/null ||
        biomedgpt_die "python module $MODULE is not installed in ${container[*]} $BIOMEDGPT_PYTHON"

    local max_steps="" latest_step=0 checkpoint_dir=""
    if [[ $MODE == train ]]; then
        local prep key value
        # shellcheck disable=SC2086  # split like the ranks split it
        prep=$(${container[@]+"${container[@]}"} "$BIOMEDGPT_PYTHON" "$REPO_DIR/slurm/job_prep.py" --mlflow --check-inputs \
            $BIOMEDGPT_ARGS_STR) ||
            biomedgpt_die "the run config does not resolve or names inputs that are missing (message above); nothing was started"
        while IFS='=' read -r key value; do
            case $key in
            checkpoint_dir) checkpoint_dir=$value ;;
            max_steps) max_steps=$value ;;
            latest_step) latest_step=$value ;;
            tracking_uri) biomedgpt_log "MLflow store: $value" ;;
            mlflow_run_id) [[ -z $value ]] || export MLFLOW_RUN_ID=$value ;;
            esac
        done <<<"$prep"
        biomedgpt_log "checkpoints: $checkpoint_dir (newest complete: step $latest_step of $max_steps);" \
            "MLflow run: ${MLFLOW_RUN_ID:-(created by the trainer)}"
        if ((latest_step >= max_steps)); then
            biomedgpt_log "training already finished (step $latest_step >= optim.max_steps $max_steps); nothing to do"
            return 0
        fi
    fi

    # srun does not inherit --cpus-per-task from sbatch (SLURM >= 22.05): pass it on.
    local rc=0
    if [[ -n $BIOMEDGPT_SIGNALLED ]]; then
        biomedgpt_log "signalled before the step started; not starting it"
    else
        srun --nodes="$NNODES" --ntasks-per-node=1 --ntasks="$NNODES" --cpus-per-task="$cpus" --kill-on-bad-exit=1 \
            ${srun_args[@]+"${srun_args[@]}"} ${container[@]+"${container[@]}"} bash "$launch_sh" node &
        BIOMEDGPT_SRUN_PID=$!
        while :; do
            rc=0
            wait "$BIOMEDGPT_SRUN_PID" || rc=$?
            kill -0 "$BIOMEDGPT_SRUN_PID" 2>/dev/null || break # else a trap interrupted the wait
        done
        biomedgpt_log "step finished with exit code $rc"
    fi
    trap - USR1 TERM

    if [[ $BIOMEDGPT_SIGNALLED == USR1 && $rc -eq 0 && $MODE == train ]]; then
        local prep_after
        # shellcheck disable=SC2086
        prep_after=$(${container[@]+"${container[@]}"} "$BIOMEDGPT_PYTHON" "$REPO_DIR/slurm/job_prep.py" $BIOMEDGPT_ARGS_STR)
        latest_step=$(sed -n 's/^latest_step=//p' <<<"$prep_after")
        if ((latest_step >= max_steps)); then
            biomedgpt_log "training finished (step $latest_step) before the signal took effect; not requeueing"
        elif ((${SLURM_RESTART_COUNT:-0} >= MAX_RESTARTS)); then
            biomedgpt_log "stopped at step $latest_step; MAX_RESTARTS=$MAX_RESTARTS reached, not requeueing"
        else
            biomedgpt_log "stopped at step $latest_step of $max_steps; requeueing job $SLURM_JOB_ID"
            scontrol requeue "$SLURM_JOB_ID"
            sleep 300 # the requeue ends this shell
        fi
    elif [[ $BIOMEDGPT_SIGNALLED == USR1 && ${REQUEUE_ON_SIGNAL:-0} == 1 && ${SLURM_RESTART_COUNT:-0} -lt $MAX_RESTARTS ]]; then
        biomedgpt_log "stopped by SIGUSR1; requeueing job $SLURM_JOB_ID (the command starts over)"
        scontrol requeue "$SLURM_JOB_ID"
        sleep 300
    fi
    return "$rc"
}

# Defaults for what a template may leave unset.
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
MODULE=${MODULE:-biomedgpt.train}
MODE=${MODE:-train}
MAX_RESTARTS=${MAX_RESTARTS:-50}
VENV=${VENV:-$REPO_DIR/.venv}
