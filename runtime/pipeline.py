"""A model file plus the samplers: ``runtime.load(path).sample(n, seed)``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .backends import open_backend
from .errors import check_int
from .images import to_uint8
from .metadata import ModelRecord
from .samplers import SAMPLERS, ImageNoise, sample
from .schedule import VARIANCES

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
    """Open a model file with the backend named, or the one its suffix is registered for
    (``.onnx``: ONNX Runtime; ``.plan``/``.engine``/``.trt``: TensorRT); see runtime.backends.

    ``device`` picks ONNX Runtime's provider ("cpu", "cuda", "tensorrt"; default cpu).
    ``threads``: CPU threads for ONNX Runtime (default: every core this process may use),
    spent on one-thread shards of each batch; see :class:`~runtime.backends.ort.OrtBackend`.
    """
    opened = open_backend(path, backend=backend, device=device, threads=threads,
                          device_id=device_id)
    return Pipeline(opened, opened.record, source=str(path), backend_name=opened.name,
                    max_batch=opened.max_batch, closer=opened.close)
