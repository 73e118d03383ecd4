"""HDF5 checkpoints: round trips, finding, pruning, concurrency, kills and corruption."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from aau_mpi.decentralized.checkpoint import (
    check_compatible, commit_generation, find_checkpoint, read_manifest, read_rank_state,
    write_rank_state)
from aau_mpi.base.errors import UserError
from aau_mpi.training.models import build_model, load_model, save_model

REPO = Path(__file__).resolve().parents[1]
CONFIG = "model:\n  name: mlp\n"
META = {"model": {"name": "mlp", "hidden": [16]}, "data": {"name": "digits"}}


def rank_arrays(rank):
    return {
        "params": np.arange(10, dtype=np.float32) + rank,
        "rng": np.frombuffer(bytes(range(rank, rank + 40)), dtype=np.uint8),
        "counts": np.array([[1, 2], [3, 4]], dtype=np.int64) * rank,
        "step": np.array(7 + rank),
    }


def write_generation(root, generation, world_size=2, keep=2, commit=True):
    for rank in range(world_size):
        write_rank_state(root, generation, rank, world_size, rank_arrays(rank),
                         {"iteration": 100 * generation + rank, "lr": 0.1, "tags": ["a"]})
    if commit:
        return commit_generation(root, generation, world_size, CONFIG, META, keep=keep)
    return None


def gen_names(root):
    return sorted(path.name for path in Path(root).iterdir())


def test_round_trip_of_arrays_info_and_manifest(tmp_path):
    manifest_path = write_generation(tmp_path, 3)
    assert manifest_path == tmp_path / "gen-000003" / "manifest.h5"
    manifest = read_manifest(manifest_path)
    assert (manifest.generation, manifest.world_size) == (3, 2)
    assert manifest.config_yaml == CONFIG and manifest.meta == META
    assert abs(manifest.created - time.time()) < 60
    for rank in range(2):
        arrays, info = read_rank_state(manifest, rank)
        assert info == {"iteration": 300 + rank, "lr": 0.1, "tags": ["a"]}
        expected = rank_arrays(rank)
        assert arrays.keys() == expected.keys()
        for name, array in expected.items():
            assert arrays[name].dtype == array.dtype and arrays[name].shape == array.shape
            np.testing.assert_array_equal(arrays[name], array)
    assert [path.name for path in (tmp_path / "gen-000003").iterdir()
            if path.name.startswith(".")] == []  # no temp file left behind


def test_manifest_sees_every_rank_through_external_links(tmp_path, monkeypatch):
    manifest_path = write_generation(tmp_path / "ckpt", 1)
    monkeypatch.chdir(tmp_path)  # links resolve next to the manifest, not in the cwd
    with h5py.File(manifest_path, "r") as file:
        assert sorted(file["ranks"]) == ["00000", "00001"]
        np.testing.assert_array_equal(file["ranks/00001/arrays/params"][()],
                                      rank_arrays(1)["params"])
        assert file["ranks/00001"].attrs["rank"] == 1


def test_find_checkpoint_accepts_every_path_form(tmp_path):
    run = tmp_path / "run"
    root = run / "checkpoints"
    write_generation(root, 1)
    newest = write_generation(root, 2)
    write_generation(root, 3, commit=False)  # incomplete: skipped
    assert find_checkpoint(newest) == newest
    assert find_checkpoint(root / "gen-000002") == newest
    assert find_checkpoint(root / "gen-000001") == root / "gen-000001" / "manifest.h5"
    assert find_checkpoint(root) == newest
    assert find_checkpoint(run) == newest
    assert find_checkpoint(str(run)) == newest


def test_find_checkpoint_errors(tmp_path):
    root = tmp_path / "checkpoints"
    write_generation(root, 1)
    write_generation(root, 2, commit=False)
    with pytest.raises(UserError, match=r"no complete checkpoint under .*gen-000002: the "
                                        r"generation is incomplete.*--resume .*gen-000001"):
        find_checkpoint(root / "gen-000002")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"no complete checkpoint under .*empty: no generation"):
        find_checkpoint(empty)
    with pytest.raises(UserError, match=r"no complete checkpoint under .*nowhere: it does not"):
        find_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("keep, survivors", [(2, [3, 4]), (1, [4])])
def test_pruning_keeps_newest_complete_generations(tmp_path, keep, survivors):
    for generation in (1, 3):
        write_generation(tmp_path, generation, keep=keep)
    write_generation(tmp_path, 2, commit=False)  # older and incomplete: pruned
    write_generation(tmp_path, 5, commit=False)  # newer, ranks may be writing it: kept
    write_generation(tmp_path, 4, keep=keep)
    assert gen_names(tmp_path) == [f"gen-{g:06d}" for g in survivors] + ["gen-000005"]
    assert sorted(os.listdir(tmp_path / "gen-000005")) == ["rank-00000.h5", "rank-00001.h5"]
    assert find_checkpoint(tmp_path) == tmp_path / "gen-000004" / "manifest.h5"


def test_commit_is_idempotent_needs_every_rank_and_reads_check_the_files(tmp_path):
    first = write_generation(tmp_path, 1)
    assert commit_generation(tmp_path, 1, 2, CONFIG, META) == first
    assert read_manifest(first).generation == 1
    write_rank_state(tmp_path, 2, 0, 2, rank_arrays(0), {})
    with pytest.raises(UserError, match=r"cannot commit generation 2: .*rank-00001.h5 is missing"):
        commit_generation(tmp_path, 2, 2, CONFIG, META)
    write_rank_state(tmp_path, 2, 1, 3, rank_arrays(1), {})  # written for another world size
    manifest = read_manifest(commit_generation(tmp_path, 2, 2, CONFIG, META))
    with pytest.raises(UserError, match=r"holds rank 1 of 3, generation 2, expected rank 1 of 2"):
        read_rank_state(manifest, 1)  # a commit only stats the files; a read checks them
    with pytest.raises(UserError, match="keep must be at least 1"):
        commit_generation(tmp_path, 1, 2, CONFIG, META, keep=0)


COMMIT_AT = """
import sys, time
from aau_mpi.decentralized.checkpoint import commit_generation
root, start = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
commit_generation(root, 3, 2, "config", {"model": "mlp"}, keep=1)
"""


def test_concurrent_commits_leave_one_valid_manifest(tmp_path):
    for generation in (1, 2):
        write_generation(tmp_path, generation)
    write_generation(tmp_path, 3, commit=False)
    start = time.time() + 1.0  # all processes imported and waiting: the commits overlap
    procs = [subprocess.Popen([sys.executable, "-c", COMMIT_AT, str(tmp_path), str(start)],
                              cwd=REPO, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for proc in procs:
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    assert gen_names(tmp_path) == ["gen-000003"]  # no trash dir left either
    assert sorted(os.listdir(tmp_path / "gen-000003")) == [
        "manifest.h5", "rank-00000.h5", "rank-00001.h5"]
    manifest = read_manifest(find_checkpoint(tmp_path))
    assert (manifest.generation, manifest.meta) == (3, {"model": "mlp"})
    assert read_rank_state(manifest, 1)[1]["iteration"] == 301


# Writes datasets forever: the kill is certain to land mid-write.
ENDLESS_WRITE = """
import sys
import numpy as np
from aau_mpi.decentralized.checkpoint import write_rank_state

