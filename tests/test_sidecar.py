"""The engine sidecar format (runtime/sidecar.py): round trip, versions, malformed files."""

from __future__ import annotations

import json

import pytest

from runtime.errors import ModelFileError
from runtime.metadata import ModelRecord
from runtime.schedule import Schedule
from runtime.sidecar import (
    SIDECAR_VERSION,
    VERSION_KEY,
    EngineBuild,
    EngineSidecar,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)


def _record() -> ModelRecord:
    return ModelRecord(schedule=Schedule.linear(100).config, image_shape=(1, 8, 8),
                       data_range=(-1.0, 1.0), num_levels=17, model_config={"ch": 16},
                       checkpoint_sha256="ab" * 32, weights="ema", train_step=300,
                       flops_per_image=1234, exporter={"opset": 17})


def _built(**changes) -> EngineBuild:
    fields = dict(version="10.16.1.11", gpu="NVIDIA H200", compute_capability=(9, 0),
                  precision="fp16", profile=(1, 4, 8))
    return EngineBuild(**{**fields, **changes})


def _legacy_dict(**tensorrt) -> dict:
    """A sidecar as export/to_trt.py wrote it before the version field: record + tensorrt."""
    info = {"version": "10.16.1.11", "gpu": "NVIDIA H200", "compute_capability": [9, 0],
            "precision": "fp16", "profile": {"min": 1, "opt": 4, "max": 8}, **tensorrt}
    return {**json.loads(_record().to_json()), "tensorrt": info}


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, f"error message is not one line: {text!r}"
    return text


def test_round_trip_through_the_file(tmp_path):
    engine = tmp_path / "model.plan"
    sidecar = EngineSidecar(_record(), _built())
    path = write_sidecar(engine, sidecar)
    assert path == sidecar_path(engine) and path.name == "model.plan.json"
    assert read_sidecar(engine) == sidecar
    data = json.loads(path.read_text())
    # The record's fields sit at the top level, as every reader before this one expects.
    assert data[VERSION_KEY] == SIDECAR_VERSION and data["num_levels"] == 17
    assert data["tensorrt"]["profile"] == {"min": 1, "opt": 4, "max": 8}
    assert ModelRecord.from_dict({k: v for k, v in data.items() if k != "tensorrt"},
                                 "x") == sidecar.record
    assert [p.name for p in tmp_path.iterdir()] == ["model.plan.json"]  # no temporaries left


def test_sidecar_written_before_the_version_field_still_loads(tmp_path):
    engine = tmp_path / "model.plan"
    sidecar_path(engine).write_text(json.dumps(_legacy_dict()))
    sidecar = read_sidecar(engine)
    assert sidecar.version == 1 and sidecar.record == _record() and sidecar.engine == _built()
    assert (sidecar.engine.min_batch, sidecar.engine.max_batch) == (1, 8)


def test_newer_version_is_refused_with_a_clear_line(tmp_path):
    engine = tmp_path / "model.plan"
    sidecar_path(engine).write_text(json.dumps({**_legacy_dict(), VERSION_KEY: 2}))
    with pytest.raises(ModelFileError) as info:
        read_sidecar(engine)
    text = _one_line(info.value)
    assert "model.plan.json" in text and "version 2" in text and "newer" in text
    assert "upgrade the runtime" in text and f"version {SIDECAR_VERSION}" in text


@pytest.mark.parametrize("version", ["1", 0, True, 1.5, None])
def test_garbled_version_is_refused(tmp_path, version):
    engine = tmp_path / "model.plan"
    sidecar_path(engine).write_text(json.dumps({**_legacy_dict(), VERSION_KEY: version}))
    with pytest.raises(ModelFileError, match=f"malformed \"{VERSION_KEY}\"") as info:
        read_sidecar(engine)
    _one_line(info.value)


def _without(key: str) -> dict:
    return {k: v for k, v in _legacy_dict().items() if k != key}


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ("[" * 100_000, "nests too deeply"),
        ("[1, 2]", "not a JSON object"),
        (json.dumps(_without("tensorrt")), '"tensorrt"'),
        (json.dumps(_legacy_dict(gpu=7)), "tensorrt.gpu"),
        (json.dumps(_legacy_dict(precision="int8")), "precision"),
        (json.dumps(_legacy_dict(profile={"min": 4, "opt": 2, "max": 8})), "profile"),
        (json.dumps(_legacy_dict(profile={"min": 1, "max": 8})), "profile"),
        (json.dumps(_legacy_dict(compute_capability="9.0")), "compute_capability"),
        (json.dumps(_without("num_levels")), "lacks"),
        (json.dumps({**_legacy_dict(), "format_version": 99}), "format version 99"),
        (json.dumps({**_legacy_dict(), "image_shape": [1, 8]}), "image_shape"),
    ],
)
def test_malformed_sidecars_are_refused(tmp_path, text, message):
    engine = tmp_path / "model.plan"
    sidecar_path(engine).write_text(text)
    with pytest.raises(ModelFileError) as info:
        read_sidecar(engine)
    assert message in _one_line(info.value) and "model.plan.json" in str(info.value)


def test_missing_or_unreadable_sidecar_names_the_expected_path(tmp_path):
    engine = tmp_path / "model.plan"
    with pytest.raises(ModelFileError) as info:
        read_sidecar(engine)
    assert str(sidecar_path(engine)) in _one_line(info.value) and "not found" in str(info.value)
    sidecar_path(engine).write_bytes(b"\xff\xfe{")
    with pytest.raises(ModelFileError, match="cannot read"):
        read_sidecar(engine)


def test_to_dict_is_what_from_dict_reads():
    sidecar = EngineSidecar(_record(), _built(precision="bf16", profile=(2, 2, 2)))
    assert EngineSidecar.from_dict(sidecar.to_dict(), "s.json") == sidecar
    assert EngineSidecar.from_dict(json.loads(sidecar.to_json()), "s.json") == sidecar
