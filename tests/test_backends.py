"""The backend contract and registry (runtime/backends): lookup, errors, a new backend, describe.

The new backend registered here is a real one: it reads its own small file format and
evaluates the exact ε of a point-mass data distribution in closed form, so what the
pipeline samples through it is known exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import runtime
from runtime import backends
from runtime.cli import main as cli_main
from runtime.errors import ModelFileError
from runtime.metadata import ModelRecord
from runtime.schedule import Schedule

REPO = Path(__file__).resolve().parents[1]


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, f"error message is not one line: {text!r}"
    return text


# === Lookup ===


@pytest.mark.parametrize("name, backend", [("m.onnx", "ort"), ("M.ONNX", "ort"),
                                           ("m.plan", "trt"), ("m.engine", "trt"),
                                           ("m.trt", "trt")])
def test_lookup_by_suffix(name, backend):
    assert backends.lookup(name).name == backend


def test_lookup_by_name_overrides_the_suffix():
    assert backends.lookup("m.onnx", "trt").name == "trt"
    assert backends.lookup("m.plan", "ort").name == "ort"
    assert {"ort", "trt"} <= set(backends.names())


def test_unknown_name_lists_the_choices(tiny_onnx):
    with pytest.raises(ValueError) as info:
        runtime.load(tiny_onnx, backend="openvino")
    text = _one_line(info.value)
    assert "'openvino'" in text and all(n in text for n in ("auto", "ort", "trt"))


def test_unknown_suffix_lists_the_choices(tmp_path):
    model = tmp_path / "model.bin"
    model.write_bytes(b"\0" * 16)
    with pytest.raises(ModelFileError) as info:
        runtime.load(model)
    text = _one_line(info.value)
    assert str(model) in text and "'.bin'" in text and "--backend" in text
    assert ".onnx (ort)" in text and ".plan" in text
    out = subprocess.run([sys.executable, "-m", "runtime", "info", str(model)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 1 and "'.bin'" in out.stderr and "Traceback" not in out.stderr


def test_a_missing_file_is_named_before_its_suffix(tmp_path):
    with pytest.raises(ModelFileError, match="no such model file"):
        runtime.load(tmp_path / "absent.bin")


@pytest.mark.parametrize("name, suffixes", [("auto", (".x",)), ("", (".x",)),
                                            ("mine", ("onnx",)), ("mine", (".ONNX",))])
def test_register_refuses_bad_names_and_taken_suffixes(name, suffixes):
    with pytest.raises(ValueError):
        backends.register(name, suffixes=suffixes)(open_point_mass)
    assert "mine" not in backends.names()


# === A new backend in a test module: a closed-form ε ===


POINT_MASS_SUFFIX = ".pointmass"


class PointMassBackend:
    """The exact ε of data that is one image ``mean``: ε*(x_t, t) = (x_t - √ᾱ_t mean) / √(1-ᾱ_t).

    Its file: JSON with the model's ``ddpm`` record, the per-channel ``mean`` and the
    ``max_batch`` one call takes.
    """

    def __init__(self, path: Path):
        data = json.loads(Path(path).read_text())
        self.record = ModelRecord.from_dict(data["record"], str(path))
        c, h, w = self.record.image_shape
        self.mean = np.broadcast_to(np.asarray(data["mean"], np.float64)[:, None, None], (c, h, w))
        self.alphas_cumprod = Schedule.from_config(self.record.schedule).alphas_cumprod
        self.name = "pointmass:closed-form"
        self.max_batch = data["max_batch"]
        self.batches: list[int] = []
        self.closed = 0

    def __call__(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        assert x.dtype == np.float32 and t.dtype == np.float32 and t.shape == (x.shape[0],)
        self.batches.append(x.shape[0])
        ab = self.alphas_cumprod[t.astype(np.int64)][:, None, None, None]
        return ((x - np.sqrt(ab) * self.mean) / np.sqrt(1.0 - ab)).astype(np.float32)

    def describe(self) -> list[tuple[str, str]]:
        return [("mean", str(self.mean[:, 0, 0].tolist())), ("batches run", str(self.batches))]

    def close(self) -> None:
        self.closed += 1


OPENED: list[PointMassBackend] = []


def open_point_mass(path, *, device=None, threads=None, device_id=0) -> PointMassBackend:
    if device is not None:
        raise ValueError(f"the point-mass backend runs on numpy; device {device!r} is not valid")
    OPENED.append(PointMassBackend(path))
    return OPENED[-1]


@pytest.fixture
def point_mass(tmp_path):
    backends.register("pointmass", suffixes=(POINT_MASS_SUFFIX,))(open_point_mass)
    OPENED.clear()
    record = ModelRecord(schedule=Schedule.linear(200).config, image_shape=(2, 3, 3),
                         data_range=(-1.0, 1.0), num_levels=256, model_config={},
                         checkpoint_sha256="0" * 64, weights="ema")
    path = tmp_path / f"model{POINT_MASS_SUFFIX}"
    path.write_text(json.dumps({"record": json.loads(record.to_json()), "mean": [0.25, -0.5],
                                "max_batch": 3}))
    yield path
    backends.unregister("pointmass")
    assert "pointmass" not in backends.names()


def test_registered_backend_is_found_by_suffix_and_follows_the_contract(point_mass):
    assert backends.lookup(point_mass).name == "pointmass"
    with runtime.load(point_mass) as pipe:
        assert pipe.backend_name == "pointmass:closed-form"
        assert isinstance(OPENED[-1], backends.Backend) and pipe.max_batch == 3
        x = pipe.sample_float(7, seed=1, sampler="ddim", steps=20, progress=False)
        y = pipe.sample_float(7, seed=2, progress=False)  # the full DDPM chain
    # Every predicted x0 of a point mass is the point itself, so both samplers land on it.
    want = np.broadcast_to(np.array([0.25, -0.5])[:, None, None], (7, 2, 3, 3))
    np.testing.assert_allclose(x, want, atol=1e-5)
    np.testing.assert_allclose(y, want, atol=1e-5)
    assert max(OPENED[-1].batches) == 3 and OPENED[-1].closed == 1  # max_batch; closed once


def test_registered_backend_by_name_and_its_own_option_errors(point_mass, tmp_path):
    renamed = tmp_path / "model.json"
    renamed.write_text(point_mass.read_text())
    with runtime.load(renamed, backend="pointmass") as pipe:
        assert pipe.record.image_shape == (2, 3, 3)
    with pytest.raises(ValueError, match="point-mass backend runs on numpy"):
        runtime.load(point_mass, device="cuda")


def test_info_prints_what_the_backend_describes(point_mass):
    result = CliRunner().invoke(cli_main, ["info", str(point_mass)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[:4] == [f"model: {point_mass}", "backend: pointmass:closed-form",
                         "mean: [0.25, -0.5]", "batches run: []"]
    record = json.loads(result.output.split("metadata:\n", 1)[1])
    assert record["image_shape"] == [2, 3, 3] and OPENED[-1].closed == 1


class Undescribed:
    """Evaluates ε and closes, but cannot describe itself: not a backend."""

    def __init__(self, path):
        inner = PointMassBackend(path)
        self.name, self.record, self.max_batch = inner.name, inner.record, inner.max_batch
        self.eps, self.closed = inner, 0

    def __call__(self, x, t):
        return self.eps(x, t)

    def close(self):
        self.closed += 1


def test_a_backend_that_breaks_the_contract_is_named(point_mass):
    opened = []

    def open_undescribed(path, **options):
        opened.append(Undescribed(path))
        return opened[-1]

    backends.unregister("pointmass")
    backends.register("pointmass", suffixes=(POINT_MASS_SUFFIX,))(open_undescribed)
    with pytest.raises(TypeError) as info:
        runtime.load(point_mass)
    text = _one_line(info.value)
    assert "'pointmass'" in text and "without describe;" in text
    assert opened[-1].closed == 1  # what was opened is released


# === describe() of the ONNX Runtime backend, and `runtime info` ===


def test_ort_describe_reports_the_session_and_info_prints_it(tiny_onnx):
    import onnxruntime as ort

    with runtime.backends.open_backend(tiny_onnx, threads=2) as backend:
        assert isinstance(backend, backends.Backend)
        lines = backend.describe()
        assert backend.name == "onnxruntime:CPUExecutionProvider"
    # The file as ONNX Runtime itself reads it, without the backend.
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    nodes = [("input", n) for n in session.get_inputs()] + \
        [("output", n) for n in session.get_outputs()]
    assert [(k, f"{n.name} {n.type} {n.shape}") for k, n in nodes] == lines[:3]
    assert ("threads", "2 (one per shard of a batch)") in lines
    available = dict(lines)["onnxruntime providers available"].split(", ")
    assert available == ort.get_available_providers()
    out = subprocess.run([sys.executable, "-m", "runtime", "info", str(tiny_onnx),
                          "--threads", "2"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    printed = out.stdout.splitlines()
    assert printed[:2] == [f"model: {tiny_onnx}", "backend: onnxruntime:CPUExecutionProvider"]
    assert printed[2:2 + len(lines)] == [f"{label}: {text}" for label, text in lines]


def test_engine_suffix_without_sidecar_is_one_line(tmp_path):
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"not an engine")
    with pytest.raises(ModelFileError, match="sidecar not found") as info:
        runtime.load(engine)
    _one_line(info.value)
