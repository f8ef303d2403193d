"""A model file plus the samplers: ``runtime.load(path).sample(n, seed)``."""

from __future__ import annotations

import contextlib
import math
import os
import threading
import warnings
from collections.abc import Callable

import numpy as np

from .backends import open_backend
from .edits import (
    Edit,
    Img2Img,
    InvertRun,
    broadcast_images,
    decode_run,
    edit_class,
    images_from_uint8,
    mask_from_array,
    slerp,
)
from .errors import Cancelled, OptionError, StudentSamplingWarning, check_int
from .images import to_uint8
from .metadata import ModelRecord
from .options import SEED, N, SampleOptions
from .run import Run, image_run, run_kwargs
from .samplers import ImageNoise, draw_noise
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
                     cancel=None, first_index: int = 0, previews: int = 0,
                     **options) -> np.ndarray:
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
        ``previews`` k > 0: the callback is called as ``callback(step, total, x0)``, where
        x0 is the x_0 the network predicts for the block being drawn (float32 [rows, C, H,
        W], the paper's progressive decoding) every k-th step of a block and at its last,
        None otherwise.
        """
        opts = SampleOptions.make(sampler, steps, spacing, defaults=self.record.defaults,
                                  **options)
        self._check_request(n, seed, BYTES_PER_VALUE_FLOAT)
        off = self.record.off_distillation(opts, self.source)
        if off is not None:
            warnings.warn(off, StudentSamplingWarning, stacklevel=2)
        check_int(first_index, "first_index", minimum=0)
        schedule = opts.respace(self.schedule)

        def make_run(lo, hi, keep_x0):
            return image_run(schedule, opts, self.record, seed,
                             range(first_index + lo, first_index + hi), keep_x0=keep_x0)

        with self._call():
            return self._drive(n, make_run, schedule.num_timesteps,
                               f"{opts.sampler} {schedule.num_timesteps} steps",
                               batch_size=batch_size, progress=progress, callback=callback,
                               cancel=cancel, previews=previews)

    def edit_float(self, kind: str, images, seed: int = 0, *, mask=None, n: int | None = None,
                   sampler: str | None = None, steps: int | None = None,
                   spacing: str | None = None, batch_size: int | None = None,
                   progress: bool = True, callback=None, cancel=None, previews: int = 0,
                   **options) -> np.ndarray:
        """Edit given images: float32 [n, C, H, W] in the data range. ``kind``: a name in
        ``runtime.edits.EDITS`` ("img2img", "inpaint"). ``images``: uint8 [H, W, C] or
        [N, H, W, C] (one image is repeated ``n`` times); ``mask``: what the kind takes
        (inpaint: 1 or 255 where the image is kept, 0 where it is filled in). ``options``:
        the edit's own (``strength``; ``jump_length``, ``resamples``) and the sampler's.
        Image k depends on (seed, k) only; the rest is as :meth:`sample_float`."""
        edit = self.make_edit(kind, images, mask=mask, n=n, options=options)
        return self.run_edit(edit, seed, sampler=sampler, steps=steps, spacing=spacing,
                             batch_size=batch_size, progress=progress, callback=callback,
                             cancel=cancel, previews=previews,
                             **{k: v for k, v in options.items() if k not in edit.params})

    def run_edit(self, edit: Edit, seed: int = 0, *, sampler: str | None = None,
                 steps: int | None = None, spacing: str | None = None,
                 batch_size: int | None = None, progress: bool = True, callback=None,
                 cancel=None, previews: int = 0, **options) -> np.ndarray:
        """:meth:`edit_float` for an edit :meth:`make_edit` has already checked;
        ``options``: the sampler's."""
        opts = SampleOptions.make(sampler, steps, spacing, defaults=self.record.defaults,
                                  **options)
        edit.check(opts)
        self._check_request(edit.n, seed, BYTES_PER_VALUE_FLOAT)
        schedule = opts.respace(self.schedule)

        def make_run(lo, hi, keep_x0):
            return edit.make_run(schedule, opts, lo, hi, ImageNoise(seed, range(lo, hi)),
                                 self.record, keep_x0=keep_x0)

        with self._call():
            return self._drive(edit.n, make_run, edit.calls(schedule, self.record),
                               f"{edit.name} {opts.sampler}", batch_size=batch_size,
                               progress=progress, callback=callback, cancel=cancel,
                               previews=previews)

    def make_edit(self, kind: str, images, *, mask=None, n: int | None = None,
                  options: dict | None = None, names: tuple[str, str] = ("image", "mask")
                  ) -> Edit:
        """The checked :class:`~runtime.edits.Edit` (images as uint8 pixels, see
        :meth:`edit_float`); ``options`` may hold sampling options too (left alone here).
        ``names``: what errors call the images and the mask (a CLI names their files)."""
        cls = edit_class(kind)
        if n is not None:  # before one image is repeated n times
            self._check_request(n, 0, BYTES_PER_VALUE_FLOAT)
        pixels = broadcast_images(images_from_uint8(images, self.image_shape,
                                                    self.record.data_range, name=names[0]), n)
        keep = None if mask is None else mask_from_array(mask, self.image_shape, name=names[1])
        own = {o.name for o in cls.options}
        return cls(pixels, mask=keep, **{k: v for k, v in (options or {}).items() if k in own})

    def img2img(self, images, seed: int = 0, **kwargs) -> np.ndarray:
        """uint8 [n, H, W, C]: SDEdit at ``strength`` (0.5 unless given); see
        :meth:`edit_float`."""
        return to_uint8(self.edit_float("img2img", images, seed, **kwargs),
                        self.record.data_range)

    def inpaint(self, images, mask, seed: int = 0, **kwargs) -> np.ndarray:
        """uint8 [n, H, W, C]: RePaint, keeping the pixels where ``mask`` is 1 (or 255); see
        :meth:`edit_float`."""
        return to_uint8(self.edit_float("inpaint", images, seed, mask=mask, **kwargs),
                        self.record.data_range)

    def invert(self, images, *, steps: int | None = None, spacing: str | None = None,
               batch_size: int | None = None, progress: bool = True) -> np.ndarray:
        """Deterministic DDIM inversion: uint8 images -> float32 latents x_T [N, C, H, W],
        over ``steps`` (default all T) chosen by ``spacing``; :meth:`decode` with the same
        steps and spacing gives the images back (to within the steps' error)."""
        opts = SampleOptions.make("ddim", steps, spacing)
        schedule = opts.respace(self.schedule)
        pixels = images_from_uint8(images, self.image_shape, self.record.data_range)
        self._check_request(len(pixels), 0, BYTES_PER_VALUE_FLOAT)

        def make_run(lo, hi, keep_x0):
            return InvertRun(schedule, pixels[lo:hi], prediction=self.record.prediction)

        with self._call():
            return self._drive(len(pixels), make_run, schedule.num_timesteps,
                               f"invert {schedule.num_timesteps} steps", batch_size=batch_size,
                               progress=progress)

    def decode_float(self, latents, *, steps: int | None = None, spacing: str | None = None,
                     batch_size: int | None = None, progress: bool = True) -> np.ndarray:
        """float32 [N, C, H, W]: deterministic, unclipped DDIM from latents x_T (what
        :meth:`invert` returns) over ``steps`` chosen by ``spacing``."""
        opts = SampleOptions.make("ddim", steps, spacing)
        schedule = opts.respace(self.schedule)
        latents = np.asarray(latents)
        if (latents.ndim != 4 or latents.shape[1:] != tuple(self.image_shape)
                or latents.dtype.kind != "f" or not np.isfinite(latents).all()):
            want = ", ".join(map(str, self.image_shape))
            raise ValueError(f"latents must be finite floats [N, {want}], got "
                             f"{latents.dtype} {latents.shape}")
        self._check_request(len(latents), 0, BYTES_PER_VALUE_FLOAT)

        def make_run(lo, hi, keep_x0):
            return decode_run(schedule, latents[lo:hi], self.record)

        with self._call():
            return self._drive(len(latents), make_run, schedule.num_timesteps,
                               f"decode {schedule.num_timesteps} steps", batch_size=batch_size,
                               progress=progress)

    def decode(self, latents, **kwargs) -> np.ndarray:
        """uint8 [N, H, W, C]; see :meth:`decode_float`."""
        return to_uint8(self.decode_float(latents, **kwargs), self.record.data_range)

    def interpolate(self, a, b, *, num: int = 9, strength: float = 0.5, latent: bool = False,
                    seed: int = 0, steps: int | None = None, spacing: str | None = None,
                    sampler: str | None = None, progress: bool = True, **options) -> np.ndarray:
        """uint8 [num, H, W, C]: images between uint8 images ``a`` and ``b`` ([H, W, C]).

        As in the paper (sec. 4.3): both are noised to t ~ strength x T with the same noise,
        mixed with weights (1 - l, l) for ``num`` values of l from 0 to 1, and each mix is
        denoised by ``sampler`` with the same noise (stream (seed, 0)). ``latent=True``:
        both are inverted by deterministic DDIM (``steps``), the latents mixed spherically,
        and each mix decoded back.
        """
        check_int(num, "num", minimum=2)
        pair = np.concatenate([images_from_uint8(a, self.image_shape, self.record.data_range,
                                                 name="a"),
                               images_from_uint8(b, self.image_shape, self.record.data_range,
                                                 name="b")])
        if len(pair) != 2:
            raise ValueError("a and b must be one image each ([H, W, C])")
        weights = np.linspace(0.0, 1.0, num)
        if latent:
            uint8_pair = to_uint8(pair, self.record.data_range)
            za, zb = self.invert(uint8_pair, steps=steps, spacing=spacing, progress=progress)
            mixes = np.stack([slerp(za, zb, w) for w in weights]).astype(np.float32)
            return self.decode(mixes, steps=steps, spacing=spacing, progress=progress)
        opts = SampleOptions.make(sampler, steps, spacing, defaults=self.record.defaults,
                                  **options)
        edit = Img2Img(pair, strength=strength)
        schedule = opts.respace(self.schedule)
        k = edit.kept(schedule, self.record)
        if k == 0:
            raise OptionError("strength", f"strength {strength} keeps no step of the chain; "
                              "raise it")
        # Both with the same draw, the first of stream (seed, 0), as img2img noises one image.
        z = draw_noise(ImageNoise(seed, [0]), (1, *self.image_shape))
        noised = schedule.q_sample(pair.astype(np.float64), k - 1, np.concatenate([z, z]))
        mixes = ((1.0 - weights)[:, None, None, None] * noised[0]
                 + weights[:, None, None, None] * noised[1]).astype(np.float32)

        def make_run(lo, hi, keep_x0):
            # Every mix is denoised with the same noise, the stream after the draw that
            # noised the pair: the ends are img2img's images of a and b, bit for bit.
            noise = ImageNoise(seed, [0] * (hi - lo))
            draw_noise(noise, (hi - lo, *self.image_shape))
            return Run(schedule.first(k), opts, (hi - lo, *self.image_shape), noise,
                       start=mixes[lo:hi], keep_x0=keep_x0, **run_kwargs(self.record))

        with self._call():
            out = self._drive(num, make_run, k, f"interpolate {opts.sampler}",
                              batch_size=None, progress=progress)
        return to_uint8(out, self.record.data_range)

    @contextlib.contextmanager
    def _call(self):
        """Count a call as active: close() releases the backend after the last one."""
        with self._lock:
            if self._closed:  # closed by another thread since the request was checked
                raise ValueError(self._closed_message())
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                release = self._closed and self._active == 0
            if release:
                self._release()

    def _drive(self, n: int, make_run, calls: int, desc: str, *, batch_size, progress,
               callback=None, cancel=None, previews: int = 0) -> np.ndarray:
        """Step the runs ``make_run(lo, hi, keep_x0)`` makes for blocks of the n images, one
        network call at a time: the loop of every sampling and editing call."""
        if cancel is not None and not callable(getattr(cancel, "is_set", None)):
            raise TypeError(f"cancel must have an is_set() method (e.g. threading.Event), "
                            f"got {type(cancel).__name__}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable as callback(step, total), got "
                            f"{type(callback).__name__}")
        check_int(previews, "previews", minimum=0)
        batch = self._batch_size(n, batch_size)
        starts = range(0, n, batch)
        total = len(starts) * calls
        bar = _progress_bar(progress, total, desc)
        out = np.empty((n, *self.image_shape), np.float32)
        t = np.empty(batch, np.float32)
        steps_done = 0

        def check_cancel():
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"{desc} cancelled after {steps_done} of {total} steps")

        try:
            for start in starts:
                check_cancel()
                stop = min(start + batch, n)
                run = make_run(start, stop, previews > 0)
                t_run = t[:run.rows]
                while not run.done:
                    t_run.fill(run.t)
                    run.advance(self.eps_fn(run.x, t_run))
                    steps_done += 1
                    if bar:
                        bar.update(1)
                    if callback is not None:
                        if previews:
                            due = run.steps_done % previews == 0 or run.done
                            keep = callback(steps_done, total, run.x0 if due else None)
                        else:
                            keep = callback(steps_done, total)
                        if keep is False:
                            raise Cancelled(f"{desc} cancelled by the callback after "
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
