"""The emulated-accelerator benchmark: every policy and DDP, N ranks, stragglers, paired seeds.

    python bench/emulated.py --ranks 8 [--quick] [--seeds 0 1 2 3 4] [--tune-seed 100]
                             [--settings ...] [--partitions ...] [--policies ...]
                             [--step-seconds S] [--budget-seconds S] [--out DIR]
                             [--runs DIR] [key=value ...]

One MPI job of --ranks ranks (`mpiexec -n N python bench/emulated.py --worker
PLAN`) trains every run: a rank's start-up costs more than a run. Every rank
runs on an emulated accelerator (emulate.step_seconds, aau_mpi/algorithms/
emulation.py): it computes real gradients, then sleeps out the modelled step,
so N ranks on a 2-core machine behave like N accelerators; stragglers are
speed factors of that step. The step is sized to N (--step-seconds, default
N x 3.125 ms) so that the host's CPU keeps up: a run with more than 5 % of
its steps overrun on some rank is refused (kept in the JSON, marked, left
out of every statistic). The budget grows with it (--budget-seconds, default
N x 1 s): 320 emulated steps a rank at every N, each rank's shard the same
size, so every N gets the same epochs.

1. Tuning, per partition, on --tune-seed (never an evaluation seed), without
   stragglers: each policy's learning rate over a grid that is extended (x2 or
   /2) while the best rate sits on its edge. Best: the shortest interpolated
   time to the target, then the higher final accuracy. DDP takes allreduce's
   rate (the same algorithm: SGD on the averaged gradient).
2. Evaluation: for each partition, setting and seed, every policy in turn
   (interleaved, so drifting load touches all alike) at its tuned rate.

Writes <out>/n<N>.json (plan, tuning, every run), the report of
bench/emulated_report.py (n<N>.md, n<N>_curves.png) and the simulator's
calibration from the runs' rank logs (calibration-n<N>.json); the run folders
stay under --runs, and a relaunch skips the runs already finished.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import benchlib
import emulated_report as report

DEFAULT_CONFIG = benchlib.BENCH / "emulated.yaml"
OUT = benchlib.RESULTS / "emulated"
POLICIES = ("allreduce", "dpsgd", "async", "fixed_k", "aau", "ddp")
PARTITIONS = {
    "dirichlet": {"name": "dirichlet", "alpha": 0.1},
    # sorted by label, cut into 2 x ranks shards, two dealt to each rank
    "two_shards": {"name": "shards", "classes_per_part": 2},
}
SETTINGS = ("none", "one_4x", "quarter_2x", "pareto", "shifting")
DEFAULT_SETTINGS = ("none", "one_4x", "quarter_2x", "pareto")
LRS = (0.1, 0.2, 0.4)
MAX_EXTENSIONS = 4          # grid steps added beyond either edge, at most
SAMPLES_PER_RANK = 2500     # 2,000 train + 500 test
MAX_OVERRUN = 0.05
PARETO_CAP = 20             # steps: uncapped, one draw in 10^5 stalls a rank for minutes
ATTEMPTS = 3                # a run refused for overruns is trained again, this often at most
ENDED_JOB = "ended-its-job"  # the mark of a run folder whose run ended its MPI job
QUICK = {"seeds": [0], "settings": ["one_4x"], "partitions": ["dirichlet"],
         "overrides": ["budget.seconds=2"], "lrs": [0.05, 0.1]}


def straggler_section(setting, ranks, seed):
    """Stragglers as speed factors of the emulated step (docs/benchmarks.md)."""
    if setting == "none":
        return {"name": "none"}
    if setting == "one_4x":
        return {"name": "fixed", "ranks": [1], "slowdown": 4.0}
    if setting == "quarter_2x":  # every fourth rank, spread over the graph
        return {"name": "fixed", "ranks": list(range(1, ranks, 4)), "slowdown": 2.0}
    if setting == "pareto":      # 10 % of steps delayed by Pareto(1.5) steps, capped: mean 1.8
        return {"name": "random", "distribution": "pareto", "probability": 0.1, "scale": 1.0,
                "shape": 1.5, "relative": True, "cap": PARETO_CAP, "seed": seed}
    if setting == "shifting":    # an eighth of the ranks 4x slower, redrawn every second
        return {"name": "shifting", "count": max(1, ranks // 8), "slowdown": 4.0,
                "period": 1.0, "seed": seed}
    raise ValueError(setting)


def topology(ranks):
    return {"name": "ring"} if ranks <= 8 else {"name": "exponential_one_peer"}


def policy_section(policy):
    return {"name": "fixed_k", "k": 1} if policy == "fixed_k" else {"name": policy}


def run_name(phase, part, setting, seed, policy, lr):
    return f"{phase}-{part}-{setting}-seed{seed}-{policy}-lr{lr:g}"


def overrides(plan, name, part, setting, seed, policy, lr):
    ranks = plan["ranks"]
    return [f"budget.seconds={plan['budget_seconds']}", *plan["overrides"], f"name={name}",
            f"output.dir={plan['runs_dir']}", f"seed={seed}", f"optim.lr={lr}",
            f"data.num_samples={SAMPLES_PER_RANK * ranks}",
            f"data.partition={json.dumps(PARTITIONS[part])}",
            f"topology={json.dumps(topology(ranks))}",
            f"emulate.step_seconds={plan['step_seconds']}",
            f"policy={json.dumps(policy_section('allreduce' if policy == 'ddp' else policy))}",
            f"stragglers={json.dumps(straggler_section(setting, ranks, seed))}"]


def mark_ended_runs(runs_dir):
    """After a job that ended with an error: every trainer's run folder without a
    summary (the run that ended it) gets ENDED_JOB, so that the relaunch counts
    it as failed. A DDP run's folder holds no logs (nor a summary, finished or
    not): never marked, it is trained again if it has no record."""
    for folder in Path(runs_dir).iterdir():
        if (folder / "config.yaml").is_file() and not (folder / "summary.json").is_file():
            (folder / ENDED_JOB).touch()


def next_rate(grid, records, policy):
    """The rate to try next for `policy` (None when its best is inside the grid or
    the grid has grown MAX_EXTENSIONS beyond the starting one)."""
    mine = sorted((r for r in records if r["policy"] == policy), key=lambda r: r["lr"])
    best = min(mine, key=report.tuning_key)["lr"]
    rates = [r["lr"] for r in mine]
    if len(rates) >= len(grid) + MAX_EXTENSIONS:
        return None
    if best == rates[0]:
        return rates[0] / 2
    if best == rates[-1]:
        return rates[-1] * 2
    return None


# ------------------------------------------------------------------ worker

class Worker:
    """One rank of the benchmark's MPI job."""

    def __init__(self, plan):
        from aau_mpi.decentralized.collectives import poll_cap
        from aau_mpi.decentralized.device import init
        self.plan = plan
        self.world = init(device="cpu")
        # What this job imported (a relaunch imports the tree as it is then): in each record.
        self.code = benchlib.source() if self.world.rank == 0 else None
        self.poll_cap = poll_cap(self.world)
        self.comm = self.world.comm
        self.data = None
        self.gloo = False

    def run(self, phase, part, setting, seed, policy, lr):
        """Collective: one run, or the record an earlier job left; rank 0 returns it.

        A run refused for overruns is trained again, up to ATTEMPTS times (a
        passing load); a run whose folder holds ENDED_JOB ended an earlier job
        (the trainer's one-line error: a non-finite loss, or the watchdog): it
        counts as failed; a folder without a record or that mark is a run that
        a stopped benchmark left unfinished: it is trained again."""
        from aau_mpi.training.config_loading import load_config
        plan, comm = self.plan, self.comm
        name = run_name(phase, part, setting, seed, policy, lr)
        done = Path(plan["runs_dir"]) / "records" / f"{name}.json"
        if comm.bcast(done.is_file() if comm.rank == 0 else None, root=0):
            record = json.loads(done.read_text()) if comm.rank == 0 else None
        else:
            refused = []
            for attempt in range(1, ATTEMPTS + 1):
                args = overrides(plan, name if attempt == 1 else f"{name}-attempt{attempt}",
                                 part, setting, seed, policy, lr)
                config = load_config(plan["config"], args)
                folder = benchlib.run_folder(config)
                if comm.bcast((folder / ENDED_JOB).is_file() if comm.rank == 0 else None,
                              root=0):
                    record = self.failed(config) if comm.rank == 0 else None
                    break
                if comm.rank == 0 and folder.is_dir():
                    shutil.rmtree(folder)  # unfinished when the benchmark was stopped
                record = (self.ddp(config, folder) if policy == "ddp"
                          else self.trainer(config, args))
                if comm.rank == 0:
                    record["overrun"] = max(record["overrun_share"])
                    record["refused"] = record["overrun"] > MAX_OVERRUN
                if not comm.bcast(record["refused"] if comm.rank == 0 else None, root=0):
                    break
                if comm.rank == 0:
                    refused.append(record["overrun"])
            if comm.rank == 0:
                record = {"phase": phase, "partition": part, "setting": setting, "seed": seed,
                          "policy": policy, "lr": lr, "target": config.eval.target_accuracy,
                          **record, "refused_attempts": refused, "code": self.code}
                benchlib.write_json(done, record)
        if comm.rank == 0:
            print(report.run_line(record), flush=True)
        return comm.bcast(record, root=0)

    def failed(self, config):
        """The record of a run that ended its job: its curve up to then, no final model."""
        record = benchlib.read_failed_run(config)
        size = self.comm.size
        record.update(failed=True, accuracy=None, overrun_share=[0.0] * size,
                      cpu_share=[None] * size, overrun=0.0, refused=False)
        return record

    def trainer(self, config, args):
        benchlib.train_run(self.world, self.plan["config"], args)
        if self.comm.rank != 0:
            return None
        record = benchlib.read_run(config)
        summary = json.loads((benchlib.run_folder(config) / "summary.json").read_text())
        record.update(overrun_share=summary["overrun_share"], cpu_share=summary["cpu_share"])
        return record

    def ddp(self, config, folder):
        import ddp_parity
        from aau_mpi.training.datasets import load_dataset
        if not self.gloo:
            ddp_parity.init_gloo(self.comm)
            self.gloo = True
        if self.data is None:  # the trainer's runs cached it: read, not generated
            self.data = load_dataset(config.data.name, config.dataset_params(folder))
        if self.comm.rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
        return ddp_parity.train(config, self.data, self.comm, self.poll_cap)

    def tune(self, part):
        """Each policy's rate on the tuning seed, grid extended off its edges."""
        plan, records = self.plan, []
        for policy in plan["policies"]:
            if policy == "ddp":
                continue
            for lr in plan["lrs"]:
                records.append(self.run("tune", part, "none", plan["tune_seed"], policy, lr))
            while (lr := next_rate(plan["lrs"], records, policy)) is not None:
                records.append(self.run("tune", part, "none", plan["tune_seed"], policy, lr))
        best = report.best_rates(records)
        best["ddp"] = best.get("allreduce")
        return records, best

    def main(self):
        plan, tuning, best, runs = self.plan, [], {}, []
        for part in plan["partitions"]:
            records, best[part] = self.tune(part)
            tuning += records
            for setting in plan["settings"]:
                for seed in plan["seeds"]:
                    runs += [self.run("run", part, setting, seed, policy, best[part][policy])
                             for policy in plan["policies"]]
        if self.comm.rank == 0:
            benchlib.write_json(Path(plan["runs_dir"]) / "result.json",
                                {"tuning": tuning, "best_lr": best, "runs": runs})
        if self.gloo:
            import torch.distributed as dist
            dist.destroy_process_group()


