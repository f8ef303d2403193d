"""A model file plus the samplers: ``runtime.load(path).sample(n, seed)``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import ModelFileError, check_int
from .images import to_uint8
from .metadata import ModelRecord
from .samplers import SAMPLERS, ImageNoise, sample
from .schedule import VARIANCES

BACKENDS = ("auto", "ort", "trt")
ENGINE_SUFFIXES = (".plan", ".engine", ".trt")
DEFAULT_BATCH = 64


class Pipeline:
    """Samples images from an ε-network behind ``eps_fn``, as its record describes."""

    def __init__(self, eps_fn: Callable, record: ModelRecord, *, source: str,
                 backend_name: str, max_batch: int | None = None, closer=None):
        self.eps_fn = eps_fn
        self.record = record
        self.source = source
        self.backend_name = backend_name
        self.max_batch = max_batch
        self.schedule = record.build_schedule()
        self._closer = closer

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.record.image_shape

    def sample_float(self, n: int, seed: int = 0, *, sampler: str = "ddpm",
                     steps: int | None = None, variance: str = "fixedlarge", eta: float = 0.0,
                     batch_size: int | None = None, progress: bool = True) -> np.ndarray:
        """float32 [n, C, H, W] in the data range. Image k depends on (seed, k) only."""
        check_int(n, "n")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; expected one of {VARIANCES}")
        schedule = self.schedule if steps is None else self.schedule.respaced(steps)
        batch = self._batch_size(n, batch_size)
        starts = range(0, n, batch)
        bar = _progress_bar(progress, len(starts) * schedule.num_timesteps,
                            f"{sampler} {schedule.num_timesteps} steps")
        out = np.empty((n, *self.image_shape), np.float32)
        try:
            for start in starts:
                stop = min(start + batch, n)
                noise = ImageNoise(seed, range(start, stop))
                x = sample(self.eps_fn, schedule, (stop - start, *self.image_shape), noise,
                           sampler=sampler, variance=variance, eta=eta, clip_x0=True,
                           clip_range=self.record.data_range,
                           callback=(lambda *_: bar.update(1)) if bar else None)
                out[start:stop] = x
        finally:
            if bar:
                bar.close()
        return out

    def sample(self, n: int, seed: int = 0, **kwargs) -> np.ndarray:
        """uint8 [n, H, W, C]; the keyword arguments are those of :meth:`sample_float`."""
        return to_uint8(self.sample_float(n, seed, **kwargs), self.record.data_range)

    def _batch_size(self, n: int, requested: int | None) -> int:
        if requested is not None:
            check_int(requested, "batch_size")
        batch = requested or DEFAULT_BATCH
        if self.max_batch is not None:
            batch = min(batch, self.max_batch)
        return min(batch, n)

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False)


def load(path, *, backend: str = "auto", device: str | None = None, threads: int | None = None,
         device_id: int = 0) -> Pipeline:
    """Open a model file: ``.onnx`` runs on ONNX Runtime, ``.plan``/``.engine`` on TensorRT.

    ``device`` picks ONNX Runtime's provider ("cpu", "cuda", "tensorrt"; default cpu).
    ``threads``: CPU threads for ONNX Runtime (default: every core this process may use),
    spent on one-thread shards of each batch; see :class:`~runtime.backends.ort.OrtBackend`.
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    if backend == "auto":
        backend = "trt" if path.suffix in ENGINE_SUFFIXES else "ort"
    if backend == "ort":
        from .backends.ort import OrtBackend

        ort_backend = OrtBackend(path, device=device or "cpu", threads=threads,
                                 device_id=device_id)
        return Pipeline(ort_backend, ort_backend.record, source=str(path),
                        backend_name=f"onnxruntime:{ort_backend.providers[0]}",
                        max_batch=ort_backend.max_batch, closer=ort_backend.close)
    if device not in (None, "cuda"):
        raise ValueError(f"the TensorRT backend runs on the GPU; device {device!r} is not valid")
    from .backends.trt import TensorRTBackend, read_sidecar

    sidecar = read_sidecar(path)
    record = ModelRecord.from_dict({k: v for k, v in sidecar.items() if k != "tensorrt"},
                                   f"{path} (sidecar)")
    # The backend checks the sidecar's TensorRT version and GPU against this machine.
    trt_backend = TensorRTBackend(path, sidecar, device=device_id)
    return Pipeline(trt_backend, record, source=str(path),
                    backend_name=f"tensorrt:{sidecar['tensorrt'].get('precision', 'fp32')}",
                    max_batch=trt_backend.max_batch, closer=trt_backend.close)
