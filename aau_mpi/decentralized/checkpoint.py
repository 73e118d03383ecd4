"""HDF5 checkpoints: one file per rank per generation, atomic and resumable.

    <root>/gen-000003/rank-00000.h5 ...   one file per rank, written by that rank
    <root>/gen-000003/manifest.h5         written last: its presence = generation complete

Every file is written to a uniquely named hidden temp file in its final
directory, fsynced, renamed onto its final name with os.replace (atomic on
POSIX) and the directory fsynced: a final name only ever names a complete
file, and a process killed mid-write leaves earlier generations untouched.
Files are immutable once renamed, so readers need no locks.

This module is filesystem and h5py only (training/models.py writes the final
model, <run>/model.h5, with its atomic_h5). The trainer decides what a rank's
state holds, and when every rank has written a generation (over MPI); then it
calls commit_generation. See docs/checkpoints.md.
"""

import json
import os
import re
import secrets
import shutil
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from aau_mpi.base.errors import UserError

RANK_FORMAT = "aau_mpi.checkpoint.rank"
MANIFEST_FORMAT = "aau_mpi.checkpoint.manifest"
FORMAT_VERSION = 2
# Rank files of format 1 (aau_mpi 0.1) held the old trainer's state layout.
OLDEST_RANK_FORMAT = 2
MANIFEST = "manifest.h5"
GENERATION_DIR = re.compile(r"gen-(\d+)")

# h5py raises HDF5 failures (bad signature, truncation, damaged metadata) as
# these builtins; json.JSONDecodeError is a ValueError.
H5_READ_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)


@dataclass
class Manifest:
    path: Path           # the manifest file
    generation: int
    world_size: int
    config_yaml: str
    meta: dict
    created: float       # unix time

    def rank_path(self, rank):
        return self.path.parent / rank_file_name(rank)


def rank_file_name(rank):
    return f"rank-{rank:05d}.h5"


def generation_dir(root, generation):
    """<root>/gen-NNNNNN, created if missing."""
    path = Path(root) / f"gen-{generation:06d}"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create checkpoint directory {path} ({one_line(err)}): "
                        f"choose a writable checkpoint folder") from None
    return path


def write_rank_state(root, generation, rank, world_size, arrays, info):
    """Write this rank's arrays (name -> ndarray) and info (JSON-able dict) atomically."""
    path = generation_dir(root, generation) / rank_file_name(rank)
    with atomic_h5(path) as file:
        file.attrs.update(format_version=FORMAT_VERSION, rank=rank, world_size=world_size,
                          generation=generation, created=time.time())
        set_texts(file.attrs, format=RANK_FORMAT, info=json.dumps(info))
        write_arrays(file.create_group("arrays"), arrays)
    return path


def commit_generation(root, generation, world_size, config_yaml, meta, keep=2, prune_old=True):
    """Mark `generation` complete (its manifest), then prune old generations; return the manifest.

    Call it once every rank has written the generation: a rank file is
    renamed into place only when complete, so its presence is all that is
    checked here (one stat per rank: opening N files would put N reads on
    the committer's training path); its contents are verified, crc32 and
    attributes, whenever it is read. Idempotent, and safe for several ranks
    to call at once: each writes an equivalent manifest through its own temp
    file, and a directory is pruned by whoever renames it away first. With
    `prune_old`, removes every directory older than the committed one except
    the newest `keep` complete generations (see `prune`).
    """
    if keep < 1:
        raise UserError(f"checkpoint keep must be at least 1 (got {keep}): "
                        f"set keep to 1 or more")
    gen_dir = generation_dir(root, generation)
    for rank in range(world_size):
        path = gen_dir / rank_file_name(rank)
        if not path.exists():
            raise UserError(f"cannot commit generation {generation}: {path} is missing: "
                            f"every rank must write its state before the commit")
    manifest = gen_dir / MANIFEST
    with atomic_h5(manifest) as file:
        file.attrs.update(format_version=FORMAT_VERSION, generation=generation,
                          world_size=world_size, created=time.time())
        set_texts(file.attrs, format=MANIFEST_FORMAT, config=config_yaml, meta=json.dumps(meta))
        ranks = file.create_group("ranks")
        for rank in range(world_size):
            # Relative links: HDF5 resolves them next to the manifest, so the
            # generation directory can be moved or copied as a whole.
            ranks[f"{rank:05d}"] = h5py.ExternalLink(rank_file_name(rank), "/")
    if prune_old:
        prune(Path(root), generation, keep)
    return manifest


