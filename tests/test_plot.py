"""aau_mpi.plot over synthetic run folders in the trainer's exact format."""

import json
import subprocess
import sys

import pytest
import yaml

pytest.importorskip("matplotlib")  # the `plot` extra, not needed by the rest of the suite

from aau_mpi.base.errors import UserError  # noqa: E402
from aau_mpi.plot import load_run, load_runs, main, table  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rank_records(rank, count, step=0.1, wait=0.02):
    """`count` iterations; rank r mixes (i + r) % 3 neighbours at iteration i."""
    return [{"iteration": i, "time": (i + 1) * step, "loss": 1.0 / (i + 1),
             "averaged": list(range((i + rank) % 3)), "wait": wait, "compute": step - wait,
             "delay": 0.0, "staleness": [0] * ((i + rank) % 3), "step_scale": 1.0,
             "samples": 32 * (i + 1)} for i in range(count)]


def eval_records(accuracies, every=1.0):
    return [{"time": (i + 1) * every, "samples": 320 * (i + 1), "epochs": 0.1 * (i + 1),
             "accuracy": acc, "loss": 1 - acc, "rank_accuracy": [acc, acc],
             "rank_loss": [1 - acc, 1 - acc], "consensus_distance": 0.01} for i, acc in
            enumerate(accuracies)]


def write_jsonl(path, records, cut_last=False):
    whole = records[:-1] if cut_last else records
    text = "".join(json.dumps(r) + "\n" for r in whole)
    if cut_last:  # a kill mid-write: the final line stops half-way, no newline
        text += json.dumps(records[-1])[:25]
    path.write_text(text)


def write_run(folder, config, ranks, evals, summary=None, cut_last=False):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    for rank, records in ranks.items():
        write_jsonl(folder / f"rank-{rank:05d}.jsonl", records, cut_last)
    write_jsonl(folder / "eval.jsonl", evals, cut_last)
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def config(policy, name=None):
    resolved = {"policy": {"name": policy}, "stragglers": {"name": "fixed", "slowdown": 4.0}}
    return {**resolved, "name": name} if name else resolved


@pytest.fixture
def runs(tmp_path):
    """A finished named run, a killed run, and a finished run with the same label."""
    finished = write_run(
        tmp_path / "aau-run", config("aau", name="aau ring"),
        {0: rank_records(0, 50), 1: rank_records(1, 40)},
        eval_records([0.5, 0.85, 0.9]),
        summary={"policy": "aau", "world_size": 2, "accuracy": 0.91, "loss": 0.1,
                 "seconds": 5.0, "samples": 2880, "iterations": [50, 40],
                 "neighbours": [1.0, 1.1], "wait_share": [0.2, 0.1],
                 "time_to_target": 1.5, "target_accuracy": 0.8, "exit": "finished"})
    killed = write_run(
        tmp_path / "killed", config("dpsgd"),
        {0: rank_records(0, 30), 1: rank_records(1, 21, step=0.2, wait=0.05)},
        eval_records([0.4, 0.7, 0.82, 0.86, 0.3]), cut_last=True)
    again = write_run(
        tmp_path / "again", config("dpsgd"),
        {0: rank_records(0, 10), 1: rank_records(1, 10)}, eval_records([0.6]),
        summary={"policy": "dpsgd", "world_size": 2, "accuracy": 0.6, "loss": 0.4,
                 "seconds": 1.0, "samples": 640, "iterations": [10, 10],
                 "neighbours": [1.0, 1.0], "wait_share": [0.3, 0.3],
                 "time_to_target": None, "target_accuracy": None, "exit": "preempted"})
    return [finished, killed, again]


