"""TensorRT 10 backend: runs a serialized engine (.plan) as ``eps_fn(x, t) -> eps``.

Torch-free. Lifecycle, in the order the constructor runs it:
  load      deserialize the plan with ``trt.Runtime`` and read its I/O tensors by name
  allocate  one stream and one device buffer per tensor, sized from the profile's max batch
  infer     ``backend(x, t)``: copy in, ``execute_async_v3``, copy out, sync
  close     free everything (``with`` calls it; nothing relies on ``__del__``)

An engine carries no metadata, so it travels with a JSON sidecar ``<engine>.json``: the
ONNX file's ``ddpm`` record plus a ``tensorrt`` entry saying which TensorRT version and
GPU built it (:mod:`runtime.sidecar` owns that format). tensorrt and cuda-python import
lazily.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendUnavailableError, ModelFileError
from ..sidecar import REBUILD_HINT, EngineSidecar, read_sidecar, sidecar_path
from . import cuda, register

_log = logging.getLogger(__name__)

INPUTS = ("x", "t")
OUTPUT = "eps"
TRT_INSTALL_HINT = "pip install 'tensorrt>=10,<11', or the project extra: pip install .[trt]"


# === Lazy import and availability ===


def import_tensorrt() -> Any:
    """Return the tensorrt module (10.x or later), or raise a one-line BackendUnavailableError."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailableError(f"TensorRT is not installed ({TRT_INSTALL_HINT})") from None
    major = int(str(trt.__version__).split(".", 1)[0])
    if major < 10:
        raise BackendUnavailableError(
            f"TensorRT {trt.__version__} is too old, the TensorRT backend needs 10.x "
            f"({TRT_INSTALL_HINT})"
        )
    return trt


_TRT_LOGGER = None


def trt_logger() -> Any:
    """One process-wide ``trt.Logger``: TensorRT warns when runtimes and builders differ."""
    global _TRT_LOGGER
    if _TRT_LOGGER is None:
        trt = import_tensorrt()
        _TRT_LOGGER = trt.Logger(trt.Logger.WARNING)
    return _TRT_LOGGER


def trt_unavailable_reason(device: int = 0) -> str | None:
    """None when TensorRT, cuda-python and CUDA device ``device`` are usable, else why not."""
    try:
        import_tensorrt()
    except BackendUnavailableError as exc:
        return str(exc)
    return cuda.gpu_unavailable_reason(device)


# === The engine against this machine ===


def check_sidecar(
    sidecar: EngineSidecar,
    engine_path: str | Path,
    *,
    trt_version: str | None = None,
    gpu_name: str | None = None,
    compute_capability: tuple[int, int] | list[int] | None = None,
    device: int = 0,
) -> None:
    """Raise ModelFileError unless the engine was built by this TensorRT for this GPU model.

    A plan file only runs on the TensorRT version and GPU model that built it. The live
    values are queried when not given (given, the check needs no TensorRT or GPU).
    """
    info = sidecar.engine
    if trt_version is None:
        trt_version = str(import_tensorrt().__version__)
    if gpu_name is None or compute_capability is None:
        cuda.require_gpu(device)  # no GPU: the one-line BackendUnavailableError, not a CudaError
        live = cuda.device_info(device)
        gpu_name = live["name"] if gpu_name is None else gpu_name
        if compute_capability is None:
            compute_capability = live["compute_capability"]
    built_cc = [int(v) for v in info.compute_capability]
    here_cc = [int(v) for v in compute_capability]

    problems = []
    if info.version != trt_version:
        problems.append(f"TensorRT {info.version} (installed: {trt_version})")
    if info.gpu != gpu_name or built_cc != here_cc:
        problems.append(
            f"{info.gpu} sm_{built_cc[0]}{built_cc[1]} "
            f"(this GPU: {gpu_name} sm_{here_cc[0]}{here_cc[1]})"
        )
    if problems:
        raise ModelFileError(
            f"{engine_path}: engine was built for {' and '.join(problems)}; {REBUILD_HINT}"
        )


# === Backend ===