def prune(root, committed, keep):
    """Remove generation dirs older than `committed`, except the newest `keep` complete ones.

    Assumes generations are committed in order (a commit of g never overlaps
    one of g+1), and never touches a newer directory, which ranks may still
    be writing."""
    root = Path(root)
    kept = {number for number, _ in complete_generations(root)[-keep:]}
    for number, path in generations(root):
        if number >= committed or number in kept:
            continue
        # Renaming first makes one pruner own the directory (a concurrent
        # rename fails), and a half-deleted directory never carries a
        # generation name that find_checkpoint could pick.
        trash = root / f".trash-{path.name}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            continue
        shutil.rmtree(trash)


def find_checkpoint(path):
    """The manifest to resume from: given a manifest, gen dir, checkpoints root or run dir."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / MANIFEST).is_file():
        return path / MANIFEST
    if GENERATION_DIR.fullmatch(path.name) and path.is_dir():
        raise UserError(f"no complete checkpoint under {path}: the generation is incomplete "
                        f"(no {MANIFEST}); {resume_hint(path)}")
    for root in (path, path / "checkpoints"):
        complete = complete_generations(root)
        if complete:
            return complete[-1][1] / MANIFEST
    what = "it does not exist" if not path.exists() else "no generation with a manifest"
    raise UserError(f"no complete checkpoint under {path}: {what}: pass a run folder, its "
                    f"checkpoints folder or a gen-NNNNNN folder (or start without --resume)")


def read_manifest(path):
    path = Path(path)
    with open_h5(path, MANIFEST_FORMAT, resume_hint(path.parent)) as file:
        attrs = file.attrs
        return Manifest(path=path, generation=int(attrs["generation"]),
                        world_size=int(attrs["world_size"]), config_yaml=text(attrs, "config"),
                        meta=json.loads(text(attrs, "meta")), created=float(attrs["created"]))


def read_rank_state(manifest, rank):
    """(arrays, info) that `rank` wrote in the manifest's generation, crc32-checked."""
    if not 0 <= rank < manifest.world_size:
        raise ValueError(f"rank {rank} out of range for world size {manifest.world_size}")
    path = manifest.rank_path(rank)
    with open_h5(path, RANK_FORMAT, resume_hint(path.parent)) as file:
        check_rank_attrs(file, path, rank, manifest.world_size, manifest.generation)
        arrays = read_arrays(file["arrays"], path, resume_hint(path.parent))
        return arrays, json.loads(text(file.attrs, "info"))


def check_compatible(manifest, meta):
    """UserError unless each key of meta (the model, the dataset) matches the checkpoint's.

    Another world size is not checked: a checkpoint resumes on any number of
    ranks (aau_mpi.decentralized.checkpointer.Checkpointer.restore_resized)."""
    where = manifest.path.parent
    for key, value in meta.items():
        ours = compact_json(value)
        theirs = compact_json(manifest.meta[key]) if key in manifest.meta else "(none)"
        if ours != theirs:
            raise UserError(f"cannot resume {where}: its {key} is {theirs}, this run's is {ours}: "
                            f"use the checkpoint's {key} settings (or start a new run without "
                            f"--resume)")


# ------------------------------------------------------------------ helpers

