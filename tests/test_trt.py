"""TensorRT backend and builder: the CUDA checker, sidecars, lazy imports, the engine lifecycle.

CPU-only tests use the real cuda-bindings enums, real sidecar dicts, and a small fake of
the TensorRT 10 / CUDA calls to walk the backend's lifecycle. The parity tests (a real
engine against ONNX Runtime) need TensorRT and a CUDA GPU and skip with the reason when
they are absent.
"""

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from export.trt_build import build_engine, keep_in_fp32, verify_engine
from runtime.backends import cuda
from runtime.backends.cuda import CudaError, check
from runtime.backends.trt import TensorRTBackend, check_sidecar, trt_unavailable_reason
from runtime.errors import BackendUnavailableError, ModelFileError
from runtime.metadata import ModelRecord
from runtime.schedule import Schedule
from runtime.sidecar import EngineSidecar, read_sidecar

REPO = Path(__file__).resolve().parents[1]
IMAGE = (1, 8, 8)


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, f"error message is not one line: {text!r}"
    return text


# === The cuda-python checker, on the real enums ===


@pytest.fixture
def cudart():
    return pytest.importorskip(
        "cuda.bindings.runtime", reason="cuda-bindings not installed (pip install cuda-bindings)"
    )


def test_check_returns_values_on_success(cudart):
    ok = cudart.cudaError_t.cudaSuccess
    assert check((ok,)) is None
    assert check((ok, 5)) == 5
    assert check((ok, 5, "b")) == (5, "b")
    assert check(ok) is None  # a bare error code, no values


def test_check_raises_with_enum_name_and_text(cudart):
    err = cudart.cudaError_t.cudaErrorMemoryAllocation
    with pytest.raises(CudaError) as info:
        check((err, None), "cudaMalloc(64 bytes)")
    text = _one_line(info.value)
    assert "cudaErrorMemoryAllocation" in text and "cudaMalloc(64 bytes)" in text
    assert "out of memory" in text  # cudaGetErrorString works without a driver
    assert isinstance(info.value, RuntimeError)


def test_check_keeps_enum_name_when_error_string_is_unavailable(cudart, monkeypatch):
    def no_cudart():
        raise BackendUnavailableError("cuda-python is not installed")

    monkeypatch.setattr(cuda, "import_cudart", no_cudart)
    with pytest.raises(CudaError, match="cudaErrorInvalidValue"):
        check((cudart.cudaError_t.cudaErrorInvalidValue,))


def test_missing_cuda_python_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(BackendUnavailableError) as info:
        cuda.import_cudart()
    assert "pip install cuda-python" in _one_line(info.value)


def test_missing_tensorrt_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError) as info:
        TensorRTBackend("model.plan", {})
    assert "TensorRT is not installed" in _one_line(info.value)
    assert "pip install" in str(info.value)
    assert "TensorRT is not installed" in trt_unavailable_reason()
    with pytest.raises(BackendUnavailableError):
        check_sidecar(_sidecar(), "model.plan")  # live values need TensorRT


