#!/usr/bin/env bash
# One training run inside a Slurm allocation that survives preemption: every
# template in jobs/slurm/ ends by calling this.
#
#   jobs/slurm/train.sh RUN_FOLDER CONFIG LAUNCHER [ARGS...] -- [section.key=value ...]
#
# 1. A new run starts from CONFIG in RUN_FOLDER; a folder that already holds a
#    committed checkpoint (this is a requeued job) is resumed instead, with the
#    same overrides on top.
# 2. SIGUSR1 or SIGTERM reaching this batch shell (`--signal=B:USR1@<s>`,
#    `scancel --signal=USR1 --batch`) is passed to the launcher as SIGUSR1:
#    mpirun and srun forward it to every rank; the ranks checkpoint and the job
#    ends with status 75. (SIGTERM to Open MPI's mpirun would make it exit 1.)
# 3. Status 75 requeues the job: Slurm runs this script again under the same
#    SLURM_JOB_ID, hence the same RUN_FOLDER, and step 1 resumes it.
set -uo pipefail

EXIT_PREEMPTED=75   # aau_mpi.train's status after a signal and a final checkpoint

if [ $# -lt 4 ] || [[ ! " $* " == *" -- "* ]]; then
    echo "error: usage: $0 RUN_FOLDER CONFIG LAUNCHER [ARGS...] -- [section.key=value ...]" >&2
    exit 2
fi
run=$1 config=$2
shift 2
launcher=()
while [ "$1" != -- ]; do launcher+=("$1"); shift; done
shift
overrides=("$@")

start=$(( ${SLURM_RESTART_COUNT:-0} + 1 ))
if compgen -G "$run/checkpoints/gen-*/manifest.h5" >/dev/null; then
    echo "train.sh: job ${SLURM_JOB_ID:-?} start $start: resuming $run"
    args=(--resume "$run" "${overrides[@]}")
else
    echo "train.sh: job ${SLURM_JOB_ID:-?} start $start: new run $run from $config"
    args=(--config "$config" "output.dir=$(dirname "$run")" "name=$(basename "$run")" "${overrides[@]}")
fi

"${launcher[@]}" python -m aau_mpi.train "${args[@]}" &
pid=$!
trap 'kill -USR1 "$pid" 2>/dev/null' USR1 TERM
# A trapped signal interrupts `wait`; wait again until the launcher has ended.
while :; do
    wait "$pid"
    status=$?
    kill -0 "$pid" 2>/dev/null || break
done

if [ "$status" = "$EXIT_PREEMPTED" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "train.sh: preempted after a checkpoint; requeueing job $SLURM_JOB_ID"
    # Needs --requeue (or JobRequeue=1 in slurm.conf). Slurm ends this script.
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "error: scontrol requeue $SLURM_JOB_ID failed: resubmit by hand, the run continues with --resume $run" >&2
fi
exit "$status"