class Endless(dict):
    def items(self):
        index = 0
        while True:
            yield f"a{index:06d}", np.full(1 << 18, index, np.float32)
            index += 1

write_rank_state(sys.argv[1], 2, 0, 2, Endless(), {})
"""


def test_sigkill_mid_write_leaves_previous_generation_loadable(tmp_path):
    previous = write_generation(tmp_path, 1)
    proc = subprocess.Popen([sys.executable, "-c", ENDLESS_WRITE, str(tmp_path)], cwd=REPO)
    gen_dir = tmp_path / "gen-000002"
    deadline = time.monotonic() + 20
    temps = []
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            temps = list(gen_dir.glob(".rank-00000.h5.*.tmp")) if gen_dir.exists() else []
            if temps and temps[0].stat().st_size > 8 << 20:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert len(temps) == 1  # a partial temp file, under a name nothing reads
    assert not (gen_dir / "rank-00000.h5").exists() and not (gen_dir / "manifest.h5").exists()
    assert find_checkpoint(tmp_path) == previous
    arrays, _ = read_rank_state(read_manifest(previous), 0)
    np.testing.assert_array_equal(arrays["params"], rank_arrays(0)["params"])
    with pytest.raises(UserError, match="cannot commit generation 2: .*rank-00000.h5 is missing"):
        commit_generation(tmp_path, 2, 2, CONFIG, META)


def test_a_rank_file_of_the_old_format_is_refused_with_the_fix(tmp_path):
    manifest = read_manifest(write_generation(tmp_path, 1))
    with h5py.File(manifest.rank_path(0), "r+") as file:
        file.attrs["format_version"] = 1  # as aau_mpi 0.1 wrote it
    with pytest.raises(UserError, match="written by aau_mpi 0.1.*start a new run"):
        read_rank_state(manifest, 0)


def test_truncated_rank_file_is_a_user_error(tmp_path):
    write_generation(tmp_path, 1)
    manifest = read_manifest(write_generation(tmp_path, 2))
    path = manifest.rank_path(1)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(UserError, match=r"rank-00001.h5 is corrupt or truncated .*: resume "
                                        r"from an earlier generation: --resume .*gen-000001$"):
        read_rank_state(manifest, 1)


def test_flipped_byte_in_array_data_fails_crc(tmp_path):
    manifest = read_manifest(write_generation(tmp_path, 1))
    path = manifest.rank_path(0)
    with h5py.File(path, "r") as file:
        offset = file["arrays/params"].id.get_offset()
    with open(path, "r+b") as raw:
        raw.seek(offset + 5)
        byte = raw.read(1)
        raw.seek(offset + 5)
        raw.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(UserError, match=r"array 'params' in .*rank-00000.h5 fails its crc32 "
                                        r"check.*start a new run without --resume"):
        read_rank_state(manifest, 0)


def test_damaged_manifest_and_foreign_files_are_user_errors(tmp_path):
    write_generation(tmp_path, 1)
    manifest = write_generation(tmp_path, 2)
    manifest.write_bytes(manifest.read_bytes()[:100])
    with pytest.raises(UserError, match=r"manifest.h5 is corrupt or truncated .*--resume "
                                        r".*gen-000001$"):
        read_manifest(find_checkpoint(tmp_path / "gen-000002"))
    # A flipped byte inside the stored config text: caught by the header checksum.
    first = read_manifest(tmp_path / "gen-000001" / "manifest.h5").path
    raw = bytearray(first.read_bytes())
    at = raw.find(CONFIG.encode())
    assert at > 0
    raw[at + 3] ^= 0x01
    first.write_bytes(raw)
    with pytest.raises(UserError, match=r"gen-000001/manifest.h5 is corrupt .*start a new run"):
        read_manifest(first)
    text = tmp_path / "notes.txt"
    text.write_text("not hdf5\n")
    with pytest.raises(UserError, match="notes.txt is corrupt or truncated"):
        read_manifest(text)
    with pytest.raises(UserError, match=r"rank-00000.h5 is not an aau_mpi.checkpoint.manifest"):
        read_manifest(tmp_path / "gen-000001" / "rank-00000.h5")
    with pytest.raises(UserError, match="is missing"):
        read_manifest(tmp_path / "gen-000001" / "nothing.h5")


def test_user_error_messages_are_one_line(tmp_path):
    path = tmp_path / "gen-000001" / "manifest.h5"
    path.parent.mkdir()
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(200))  # an HDF5 signature, then garbage
    with pytest.raises(UserError) as error:
        read_manifest(path)
    assert "\n" not in str(error.value)


def test_check_compatible(tmp_path):
    manifest = read_manifest(write_generation(tmp_path, 1))
    check_compatible(manifest, {"model": {"hidden": (16,), "name": "mlp"}})  # tuple == list
    with pytest.raises(UserError, match=r'its data is {"name":"digits"}, this run\'s is '
                                        r'{"name":"mnist"}: use the checkpoint\'s data'):
        check_compatible(manifest, {"data": {"name": "mnist"}})
    with pytest.raises(UserError, match=r"its optimizer is \(none\)"):
        check_compatible(manifest, {"optimizer": {"lr": 0.1}})


MODEL_META = {"model": "mlp", "model_params": {"hidden": [16]}, "input_shape": [64],
              "num_classes": 10}


def test_save_and_load_model(tmp_path):
    torch.manual_seed(0)
    model = build_model("mlp", (64,), 10, {"hidden": [16]})
    path = tmp_path / "run" / "model.h5"
    path.parent.mkdir()
    save_model(path, model, {**MODEL_META, "accuracy": 0.9})
    loaded = load_model(path)
    assert not loaded.training
    inputs = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), model(inputs), rtol=0, atol=0)
    save_model(path, model.state_dict(), MODEL_META)  # a state_dict works too, and overwrites
    assert os.listdir(path.parent) == ["model.h5"]


def test_model_file_errors(tmp_path):
    model = build_model("mlp", (64,), 10, {"hidden": [16]})
    with pytest.raises(UserError, match=r"cannot write .*model.h5 .*check that its folder exists"):
        save_model(tmp_path / "missing" / "model.h5", model, MODEL_META)
    path = tmp_path / "model.h5"
    save_model(path, model, {**MODEL_META, "model_params": {"hidden": [8]}})
    with pytest.raises(UserError, match=r"model.h5 does not fit model 'mlp'"):
        load_model(path)
    path.write_bytes(b"junk")
    with pytest.raises(UserError, match=r"model.h5 is corrupt or truncated .*save the model again"):
        load_model(path)
    write_generation(tmp_path / "ckpt", 1)
    with pytest.raises(UserError, match=r"is not an aau_mpi.model file"):
        load_model(tmp_path / "ckpt" / "gen-000001" / "manifest.h5")
