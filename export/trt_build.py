"""Build a TensorRT 10 engine from the ε-network ONNX file, and check it against ONNX Runtime.

Used by ``export/to_trt.py``. TensorRT, cuda-python and onnxruntime import lazily, so
this module imports on a machine without them;
:func:`runtime.backends.trt.trt_unavailable_reason` says what is missing.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from export.verification import Verification
from runtime.backends import cuda
from runtime.backends.trt import TRT_INSTALL_HINT, TensorRTBackend, import_tensorrt, trt_logger
from runtime.errors import BackendUnavailableError, ModelFileError
from runtime.metadata import ModelRecord
from runtime.sidecar import PRECISIONS, EngineBuild, EngineSidecar, read_sidecar, write_sidecar
from runtime.util.fileio import write_bytes

_log = logging.getLogger(__name__)


# Layers kept in fp32 in fp16/bf16 engines, by TensorRT layer type and by ONNX node name.
# torch exports GroupNorm as InstanceNormalization between two Reshapes (both the
# TorchScript and the dynamo exporter, opset 17-20), or GroupNormalization (opset 21), both
# parsed into a NORMALIZATION layer; other exporters decompose it into
# ReduceMean/Sub/Pow/Sqrt/Div. Mean and variance over H*W overflow or lose bits in fp16,
# and the attention softmax is range-sensitive too, so those stay fp32; convolutions and
# matmuls, where the speed is, run in reduced precision.
_FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX", "REDUCE")
_FP32_NAME_TOKENS = ("norm", "reducemean", "pow", "sqrt", "div")


# === Build ===


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    precision: str = "fp32",
    min_batch: int = 1,
    opt_batch: int = 16,
    max_batch: int = 64,
    workspace_gib: float | None = None,
    timing_cache: str | Path | None = None,
    record: ModelRecord,
    device: int = 0,
) -> EngineSidecar:
    """Build ``engine_path`` from ``onnx_path``; write it and its sidecar; return the sidecar.

    The sidecar is ``record`` (the ONNX file's, :func:`runtime.backends.ort.read_record`)
    plus how the engine was built (:mod:`runtime.sidecar`). ``timing_cache``: a file reused
    when present and saved after the build, so rebuilds on the same GPU skip most kernel
    timing.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(
            f"batch sizes need 1 <= min <= opt <= max, got {min_batch}, {opt_batch}, {max_batch}"
        )
    if workspace_gib is not None and workspace_gib <= 0:
        raise ValueError(f"workspace_gib must be positive, got {workspace_gib}")
    if not isinstance(record, ModelRecord):
        raise TypeError(f"record must be the ONNX file's ModelRecord, got {type(record).__name__}")
    if not onnx_path.is_file():
        raise ModelFileError(f"{onnx_path}: ONNX file not found; export the checkpoint first")

    trt = import_tensorrt()
    cuda.require_gpu(device)
    cuda.set_device(device)  # the builder times kernels on the current device
    logger = trt_logger()
    builder = trt.Builder(logger)
    # Flags 0: explicit batch is the only mode in TensorRT 10, and STRONGLY_TYPED would
    # forbid the per-layer precision pins that keep fp16/bf16 builds accurate.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file rather than parse(bytes): it finds external weight files beside the model.
    if not parser.parse_from_file(str(onnx_path)):
        count = parser.num_errors
        for i in range(count):
            error = parser.get_error(i)
            print(f"TensorRT ONNX parser error {i + 1}/{count}: {error}", file=sys.stderr)
        raise ModelFileError(
            f"{onnx_path}: TensorRT {trt.__version__} could not parse the model ({count} "
            "error(s) printed above); re-export it with an opset and ops this TensorRT supports"
        )
    chw = _check_network_io(trt, network, onnx_path)

    config = builder.create_builder_config()
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (min_batch, *chw), (opt_batch, *chw), (max_batch, *chw))
    profile.set_shape("t", (min_batch,), (opt_batch,), (max_batch,))
    if config.add_optimization_profile(profile) < 0:
        raise RuntimeError(f"{onnx_path}: TensorRT rejected the batch profile (see its log above)")
    pinned = _set_precision(trt, network, config, precision)
    _log.info("%s build: %d layer(s) kept in fp32", precision, len(pinned))
    cache = _attach_timing_cache(config, timing_cache) if timing_cache is not None else None

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(
            f"{onnx_path}: TensorRT failed to build the {precision} engine (see its log above); "
            "try a larger workspace, a smaller max batch, or fp32"
        )
    gpu = cuda.device_info(device)
    built = EngineBuild(version=str(trt.__version__), gpu=gpu["name"],
                        compute_capability=tuple(gpu["compute_capability"]),
                        precision=precision, profile=(min_batch, opt_batch, max_batch))
    sidecar = EngineSidecar(record, built)
    write_bytes(engine_path, serialized)
    write_sidecar(engine_path, sidecar)
    if cache is not None:
        write_bytes(Path(timing_cache), cache.serialize())
    return sidecar


