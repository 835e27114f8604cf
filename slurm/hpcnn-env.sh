# shellcheck shell=bash
# Shared part of the hpcnn sbatch scripts (hpcnn-one-node.sbatch,
# hpcnn-multi-node.sbatch); sourced by them, not run by itself.
#
# It loads the software environment and defines `hpcnn_launch JOB.toml
# [--set section.key=value ...]`, which starts `hpcnn train` on every task of
# the allocation (one MPI rank per GPU), passes stop signals on to the ranks so
# that they write a checkpoint before Slurm kills them, waits for them, and
# requeues the job when it stopped because its time limit was near.
#
# Settings (environment variables exported at `sbatch` time; all optional):
#   HPCNN_MODULES        modules to `module load` first, e.g. "gcc/12 cuda/12.4 openmpi/4.1"
#   HPCNN_VENV           virtual environment to activate (with hpcnn, mpi4py, cupy)
#   HPCNN_PYTHON         Python that runs hpcnn (default: python3 on PATH after the above)
#   HPCNN_COMMAND        the hpcnn command, word-split (default: "$HPCNN_PYTHON -m hpcnn");
#                        e.g. to wrap it in a profiler
#   HPCNN_LAUNCHER       srun (default) or mpiexec.  srun needs an MPI built for the
#                        site's Slurm (mpi4py built against the site MPI); mpiexec is
#                        for an MPI that brings its own launcher, e.g. the MPICH wheel.
#   HPCNN_SRUN_MPI       srun --mpi plugin (pmix, pmi2, ...); default: the cluster's MpiDefault
#   HPCNN_SRUN_ARGS      more srun options (word-split), e.g. "--cpu-bind=cores"
#   HPCNN_MPIEXEC        the mpiexec to use (default: mpiexec on PATH)
#   HPCNN_MPIEXEC_ARGS   more mpiexec options (word-split)
#   HPCNN_RUN_DIR        directory of this training run; it must survive a requeue, so
#                        by default it lies under the submit directory:
#                        $SLURM_SUBMIT_DIR/runs/$SLURM_JOB_NAME (one per job name: give
#                        each training run its own name with `sbatch -J NAME`).  The
#                        checkpoints go to RUN_DIR/checkpoints (checkpoint.dir) and the
#                        metrics to RUN_DIR/metrics.jsonl (log.metrics), the layout
#                        of the job files in jobs/
#   HPCNN_REQUEUE_AT_LIMIT  1 (default): after the ranks stopped cleanly on the
#                        time-limit warning (SIGUSR1, see --signal), put the job back in
#                        the queue so it resumes; 0: just end
#
# Signals (see docs/slurm.md):
#   USR1  sent to this batch shell by `#SBATCH --signal=B:USR1@SECONDS` before the
#         time limit: the ranks are told to stop (SIGUSR1 through srun, SIGTERM
#         through mpiexec), they checkpoint and exit 0, and the job is requeued.
#   TERM  scancel, preemption, `scontrol requeue`, node shutdown: the ranks are told
#         to stop (Slurm signals them too), and the shell waits for them to finish
#         their checkpoint (Slurm's KillWait bounds how long that may take).

hpcnn_log() {
    echo "hpcnn-slurm: $*"
}

hpcnn_die() {
    echo "hpcnn-slurm: error: $*" >&2
    exit 2
}

hpcnn_setup_env() {
    if [ -n "${HPCNN_MODULES:-}" ]; then
        command -v module >/dev/null 2>&1 || hpcnn_die "HPCNN_MODULES is set but there is no 'module' command"
        # shellcheck disable=SC2086
        module load $HPCNN_MODULES || hpcnn_die "module load $HPCNN_MODULES failed"
    fi
    if [ -n "${HPCNN_VENV:-}" ]; then
        [ -f "$HPCNN_VENV/bin/activate" ] || hpcnn_die "HPCNN_VENV=$HPCNN_VENV is not a virtual environment (no bin/activate)"
        # shellcheck disable=SC1091
        source "$HPCNN_VENV/bin/activate"
    fi
    HPCNN_PYTHON=${HPCNN_PYTHON:-python3}
    command -v "$HPCNN_PYTHON" >/dev/null 2>&1 || hpcnn_die "no Python '$HPCNN_PYTHON' on PATH; set HPCNN_VENV or HPCNN_PYTHON"
    # every rank uses the cores Slurm gave its task, no more
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-$OMP_NUM_THREADS}
    export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
    export PYTHONUNBUFFERED=1
}

# -- signals ---------------------------------------------------------------
hpcnn_stop_ranks() {
    # Ask every rank to stop at its next step boundary (hpcnn then writes a
    # checkpoint and exits 0).  srun turns a SIGTERM it receives into SIGKILL
    # for its tasks, but forwards SIGUSR1 to them as it is, and hpcnn treats
    # SIGUSR1 like SIGTERM.  Hydra's mpiexec passes SIGTERM on to its ranks.
    # (Not `scancel --signal=TERM`: while Slurm is ending the job it keeps
    # retrying, and it would stop the next run of a requeued job.)
    case "$HPCNN_LAUNCHER" in
        srun) kill -USR1 "$hpcnn_pid" 2>/dev/null ;;
        mpiexec) kill -TERM "$hpcnn_pid" 2>/dev/null ;;
    esac
}

hpcnn_on_usr1() {
    hpcnn_log "SIGUSR1: the time limit is near; stopping the ranks at the next step"
    hpcnn_signalled=1
    hpcnn_at_limit=1
    hpcnn_stop_ranks
}

