"""The benchmarks' machinery: they run end to end and write well-formed outputs.

Each benchmark is launched as its users launch it, in its --quick size, into
a temporary folder, with a hard timeout so that a hang fails the test. No
test looks at how fast anything was: timings on a shared machine are noise.
The report's pure pieces (rates model, medians, the tuning rule) are checked
on synthetic records.
"""

import collections
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import benchlib  # noqa: E402  (bench/ is not a package)
import emulated  # noqa: E402
import emulated_report  # noqa: E402
import projection  # noqa: E402
import simulation  # noqa: E402
import stragglers  # noqa: E402
from aau_mpi.algorithms.topology import load_topology  # noqa: E402
from launcher import ENV  # noqa: E402

MPIEXEC = Path(sys.executable).with_name("mpiexec")
needs_launchers = pytest.mark.skipif(
    not MPIEXEC.exists() or not Path(sys.executable).with_name("torchrun").exists(),
    reason=f"no mpiexec/torchrun beside {sys.executable}")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"




def run_bench(script, *args, launcher=(), timeout=240):
    result = subprocess.run([*launcher, sys.executable, f"bench/{script}", *map(str, args)],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


@needs_launchers
@pytest.mark.long
@pytest.mark.timeout(400)  # about 16 jobs of 4 ranks: 80-90 s here
def test_stragglers_quick(tmp_path):
    out = tmp_path / "out"
    run_bench("stragglers.py", "--quick", "--runs", tmp_path / "runs", "--out", out,
              "--timeout", 200)
    result = json.loads((out / "stragglers.json").read_text())
    plan = result["plan"]
    assert plan["settings"] == ["none", "fixed4"] and plan["seeds"] == [0]
    assert plan["partitions"] == ["dirichlet", "two_classes"]
    # The grid, per partition: every policy at every rate, and one chosen rate each.
    assert {(t["partition"], t["variant"], t["lr"]) for t in result["tuning"]} == {
        (p, v, lr) for p in plan["partitions"] for v in plan["variants"] for lr in plan["lrs"]}
    assert all(set(result["best_lr"][p]) == set(plan["variants"]) for p in plan["partitions"])
    variants = plan["variants"] + ["ddp"]
    # DDP on the straggler-free setting only.
    assert {(r["partition"], r["setting"], r["variant"]) for r in result["runs"]} == {
        (p, s, v) for p in plan["partitions"] for s in plan["settings"] for v in variants
        if v != "ddp" or s == "none"}
    for run in result["runs"]:
        best = result["best_lr"][run["partition"]]
        assert run["lr"] == best.get(run["variant"], best["allreduce"])
        assert (len(run["iterations"]) == len(run["shard_accuracy"])
                == len(run["class_accuracy"]) == plan["ranks"])
        assert all(0 <= a <= 1 for a in run["shard_accuracy"] + run["class_accuracy"])
        assert run["consensus_distance"] >= 0
        assert run["samples"] > 0 and run["seconds"] > 0 and math.isfinite(run["loss"])
        assert run["curve"] and all(len(point) == 4 for point in run["curve"])
        times = [point[0] for point in run["curve"]]
        assert times == sorted(times) and times[-1] <= run["seconds"] + 1e-6
    assert len(result["rows"]) == len(plan["partitions"]) * (2 * len(variants) - 1)
    fixed4 = [r for r in result["rows"] if r["setting"] == "fixed4"]
    assert all(r["slow_shard_gap"] is not None and r["slow_class_accuracy"] is not None
               for r in fixed4)
    assert [(c["partition"], c["setting"]) for c in result["throughput"]] == [
        (p, "fixed4") for p in plan["partitions"]]
    # aau against every other policy in every cell.
    assert {(c["partition"], c["setting"], c["baseline"]) for c in result["comparisons"]} == {
        (r["partition"], r["setting"], r["variant"]) for r in result["rows"]
        if r["variant"] != "aau"}
    assert all(c["verdict"] in ("win", "loss", "tie") for c in result["comparisons"])
    assert set(result["noise"]) == {"samples_per_second", "time_to_target"}
    markdown = (out / "stragglers.md").read_text()
    assert "| partition | setting | policy |" in markdown and "## Learning-rate grid" in markdown
    assert "## aau against each baseline" in markdown
    assert all(f"| two_classes | fixed4 | {variant} |" in markdown
               for variant in plan["variants"])
    assert_png(out / "stragglers_accuracy.png")
    # The run folders stay for inspection.
    assert (tmp_path / "runs" / "run-two_classes-fixed4-aau-seed0-lr{:g}".format(
        result["best_lr"]["two_classes"]["aau"]) / "model.h5").is_file()


@needs_launchers
@pytest.mark.long
@pytest.mark.timeout(300)  # about 20 runs in one job of 4 ranks, then 5 simulations: 80 s here
def test_emulated_quick(tmp_path):
    out = tmp_path / "out"
    run_bench("emulated.py", "--quick", "--ranks", 4, "--runs", tmp_path / "runs", "--out", out,
              timeout=280)
    result = json.loads((out / "n4.json").read_text())
    plan = result["plan"]
    assert plan["quick"] and plan["step_seconds"] == 4 * 0.003125 and plan["seeds"] == [0]
    policies = list(emulated.POLICIES)
    assert set(result["best_lr"]["dirichlet"]) == set(policies)
    assert result["best_lr"]["dirichlet"]["ddp"] == result["best_lr"]["dirichlet"]["allreduce"]
    assert {t["seed"] for t in result["tuning"]} == {plan["tune_seed"]}
    for policy in policies[:-1]:  # each grid brackets its best rate or ran out of extensions
        rates = sorted(t["lr"] for t in result["tuning"] if t["policy"] == policy)
        best = result["best_lr"]["dirichlet"][policy]
        assert rates[0] < best < rates[-1] or len(rates) == 2 + emulated.MAX_EXTENSIONS
    runs = [r for r in result["runs"] if r["phase"] == "run"]
    assert [r["policy"] for r in runs] == policies, "every policy in turn, one seed"
    for run in runs:
        assert run["setting"] == "one_4x" and run["lr"] == result["best_lr"]["dirichlet"][
            run["policy"]]
        assert len(run["overrun_share"]) == len(run["cpu_share"]) == 4
        assert run["refused"] == (run["overrun"] > emulated.MAX_OVERRUN)
        assert run["curve"] and run["samples"] > 0
        if not run["refused"]:  # the straggler's step is 4x the others'
            assert run["iterations"][1] < min(run["iterations"][0], run["iterations"][2]) or (
                run["policy"] in ("allreduce", "ddp", "dpsgd"))
    cells = result["cells"]["dirichlet/one_4x"]
    assert set(cells) == set(policies) and all(c["seeds"] + c["refused"] == 1
                                               for c in cells.values())
    assert set(result["ratios"]["dirichlet/one_4x"]) == set(emulated_report.BASELINES)
    assert "dirichlet/one_4x" in result["ddp_over_allreduce_samples_per_second"]
    markdown = (out / "n4.md").read_text()
    assert "## dirichlet/one_4x" in markdown and "| aau vs |" in markdown
    assert_png(out / "n4_curves.png")
    assert not (out / "summary.md").exists(), "a quick run stays out of the summary"

    # The simulator, calibrated from these runs' logs, runs them again and compares.
    calibration = json.loads((out / "calibration-n4.json").read_text())
    assert {g["policy"] for g in calibration["groups"]} == {
        r["policy"] for r in runs if r["policy"] != "ddp" and not r["refused"]}
    run_bench("simulation.py", "validate", "--emulated", out / "n4.json", "--runs",
              tmp_path / "sim", "--out", out, timeout=280)
    record = json.loads((out / "simulation_validation.json").read_text())
    simulated = [r for r in runs if r["policy"] in simulation.VALIDATED and not r["refused"]]
    assert sorted(s["policy"] for s in record["simulated"]) == sorted(
        r["policy"] for r in simulated)
    assert all(s["ranks"] == 4 and s["curve"] for s in record["simulated"])
    pairs = len(simulation.VALIDATED) * (len(simulation.VALIDATED) - 1) // 2
    assert len(record["rows"]) == pairs and record["compared"] + record["not_compared"] == pairs
    for row in record["rows"]:
        if row["compared"]:
            assert simulation.MIN_LEVEL <= row["level"] <= 0.6
            assert row["within"] == (abs(row["simulated_ratio"] / row["real_ratio"] - 1)
                                     <= simulation.TOLERANCE)
    assert record["share_within_15pct"] == (record["within"] / record["compared"]
                                            if record["compared"] else None)
    assert "| N | partition |" in (out / "simulation_validation.md").read_text()


def test_after_a_job_ends_in_a_run_only_unfinished_folders_are_marked(tmp_path):
    # Marked: failed on the relaunch. Unmarked and without a record: trained again.
    # A DDP run writes nothing to its folder: marked, its rerun read logs it never had.
    for name, files in (("finished", ["config.yaml", "summary.json"]), ("ended", ["config.yaml"]),
                        ("ddp", []), ("records", [])):
        (tmp_path / name).mkdir()
        for file in files:
            (tmp_path / name / file).write_text("{}")
    emulated.mark_ended_runs(tmp_path)
    assert [f.parent.name for f in tmp_path.glob(f"*/{emulated.ENDED_JOB}")] == ["ended"]


def test_a_failed_runs_line_says_so_without_the_numbers_it_never_had():
    # A run that ended its job left no evaluation: printing it ended the benchmark.
    failed = {"phase": "tune", "partition": "dirichlet", "setting": "none", "seed": 100,
              "policy": "dpsgd", "lr": 0.2, "target": 0.6, "curve": [], "accuracy": None,
              "samples_per_second": None, "overrun": 0.0, "refused": False, "failed": True}
    line = emulated_report.run_line(failed)
    assert "accuracy -" in line and "- samples/s" in line and line.endswith(
        "FAILED (ended its job: diverged or stalled)")


def test_the_crossing_is_interpolated_between_the_evaluations_around_it():
    curve = [[0.25, 100, 0.4, 1.0], [0.5, 200, 0.5, 0.9], [0.75, 300, 0.7, 0.8]]
    assert emulated_report.crossing(curve, 0.6) == pytest.approx(0.625)
    assert emulated_report.crossing(curve, 0.6, column=1) == pytest.approx(250)
    assert emulated_report.crossing(curve, 0.3) == 0.25, "reached at the first evaluation"
    assert emulated_report.crossing(curve, 0.8) is None


def record(seed, policy, seconds, accuracy=0.8, **extra):
    """A run that reaches 0.6 at `seconds` (None: never)."""
    curve = [[seconds, 1000, 0.7, 1.0]] if seconds is not None else [[1.0, 1000, 0.3, 2.0]]
    return {"seed": seed, "policy": policy, "target": 0.6, "curve": curve, "refused": False,
            "accuracy": accuracy, **extra}


def test_paired_ratios_give_a_verdict_only_when_the_interval_excludes_one():
    rng = __import__("numpy").random.default_rng(0)
    base = [record(s, "dpsgd", 2.0 + 0.1 * s) for s in range(5)]
    faster = [record(s, "aau", 1.0 + 0.05 * s) for s in range(5)]
    ratio = emulated_report.paired_ratio(faster, base, rng)
    assert ratio["pairs"] == 5 and ratio["geometric_mean"] == pytest.approx(0.5)
    assert ratio["high"] < 1 and ratio["verdict"] == "aau faster"
    mixed = [record(s, "aau", t) for s, t in enumerate([1.0, 3.0, 1.5, 3.5, 2.0])]
    assert emulated_report.paired_ratio(mixed, base, rng)["verdict"] == "no verdict"
    # seeds where only one side reached the target are counted, not paired
    few = [record(s, "aau", 1.0 if s < 2 else None) for s in range(5)]
    ratio = emulated_report.paired_ratio(few, base, rng)
    assert (ratio["pairs"], ratio["only_baseline_reached"]) == (2, 3)
    assert ratio["verdict"] == "no verdict", "two pairs are too few for a verdict"
    refused = [record(s, "aau", 1.0, refused=s < 3) for s in range(5)]
    assert emulated_report.paired_ratio(refused, base, rng)["pairs"] == 2


def test_a_cell_counts_collapses_failures_and_refusals_apart():
    runs = [record(0, "aau", 1.0), record(1, "aau", None, accuracy=0.1),
            record(2, "aau", 2.0, failed=True, accuracy=None),
            record(3, "aau", 1.0, refused=True)]
    for run in runs:
        run.update(samples_per_second=100.0, overrun=0.0, cpu_share=[0.1, 0.1])
    stats = emulated_report.cell_stats(runs)
    assert (stats["seeds"], stats["refused"], stats["reached"]) == (3, 1, 2)
    assert (stats["collapsed"], stats["failed"]) == (1, 1)
    assert stats["time_to_target_mean"] is None, "not every seed reached the target"
    assert stats["time_to_target_reached_mean"] == pytest.approx(1.5)
    assert stats["accuracy_worst"] == 0.1


def test_the_rate_grid_grows_past_an_edge_until_the_best_is_inside():
    grid = [0.1, 0.2, 0.4]
    tuned = [record(100, "aau", t, lr=lr) for lr, t in [(0.1, 3.0), (0.2, 2.0), (0.4, 1.0)]]
    assert emulated.next_rate(grid, tuned, "aau") == 0.8
    tuned.append(record(100, "aau", None, lr=0.8, accuracy=0.1))
    assert emulated.next_rate(grid, tuned, "aau") is None, "0.4 is inside now"
    low = [record(100, "dpsgd", t, lr=lr) for lr, t in [(0.1, 1.0), (0.2, 2.0), (0.4, None)]]
    assert emulated.next_rate(grid, low, "dpsgd") == 0.05
    assert emulated_report.best_rates(tuned + low) == {"aau": 0.4, "dpsgd": 0.1}


@pytest.mark.long
@pytest.mark.timeout(400)  # about 20 simulations of 4 workers in 2 processes: 60 s here
def test_projection_quick(tmp_path):
    """Tuning extends each policy's grid until its best rate is inside; every profile,
    setting and policy is simulated and reported; a relaunch simulates nothing again."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"groups": [
        {"policy": policy, "ranks": 8, "runs": 1, "overhead_seconds": {"mean": 0.001}}
        for policy in projection.POLICIES]}))
    args = ["--quick", "--calibration", calibration, "--runs", runs, "--out", out]
    run_bench("projection.py", *args, timeout=350)
    record = json.loads((out / "simulation_projection.json").read_text())
    assert {(r["profile"], r["setting"], r["policy"], r["ranks"]) for r in record["rows"]} == {
        (profile, "slow_tenth", policy, 4) for profile in projection.PROFILES
        for policy in projection.POLICIES}
    for policy in projection.POLICIES:
        tried = sorted(t["lr"] for t in record["tuning"] if t["policy"] == policy)
        best = record["best_lr"]["4"][policy]
        assert tried[0] < best < tried[-1] or len(tried) == 2 + emulated.MAX_EXTENSIONS, tried
    assert all(r["ranks"] == 4 and r["iterations"] for r in record["runs"])
    assert (out / "simulation_projection.md").read_text().count("| slow_tenth |") == 10
    assert_png(out / "simulation_projection.png")
    assert record["plan"]["simulation_seconds"] > 0
    assert record["plan"]["simulations_without_seconds"] == 0
    again = run_bench("projection.py", *args, timeout=350)
    assert "virtual s (" not in again.stdout, "every run folder was read, none simulated"
    reread = json.loads((out / "simulation_projection.json").read_text())["plan"]
    assert reread["simulation_seconds"] == record["plan"]["simulation_seconds"], \
        "a relaunch counts the seconds its runs took when they were simulated"


def test_a_result_names_the_commit_its_code_was_at_and_says_when_the_tree_differed(tmp_path,
                                                                                   monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c",
                               "user.email=t@example.org", *args], capture_output=True,
                              text=True, check=True).stdout.strip()
    git("init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-q", "-m", "code")
    monkeypatch.setattr(benchlib, "REPO", repo)
    assert benchlib.source() == git("rev-parse", "--short", "HEAD")
    (repo / "untracked.txt").write_text("not code\n")
    assert not benchlib.source().endswith("+edits"), "untracked files are not edits"
    (repo / "code.py").write_text("x = 2\n")
    assert benchlib.source() == git("rev-parse", "--short", "HEAD") + "+edits"
    monkeypatch.setattr(benchlib, "REPO", tmp_path / "elsewhere")
    assert benchlib.source() is None


def test_the_largest_n_is_not_tuned_unless_asked_and_the_smallest_always_is(capsys):
    assert projection.parse_args([]).tune_ranks == [16, 64, 256]
    assert projection.parse_args(["--tune-ranks", "16", "1024"]).tune_ranks == [16, 1024]
    assert projection.parse_args(["--ranks", "8"]).tune_ranks == [8]
    with pytest.raises(SystemExit):
        projection.parse_args(["--tune-ranks", "64", "256"])
    assert "the smallest included" in capsys.readouterr().err


def test_from_the_reduced_n_up_only_the_first_seeds_and_the_reduced_settings_run():
    args = projection.parse_args(["--ranks", "16", "64", "256", "--seeds", "0", "1", "2",
                                  "--reduce-from", "64", "--reduced-seeds", "2",
                                  "--reduced-settings", "slow_tenth"])
    plan = {**vars(args), "runs_dir": "runs", "batch_size": 32, "config": "job.yaml",
            "calibration": "c.json"}
    keys = [(t["ranks"], t["key"]["setting"], t["key"]["seed"])
            for t in projection.evaluation_tasks(plan, {n: dict.fromkeys(args.policies, 0.2)
                                                        for n in args.ranks})]
    per = len(args.policies) * len(args.profiles)
    assert sorted(set(keys)) == sorted(
        [(16, s, seed) for s in args.settings for seed in (0, 1, 2)]
        + [(n, "slow_tenth", seed) for n in (64, 256) for seed in (0, 1)])
    assert len(keys) == per * (9 + 4)
    assert projection.parse_args([]).reduce_from == 1024, "by default only the largest N"


def test_a_policy_that_diverges_at_an_inherited_rate_runs_again_at_half_of_it():
    plan = {"ranks": [16, 64, 256], "tune_ranks": [16]}

    def run(n, policy, lr, failed):
        return {"ranks": n, "policy": policy, "lr": lr, **({"failed": True} if failed else {})}

    runs = [run(16, "aau", 0.4, True), run(64, "aau", 0.4, True), run(64, "aau", 0.4, False),
            run(64, "dpsgd", 0.4, False), run(256, "dpsgd", 0.4, True)]
    # a tuned N keeps its rate: its divergence is the tuning's verdict, shown as such
    none_yet = collections.Counter()
    assert projection.policies_to_halve(plan, runs, none_yet) == {(64, "aau"), (256, "dpsgd")}
    twice = collections.Counter({(64, "aau"): projection.MAX_HALVINGS})
    assert projection.policies_to_halve(plan, [run(64, "aau", 0.1, True)], twice) == set(), \
        f"at most {projection.MAX_HALVINGS} halvings"


def test_a_tenth_of_the_workers_is_slow_spread_over_the_ranks_2_to_8x():
    section = projection.straggler_section("slow_tenth", 64, seed=0)
    assert len(section["ranks"]) == 6 and section["ranks"] == sorted(set(section["ranks"]))
    assert max(section["ranks"]) < 64 and min(section["ranks"]) > 0
    assert section["slowdown"][0] == 2 and section["slowdown"][-1] == 8
    assert projection.straggler_section("slow_tenth", 4, seed=0)["ranks"] == [2]


def test_projection_rows_give_the_seeds_range_only_where_every_seed_reached():
    def record(seed, accuracies, failed=False):
        curve = [[0.1 * i, 1000 * i, a, 1.0] for i, a in enumerate(accuracies, 1)]
        return {"profile": "ethernet", "setting": "none", "policy": "aau", "ranks": 16,
                "lr": 0.2, "seed": seed, "target": 0.9, "curve": curve,
                "accuracy": None if failed else accuracies[-1], "seconds": 0.1 * len(curve),
                "wait_share": None if failed else [0.1, 0.3],
                **({"failed": True} if failed else {})}

    both = projection.cell_row([record(0, [0.5, 0.9]), record(1, [0.5, 0.8, 0.95])])
    assert both["reached"] == 2
    # interpolated: 0.8 at 2,000 samples, 0.95 at 3,000 -> 0.9 at 2,667
    assert both["samples_to_target"] == pytest.approx({"mean": 7000 / 3, "low": 2000,
                                                       "high": 8000 / 3})
    assert both["samples_to_target_per_worker"]["mean"] == pytest.approx(7000 / 3 / 16)
    one_diverged = projection.cell_row([record(0, [0.5, 0.95]), record(1, [0.1], failed=True)])
    assert one_diverged["reached"] == 1 and one_diverged["diverged"] == 1
    assert one_diverged["samples_to_target"]["mean"] is None, "not every seed reached it"
    cells = projection.table_cells(one_diverged)
    assert cells[5] == "1/2" and cells[6] == "-" and cells[10] == 1


def test_a_simulation_resumes_from_its_own_run_folder_only(tmp_path, capsys):
    """A finished folder is read back, not simulated again; a folder of the same name
    holding another run (another N: the 8- and 16-rank validations once shared
    names, and the 8-rank tasks silently read the 16-rank runs) is an error."""
    def task(ranks):
        return {"config": str(REPO / "jobs" / "demo.yaml"), "ranks": ranks,
                "overrides": [f"output.dir={tmp_path}", "name=same", "budget.epochs=0.5",
                              "output.progress=false", "model={name: mlp, hidden: [16]}"],
                "options": {"step_seconds": 0.001}, "key": {"policy": "aau"}}

    first = simulation.simulate(task(4))
    assert "virtual s (" in capsys.readouterr().out
    again = simulation.simulate(task(4))
    assert "virtual s (" not in capsys.readouterr().out, "read back, not simulated"
    assert again["curve"] == first["curve"] and again["samples"] == first["samples"]
    with pytest.raises(SystemExit, match="holds another run than this task's"):
        simulation.simulate(task(2))


def test_the_common_accuracy_is_the_lowest_best_on_the_grid_capped_by_the_target():
    def run(best):
        return {"curve": [[1.0, 10, best - 0.1, 1.0], [2.0, 20, best, 0.5]]}

    assert simulation.common_level([run(0.93), run(0.61), run(0.95)], 0.9) == pytest.approx(0.6)
    assert simulation.common_level([run(0.93), run(0.95)], 0.9) == 0.9
    assert simulation.common_level([run(0.65)], 0.9) == pytest.approx(0.65)
    assert simulation.common_level([run(0.3)], 0.9) == 0.3, "a level the curve reaches"


def test_validation_compares_each_pairs_ratio_real_against_simulated():
    """Per cell and pair: the geometric mean over the seeds of the time ratio to the
    pair's common accuracy, real and simulated, within 15 % or not; a pair that
    shares no accuracy of 0.2 is listed, not compared."""
    def run(policy, seed, time_to_half, best=0.52):
        return {"phase": "run", "partition": "two_shards", "setting": "one_4x", "seed": seed,
                "policy": policy, "target": 0.6, "refused": False,
                "curve": [[time_to_half / 2, 1, min(0.3, best), 1.0],
                          [time_to_half, 2, best, 0.8]]}

    real = {"plan": {"ranks": 8}, "runs": [
        run("aau", 0, 2.0), run("aau", 1, 2.0), run("dpsgd", 0, 4.0), run("dpsgd", 1, 16.0),
        run("async", 0, 2.0), run("async", 1, 2.0), run("fixed_k", 0, 1.0, best=0.15),
        run("fixed_k", 1, 1.0, best=0.15), run("allreduce", 0, 1.0), run("ddp", 0, 1.0)]}
    simulated = [run("aau", 0, 1.0), run("aau", 1, 1.0), run("dpsgd", 0, 2.5),
                 run("dpsgd", 1, 10.0), run("async", 0, 0.5), run("async", 1, 0.5),
                 run("fixed_k", 0, 1.0, best=0.15), run("fixed_k", 1, 1.0, best=0.15)]
    for r in simulated:
        r["ranks"] = 8
    rows = {tuple(r["pair"]): r for r in simulation.compare(real, simulated)}
    assert len(rows) == 10
    dpsgd_aau = rows["dpsgd", "aau"]
    assert dpsgd_aau["level"] == pytest.approx(0.5) and dpsgd_aau["seeds"] == [0, 1]
    assert dpsgd_aau["real_ratio"] == pytest.approx(4.0)      # sqrt(2 x 8)
    assert dpsgd_aau["simulated_ratio"] == pytest.approx(5.0)  # sqrt(2.5 x 10)
    assert dpsgd_aau["error"] == pytest.approx(0.25) and not dpsgd_aau["within"]
    # The seeds' ratios are 2 and 8: the bootstrap interval spans them, and holds 5.
    assert (dpsgd_aau["real_low"], dpsgd_aau["real_high"]) == pytest.approx((2.0, 8.0))
    assert dpsgd_aau["inside_real_interval"] and not dpsgd_aau["real_precise"]
    async_aau = rows["async", "aau"]   # both seeds 1.0: a precise real ratio, 0.25 outside it
    assert async_aau["real_precise"] and not async_aau["inside_real_interval"]
    assert rows["async", "aau"]["real_ratio"] == 1.0 and rows["async", "aau"]["within"] is False
    assert rows["dpsgd", "fixed_k"]["compared"] is False  # fixed_k never reached 0.2
    assert rows["allreduce", "aau"] == {**rows["allreduce", "aau"], "compared": False,
                                        "why": "a run is missing"}


@needs_launchers
@pytest.mark.long
def test_scaling_quick(tmp_path):
    out = tmp_path / "out"
    run_bench("scaling.py", "--quick", "--policies", "aau", "--runs", tmp_path / "runs",
              "--out", out, "--timeout", 120)
    result = json.loads((out / "scaling.json").read_text())
    assert [(r["ranks"], r["policy"]) for r in result["rows"]] == [(1, "aau"), (2, "aau")]
    for run in result["runs"]:
        samples = [point[1] for point in run["curve"]]
        assert samples == sorted(samples) and samples[-1] <= result["sample_budget"]
    for row in result["rows"]:
        assert len(row["loss_at"]) == 3 and row["loss_at"][-1] > 0
    assert "| aau | 2 |" in (out / "scaling.md").read_text()
    assert_png(out / "scaling.png")


@needs_launchers
def test_the_gpu_check_dry_run_runs_every_step_on_the_cpu():
    """bench/gpu_check.sh --device cpu: the CUDA tests (skipped, with their
    reasons), the training runs of a BatchNorm model and the JSON, as on a GPU
    machine; the JSON lands under runs/, never in bench/results/ (GPU figures only)."""
    out = REPO / "runs" / "gpu-check-cpu.json"
    out.unlink(missing_ok=True)
    results = sorted((REPO / "bench" / "results").iterdir())
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--device", "cpu"],
                            cwd=REPO, env={**ENV, "PYTHON": sys.executable}, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "needs CUDA" in result.stdout, "the CUDA tests say why they skip"
    assert sorted((REPO / "bench" / "results").iterdir()) == results
    record = json.loads(out.read_text())
    assert record["device"] == "cpu" and record["quick"] is True
    assert {(r["policy"], r["ranks"]) for r in record["runs"]} == {
        (policy, ranks) for policy in ("aau", "allreduce") for ranks in (1, 2)}
    for run in record["runs"]:
        assert run["model"] == "resnet18" and run["norm"] == "batch"
        assert run["samples_per_second"] > 0 and run["iteration_ms"] > 0
        assert run["compute_ms"] > 0 and run["iteration_ms"] >= run["compute_ms"]


@needs_launchers
def test_policy_cost_quick(tmp_path):
    run_bench("policy_cost.py", "--quick", "--out", tmp_path,
              launcher=(str(MPIEXEC), "-n", "2"), timeout=120)
    result = json.loads((tmp_path / "policy_cost.json").read_text())
    assert result["step_seconds"] > 0
    assert {d["policy"] for d in result["decisions"]} == {"dpsgd", "async", "fixed_k", "aau"}
    assert all(d["select_seconds"] > 0 and d["share_of_step"] > 0 for d in result["decisions"])
    assert [r["parameters_millions"] for r in result["sizes"]] == [0.1, 1.0]
    assert all(r["policy_seconds"] > 0 and r["deposit_seconds"] > 0 for r in result["sizes"])
    assert "## Against the model size" in (tmp_path / "policy_cost.md").read_text()


def test_predicted_rates_on_a_ring():
    ring = load_topology("ring", 4)
    # Slower than tau: the straggler's neighbours are held to tau per deposit.
    assert stragglers.predicted_rates(ring, [1], 10.0, 4) == [0.4, 0.1, 0.4, 1.0]
    # Within tau: nobody waits for the straggler.
    assert stragglers.predicted_rates(ring, [1], 4.0, 4) == [1.0, 0.25, 1.0, 1.0]


def test_best_rate_is_fewest_epochs_then_accuracy():
    tuning = [{"variant": "a", "lr": 0.1, "epochs_to_target": 5.0, "accuracy": 0.90},
              {"variant": "a", "lr": 0.05, "epochs_to_target": 4.0, "accuracy": 0.89},
              {"variant": "b", "lr": 0.1, "epochs_to_target": None, "accuracy": 0.80},
              {"variant": "b", "lr": 0.05, "epochs_to_target": None, "accuracy": 0.85}]
    assert stragglers.best_rates(tuning) == {"a": 0.05, "b": 0.05}


def test_summary_rows_take_medians_and_mark_unreached_targets():
    def run(seed, to_target, accuracy):
        return {"partition": "two_classes", "setting": "fixed4", "variant": "aau",
                "seed": seed, "lr": 0.05,
                "time_to_target": to_target, "seconds": 2.0 + seed, "accuracy": accuracy,
                "loss": 0.3, "samples_per_second": 100.0, "iterations": [10, 3, 10, 10],
                "neighbours": [2, 1, 2, 2], "wait_share": [0.1, 0.0, 0.1, 0.1],
                "shard_accuracy": [0.9, 0.8, 0.9, 1.0], "step_seconds": 0.01,
                "class_accuracy": [0.9, 0.7 + seed / 10, 0.9, 0.9], "consensus_distance": 0.1,
                "curve": [[0.5, 10, 0.5, 1.0], [1.5, 20, accuracy, 0.3]]}

    rows = stragglers.summarise([run(0, 1.0, 0.9), run(1, None, 0.8), run(2, 3.0, 0.95)],
                                ["dirichlet", "two_classes"], ["none", "fixed4"], ["aau"])
    assert len(rows) == 1
    row = rows[0]
    assert row["time_to_target"] == 3.0 and row["accuracy"] == 0.9
    assert row["time_to_target_range"] == [1.0, math.inf]
    assert row["time_to_target_spread"] == pytest.approx((3.0 - 1.0) / 2.0)  # finite ones
    assert row["slow_class_accuracy"] == pytest.approx(0.8)  # rank 1's, median over seeds
    assert row["fixed_time"] == 2.0 and row["accuracy_at_fixed_time"] == 0.9
    assert row["iterations"] == [3, 10, 10]
    assert row["slow_shard_gap"] == pytest.approx(0.8 - 0.9333333)
    assert row["shard_spread"] == pytest.approx(0.2)
    assert stragglers.summarise([run(1, None, 0.8)], ["two_classes"], ["fixed4"], ["aau"])[0][
        "time_to_target"] == math.inf


def test_aau_wins_on_time_beyond_the_noise_else_on_final_accuracy():
    def row(to_target, accuracy):
        return {"time_to_target": to_target, "accuracy": accuracy}

    assert stragglers.verdict(row(5.0, 0.9), row(10.0, 0.9), 0.2) == (0.5, "win")
    assert stragglers.verdict(row(11.0, 0.9), row(10.0, 0.9), 0.2) == (1.1, "tie")
    assert stragglers.verdict(row(13.0, 0.9), row(10.0, 0.9), 0.2) == (1.3, "loss")
    assert stragglers.verdict(row(8.0, 0.9), row(math.inf, 0.95), 0.2) == (0.0, "win")
    assert stragglers.verdict(row(math.inf, 0.9), row(8.0, 0.8), 0.2) == (math.inf, "loss")
    assert stragglers.verdict(row(math.inf, 0.85), row(math.inf, 0.80), 0.2) == (None, "win")
    assert stragglers.verdict(row(math.inf, 0.805), row(math.inf, 0.80), 0.2) == (None, "tie")