def _check_network_io(trt: Any, network: Any, onnx_path: Path) -> tuple[int, ...]:
    """The parsed network must be the ε-network contract; returns its fixed (C, H, W)."""
    inputs = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        inputs[tensor.name] = tensor
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    if sorted(inputs) != ["t", "x"] or outputs != ["eps"]:
        raise ModelFileError(
            f"{onnx_path}: inputs {sorted(inputs)} and outputs {outputs}, expected inputs "
            "x, t and output eps; re-export the model"
        )
    x_shape, t_shape = tuple(inputs["x"].shape), tuple(inputs["t"].shape)
    if len(x_shape) != 4 or x_shape[0] != -1 or min(x_shape[1:]) <= 0 or t_shape != (-1,):
        raise ModelFileError(
            f"{onnx_path}: x is {x_shape} and t is {t_shape}, expected x [B, C, H, W] and "
            "t [B] with only B dynamic; re-export with a dynamic batch axis"
        )
    for name in ("x", "t"):
        if inputs[name].dtype != trt.float32:
            raise ModelFileError(f"{onnx_path}: input {name} is {inputs[name].dtype}, not float32")
    return x_shape[1:]


def _set_precision(trt: Any, network: Any, config: Any, precision: str) -> list[str]:
    """Enable fp16/bf16 and pin the range-sensitive layers to fp32; returns their names."""
    if precision == "fp32":
        # TF32 is on by default and rounds conv/matmul inputs to 10-bit mantissas (~1e-3):
        # an "fp32" engine should match ONNX Runtime to ~1e-5, so it is turned off.
        tf32 = getattr(trt.BuilderFlag, "TF32", None)
        if tf32 is not None:
            config.clear_flag(tf32)
        return []
    flag = getattr(trt.BuilderFlag, precision.upper(), None)
    obey = getattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS", None)
    if flag is None or obey is None:
        raise BackendUnavailableError(
            f"TensorRT {trt.__version__} has no {precision} builder flag (removed in 11.x): "
            f"{TRT_INSTALL_HINT}, or build in fp32"
        )
    config.set_flag(flag)
    # OBEY, not PREFER: a pin that is silently dropped overflows silently; a failed build
    # is loud. Every pinned layer type has an fp32 kernel, so OBEY cannot starve the build.
    config.set_flag(obey)
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if keep_in_fp32(trt, layer):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned.append(layer.name)
    return pinned


def keep_in_fp32(trt: Any, layer: Any) -> bool:
    """Whether a network layer is a normalization/softmax piece to keep in fp32."""
    if layer.type == trt.LayerType.CONSTANT:
        return False  # weights: nothing is computed
    floats = (trt.float32, trt.float16, getattr(trt, "bfloat16", trt.float16))
    for j in range(layer.num_outputs):
        out = layer.get_output(j)
        # Never pin shape arithmetic (int tensors): a Div inside a Reshape's shape, say.
        if out is None or out.dtype not in floats:
            return False
    if any(layer.type == getattr(trt.LayerType, name) for name in _FP32_LAYER_TYPES):
        return True
    name = (layer.name or "").lower()
    return any(token in name for token in _FP32_NAME_TOKENS)


def _attach_timing_cache(config: Any, path: str | Path) -> Any:
    path = Path(path)
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)  # b"" makes a new, empty cache
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        print(
            f"warning: timing cache {path} comes from another GPU or TensorRT; "
            "starting a new one (it will be overwritten)",
            file=sys.stderr,
        )
        cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise RuntimeError(f"TensorRT refused a new timing cache for {path}")
    return cache  # TensorRT needs it alive until the build ends


# === Verify ===


def verify_engine(
    engine_path: str | Path,
    onnx_path: str | Path,
    *,
    batch_sizes: Iterable[int],
    tolerance: float,
    seed: int = 0,
    device: int = 0,
) -> Verification:
    """Run the engine and the ONNX file (ONNX Runtime, CPU) on the same random inputs.

    max_rel is max_abs over the largest |eps| of the reference, and ok means
    ``max_abs <= tolerance * max(1, that largest |eps|)``, i.e. an absolute tolerance for
    unit-scale outputs like eps. Non-finite output fails.
    """
    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes:
        raise ValueError("batch_sizes is empty: give at least one batch size to verify")
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailableError(
            "onnxruntime is not installed, verification needs it: pip install onnxruntime"
        ) from None
    sidecar = read_sidecar(engine_path)
    num_timesteps = sidecar.record.num_timesteps
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    if session.get_providers()[:1] != ["CPUExecutionProvider"]:
        raise RuntimeError(f"ONNX Runtime did not give the CPU provider: {session.get_providers()}")
    input_names = sorted(i.name for i in session.get_inputs())
    if input_names != ["t", "x"]:
        raise ModelFileError(f"{onnx_path}: inputs are {input_names}, expected x and t")

    rng = np.random.default_rng(seed)
    max_abs, ref_scale = 0.0, 0.0
    with TensorRTBackend(engine_path, sidecar, device=device) as backend:
        for batch in batch_sizes:
            x = rng.standard_normal((batch, *backend.image_shape), dtype=np.float32)
            t = rng.integers(0, num_timesteps, size=batch).astype(np.float32)
            got = backend(x, t)
            (want,) = session.run(["eps"], {"x": x, "t": t})
            if not np.all(np.isfinite(got)):
                max_abs = float("inf")
                continue
            max_abs = max(max_abs, float(np.max(np.abs(got - want))))
            ref_scale = max(ref_scale, float(np.max(np.abs(want))))
    max_rel = max_abs / ref_scale if ref_scale > 0 else max_abs
    return Verification(max_abs, max_rel, tolerance, tuple(batch_sizes), ref_scale,
                        absolute=True)