hpcnn_on_term() {
    hpcnn_log "SIGTERM: the job is being cancelled, preempted or requeued; stopping the ranks"
    hpcnn_signalled=1
    hpcnn_terminated=1
    hpcnn_stop_ranks
}

# -- launch ----------------------------------------------------------------
hpcnn_launch() {
    [ $# -ge 1 ] || hpcnn_die "usage: sbatch [sbatch options] slurm/hpcnn-one-node.sbatch (or hpcnn-multi-node.sbatch) JOB.toml [--set section.key=value ...]"
    local job=$1
    shift
    [ -n "${SLURM_JOB_ID:-}" ] || hpcnn_die "not inside a Slurm job: submit this script with sbatch"
    [ -f "$job" ] || hpcnn_die "job file '$job' not found (relative paths start at the submit directory $SLURM_SUBMIT_DIR)"
    hpcnn_setup_env

    HPCNN_LAUNCHER=${HPCNN_LAUNCHER:-srun}
    local run_dir=${HPCNN_RUN_DIR:-$SLURM_SUBMIT_DIR/runs/$SLURM_JOB_NAME}
    local ckpt=$run_dir/checkpoints
    mkdir -p "$ckpt" || hpcnn_die "cannot create the checkpoint directory $ckpt (HPCNN_RUN_DIR)"
    local -a hpcnn
    # shellcheck disable=SC2206
    if [ -n "${HPCNN_COMMAND:-}" ]; then hpcnn=($HPCNN_COMMAND); else hpcnn=("$HPCNN_PYTHON" -m hpcnn); fi
    # paths as TOML literal strings, so that they stay strings; the user's
    # --set options come after ours and win
    local -a train=("${hpcnn[@]}" train "$job" --set "checkpoint.dir='$ckpt'"
                    --set "log.metrics='$run_dir/metrics.jsonl'" "$@")
    local -a cmd
    case "$HPCNN_LAUNCHER" in
        srun)
            # one task per GPU; each rank picks CUDA device SLURM_LOCALID
            cmd=(srun --kill-on-bad-exit=1)
            # Slurm 22.05 to 23.02 do not pass --cpus-per-task from sbatch to srun
            [ -n "${SLURM_CPUS_PER_TASK:-}" ] && cmd+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
            [ -n "${HPCNN_SRUN_MPI:-}" ] && cmd+=(--mpi="$HPCNN_SRUN_MPI")
            # shellcheck disable=SC2206
            [ -n "${HPCNN_SRUN_ARGS:-}" ] && cmd+=($HPCNN_SRUN_ARGS)
            cmd+=("${train[@]}")
            ;;
        mpiexec)
            local mpiexec=${HPCNN_MPIEXEC:-mpiexec}
            command -v "$mpiexec" >/dev/null 2>&1 || hpcnn_die "HPCNN_LAUNCHER=mpiexec but '$mpiexec' is not on PATH; set HPCNN_MPIEXEC"
            cmd=("$mpiexec" -n "$SLURM_NTASKS")
            [ -n "${SLURM_NTASKS_PER_NODE:-}" ] && cmd+=(-ppn "$SLURM_NTASKS_PER_NODE")
            # shellcheck disable=SC2206
            [ -n "${HPCNN_MPIEXEC_ARGS:-}" ] && cmd+=($HPCNN_MPIEXEC_ARGS)
            # The ranks inherit SLURM_LOCALID=0 from the step that runs mpiexec's
            # proxies; drop it so that hpcnn takes the node-local rank from the MPI
            # launcher (MPI_LOCALRANKID, OMPI_COMM_WORLD_LOCAL_RANK) instead.
            cmd+=(env -u SLURM_LOCALID -u SLURM_PROCID "${train[@]}")
            ;;
        *) hpcnn_die "HPCNN_LAUNCHER=$HPCNN_LAUNCHER: use srun or mpiexec" ;;
    esac

    hpcnn_log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) run $((${SLURM_RESTART_COUNT:-0} + 1)) on ${SLURM_JOB_NUM_NODES:-1} node(s) [$SLURM_JOB_NODELIST], $SLURM_NTASKS ranks, launcher $HPCNN_LAUNCHER"
    hpcnn_log "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}; run directory $run_dir"
    hpcnn_log "running: ${cmd[*]}"

    hpcnn_signalled=0 hpcnn_at_limit=0 hpcnn_terminated=0
    trap hpcnn_on_usr1 USR1
    trap hpcnn_on_term TERM
    # run the ranks in the background: bash runs a trap only between commands,
    # and `wait` returns as soon as a trapped signal arrives
    "${cmd[@]}" &
    hpcnn_pid=$!
    local rc
    while :; do
        hpcnn_signalled=0
        wait "$hpcnn_pid"
        rc=$?
        # >128 after a trap: the ranks are still writing their checkpoint
        [ "$hpcnn_signalled" = 1 ] && [ "$rc" -gt 128 ] && continue
        break
    done
    trap - USR1 TERM
    hpcnn_log "ranks finished with status $rc"

    if [ "$hpcnn_at_limit" = 1 ] && [ "$hpcnn_terminated" = 0 ] && [ "$rc" = 0 ] \
        && [ "${HPCNN_REQUEUE_AT_LIMIT:-1}" = 1 ]; then
        hpcnn_log "requeueing job $SLURM_JOB_ID to resume from its last checkpoint"
        scontrol requeue "$SLURM_JOB_ID" || hpcnn_log "scontrol requeue failed; resubmit the job to resume"
    fi
    return "$rc"
}
