"""A model's files as its backend declares them: ONNX external data goes wherever the
model goes (load, info, sample, digests, Ray shipping), read from the protobuf itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime import backends
from runtime.backends.onnx_files import external_data_names
from runtime.errors import ModelFileError
from runtime.metadata import sha256_file

ROOT = Path(__file__).resolve().parents[1]
onnx = pytest.importorskip("onnx")


def with_external_data(src: Path, dst: Path, location: str = "weights/model.data") -> Path:
    """``src`` saved with every tensor in one external file at ``location``."""
    model = onnx.load(str(src))
    (dst.parent / location).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024)
    return dst


def relocate(path: Path, location: str) -> Path:
    """Point every tensor of ``path`` at ``location`` (onnx itself refuses to write '..')."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(scope="module")
def external(tiny_onnx, tmp_path_factory):
    return with_external_data(tiny_onnx, tmp_path_factory.mktemp("ext") / "model.onnx")


def test_an_external_data_model_samples_like_the_one_file_model(tiny_onnx, external):
    assert external.stat().st_size < tiny_onnx.stat().st_size / 4  # the weights moved out
    with runtime.load(external) as a, runtime.load(tiny_onnx) as b:
        np.testing.assert_array_equal(a.sample(3, 1, steps=4, progress=False),
                                      b.sample(3, 1, steps=4, progress=False))
    info = subprocess.run([sys.executable, "-m", "runtime", "info", str(external)],
                          capture_output=True, text=True, cwd=ROOT)
    assert info.returncode == 0 and "checkpoint_sha256" in info.stdout


def test_backends_declare_every_file_and_digest_them_all(tiny_onnx, external):
    assert backends.model_files(tiny_onnx) == [tiny_onnx]
    assert external_data_names(tiny_onnx) == []
    # A one-file model's digest is its own SHA-256, as manifests always recorded it.
    assert backends.model_digest([tiny_onnx]) == sha256_file(tiny_onnx)
    files = backends.model_files(external)
    assert files == [external, external.parent / "weights" / "model.data"]
    digest = backends.model_digest(files)
    data = files[1].read_bytes()
    try:
        files[1].write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # the weights change
        assert backends.model_digest(files) != digest
    finally:
        files[1].write_bytes(data)
    assert backends.model_digest(files) == digest


def test_bad_external_data_is_one_line_naming_the_file(tiny_onnx, tmp_path):
    outside = relocate(with_external_data(tiny_onnx, tmp_path / "a" / "m.onnx"), "../x.data")
    with pytest.raises(ModelFileError, match="outside the model's folder"):
        backends.model_files(outside)
    missing = with_external_data(tiny_onnx, tmp_path / "b" / "m.onnx")
    (tmp_path / "b" / "weights" / "model.data").unlink()
    with pytest.raises(ModelFileError, match="external data file .*model.data is missing"):
        backends.model_files(missing)
    garbage = tmp_path / "c.onnx"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelFileError, match="malformed"):
        backends.model_files(garbage)


def test_export_writes_external_data_atomically_and_replaces_its_own(tiny_model, tiny_onnx,
                                                                    tmp_path):
    """--external-data yes: model.onnx plus one data file named by its weights' SHA-256;
    the same images as the one-file model; a second file of other weights commits by the
    model file's rename and removes the data the first wrote; a failed verification leaves
    the model and its data as they were. (The proto is tiny.onnx's, the export of
    tiny_model: the writer is what is tested, not torch's exporter again.)"""
    import copy

    from export.onnx_export import ExportError, write_proto_verified

    proto = onnx.load(str(tiny_onnx))
    out = tmp_path / "model.onnx"

    def write(p, tolerance=2e-5):
        return write_proto_verified(tiny_model, copy.deepcopy(p), out, tolerance=tolerance,
                                    batch_sizes=(1,), external_data="yes")

    write(proto)
    (first,) = external_data_names(out)
    assert first.startswith("model.") and first.endswith(".onnx.data")
    assert sha256_file(tmp_path / first).startswith(first.split(".")[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.onnx", first])
    assert (tmp_path / first).stat().st_mode & 0o777 == out.stat().st_mode & 0o777
    with runtime.load(out) as a, runtime.load(tiny_onnx) as b:
        np.testing.assert_array_equal(a.sample(2, 1, steps=4, progress=False),
                                      b.sample(2, 1, steps=4, progress=False))

    other = copy.deepcopy(proto)  # other weights: accepted here by a tolerance that
    weight = max(other.graph.initializer, key=lambda t: len(t.raw_data))  # takes anything
    weight.raw_data = bytes(len(weight.raw_data))
    write(other, tolerance=float("inf"))
    (second,) = external_data_names(out)
    assert second != first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.onnx", second])

    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ExportError, match="unverified"):
        write(proto, tolerance=0.0)
    assert {n: (tmp_path / n).read_bytes() for n in before} == before  # untouched
    assert (tmp_path / "model.unverified.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries


def test_only_large_networks_go_to_a_data_file_unless_asked(tiny_model, tiny_onnx, tmp_path):
    from export.onnx_export import (
        EXTERNAL_DATA_MIN_BYTES,
        PROTOBUF_LIMIT,
        write_verified,
        writes_external_data,
    )
    from runtime.backends.ort import read_record

    small, large = EXTERNAL_DATA_MIN_BYTES - 1, EXTERNAL_DATA_MIN_BYTES
    assert [writes_external_data(w, "auto") for w in (small, large)] == [False, True]
    assert writes_external_data(small, "yes") and not writes_external_data(large, "no")
    with pytest.raises(ValueError, match="over the 2 GiB one ONNX file can hold"):
        writes_external_data(PROTOBUF_LIMIT, "no")
    assert writes_external_data(PROTOBUF_LIMIT, "auto")
    with pytest.raises(ValueError, match="external_data must be one of"):
        write_verified(tiny_model, read_record(tiny_onnx), tmp_path / "n.onnx",
                       tolerance=2e-5, batch_sizes=(1,), exporter="dynamo",
                       external_data="maybe")
    assert list(tmp_path.iterdir()) == []