def test_main_writes_valid_pngs_table_and_markdown(runs, tmp_path, capsys):
    out = tmp_path / "out" / "nested"
    main([str(folder) for folder in runs] + ["--out", str(out), "--target", "0.8"])
    for name in ("accuracy.png", "neighbours.png", "wait_share.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, name
    markdown = (out / "runs.md").read_text().splitlines()
    assert len(markdown) == 2 + len(runs)
    assert markdown[0].startswith("| run | policy | accuracy |")
    printed = capsys.readouterr().out
    for label in ("aau ring", "dpsgd (fixed) [killed]", "dpsgd (fixed) [again] (preempted)",
                  "dpsgd (fixed) [killed] (unfinished)"):
        assert label in printed


def test_default_out_dir_is_plots(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main([str(runs[0])])
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "accuracy.png", "neighbours.png", "runs.md", "wait_share.png"]


def test_killed_run_is_read_from_jsonl_skipping_the_cut_line(runs):
    killed = load_run(runs[1])
    assert killed.summary is None
    assert [len(r) for r in killed.ranks.values()] == [29, 20]  # last line of each cut
    assert len(killed.evals) == 4
    [row] = table([killed], target=0.8)
    assert row["accuracy"] == pytest.approx(0.86)  # last complete evaluation
    assert row["time_to_target"] == pytest.approx(3.0)  # first evaluation >= 0.8
    assert row["seconds"] == pytest.approx(4.0)  # rank 1: 20 steps of 0.2 s, and the last eval
    assert row["iterations"] == (20, 24.5, 29)
    # wait share per rank: 29 * 0.02 / 2.9 = 0.2 and 20 * 0.05 / 4.0 = 0.25
    assert row["wait_share"] == pytest.approx(0.225)
    # neighbours cycle 0, 1, 2: rank 0 over 29 iterations, rank 1 (shifted) over 20
    expected = (sum(i % 3 for i in range(29)) / 29 + sum((i + 1) % 3 for i in range(20)) / 20) / 2
    assert row["neighbours"] == pytest.approx(expected)
    assert row["policy"] == "dpsgd" and row["exit"] == "unfinished"


def test_finished_run_is_read_from_its_summary(runs):
    finished = load_run(runs[0])
    [own_target] = table([finished])
    assert own_target["accuracy"] == 0.91 and own_target["seconds"] == 5.0
    assert (own_target["target"], own_target["time_to_target"]) == (0.8, 1.5)
    assert own_target["iterations"] == (40, 45.0, 50)
    assert own_target["neighbours"] == pytest.approx(1.05)
    assert own_target["wait_share"] == pytest.approx(0.15)
    # another target than the summary's is read off eval.jsonl
    assert table([finished], target=0.9)[0]["time_to_target"] == pytest.approx(3.0)
    assert table([finished], target=0.95)[0]["time_to_target"] is None


def test_labels_name_then_policy_and_straggler_then_disambiguated(runs):
    assert [run.label for run in load_runs(runs)] == [
        "aau ring", "dpsgd (fixed) [killed]", "dpsgd (fixed) [again]"]
    assert [run.label for run in load_runs(runs[:2])] == ["aau ring", "dpsgd (fixed)"]


def test_label_falls_back_to_folder_name(tmp_path):
    folder = tmp_path / "bare"
    folder.mkdir()
    write_jsonl(folder / "rank-00000.jsonl", rank_records(0, 5))
    assert load_run(folder).label == "bare"


@pytest.mark.parametrize("make", [lambda p: p.mkdir(), lambda p: None,
                                  lambda p: p.write_text("not a folder")])
def test_non_run_folder_is_a_user_error(tmp_path, make):
    folder = tmp_path / "notes"
    make(folder)
    with pytest.raises(UserError, match="notes is not a run folder .*output.dir"):
        main([str(folder), "--out", str(tmp_path / "out")])


def test_corrupt_line_before_the_end_is_a_user_error(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "eval.jsonl").write_text('{"time": 1\n' + json.dumps(eval_records([0.5])[0]) + "\n")
    with pytest.raises(UserError, match="eval.jsonl line 1 is not JSON"):
        load_run(folder)


def test_target_must_be_a_fraction(runs, tmp_path):
    with pytest.raises(UserError, match="--target must be an accuracy in"):
        main([str(runs[0]), "--out", str(tmp_path / "out"), "--target", "90"])


def test_cli_prints_user_error_as_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "aau_mpi.plot", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
