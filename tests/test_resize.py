"""Resuming a checkpoint on another number of ranks, end to end: one 8-rank run
with checkpoints, resumed (each on its own copy of the run folder) on 6 ranks
and on 10 (`mpiexec -n M python -m aau_mpi.train --resume run/`).

Each resumed job trains on from the average of the 8 saved models, its
global sample budget continues from the checkpoint's count, and the 8-rank
generations it resumed from stay as they were. Starting the 24 ranks of the
three jobs (each imports torch) costs most of this test's time; the training
itself is a few seconds.
"""

import json
import shutil

import pytest

from aau_mpi.decentralized import checkpoint

from launcher import MLP, launch, launcher_required, read_lines

pytestmark = [launcher_required(), pytest.mark.long]

SAVED = 8
TRAIN_SIZE = 1437          # digits' training set
EPOCHS, MORE_EPOCHS = 4, 8
JOB = ["--config", "jobs/demo.yaml", MLP, "stragglers={name: none}", "data.batch_size=16",
       f"budget.epochs={EPOCHS}", "eval.every_epochs=2", "output.progress=false",
       "checkpoint.every_iterations=10", "checkpoint.keep=50"]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """The 8-rank run (about 45 iterations per rank) and its summary."""
    out = tmp_path_factory.mktemp("saved")
    result = launch(SAVED, *JOB, f"output.dir={out}", "name=r8", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = out / "r8"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["world_size"] == SAVED and summary["exit"] == "finished"
    # The saved ranks' average, which every resumed rank starts from, scored this.
    assert summary["accuracy"] > 0.5, summary["accuracy"]
    return folder, summary


def verify_generation(manifest):
    """Every rank file of the generation reads back: attributes, crc32 of every array."""
    for rank in range(manifest.world_size):
        checkpoint.read_rank_state(manifest, rank)


@pytest.mark.parametrize("ranks", [6, 10])
def test_an_8_rank_checkpoint_resumes_on_another_number_of_ranks(saved_run, tmp_path, ranks):
    saved, before = saved_run
    folder = tmp_path / "run"
    shutil.copytree(saved, folder)
    root = folder / "checkpoints"
    files = {path: path.read_bytes() for path in root.rglob("*.h5")}
    generations = sorted(path.parent for path in root.glob("gen-*/manifest.h5"))
    assert len(generations) >= 2, [g.name for g in generations]
    newest = checkpoint.read_manifest(checkpoint.find_checkpoint(folder))
    states = [checkpoint.read_rank_state(newest, rank)[1] for rank in range(SAVED)]
    iteration = max(info["iteration"] for info in states)
    count = sum(info["own_samples"] for info in states)  # the checkpoint's total
    lines = {rank: len(read_lines(folder / f"rank-{rank:05d}.jsonl")) for rank in range(SAVED)}
    evaluations = len(read_lines(folder / "eval.jsonl"))

    budget = MORE_EPOCHS * TRAIN_SIZE
    result = launch(ranks, "--resume", str(folder), f"budget.epochs={MORE_EPOCHS}",
                    "checkpoint.keep=50", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    said = [line for line in result.stdout.splitlines() if line.startswith("resuming ")]
    assert said == [f"resuming {SAVED} ranks' checkpoint {newest.path.parent.name} on {ranks} "
                    f"ranks: every rank starts from the average of the {SAVED} models; "
                    f"optimizer state (momentum) averaged; policy and straggler state reset; "
                    f"shards re-partitioned"], result.stdout[-3000:]

    summary = json.loads((folder / "summary.json").read_text())
    assert summary["exit"] == "finished" and summary["world_size"] == ranks
    assert len(summary["iterations"]) == ranks
    # The global budget continues: the job's total reaches it, counting the
    # checkpoint's samples (a new budget on top would end near count + budget).
    assert count > 0.4 * budget and summary["samples"] > count
    assert budget <= summary["samples"] < budget + 4 * ranks * 16
    # The floor: the saved average's accuracy (the resumed ranks' start), less noise.
    assert summary["accuracy"] >= min(before["accuracy"], 0.8) - 0.03, (
        summary["accuracy"], before["accuracy"])

    # Every rank's iterations and its view of the global count go on from the
    # checkpoint's (a restart would begin at 0).
    for rank in range(ranks):
        records = read_lines(folder / f"rank-{rank:05d}.jsonl")[lines.get(rank, 0):]
        assert records, f"rank {rank} did not train"
        assert records[0]["iteration"] == iteration, "every rank goes on from the largest"
        assert records[0]["samples"] >= count, records[0]
    resumed = read_lines(folder / "eval.jsonl")[evaluations:]
    assert resumed and resumed[0]["evaluation"] > evaluations
    assert min(e["accuracy"] for e in resumed) >= min(before["accuracy"], 0.8) - 0.05

    # Nothing the 8 ranks saved was lost or changed: every file byte for byte,
    # every 8-rank generation complete and verified; the new ones follow them.
    for path, data in files.items():
        assert path.read_bytes() == data, f"{path} changed"
    for gen in generations:
        manifest = checkpoint.read_manifest(gen / checkpoint.MANIFEST)
        assert manifest.world_size == SAVED
        verify_generation(manifest)
    latest = checkpoint.read_manifest(checkpoint.find_checkpoint(folder))
    assert latest.world_size == ranks and latest.generation > newest.generation
    verify_generation(latest)
