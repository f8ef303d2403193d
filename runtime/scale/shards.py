"""A bulk sampling job on disk: its shards, its manifest, and which shards are still missing.

Image k of a seed depends on (seed, k) only, so a job of ``n`` images is cut into shards of
consecutive indices that any worker on any machine can draw alone. The folder holds
``manifest.json`` (the model's SHA-256, the options, the shard list) and one
``shard-00000.npz`` per shard (uint8 ``images`` [N, H, W, C], int64 ``indices``, and the
job's id). Each file is written atomically, so a shard on disk is a whole shard; a killed
run finds the shards that are there, checks them, and draws only the others. No Ray here:
:mod:`runtime.scale.bulk` runs the job.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..metadata import decode_json
from ..util.fileio import (
    NotRegularFileError,
    OutputError,
    atomic_output,
    check_name_lengths,
    check_output,
    read_regular_file,
    write_text,
)

MANIFEST = "manifest.json"
FORMAT = "ddpm-bulk"
FORMAT_VERSION = 1
DEFAULT_SHARD_SIZE = 256
# The manifest lists every shard and a rerun opens every shard file: keep both small.
MAX_SHARDS = 100_000
# What reading a damaged or foreign shard file can raise (np.load, zipfile, zlib, npy);
# RuntimeError: zipfile's "encrypted" and NotImplementedError's "unknown compression".
_UNREADABLE = (OSError, KeyError, ValueError, EOFError, RuntimeError, zipfile.BadZipFile,
               zlib.error)


class JobMismatchError(ValueError):
    """The output folder holds another job (other model or options): refuse to mix them."""


def check_job_size(n: int, shard_size: int) -> int:
    """The number of shards of ``n`` images, or ValueError when there would be too many."""
    shards = -(-n // shard_size)
    if shards > MAX_SHARDS:
        raise ValueError(f"-n {n} in shards of --shard-size {shard_size} makes {shards} "
                         f"shards, more than {MAX_SHARDS}; use --shard-size "
                         f"{-(-n // MAX_SHARDS)} or more, or fewer images")
    return shards


@dataclass(frozen=True)
class Shard:
    index: int
    first: int   # first image index
    count: int

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}.npz"

    @property
    def indices(self) -> np.ndarray:
        return np.arange(self.first, self.first + self.count, dtype=np.int64)


class BulkJob:
    """``n`` images of ``seed`` drawn with ``sample_options``, in shards under ``out``."""

    def __init__(self, out, *, model_sha256: str, image_shape, n: int, seed: int,
                 shard_size: int, sample_options: dict):
        self.out = Path(out)
        self.model_sha256 = model_sha256
        c, h, w = image_shape
        self.image_shape = (int(h), int(w), int(c))   # as stored: [N, H, W, C]
        # Everything that decides the pixels, and nothing that does not (threads, workers).
        self.options = {"n": int(n), "seed": int(seed), "shard_size": int(shard_size),
                        **sample_options}
        check_job_size(n, shard_size)
        self.shards = [Shard(i, first, min(shard_size, n - first))
                       for i, first in enumerate(range(0, n, shard_size))]
        key = json.dumps({"model_sha256": model_sha256, "options": self.options},
                         sort_keys=True)
        self.job_id = hashlib.sha256(key.encode()).hexdigest()[:16]

    @property
    def manifest_path(self) -> Path:
        return self.out / MANIFEST

    def manifest(self, complete: bool) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "job_id": self.job_id,
                "model_sha256": self.model_sha256, "options": self.options,
                "image_shape": list(self.image_shape), "complete": complete,
                "shards": [{"file": s.name, "first": s.first, "count": s.count}
                           for s in self.shards]}

    def prepare(self, inputs=()) -> None:
        """Check the folder before any work; adopt its manifest or write a new one.

        Raises OutputError for a folder that cannot hold the job and JobMismatchError
        when it holds another job's manifest or stray shards.
        """
        check_name_lengths(self.manifest_path, "--out")
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"--out {self.out} is a file; give a folder for the shards")
        check_output(self.manifest_path, inputs=inputs, option="--out")
        if self.manifest_path.exists():
            self._check_manifest(self._read_manifest())
        elif any(self.out.glob("shard-*.npz")):
            raise JobMismatchError(f"--out {self.out} holds shard files but no {MANIFEST}; "
                                   "choose an empty folder")
        else:
            self.write_manifest(complete=False)

    def write_manifest(self, *, complete: bool) -> None:
        write_text(self.manifest_path, json.dumps(self.manifest(complete), indent=1) + "\n")

    def _read_manifest(self) -> dict:
        return read_manifest(self.out, "remove the folder or choose another --out")

    def _check_manifest(self, data: dict) -> None:
        theirs = dict(data["options"], model_sha256=data["model_sha256"])
        ours = dict(self.options, model_sha256=self.model_sha256)
        diffs = [f"{key} {theirs.get(key)!r} != {ours.get(key)!r}"
                 for key in sorted(set(theirs) | set(ours)) if theirs.get(key) != ours.get(key)]
        if diffs:
            raise JobMismatchError(f"{self.manifest_path} is another job ({'; '.join(diffs)}); "
                                   "rerun with its options, or use a new --out")

    def is_done(self, shard: Shard) -> bool:
        """A shard counts only if its file is whole and was drawn by this very job."""
        path = self.out / shard.name
        try:
            with np.load(path, allow_pickle=False) as data:
                return (str(data["job_id"]) == self.job_id
                        and data["images"].shape == (shard.count, *self.image_shape)
                        and data["images"].dtype == np.uint8
                        and np.array_equal(data["indices"], shard.indices))
        except _UNREADABLE:
            return False  # missing, truncated, damaged or foreign: draw it again

    def missing(self) -> list[Shard]:
        return [s for s in self.shards if not self.is_done(s)]

    def write_shard(self, shard: Shard, images: np.ndarray) -> Path:
        expected = (shard.count, *self.image_shape)
        if images.shape != expected or images.dtype != np.uint8:
            raise ValueError(f"{shard.name}: got images {images.dtype} {images.shape}, "
                             f"expected uint8 {expected}")
        path = self.out / shard.name
        with atomic_output(path) as tmp, open(tmp, "xb") as f:
            _write_npz(f, {"images": images, "indices": shard.indices,
                           "job_id": np.array(self.job_id)})
        return path


def _write_npz(f, arrays: dict) -> None:
    """np.savez_compressed, less the clock: a fixed timestamp in every zip entry, so a shard's
    bytes depend only on its images (the same file from 1 worker or 100, run to run)."""
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(entry, "w", force_zip64=True) as out:
                np.lib.format.write_array(out, np.asanyarray(array), allow_pickle=False)


# A manifest lists at most MAX_SHARDS shards of ~60 bytes each.
MAX_MANIFEST_BYTES = 64 << 20


def read_manifest(out, fix: str) -> dict:
    """The folder's manifest.json, checked to be a bulk manifest; JobMismatchError naming
    it otherwise (``fix`` says what to do)."""
    path = Path(out) / MANIFEST
    try:
        raw = read_regular_file(path, MAX_MANIFEST_BYTES)
    except (OSError, NotRegularFileError) as err:
        reason = err.strerror if isinstance(err, OSError) else f"it {err}"
        raise JobMismatchError(f"{path}: unreadable manifest ({reason}); {fix}") from None
    data = decode_json(raw, path, "the manifest", fix, JobMismatchError)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise JobMismatchError(f"{path} is not a bulk sampling manifest; {fix}")
    if (not isinstance(data.get("options"), dict)
            or not isinstance(data.get("model_sha256"), str)):
        raise JobMismatchError(f"{path}: damaged manifest ('options' must be an object, "
                               f"'model_sha256' a string); {fix}")
    return data


def read_images(out) -> tuple[np.ndarray, np.ndarray]:
    """All images of a finished job folder in index order: (uint8 [n, H, W, C], int64 [n]).

    Every shard must carry the manifest's job id and its own indices: a shard file copied
    in from another job's folder is refused (JobMismatchError naming it), never returned
    as this job's images.
    """
    out = Path(out)
    fix = "rerun the bulk command on this folder to draw it again"
    manifest = read_manifest(out, "it is not a finished bulk job folder")
    job_id, entries = manifest.get("job_id"), manifest.get("shards")
    if not isinstance(job_id, str) or not isinstance(entries, list) or \
            manifest.get("complete") is not True:
        raise JobMismatchError(f"{out / MANIFEST}: the job is not complete (or the manifest is "
                               f"damaged); {fix}")
    images, indices = [], []
    for entry in entries:
        try:
            name, first, count = entry["file"], int(entry["first"]), int(entry["count"])
            if not isinstance(name, str) or Path(name).name != name:
                raise ValueError(f"shard file {name!r} is not a name in the folder")
            path = out / name
        except (TypeError, KeyError, ValueError) as err:
            raise JobMismatchError(f"{out / MANIFEST}: damaged shard entry {entry!r} ({err}); "
                                   f"{fix}") from None
        try:
            with np.load(path, allow_pickle=False) as data:
                theirs, shard_images = str(data["job_id"]), data["images"]
                shard_indices = data["indices"]
        except _UNREADABLE as err:
            raise JobMismatchError(f"{path}: unreadable shard ({type(err).__name__}); "
                                   f"{fix}") from None
        if theirs != job_id:
            raise JobMismatchError(f"{path}: a shard of another job (job id {theirs!r}, this "
                                   f"folder's is {job_id!r}); remove it and {fix}")
        want = np.arange(first, first + count, dtype=np.int64)
        if not np.array_equal(shard_indices, want) or len(shard_images) != count:
            raise JobMismatchError(f"{path}: holds images other than {first}..{first + count - 1}"
                                   f" of this job; remove it and {fix}")
        images.append(shard_images)
        indices.append(shard_indices)
    return np.concatenate(images), np.concatenate(indices)
