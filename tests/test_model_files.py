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
