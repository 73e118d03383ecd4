"""The run folder's logs and rank 0's progress line (no MPI)."""

import io
import json

from aau_mpi.decentralized.exchange import Iteration
from aau_mpi.training.runlog import Progress, RankLog, duration, summary_table
from aau_mpi.algorithms.schedule import Schedule


def test_rank_log_writes_json_lines_and_an_unterminated_chrome_trace(tmp_path):
    log = RankLog(tmp_path, 3, trace=True)
    for k, started in ((7, 1.0), (8, 1.03)):
        record = Iteration(k, started=started, compute_seconds=0.01, wait_seconds=0.002,
                           deposit_seconds=0.001, deposit_wait_seconds=0.0005,
                           mix_seconds=0.0004, step_seconds=0.0001, time=started + 0.003,
                           averaged=[2, 4], staleness=[0, 1])
        log.iteration(record, loss=0.5)
    log.span("evaluate", 1.04, 0.0, evaluation=1)
    log.close()
    line = json.loads((tmp_path / "rank-00003.jsonl").read_text().splitlines()[0])
    assert line["iteration"] == 7 and line["averaged"] == [2, 4] and line["loss"] == 0.5
    assert {"compute", "wait", "deposit", "deposit_wait", "mix", "step"} <= set(line)
    # The array format without its closing bracket is what a killed run leaves.
    text = (tmp_path / "trace-rank-00003.json").read_text()
    events = json.loads(text.rstrip(",\n") + "]")
    names = [e["name"] for e in events]
    assert names == ["compute", "wait", "mix", "step", "deposit_wait"] * 2 + ["deposit", "evaluate"]
    assert events[0]["ts"] == 990_000.0 and events[0]["dur"] == 10000.0
    deposit = events[10]
    assert deposit["tid"] == 1 and deposit["ts"] == 1_003_000.0, "overlapping, on its thread"
    assert all(e["pid"] == 3 and e["ph"] == "X" for e in events)


def test_progress_prints_plain_lines_to_a_file_with_rate_and_eta():
    out = io.StringIO()
    progress = Progress(Schedule(sample_budget=1000), stream=out, every=0.0)
    progress.update(0, 0.0, 2.3, None, force=True)
    progress.update(500, 5.0, 1.1, 0.75, force=True)
    last = out.getvalue().splitlines()[-1]
    assert "50%" in last and "samples 500/1000" in last and "acc 0.750" in last
    assert "ETA" in last and "\r" not in out.getvalue()


def test_durations_and_summary_table():
    assert duration(75) == "1:15" and duration(3725) == "1:02:05" and duration(None) == "?"
    table = summary_table({"policy": "aau", "topology": "ring(n=2)", "world_size": 2,
                           "accuracy": 0.9, "loss": 0.3, "seconds": 12.0, "samples": 100,
                           "target_accuracy": 0.8, "time_to_target": 4.5,
                           "stragglers": "none: no stragglers", "iterations": [10, 5],
                           "neighbours": [1.0, 1.0], "wait_share": [0.1, 0.0],
                           "sleep_share": [0.0, 0.5]})
    assert "accuracy 0.8 reached at 4.5 s" in table
    assert table.splitlines()[-1].split() == ["1", "5", "1.00", "0.00", "0.50"]
