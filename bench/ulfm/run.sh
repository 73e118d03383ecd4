#!/usr/bin/env bash
# Run every ULFM probe with hard timeouts and print what each observed.
#
#   bench/ulfm/run.sh                         # Open MPI wheel (/work/main/.venv or $OMPI_VENV)
#   bench/ulfm/run.sh /work/venv-mpich-probe  # the same, then the MPICH wheel in that venv
#
# Each job runs under `timeout -k 5 60`; inside it every probe step is bounded
# by its own timer (common.py). Full logs go to $LOGDIR (default /tmp/ulfm-probes);
# the summary shows the observation lines ("rN step ...") and each job's exit status.
# About 2 minutes for Open MPI and 3 for MPICH on a 2-core machine.

set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
OMPI_VENV="${OMPI_VENV:-/work/main/.venv}"
MPICH_VENV="${1:-}"
LOGDIR="${LOGDIR:-/tmp/ulfm-probes}"
mkdir -p "$LOGDIR"
SUMMARY="$LOGDIR/summary.txt"
: > "$SUMMARY"

# Open MPI as root, oversubscribed, one-sided over sm/rdma (as in the Makefile).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe
export PYTHONUNBUFFERED=1

# job NAME ENV... -- LAUNCHER-AND-ARGS: one bounded MPI job, its log and its summary.
job() {
    local name="$1"; shift
    local envs=()
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    local log="$LOGDIR/$name.log" t0 rc
    t0=$(date +%s.%N)
    env "${envs[@]}" timeout -k 5 60 "$@" > "$log" 2>&1
    rc=$?
    local secs
    secs=$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")
    {
        echo "### $name: launcher exit $rc after $secs s"
        echo "    ${envs[*]} $*" | sed "s|$HERE/||g"
        # Observations, launcher verdicts and assertion/timeout lines, one each.
        tr -d '\r' < "$log" | grep -a -E \
            '^r[0-9]+ |^== |prterun noticed|YOUR APPLICATION TERMINATED|Assertion failed|HUNG_STEP|^Timeout' \
            | sed -E 's/^ +File .*line [0-9]+ in (HUNG_STEP_.*)/    faulthandler backstop: main thread in \1/' \
            | awk '!seen[$0]++ || /^r[0-9]/' | sed 's/^/    /'
    } | tee -a "$SUMMARY"
}

OV="$OMPI_VENV/bin"
O=(OMPI_MCA_osc=sm,rdma)
FT=(--with-ft ulfm)
P="$OV/python $HERE"
if [ -x "$OV/mpirun" ]; then
    echo "== Open MPI: $("$OV/ompi_info" | grep -E 'Open MPI:|FT MPI support' | tr -s ' ' | tr '\n' ';')" | tee -a "$SUMMARY"
    job ompi-rma-no-ft "${O[@]}" -- "$OV/mpirun" -n 3 $P/probe_rma.py --victim 1
    job ompi-rma-v1 "${O[@]}" -- "$OV/mpirun" "${FT[@]}" -n 3 $P/probe_rma.py --victim 1
    job ompi-rma-v0-owner-dead "${O[@]}" -- "$OV/mpirun" "${FT[@]}" -n 3 $P/probe_rma.py --victim 0
    job ompi-rma-v2-other-deadfirst "${O[@]}" -- "$OV/mpirun" "${FT[@]}" -n 4 \
        $P/probe_rma.py --victim 2 --kill other --order dead-first --delay 0
    job ompi-rma-v1-rdma-tcp OMPI_MCA_osc=rdma OMPI_MCA_btl=self,tcp -- "$OV/mpirun" "${FT[@]}" -n 3 \
        $P/probe_rma.py --victim 1
    job ompi-detect-v1 "${O[@]}" -- "$OV/mpirun" "${FT[@]}" -n 4 $P/probe_detect_shrink.py --victim 1
    job ompi-detect-v0-other-freeold "${O[@]}" -- "$OV/mpirun" "${FT[@]}" -n 4 \
        $P/probe_detect_shrink.py --victim 0 --kill other --free-old
    job ompi-detect-no-sentinel "${O[@]}" -- "$OV/mpirun" "${FT[@]}" -n 4 \
        $P/probe_detect_shrink.py --no-sentinel --window 5
    job ompi-detect-create-group "${O[@]}" -- "$OV/mpirun" "${FT[@]}" -n 4 \
        $P/probe_detect_shrink.py --rebuild create-group --no-revoke
    job ompi-detect-exit-not-sigkill "${O[@]}" -- "$OV/mpirun" "${FT[@]}" -n 4 \
        $P/probe_detect_shrink.py --kill exit --window 5 --timeout 5
else
    echo "no Open MPI venv at $OMPI_VENV" | tee -a "$SUMMARY"
fi

if [ -n "$MPICH_VENV" ]; then
    MV="$MPICH_VENV/bin"
    M=("$MV/mpiexec" -disable-auto-cleanup)
    Q="$MV/python $HERE"
    echo "== MPICH: $("$MV/python" -c 'from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])')" \
        | tee -a "$SUMMARY"
    job mpich-rma-sigkill -- "${M[@]}" -n 3 $Q/probe_rma.py --victim 1
    job mpich-rma-exit -- "${M[@]}" -n 3 $Q/probe_rma.py --victim 1 --kill exit
    # MPICH installs its own C handler for SIGUSR1 at MPI_Init; the probes replace it
    # (to time the notice) unless --keep-sigusr1.
    job mpich-rma-exit-mpich-sigusr1-handler -- "${M[@]}" -n 3 $Q/probe_rma.py --victim 1 --kill exit \
        --keep-sigusr1
    job mpich-enable-ft MPIR_CVAR_ENABLE_FT=1 -- "${M[@]}" -n 3 $Q/probe_rma.py --victim 1 --kill exit
    job mpich-detect-exit -- "${M[@]}" -n 4 $Q/probe_detect_shrink.py --kill exit --window 3 --timeout 5
    job mpich-detect-exit-create-group -- "${M[@]}" -n 4 $Q/probe_detect_shrink.py --kill exit \
        --window 3 --rebuild create-group --no-world-after --timeout 5
    for step in get-failed failure-ack revoke agree shrink; do
        job "mpich-mpix-$step" -- "${M[@]}" -n 3 $Q/probe_mpix.py --only "$step" --timeout 5 \
            --delay 0 --keep-sigusr1
    done
fi
echo "summary: $SUMMARY, logs: $LOGDIR/*.log"
