"""Fit the simulator's per-iteration costs to real runs (aau_mpi/training/calibration.py).

    python -m aau_mpi.calibrate RUN_FOLDER [RUN_FOLDER ...] --out calibration.json

RUN_FOLDER: run folders that aau_mpi.train wrote (config.yaml, rank-NNNNN.jsonl);
`python -m aau_mpi.simulate --calibration calibration.json` reads the file.
"""

import argparse
import json
import sys
from pathlib import Path

from aau_mpi.base.errors import exit_status
from aau_mpi.training.calibration import calibrate


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m aau_mpi.calibrate",
        description="Fit the simulator's per-iteration costs to real runs' rank logs.")
    parser.add_argument("folders", nargs="+", metavar="RUN_FOLDER",
                        help="run folders of aau_mpi.train (config.yaml, rank-NNNNN.jsonl)")
    parser.add_argument("--out", required=True, help="the calibration file to write (JSON)")
    args = parser.parse_args(argv)
    result = calibrate([Path(f) for f in args.folders])
    result["command"] = " ".join(["python -m aau_mpi.calibrate", *(argv or sys.argv[1:])])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'policy':<10} {'ranks':>5} {'runs':>5} {'overhead ms':>12} {'collective ms':>14}"
          f"  stragglers")
    for group in result["groups"]:
        collective = group.get("collective_seconds")
        stragglers = group["stragglers"]
        print(f"{group['policy']:<10} {group['ranks']:>5} {group['runs']:>5} "
              f"{group['overhead_seconds']['mean'] * 1e3:>12.2f} "
              f"{collective['mean'] * 1e3 if collective else float('nan'):>14.2f}  "
              f"{'every setting' if stragglers is None else json.dumps(stragglers)}")
    print(f"wrote {out}")
    return 0


def cli():
    sys.exit(exit_status(main))


if __name__ == "__main__":
    cli()
