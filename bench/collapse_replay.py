"""Replay one straggler-benchmark run with per-iteration instrumentation (aau's collapse).

    mpiexec -n 4 python bench/collapse_replay.py [--policy aau] [--seed 2] [--lr 0.2]
        [--partition two_classes] [--setting none] [--out runs/collapse] [key=value ...]

Trains the run bench/stragglers.py would train for (partition, setting,
policy, seed, lr) on bench/stragglers.yaml (key=value overrides on top, e.g.
optim.clip_grad_norm=2), and beside the usual run folder writes
`instrument-rank-0000R.jsonl`: one line per iteration of rank R with

    mix_change   ||x_mixed - x||, how far the mix moved this rank's model
                 (a neighbour-side consensus distance: zero when the mixed
                 neighbours hold this rank's model)
    x_norm       ||x|| after the mix
    grad_norm    ||g||, the local gradient at the pre-mix x (after optim.clip_grad_norm)
    momentum     ||v||, SGD's momentum buffer after the step
    active       per ReLU layer, the share of its units (channel x position)
                 that are positive for at least one sample of the step's batch
                 (0 everywhere: a dead network, whose output is its last bias)
    update       ||x_after_step - x_mixed||, the local step actually taken
    loss, lr, step_scale, averaged, staleness   (as in the rank log)

At the end rank 0 prints the evaluations (accuracy, loss, consensus
distance) and, per rank, the iterations up to the first step whose loss
exceeds 5; `--report RUN_FOLDER` prints the same for a finished replay.
docs/benchmarks.md ("aau's collapse on seed 2") is what it found.
"""

import argparse
import json
import sys
from pathlib import Path

import benchlib
import stragglers

INSTRUMENT_LOG = "instrument-rank-{:05d}.jsonl"


def instrument(opt, out, loss):
    """Wrap `opt`'s mix (this instance only) and hook its wrapped optimizer's step to
    log the norms above; `loss()` is the step's training loss."""
    import torch

    mix_selection = opt.exchange._mix_selection
    state = {}
    relus = [m for m in opt.model.modules() if isinstance(m, torch.nn.ReLU)]

    def active(module, inputs, output):
        if not torch.is_grad_enabled():  # an evaluation's forward pass, not the step's
            return
        state.setdefault("active", []).append(
            round(float((output.detach() > 0).any(dim=0).float().mean()), 4))

    for relu in relus:
        relu.register_forward_hook(active)

    def logged_mix(k, selection, record):
        before = opt.params.flat.detach().clone()
        mix_selection(k, selection, record)
        state["mixed"] = opt.params.flat.detach().clone()
        state["mix_change"] = float(torch.linalg.vector_norm(state["mixed"] - before))

    def before_step(optimizer, args, kwargs):
        grads = [p.grad for p in opt.params.params if p.grad is not None]
        state["grad_norm"] = float(torch.linalg.vector_norm(torch.cat([g.flatten()
                                                                       for g in grads])))

    def after_step(optimizer, args, kwargs):
        buffers = [s["momentum_buffer"] for s in opt.optimizer.state.values()
                   if s.get("momentum_buffer") is not None]
        momentum = (float(torch.linalg.vector_norm(torch.cat([b.flatten() for b in buffers])))
                    if buffers else 0.0)
        mixed = state.get("mixed", opt.params.flat)
        line = {"iteration": opt.k, "mix_change": state.get("mix_change", 0.0),
                "x_norm": float(torch.linalg.vector_norm(mixed)), "grad_norm": state["grad_norm"],
                "momentum": momentum,
                "update": float(torch.linalg.vector_norm(opt.params.flat - mixed)),
                "active": state.pop("active", [])[-len(relus):]}
        state["line"] = line

    def logged_iteration(record, callback=opt.on_iteration):
        callback(record)
        line = state.pop("line", {})
        line.update(time=round(record.time, 4), loss=loss(), averaged=record.averaged,
                    step_scale=record.step_scale,
                    staleness=record.staleness, lr=opt.param_groups[0]["lr"] * record.step_scale)
        out.write(json.dumps(line) + "\n")

    opt.exchange._mix_selection = logged_mix
    opt.optimizer.register_step_pre_hook(before_step)
    opt.optimizer.register_step_post_hook(after_step)
    opt.on_iteration = logged_iteration


def replay(args):
    from aau_mpi.training.config_loading import load_config
    from aau_mpi.train import Trainer
    from aau_mpi.decentralized.device import init

    world = init(device="cpu")
    plan = {"overrides": [], "runs_dir": args.out, "tau": 4, "gamma": 0.0}  # the benchmark's
    overrides = stragglers.run_overrides(plan, "replay", args.partition, args.setting,
                                         args.seed, args.policy, args.lr)
    overrides += ["output.progress=false", *args.overrides]
    config = load_config(str(stragglers.DEFAULT_CONFIG), overrides)
    trainer = Trainer(world, config, str(stragglers.DEFAULT_CONFIG))
    with open(trainer.folder / INSTRUMENT_LOG.format(world.rank), "w") as out:
        instrument(trainer.opt, out, lambda: trainer.loss)
        trainer.run()
    if world.rank == 0:
        report(trainer.folder)


def report(folder, window=12):
    """Per rank: evaluations, then the iterations around the first loss spike."""
    folder = Path(folder)
    for line in open(folder / "eval.jsonl"):
        e = json.loads(line)
        if "accuracy" in e:
            print(f"eval {e['time']:5.1f} s  accuracy {e['accuracy']:.4f}  loss {e['loss']:.3f}"
                  f"  consensus {e['consensus_distance']:.3g}")
    for path in sorted(folder.glob("instrument-rank-*.jsonl")):
        lines = [json.loads(line) for line in open(path)]
        spike = next((i for i, l in enumerate(lines) if l["loss"] > 5.0), None)
        print(f"{path.name}: first loss > 5 at line {spike}")
        if spike is None:
            continue
        for l in lines[max(0, spike - window):spike + 3]:
            print(f"  k {l['iteration']:5} t {l['time']:6.3f} loss "
                  f"{l['loss']:7.3f} lr {l['lr']:.3f} "
                  f"mix {l['mix_change']:7.3f} |x| {l['x_norm']:7.2f} |g| {l['grad_norm']:8.3f} "
                  f"|v| {l['momentum']:8.3f} step {l['update']:7.3f} "
                  f"from {l['averaged']} stale {l['staleness']} active {l['active']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="aau", choices=stragglers.VARIANTS)
    parser.add_argument("--partition", default="two_classes", choices=stragglers.PARTITIONS)
    parser.add_argument("--setting", default="none", choices=stragglers.SETTINGS)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--out", default=str(benchlib.REPO / "runs" / "collapse"))
    parser.add_argument("--report", metavar="RUN_FOLDER", help="only report on a finished run")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    if args.report:
        report(args.report)
        return
    replay(args)


if __name__ == "__main__":
    sys.exit(main())