class TensorRTBackend:
    """A TensorRT engine as the ε-network callable ``backend(x, t) -> eps``.

    ``x`` float32 ``[B, C, H, W]`` and ``t`` float32 ``[B]`` with
    ``min_batch <= B <= max_batch``; returns a new float32 array ``[B, C, H, W]``.
    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, engine_path: str | Path, sidecar: EngineSidecar, device: int = 0):
        self.engine_path = Path(engine_path)
        self.device = int(device)
        self.sidecar = sidecar
        self.min_batch = 0
        self.max_batch = 0
        self.image_shape: tuple[int, int, int] = (0, 0, 0)
        self._trt = import_tensorrt()
        cuda.require_gpu(self.device)
        check_sidecar(sidecar, self.engine_path, device=self.device)
        self.record = sidecar.record
        self.name = f"tensorrt:{sidecar.engine.precision}"

        self._runtime = None
        self._engine = None
        self._context = None
        self._stream = None
        self._buffers: dict[str, int] = {}
        self._closed = False
        # One context, stream and set of device buffers: callers from several threads
        # take turns (the step-level batching engine is how they share the GPU).
        self._lock = threading.Lock()
        try:
            self._load()
            self._allocate()
        except BaseException:
            self._closed = True
            for exc in self._release():
                _log.warning("while cleaning up a failed TensorRT load: %s", exc)
            raise

    # --- lifecycle ---

    def _load(self) -> None:
        trt = self._trt
        if not self.engine_path.is_file():
            raise ModelFileError(f"{self.engine_path}: TensorRT engine not found; {REBUILD_HINT}")
        # TensorRT and cudaMalloc both work on the calling thread's current device.
        cuda.set_device(self.device)
        self._runtime = trt.Runtime(trt_logger())
        engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            raise ModelFileError(
                f"{self.engine_path}: TensorRT {trt.__version__} could not deserialize the "
                f"engine (see the TensorRT log above); {REBUILD_HINT}"
            )
        self._engine = engine
        self._read_io(engine)
        self._context = engine.create_execution_context()
        if self._context is None:
            raise RuntimeError(
                f"{self.engine_path}: TensorRT could not create an execution context "
                "(see the TensorRT log above); free GPU memory or rebuild with a smaller max batch"
            )

    def _read_io(self, engine: Any) -> None:
        """Check the engine's tensors by name and read the batch range from profile 0."""
        trt = self._trt
        where = self.engine_path
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if sorted(names) != sorted((*INPUTS, OUTPUT)):
            raise ModelFileError(
                f"{where}: engine tensors are {names}, expected inputs x, t and output eps; "
                "re-export the ONNX model and rebuild the engine"
            )
        modes = {"x": trt.TensorIOMode.INPUT, "t": trt.TensorIOMode.INPUT}
        modes[OUTPUT] = trt.TensorIOMode.OUTPUT
        for name, mode in modes.items():
            if engine.get_tensor_mode(name) != mode:
                raise ModelFileError(f"{where}: engine tensor {name} is not an {mode.name}")
            if engine.get_tensor_dtype(name) != trt.float32:
                raise ModelFileError(
                    f"{where}: engine tensor {name} is {engine.get_tensor_dtype(name)}, the "
                    f"runtime feeds float32; {REBUILD_HINT}"
                )
        x_shape = tuple(engine.get_tensor_shape("x"))
        eps_shape = tuple(engine.get_tensor_shape(OUTPUT))
        if len(x_shape) != 4 or min(x_shape[1:]) <= 0 or eps_shape[1:] != x_shape[1:]:
            raise ModelFileError(
                f"{where}: engine x {x_shape} / eps {eps_shape} are not [B, C, H, W] with "
                "fixed C, H, W; re-export the ONNX model and rebuild the engine"
            )
        if engine.num_optimization_profiles < 1:
            raise ModelFileError(f"{where}: engine has no optimization profile; {REBUILD_HINT}")
        x_min, _, x_max = (tuple(s) for s in engine.get_tensor_profile_shape("x", 0))
        t_min, _, t_max = (tuple(s) for s in engine.get_tensor_profile_shape("t", 0))
        self.min_batch, self.max_batch = int(x_min[0]), int(x_max[0])
        self.image_shape = tuple(int(d) for d in x_shape[1:])
        if (int(t_min[0]), int(t_max[0])) != (self.min_batch, self.max_batch):
            raise ModelFileError(
                f"{where}: engine profiles for x (batch {x_min[0]}..{x_max[0]}) and t "
                f"(batch {t_min[0]}..{t_max[0]}) differ; {REBUILD_HINT}"
            )
        built = self.sidecar.engine
        if (built.min_batch, built.max_batch) != (self.min_batch, self.max_batch):
            raise ModelFileError(
                f"{where}: sidecar says batch {built.min_batch}..{built.max_batch} but the "
                f"engine has {self.min_batch}..{self.max_batch}, so they do not belong "
                f"together; {REBUILD_HINT}"
            )

    def _allocate(self) -> None:
        """One device buffer per tensor for the profile's max batch, bound once by name."""
        self._stream = cuda.stream_create()
        shapes = {
            "x": (self.max_batch, *self.image_shape),
            "t": (self.max_batch,),
            OUTPUT: (self.max_batch, *self.image_shape),
        }
        for name, shape in shapes.items():
            nbytes = int(np.prod(shape)) * np.dtype(np.float32).itemsize
            self._buffers[name] = cuda.malloc(nbytes)
            # The addresses never change, so they are bound once, not per call.
            if not self._context.set_tensor_address(name, self._buffers[name]):
                raise RuntimeError(
                    f"{self.engine_path}: TensorRT rejected the device buffer for tensor {name} "
                    "(see the TensorRT log above)"
                )

    def close(self) -> None:
        """Free the context, engine, device buffers and stream. Safe to call twice."""
        with self._lock:  # never under a call that is using the buffers
            if self._closed:
                return
            self._closed = True
            errors = self._release()
        if errors:
            raise errors[0]

    def _release(self) -> list[Exception]:
        """Release everything held, attempting every step; return the CUDA errors met."""
        errors: list[Exception] = []

        def attempt(step, *args) -> None:
            try:
                step(*args)
            except cuda.CudaError as exc:
                errors.append(exc)

        if self._stream is not None:
            # Work still queued may read the buffers freed below.
            attempt(cuda.stream_synchronize, self._stream)
        # TensorRT 10 objects free themselves when the last reference goes (its context
        # managers are deprecated); drop them dependents-first.
        self._context = None
        self._engine = None
        self._runtime = None
        for ptr in self._buffers.values():
            attempt(cuda.free, ptr)
        self._buffers = {}
        if self._stream is not None:
            attempt(cuda.stream_destroy, self._stream)
            self._stream = None
        return errors

    def __enter__(self) -> TensorRTBackend:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def describe(self) -> list[tuple[str, str]]:
        """The engine's tensors, batch profile and the TensorRT and GPU that built it."""
        built = self.sidecar.engine
        c, h, w = self.image_shape
        return [
            ("input", f"x float32 [B, {c}, {h}, {w}]"),
            ("input", "t float32 [B]"),
            ("output", f"eps float32 [B, {c}, {h}, {w}]"),
            ("batch", f"{self.min_batch}..{self.max_batch} (optimised for {built.profile[1]})"),
            ("built by", f"TensorRT {built.version} for {built.gpu} "
                         f"sm_{built.compute_capability[0]}{built.compute_capability[1]}"),
            ("device", f"CUDA device {self.device}"),
        ]

    # --- inference ---

    def _check_inputs(self, x: Any, t: Any) -> int:
        where = self.engine_path.name
        for name, arr in (("x", x), ("t", t)):
            if not isinstance(arr, np.ndarray):
                raise ValueError(f"input {name} must be a numpy array, got {type(arr).__name__}")
            if arr.dtype != np.float32:
                raise ValueError(
                    f"input {name} must be float32, got {arr.dtype}; cast with .astype(np.float32)"
                )
        c, h, w = self.image_shape
        if x.ndim != 4 or x.shape[1:] != self.image_shape:
            raise ValueError(f"input x must be [B, {c}, {h}, {w}] for {where}, got {x.shape}")
        batch = x.shape[0]
        if not self.min_batch <= batch <= self.max_batch:
            raise ValueError(
                f"batch size {batch} is outside the profile of {where} "
                f"[{self.min_batch}, {self.max_batch}]: split the batch or rebuild with larger max"
            )
        if t.shape != (batch,):
            raise ValueError(f"input t must be [{batch}] to match x, got {t.shape}")
        return batch

    def __call__(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        with self._lock:
            return self._run(x, t)

    def _run(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        if self._closed:
            raise RuntimeError(f"TensorRT backend for {self.engine_path} is closed; load it again")
        self._check_inputs(x, t)
        x = np.ascontiguousarray(x)
        t = np.ascontiguousarray(t)
        context = self._context
        # Cheap, and keeps a second backend on another device from stealing this thread.
        cuda.set_device(self.device)
        if not (context.set_input_shape("x", x.shape) and context.set_input_shape("t", t.shape)):
            raise RuntimeError(
                f"{self.engine_path}: TensorRT rejected input shapes x {x.shape}, t {t.shape} "
                "(see the TensorRT log above)"
            )
        out_shape = tuple(context.get_tensor_shape(OUTPUT))
        if out_shape != x.shape:
            raise RuntimeError(
                f"{self.engine_path}: engine output eps is {out_shape} for x {x.shape}; "
                f"{REBUILD_HINT}"
            )
        eps = np.empty(x.shape, dtype=np.float32)
        cuda.memcpy_htod_async(self._buffers["x"], x, self._stream)
        cuda.memcpy_htod_async(self._buffers["t"], t, self._stream)
        if not context.execute_async_v3(cuda.stream_handle(self._stream)):
            cuda.stream_synchronize(self._stream)
            raise RuntimeError(
                f"{self.engine_path}: TensorRT execute_async_v3 failed (see the TensorRT log above)"
            )
        cuda.memcpy_dtoh_async(eps, self._buffers[OUTPUT], self._stream)
        # Note: a CPU-GPU sync point; eps (and the lifetime of x, t) is safe only after it.
        cuda.stream_synchronize(self._stream)
        return eps


def engine_files(path: Path) -> list[Path]:
    """An engine and its sidecar: the engine alone cannot be loaded."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        raise ModelFileError(f"{path}: its sidecar {sidecar} is missing; rebuild the engine "
                             "with python export/to_trt.py")
    return [Path(path), sidecar]


@register("trt", suffixes=(".plan", ".engine", ".trt"), files=engine_files)
def open_engine(path, *, device: str | None = None, threads: int | None = None,
                device_id: int = 0) -> TensorRTBackend:
    """A TensorRT engine with its sidecar; it runs on CUDA device ``device_id``."""
    if device not in (None, "cuda"):
        raise ValueError(f"the TensorRT backend runs on the GPU; device {device!r} is not valid")
    # The backend checks the sidecar's TensorRT version and GPU against this machine.
    return TensorRTBackend(path, read_sidecar(path), device=device_id)
