"""The one checked entry point to the CUDA runtime through cuda-python.

cuda-python returns ``(err, *values)`` from every call instead of raising; :func:`check`
turns that into values or a :class:`CudaError` naming the error. Every CUDA call in this
project goes through :func:`check`, so an error can never pass silently.

cuda-python is imported lazily (inside functions): importing this module costs nothing
on a machine without CUDA.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import BackendUnavailableError

_INSTALL_HINT = "pip install cuda-python (or the project extra: pip install .[trt])"

# One hint per error a user can act on; the rest get the generic advice.
_FIX_HINTS = {
    "cudaErrorMemoryAllocation": "lower the batch size or free GPU memory (see nvidia-smi)",
    "cudaErrorNoDevice": "check nvidia-smi and CUDA_VISIBLE_DEVICES",
    "cudaErrorInvalidDevice": "pick a device index below the GPU count (see nvidia-smi)",
    "cudaErrorInsufficientDriver": (
        "update the NVIDIA driver, or install the cuda-python major version your driver "
        "supports (e.g. pip install 'cuda-python<13' for a CUDA 12 driver)"
    ),
}


class CudaError(RuntimeError):
    """A CUDA runtime call returned an error code."""


# === Import ===


def import_cudart() -> Any:
    """Return cuda-python's runtime module, or raise a one-line BackendUnavailableError."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python layout
        except ImportError:
            raise BackendUnavailableError(
                f"cuda-python is not installed, the TensorRT backend needs it: {_INSTALL_HINT}"
            ) from None
    return cudart


# === The checker ===


def _error_name(err: Any) -> str:
    name = getattr(err, "name", None)
    return name if isinstance(name, str) else repr(err)


def _error_string(err: Any) -> str | None:
    """cudaGetErrorString text, or None; it needs no driver but must never mask the error."""
    try:
        cudart = import_cudart()
        result = cudart.cudaGetErrorString(err)
    except (BackendUnavailableError, TypeError, ValueError):
        return None
    # cuda-python returns (cudaSuccess, bytes); tolerate a bare bytes from other versions.
    text = result[-1] if isinstance(result, tuple) else result
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return text if isinstance(text, str) and text else None


def check(result: Any, call: str = "CUDA call") -> Any:
    """Unpack a cuda-python result ``(err, *values)``.

    Returns None when the call returns no value, the value when it returns one, and a
    tuple otherwise. Raises :class:`CudaError` (one line, with the enum name) when ``err``
    is not ``cudaSuccess`` (value 0).
    """
    if isinstance(result, tuple):
        if not result:
            raise TypeError(f"{call}: expected a cuda-python result (err, *values), got ()")
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if int(err) != 0:
        name = _error_name(err)
        text = _error_string(err)
        detail = f"{name} ({text})" if text and text != name else name
        hint = _FIX_HINTS.get(name, "check the GPU with nvidia-smi and the driver version")
        raise CudaError(f"{call} failed: {detail}; {hint}")
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return values


# === Devices ===


def device_count() -> int:
    cudart = import_cudart()
    return int(check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount"))


def gpu_unavailable_reason(device: int = 0) -> str | None:
    """None when CUDA device ``device`` is usable, else one line saying why not."""
    try:
        count = device_count()
    except BackendUnavailableError as exc:
        return str(exc)
    except CudaError as exc:
        return f"no CUDA GPU is visible ({exc})"
    if count == 0:
        return "no CUDA GPU is visible (cudaGetDeviceCount found 0 devices)"
    if not 0 <= device < count:
        return (
            f"CUDA device {device} is not visible ({count} GPU(s) found): "
            f"use a device index below {count} or check CUDA_VISIBLE_DEVICES"
        )
    return None


def require_gpu(device: int = 0) -> None:
    """Raise a one-line BackendUnavailableError unless CUDA device ``device`` is usable."""
    reason = gpu_unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailableError(reason)


def set_device(device: int) -> None:
    cudart = import_cudart()
    check(cudart.cudaSetDevice(device), f"cudaSetDevice({device})")


def device_info(device: int = 0) -> dict:
    """``{"name": str, "compute_capability": [major, minor]}`` of a CUDA device."""
    cudart = import_cudart()
    prop = check(cudart.cudaGetDeviceProperties(device), f"cudaGetDeviceProperties({device})")
    name = prop.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode("utf-8", errors="replace")
    return {"name": str(name), "compute_capability": [int(prop.major), int(prop.minor)]}


# === Memory ===


def malloc(nbytes: int) -> int:
    """Allocate ``nbytes`` of device memory; returns the device address as an int."""
    cudart = import_cudart()
    return int(check(cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes} bytes)"))


def free(ptr: int) -> None:
    cudart = import_cudart()
    check(cudart.cudaFree(ptr), "cudaFree")


def _host_array(array: np.ndarray, role: str) -> np.ndarray:
    if not isinstance(array, np.ndarray) or not array.flags.c_contiguous:
        raise ValueError(f"{role} must be a C-contiguous numpy array (use np.ascontiguousarray)")
    return array


def memcpy_htod_async(dst: int, src: np.ndarray, stream: Any) -> None:
    """Queue a host -> device copy of all of ``src`` on ``stream``.

    ``src`` may be pageable: the driver stages it before this returns, but keep it alive
    until the stream is synchronized anyway.
    """
    cudart = import_cudart()
    src = _host_array(src, "memcpy source")
    kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
    result = cudart.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, stream)
    check(result, "cudaMemcpyAsync host->device")


def memcpy_dtoh_async(dst: np.ndarray, src: int, stream: Any) -> None:
    """Queue a device -> host copy filling all of ``dst``; valid after the stream syncs."""
    cudart = import_cudart()
    dst = _host_array(dst, "memcpy destination")
    if not dst.flags.writeable:
        raise ValueError("memcpy destination must be writeable")
    kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
    result = cudart.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, stream)
    check(result, "cudaMemcpyAsync device->host")


# === Streams ===


def stream_create() -> Any:
    """A non-blocking stream: TensorRT warns that the legacy default stream adds syncs."""
    cudart = import_cudart()
    return check(
        cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreateWithFlags"
    )


def stream_synchronize(stream: Any) -> None:
    cudart = import_cudart()
    check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")


def stream_destroy(stream: Any) -> None:
    cudart = import_cudart()
    check(cudart.cudaStreamDestroy(stream), "cudaStreamDestroy")


def stream_handle(stream: Any) -> int:
    """The raw ``cudaStream_t`` address TensorRT's ``execute_async_v3`` takes as an int."""
    return int(stream)
