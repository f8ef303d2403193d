"""ONNX Runtime backend: an ONNX ε-network file as an ``eps_fn(x, t)`` callable."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError, ModelFileError
from ..metadata import METADATA_KEY, ModelRecord

# What the user asks for -> the execution provider that must end up running it.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError(
            "onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu for CUDA)"
        ) from None
    return onnxruntime


def _load_errors() -> tuple[type[BaseException], ...]:
    """The exception types ONNX Runtime raises for a file it cannot load."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile",
             "NotImplemented", "RuntimeException")
    return tuple(getattr(state, n) for n in names if hasattr(state, n))


def available_providers() -> list[str]:
    return list(_import_ort().get_available_providers())


class OrtBackend:
    """An ONNX Runtime session over a model file that follows the DESIGN.md contract.

    Inputs ``x`` float32 [B, C, H, W] and ``t`` float32 [B]; output ``eps``.
    ``device`` picks one execution provider explicitly; if ONNX Runtime cannot give
    it, that is an error, never a silent fall back to the CPU.
    """

    def __init__(self, path, *, device: str = "cpu", threads: int | None = None,
                 device_id: int = 0):
        ort = _import_ort()
        self.path = Path(path)
        if device not in PROVIDERS:
            raise ValueError(f"unknown device {device!r} for ONNX Runtime; expected one of "
                             f"{sorted(PROVIDERS)}")
        provider = PROVIDERS[device]
        if provider not in ort.get_available_providers():
            raise BackendUnavailableError(
                f"ONNX Runtime provider {provider} is not available here (available: "
                f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu for "
                "cuda/tensorrt, or use --device cpu"
            )
        if not self.path.is_file():
            raise ModelFileError(f"{self.path}: no such model file")

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1  # one chain of ops: parallelism lives inside ops
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            options.intra_op_num_threads = threads
        provider_options = [{}] if device == "cpu" else [{"device_id": device_id}]
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=[provider],
                provider_options=provider_options,
            )
        except _load_errors() as err:
            raise ModelFileError(
                f"{self.path}: ONNX Runtime cannot load it ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); re-export the model"
            ) from None
        running = self.session.get_providers()
        if not running or running[0] != provider:
            raise BackendUnavailableError(
                f"{self.path}: asked for {provider} but ONNX Runtime runs {running}; "
                "check the GPU driver and onnxruntime-gpu install"
            )
        self.device = device
        self.max_batch: int | None = None  # the batch axis is dynamic
        self.providers = running
        self.record = ModelRecord.from_json(
            self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY), str(self.path)
        )
        self._check_signature()
        self._binding = self.session.io_binding() if device != "cpu" else None

    def _check_signature(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        where = str(self.path)
        if set(inputs) != {"x", "t"} or "eps" not in outputs:
            raise ModelFileError(f"{where}: expected inputs x, t and output eps, got inputs "
                                 f"{sorted(inputs)} and outputs {sorted(outputs)}")
        for name, node in [("x", inputs["x"]), ("t", inputs["t"]), ("eps", outputs["eps"])]:
            if node.type != "tensor(float)":
                raise ModelFileError(f"{where}: {name} must be float32, the file says {node.type}")
        x_shape, eps_shape = inputs["x"].shape, outputs["eps"].shape
        if len(x_shape) != 4 or [int(d) for d in x_shape[1:]] != list(self.record.image_shape):
            raise ModelFileError(f"{where}: input x has shape {x_shape} but the metadata says "
                                 f"[B, {', '.join(map(str, self.record.image_shape))}]")
        if len(eps_shape) != 4 or list(eps_shape[1:]) != list(x_shape[1:]):
            raise ModelFileError(f"{where}: output eps has shape {eps_shape}, input x {x_shape}")
        if len(inputs["t"].shape) != 1:
            raise ModelFileError(f"{where}: input t must be 1-D [B], got {inputs['t'].shape}")
        if isinstance(x_shape[0], int):
            raise ModelFileError(f"{where}: input x has a fixed batch of {x_shape[0]}; the "
                                 "contract is a dynamic batch axis: re-export the model")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.record.image_shape

    def __call__(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        # ONNX Runtime accepts some wrong shapes silently: check before run.
        if x.dtype != np.float32 or x.ndim != 4 or x.shape[1:] != self.image_shape:
            raise ValueError(f"x must be float32 [B, {', '.join(map(str, self.image_shape))}], "
                             f"got {x.dtype} {list(x.shape)}")
        if t.dtype != np.float32 or t.shape != (x.shape[0],):
            raise ValueError(f"t must be float32 [{x.shape[0]}], got {t.dtype} {list(t.shape)}")
        if self._binding is None:
            return self.session.run(["eps"], {"x": x, "t": t})[0]
        # On a GPU: bind host inputs and let ORT allocate eps on the device, one copy back.
        self._binding.bind_cpu_input("x", np.ascontiguousarray(x))
        self._binding.bind_cpu_input("t", np.ascontiguousarray(t))
        self._binding.bind_output("eps", "cuda")
        self.session.run_with_iobinding(self._binding)
        return self._binding.copy_outputs_to_cpu()[0]

    def close(self) -> None:
        self._binding = None
        self.session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
