"""A model file plus the samplers: ``runtime.load(path).sample(n, seed)``."""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections.abc import Callable

import numpy as np

from .backends import open_backend
from .errors import Cancelled, StudentSamplingWarning, check_int
from .images import to_uint8
from .metadata import ModelRecord
from .options import SEED, N, SampleOptions
from .run import Run
from .samplers import ImageNoise
from .stepmath import eps_from_output

DEFAULT_BATCH = 64


class Pipeline:
    """Samples images from an ε-network behind ``eps_fn``, as its record describes.

    One pipeline may be shared by any number of threads: a call's state (its schedule,
    sampler buffers and noise) is its own, and the backends are safe to call at once.
    """

    def __init__(self, eps_fn: Callable, record: ModelRecord, *, source: str,
                 backend_name: str, max_batch: int | None = None, closer=None):
        self.eps_fn = eps_fn
        self.record = record
        self.source = source
        self.backend_name = backend_name
        self.max_batch = max_batch
        self.schedule = record.build_schedule()
        self._closer = closer
        self._closed = False
        # Calls running now: close() lets them finish and releases the backend after the
        # last one (it was released under them: AttributeError, or a session reopened).
        self._active = 0
        self._lock = threading.Lock()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.record.image_shape

    def predict_eps(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        """The eps the network implies at float32 x [B, C, H, W] and t [B] (indices of the
        full chain), whatever it predicts (``record.prediction``): for code that needs eps
        at arbitrary t, such as the likelihood bound. ``eps_fn`` is the network itself."""
        out = np.asarray(self.eps_fn(x, t))
        if self.record.prediction == "eps":
            return out
        idx = np.asarray(t).astype(np.int64).reshape(-1, *([1] * (x.ndim - 1)))
        eps = eps_from_output(self.record.prediction, x, out,
                              self.schedule.sqrt_alphas_cumprod[idx],
                              self.schedule.sqrt_one_minus_alphas_cumprod[idx],
                              np.empty(x.shape, np.float64))
        return eps.astype(np.float32)

    def sample_float(self, n: int, seed: int = 0, *, sampler: str | None = None,
                     steps: int | None = None, spacing: str | None = None,
                     batch_size: int | None = None, progress: bool = True,
                     callback: Callable[[int, int], bool | None] | None = None,
                     cancel=None, first_index: int = 0, **options) -> np.ndarray:
        """float32 [n, C, H, W] in the data range. Image k depends on (seed, k) only.

        ``sampler``: a name in ``runtime.samplers.SAMPLERS``; ``steps`` network calls
        (default all T) at timesteps chosen by ``spacing`` (see ``Schedule.respaced``);
        ``options``: the sampler's own (``variance`` for ddpm, ``eta`` for ddim; see
        ``runtime.options``). What is not given (None) takes the model's default (its
        record's ``defaults``), then ddpm, all T steps, linspace and the samplers' own.
        ``callback(step, total)`` runs after each network call (``total`` counts the steps
        of every batch); returning False cancels. ``cancel``: a token such as a
        ``threading.Event``, checked before each step. A cancelled call stops within one
        step and raises :class:`~runtime.errors.Cancelled`; the pipeline stays usable.
        ``first_index``: draw images first_index .. first_index + n - 1 of the seed, so that
        a range of a large job can be sampled on its own (``bulk``).
        """
        opts = SampleOptions.make(sampler, steps, spacing, defaults=self.record.defaults,
                                  **options)
        self._check_request(n, seed, BYTES_PER_VALUE_FLOAT)
        off = self.record.off_distillation(opts, self.source)
        if off is not None:
            warnings.warn(off, StudentSamplingWarning, stacklevel=2)
        with self._lock:
            if self._closed:  # closed by another thread since the check above
                raise ValueError(self._closed_message())
            self._active += 1
        try:
            return self._sample_float(n, seed, opts, batch_size=batch_size,
                                      progress=progress, callback=callback, cancel=cancel,
                                      first_index=first_index)
        finally:
            with self._lock:
                self._active -= 1
                release = self._closed and self._active == 0
            if release:
                self._release()

    def _sample_float(self, n: int, seed: int, opts: SampleOptions, *, batch_size, progress,
                      callback, cancel, first_index: int) -> np.ndarray:
        check_int(first_index, "first_index", minimum=0)
        if cancel is not None and not callable(getattr(cancel, "is_set", None)):
            raise TypeError(f"cancel must have an is_set() method (e.g. threading.Event), "
                            f"got {type(cancel).__name__}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable as callback(step, total), got "
                            f"{type(callback).__name__}")
        schedule = opts.respace(self.schedule)
        batch = self._batch_size(n, batch_size)
        starts = range(0, n, batch)
        total = len(starts) * schedule.num_timesteps
        bar = _progress_bar(progress, total, f"{opts.sampler} {schedule.num_timesteps} steps")
        out = np.empty((n, *self.image_shape), np.float32)
        t = np.empty(batch, np.float32)
        steps_done = 0

        def check_cancel():
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"sampling cancelled after {steps_done} of {total} steps")

        try:
            for start in starts:
                check_cancel()
                stop = min(start + batch, n)
                noise = ImageNoise(seed, range(first_index + start, first_index + stop))
                run = Run(schedule, opts, (stop - start, *self.image_shape), noise,
                          clip_range=self.record.data_range if self.record.clip_x0 else None,
                          prediction=self.record.prediction)
                t_run = t[:run.rows]
                while not run.done:
                    t_run.fill(run.t)
                    run.advance(self.eps_fn(run.x, t_run))
                    steps_done += 1
                    if bar:
                        bar.update(1)
                    if callback is not None and callback(steps_done, total) is False:
                        raise Cancelled(f"sampling cancelled by the callback after "
                                        f"{steps_done} of {total} steps")
                    if steps_done < total:
                        check_cancel()
                out[start:stop] = run.x
        finally:
            if bar:
                bar.close()
        return out

    def sample(self, n: int, seed: int = 0, **kwargs) -> np.ndarray:
        """uint8 [n, H, W, C]; the keyword arguments are those of :meth:`sample_float`."""
        self._check_request(n, seed, BYTES_PER_VALUE_UINT8)
        return to_uint8(self.sample_float(n, seed, **kwargs), self.record.data_range)

    def _check_request(self, n, seed, bytes_per_value: int) -> None:
        """Refuse what cannot run before anything is allocated or sampled."""
        if self._closed:
            raise ValueError(self._closed_message())
        N.check(n)
        # An explicit seed always: None would silently give other images on every call.
        SEED.check(seed)
        need = n * math.prod(self.image_shape) * bytes_per_value
        have = available_memory()
        if have is not None and need > have:
            raise ValueError(f"n={n} images of {list(self.image_shape)} need about "
                             f"{need / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB of "
                             "memory available; sample fewer images per call")

    def _batch_size(self, n: int, requested: int | None) -> int:
        if requested is not None:
            check_int(requested, "batch_size")
        batch = requested or DEFAULT_BATCH
        if self.max_batch is not None:
            batch = min(batch, self.max_batch)
        return min(batch, n)

    def _closed_message(self) -> str:
        return (f"{self.source}: this pipeline is closed; open the model again with "
                "runtime.load()")

    def close(self) -> None:
        """Refuse new calls; release the backend now, or when the calls running in other
        threads have finished (they end with their images). Does not wait for them."""
        with self._lock:
            self._closed = True
            idle = self._active == 0
        if idle:
            self._release()

    def _release(self) -> None:
        with self._lock:
            closer, self._closer = self._closer, None
        if closer is not None:
            closer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# Peak bytes per output value: float32 result (sample_float); sample adds to_uint8's float64
# working copies and the uint8 result.
BYTES_PER_VALUE_FLOAT = 4
BYTES_PER_VALUE_UINT8 = 4 + 3 * 8 + 1


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (Linux MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


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