@contextmanager
def atomic_h5(path):
    """An h5py.File on a temp file next to `path` that becomes `path` only once complete."""
    # Same directory: os.replace is only atomic within one filesystem. pid and
    # a random suffix: concurrent writers of one name never share a temp file.
    temp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        # libver v108: checksummed metadata (superblock, object headers), so
        # a damaged header is an error on read, not a wrong value.
        # locking=False: HDF5's flock fails on some cluster filesystems (NFS,
        # Lustre), and no two processes ever open one file for writing here.
        with h5py.File(temp, "w", libver="v108", locking=False) as file:
            yield file
        fsync(temp)  # the data is on disk before any name points at it
        os.replace(temp, path)
        fsync(path.parent)  # the rename itself survives a crash
    except OSError as err:
        temp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path} ({one_line(err)}): check that its folder "
                        f"exists, is writable and has free space") from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def fsync(path):
    # fsync applies to the file (or directory), not to the descriptor: data
    # written through h5py's own descriptor is flushed through this one.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def open_h5(path, expected_format, hint):
    """Open one of our files read-only; missing, foreign or damaged files are UserErrors."""
    try:
        with h5py.File(path, "r", locking=False) as file:
            found = file.attrs.get("format", b"")
            found = found.decode() if isinstance(found, bytes) else found
            if found != expected_format:
                raise UserError(f"{path} is not an {expected_format} file (format: {found!r}): "
                                f"{hint}")
            version = int(file.attrs["format_version"])
            if version > FORMAT_VERSION:
                raise UserError(f"{path} has format_version {version}, newer than this aau_mpi "
                                f"reads ({FORMAT_VERSION}): upgrade aau_mpi")
            if expected_format == RANK_FORMAT and version < OLDEST_RANK_FORMAT:
                raise UserError(f"{path} was written by aau_mpi 0.1 (format_version {version}), "
                                f"whose rank state this version does not read: resume it with "
                                f"aau_mpi 0.1, or start a new run without --resume")
            yield file
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {hint}") from None
    except H5_READ_ERRORS as err:
        raise UserError(f"{path} is corrupt or truncated ({one_line(err)}): {hint}") from None


def set_texts(attrs, **texts):
    """Store strings as fixed-length UTF-8 attributes.

    These live in the object header, which the v108 file format checksums.
    h5py's default variable-length strings live in HDF5's global heap, which
    has no checksum: a flipped byte there silently changed a config.
    """
    for name, value in texts.items():
        data = value.encode()
        attrs.create(name, np.array(data, h5py.string_dtype("utf-8", max(1, len(data)))))


def text(attrs, name):
    return bytes(attrs[name]).decode()


def check_rank_attrs(file, path, rank, world_size, generation):
    found = tuple(int(file.attrs[key]) for key in ("rank", "world_size", "generation"))
    if found != (rank, world_size, generation):
        raise UserError(f"{path} holds rank {found[0]} of {found[1]}, generation {found[2]}, "
                        f"expected rank {rank} of {world_size}, generation {generation}: "
                        f"do not mix files between checkpoint folders")


def write_arrays(group, arrays):
    for name, array in arrays.items():
        if not name or "/" in name:
            raise ValueError(f"array name {name!r} must be non-empty and contain no '/'")
        dataset = group.create_dataset(name, data=array)
        dataset.attrs["crc32"] = crc32(array)


def read_arrays(group, path, hint):
    arrays = {}
    for name, dataset in group.items():
        array = np.asarray(dataset[()])
        if crc32(array) != int(dataset.attrs["crc32"]):
            raise UserError(f"array {name!r} in {path} fails its crc32 check (the file is "
                            f"corrupt): {hint}")
        arrays[name] = array
    return arrays


def crc32(array):
    return zlib.crc32(np.ascontiguousarray(array).data)


def generations(root):
    """[(number, dir)] of <root>/gen-NNNNNN dirs, oldest first; [] if root is no directory."""
    try:
        entries = list(Path(root).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [(int(match[1]), entry) for entry in entries
             if (match := GENERATION_DIR.fullmatch(entry.name)) and entry.is_dir()]
    return sorted(found)


def complete_generations(root):
    return [(number, path) for number, path in generations(root) if (path / MANIFEST).is_file()]


def resume_hint(gen_dir):
    """Where to resume from instead of gen_dir: the newest complete generation before it."""
    gen_dir = Path(gen_dir)
    match = GENERATION_DIR.fullmatch(gen_dir.name)
    earlier = [path for number, path in complete_generations(gen_dir.parent)
               if match and number < int(match[1])]
    if earlier:
        return f"resume from an earlier generation: --resume {earlier[-1]}"
    return "no earlier complete generation: start a new run without --resume"


def compact_json(value):
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def one_line(err):
    return " ".join(str(err).split())