def test_modules_import_without_tensorrt_cuda_or_torch():
    code = (
        "import sys, runtime.backends.trt, runtime.backends.cuda, export.trt_build\n"
        "print(sorted(m for m in ('tensorrt', 'cuda', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


# === The sidecar against this machine: live values injected ===


def _sidecar(**tensorrt):
    info = {
        "version": "10.16.1.11",
        "gpu": "NVIDIA H200",
        "compute_capability": [9, 0],
        "precision": "fp16",
        "profile": {"min": 1, "opt": 4, "max": 8},
    }
    info.update(tensorrt)
    return EngineSidecar.from_dict({**tiny_record(), "tensorrt": info}, "model.plan.json")


HERE = {"trt_version": "10.16.1.11", "gpu_name": "NVIDIA H200", "compute_capability": (9, 0)}


def test_check_sidecar_accepts_same_trt_and_gpu():
    check_sidecar(_sidecar(), "model.plan", **HERE)


@pytest.mark.parametrize(
    "live, names",
    [
        ({"trt_version": "10.3.0"}, ["TensorRT 10.16.1.11", "10.3.0"]),
        ({"gpu_name": "NVIDIA A100-SXM4-80GB"}, ["NVIDIA H200", "A100"]),
        ({"compute_capability": (8, 0)}, ["sm_90", "sm_80"]),
    ],
)
def test_check_sidecar_mismatch_says_rebuild(live, names):
    with pytest.raises(ModelFileError) as info:
        check_sidecar(_sidecar(), "runs/model.plan", **{**HERE, **live})
    text = _one_line(info.value)
    assert "runs/model.plan" in text and "rebuild it with python export/to_trt.py" in text
    assert all(name in text for name in names)


# === Builder arguments and the fp32 pinning rule (no TensorRT needed) ===


@pytest.mark.parametrize(
    "kwargs",
    [
        {"precision": "int8"},
        {"min_batch": 0},
        {"min_batch": 8, "opt_batch": 4},
        {"opt_batch": 128, "max_batch": 64},
        {"workspace_gib": 0},
    ],
)
def test_build_engine_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", record={}, **kwargs)


def test_build_engine_missing_onnx(tmp_path):
    record = ModelRecord.from_dict(tiny_record(), "tiny")
    with pytest.raises(ModelFileError, match="m.onnx"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", record=record)


def _fake_trt_enums():
    kinds = ("NORMALIZATION", "SOFTMAX", "REDUCE", "CONSTANT", "CONVOLUTION", "ELEMENTWISE")
    return types.SimpleNamespace(
        LayerType=types.SimpleNamespace(**{k: k for k in kinds}),
        float32="f32",
        float16="f16",
        bfloat16="bf16",
    )


@pytest.mark.parametrize(
    "kind, name, dtype, keep",
    [
        ("NORMALIZATION", "/down.0/norm1/InstanceNormalization", "f32", True),
        ("SOFTMAX", "/mid/attn/Softmax", "f32", True),
        ("REDUCE", "node_ReduceMean_3", "f32", True),
        ("ELEMENTWISE", "/up.1/norm2/Pow", "f32", True),
        ("ELEMENTWISE", "node_Div_7", "int64", False),  # shape arithmetic
        ("CONVOLUTION", "/down.0/conv1/Conv", "f32", False),
        ("CONSTANT", "/down.0/norm1/Constant", "f32", False),
    ],
)
def test_keep_in_fp32(kind, name, dtype, keep):
    output = types.SimpleNamespace(dtype=dtype)
    layer = types.SimpleNamespace(type=kind, name=name, num_outputs=1, get_output=lambda i: output)
    assert keep_in_fp32(_fake_trt_enums(), layer) is keep


# === A tiny ε-network, made here with onnx.helper ===


def make_tiny_onnx(path: Path) -> Path:
    """x [B,1,8,8], t [B] -> eps: conv, InstanceNorm, swish, conv, plus a t term."""
    onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install onnx)")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((4, 1, 3, 3)).astype(np.float32) * 0.5,
        "b1": rng.standard_normal(4).astype(np.float32) * 0.1,
        "gamma": np.ones(4, np.float32),
        "beta": np.zeros(4, np.float32),
        "w2": rng.standard_normal((1, 4, 3, 3)).astype(np.float32) * 0.5,
        "b2": np.zeros(1, np.float32),
        "t_shape": np.array([-1, 1, 1, 1], np.int64),
        "t_scale": np.array([1e-3], np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h1"], pads=[1, 1, 1, 1]),
        helper.make_node("InstanceNormalization", ["h1", "gamma", "beta"], ["h2"]),
        helper.make_node("Sigmoid", ["h2"], ["s"]),
        helper.make_node("Mul", ["h2", "s"], ["h3"]),
        helper.make_node("Conv", ["h3", "w2", "b2"], ["h4"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["t", "t_shape"], ["t4"]),
        helper.make_node("Mul", ["t4", "t_scale"], ["te"]),
        helper.make_node("Add", ["h4", "te"], ["eps"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_eps",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", *IMAGE]),
            helper.make_tensor_value_info("t", TensorProto.FLOAT, ["B"]),
        ],
        [helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["B", *IMAGE])],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by older ONNX Runtime and TensorRT parsers
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_record() -> dict:
    """A valid ddpm record for the tiny network: what the export code would write."""
    record = ModelRecord(schedule=Schedule.linear(1000).config, image_shape=IMAGE,
                         data_range=(-1.0, 1.0), num_levels=17, model_config={},
                         checkpoint_sha256="0" * 64, weights="ema")
    return json.loads(record.to_json())


def _ort_session(path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_tiny_onnx_runs_in_onnxruntime(tmp_path):
    session = _ort_session(make_tiny_onnx(tmp_path / "tiny.onnx"))
    x = np.ones((3, *IMAGE), np.float32)
    (eps,) = session.run(["eps"], {"x": x, "t": np.array([0, 10, 999], np.float32)})
    assert eps.shape == (3, *IMAGE) and eps.dtype == np.float32
    # Same x, different t: the t term is 1e-3 * t, broadcast over the image.
    np.testing.assert_allclose(eps[2] - eps[0], 0.999, rtol=1e-4)


# === Real TensorRT on a real GPU: parity with ONNX Runtime ===

def needs_trt(test):
    """Mark a test as GPU-only (tools/gpu_check.sh runs these) and skip it with the reason."""
    reason = trt_unavailable_reason()
    test = pytest.mark.gpu(test)
    skip = pytest.mark.skipif(reason is not None, reason=f"needs TensorRT and a CUDA GPU: {reason}")
    return skip(test)


# fp32 engines (TF32 off) differ from ONNX Runtime only by kernel summation order: 1e-4
# on unit-scale eps. fp16 keeps ~3 significant digits through two convolutions: 2e-2.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_matches_onnxruntime(tmp_path, precision):
    import tensorrt as trt

    if precision == "fp16" and not hasattr(trt.BuilderFlag, "FP16"):
        pytest.skip(f"TensorRT {trt.__version__} has no weakly typed fp16 builds")
    onnx_path = make_tiny_onnx(tmp_path / "tiny.onnx")
    engine = tmp_path / "tiny.plan"
    cache = tmp_path / "timing.cache"
    record = ModelRecord.from_dict(tiny_record(), "tiny")
    sidecar = build_engine(
        onnx_path,
        engine,
        precision=precision,
        min_batch=1,
        opt_batch=4,
        max_batch=8,
        timing_cache=cache,
        record=record,
    )
    assert read_sidecar(engine) == sidecar and sidecar.record == record
    assert sidecar.engine.precision == precision and cache.stat().st_size > 0
    check_sidecar(sidecar, engine)
    report = verify_engine(engine, onnx_path, batch_sizes=[1, 3, 8], tolerance=TOLERANCE[precision])
    assert report.ok, report
    with TensorRTBackend(engine, sidecar) as backend:
        assert (backend.min_batch, backend.max_batch, backend.image_shape) == (1, 8, IMAGE)
        assert backend.name == f"tensorrt:{precision}" and backend.record == record
        assert ("batch", "1..8 (optimised for 4)") in backend.describe()
        with pytest.raises(ValueError, match="outside the profile"):
            backend(np.zeros((9, *IMAGE), np.float32), np.zeros(9, np.float32))
    # A second build reuses the saved timing cache.
    again = build_engine(
        onnx_path,
        engine,
        precision=precision,
        max_batch=8,
        opt_batch=4,
        timing_cache=cache,
        record=record,
    )
    assert again.engine == sidecar.engine
