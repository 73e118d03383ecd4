#!/usr/bin/env bash
# Collect a sweep's finished runs into one table and one set of plots.
#
#   scripts/collect-sweep.sh runs/sweep-<array job id> [--target ACC]
#
# Prints the table (and writes it as runs.md) with accuracy.png, neighbours.png
# and wait_share.png into <sweep>/plots, via `python -m aau_mpi.plot`. Runs
# that have not finished (still running, preempted and not yet resumed, or
# failed) are listed and left out, so the table compares like with like.
# To run it when the whole array has ended:
#   sbatch --dependency=afterany:<array job id> --wrap "scripts/collect-sweep.sh runs/sweep-<id>"
set -euo pipefail

[ $# -ge 1 ] && [ -d "$1" ] || { echo "error: usage: $0 SWEEP_FOLDER [--target ACC] (e.g. runs/sweep-1234)" >&2; exit 2; }
sweep=${1%/}
shift

finished=()
for run in "$sweep"/*/; do
    run=${run%/}
    [ "$(basename "$run")" = plots ] && continue
    if grep -qs '"exit": *"finished"' "$run/summary.json"; then
        finished+=("$run")
    else
        echo "not finished, left out: $run"
    fi
done
[ ${#finished[@]} -gt 0 ] || { echo "error: no finished run in $sweep: wait for the array (squeue) or look at its slurm-*.out logs" >&2; exit 1; }
exec python -m aau_mpi.plot "${finished[@]}" --out "$sweep/plots" "$@"