# ------------------------------------------------------------------ main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", metavar="PLAN", help=argparse.SUPPRESS)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--quick", action="store_true",
                        help="one seed, setting and partition, 2 s runs, two rates (CI)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--tune-seed", type=int, default=100)
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(DEFAULT_SETTINGS))
    parser.add_argument("--partitions", nargs="+", choices=PARTITIONS, default=list(PARTITIONS))
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    parser.add_argument("--step-seconds", type=float,
                        help="the emulated step (default: ranks x 3.125 ms)")
    parser.add_argument("--budget-seconds", type=float,
                        help="training seconds a run (default: ranks x 1 s)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--runs", help="run folders (default runs/emulated-n<N>)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if key == "overrides":
                args.overrides = [*value, *args.overrides]
            else:
                setattr(args, key, value)
    if args.tune_seed in args.seeds:
        parser.error(f"--tune-seed {args.tune_seed} is also an evaluation seed: tune on "
                     f"a seed that is never evaluated")
    if args.ranks < 4:
        parser.error(f"--ranks {args.ranks}: the settings need at least 4 ranks")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        Worker(json.loads(Path(args.worker).read_text())).main()
        return
    runs_dir = Path(args.runs or benchlib.REPO / "runs" / f"emulated-n{args.ranks}").resolve()
    step = args.step_seconds or args.ranks * 0.003125
    budget = args.budget_seconds or args.ranks * 1.0
    plan = {"config": str(Path(args.config).resolve()), "ranks": args.ranks,
            "step_seconds": step, "budget_seconds": budget,
            "seeds": args.seeds, "tune_seed": args.tune_seed,
            "settings": args.settings, "partitions": args.partitions,
            "policies": args.policies, "lrs": args.lrs, "overrides": args.overrides,
            "runs_dir": str(runs_dir), "quick": args.quick,
            "command": " ".join(["python", "bench/emulated.py", *sys.argv[1:]])}
    runs_dir.mkdir(parents=True, exist_ok=True)
    plan_path = benchlib.write_json(runs_dir / "plan.json", plan)
    started = time.perf_counter()
    benchlib.launch_until_done([benchlib.MPIEXEC, "-n", args.ranks, sys.executable, __file__,
                                "--worker", plan_path], runs_dir, ended=mark_ended_runs)
    result = json.loads((runs_dir / "result.json").read_text())
    result["plan"] = {**plan, "wall_seconds": round(time.perf_counter() - started),
                      "date": benchlib.today(), "machine": benchlib.machine(),
                      "mpi": benchlib.mpi_library(), "code": benchlib.source()}
    report.write(result, Path(args.out), f"n{args.ranks}")
    write_calibration(result, Path(args.out) / f"calibration-n{args.ranks}.json")


def write_calibration(result, path):
    """The simulator's calibration (aau_mpi/training/calibration.py) from the rank logs
    of the evaluated runs of the trainer's policies (not DDP's, a failed or a
    refused run's) whose folders are still here (a benchmark resumed in another
    checkout from its records has only its own); bench/simulation.py validate
    reads it."""
    from aau_mpi.training.calibration import calibrate

    runs = [run for run in result["runs"] if run["phase"] == "run" and run["policy"] != "ddp"
            and not run.get("failed") and not run["refused"]]
    folders = [run["folder"] for run in runs if (Path(run["folder"]) / "summary.json").is_file()]
    calibration = calibrate(folders)
    calibration["command"] = result["plan"]["command"]
    benchlib.write_json(path, calibration)
    elsewhere = " (the rest ran in another checkout)" if len(folders) < len(runs) else ""
    print(f"calibration of the simulator from {len(folders)} of the {len(runs)} runs' "
          f"logs{elsewhere}: {path}", flush=True)


if __name__ == "__main__":
    main()
