"""Editing given images with the unconditional model: image-to-image, inpainting, inversion.

- ``img2img`` (SDEdit, Meng et al. 2022): noise the image to t ~ strength x T with
  q(x_t | x_0), then run the reverse chain from there with any sampler. Strength 0 returns
  the image; strength 1 is plain sampling (the chain starts from pure noise).
- ``inpaint`` (RePaint, Lugmayr et al. 2022): after every reverse step the pixels the mask
  keeps are replaced by the forward process of the given image at that step; every
  ``jump_length`` steps the run goes back that many steps by the forward process and
  repeats them, ``resamples`` times in all, so the two parts agree.
- :class:`InvertRun`: deterministic DDIM inversion (image -> x_T); :func:`decode_run` is
  the way back.

An :class:`Edit` is a request kind. Like a sampler it declares its options
(:class:`~runtime.options.Option`), and for each block of a request's images it makes a
run with :class:`~runtime.run.Run`'s interface (``x``, ``t``, ``advance``, ``done``),
which :class:`~runtime.pipeline.Pipeline` and the batching scheduler step one network
call at a time: edit rows share network calls with sampling rows, and image k of a request
depends on (seed, k) only. A new kind is one registered class here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from .errors import OptionError
from .metadata import ModelRecord
from .options import Option, SampleOptions, show_value
from .run import Run, run_kwargs
from .samplers.base import sampler_class
from .samplers.noise import Noise, draw_noise
from .schedule import Schedule

EDITS: dict[str, type[Edit]] = {}


def register(cls: type[Edit]) -> type[Edit]:
    if cls.name in EDITS:
        raise ValueError(f"edit {cls.name!r} is registered twice")
    EDITS[cls.name] = cls
    return cls


def edit_class(name: str) -> type[Edit]:
    try:
        return EDITS[name]
    except KeyError:
        raise ValueError(f"unknown edit {name!r}; expected one of {tuple(EDITS)}") from None


class Edit:
    """A request on given images: float32 ``images`` [N, C, H, W] in the model's data range
    (see :func:`images_from_uint8`), ``mask`` (kinds that take one) and the kind's options.

    Subclasses set ``name``, ``options`` and implement :meth:`calls` and :meth:`make_run`.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    takes_mask: ClassVar[bool] = False

    def __init__(self, images: np.ndarray, *, mask: np.ndarray | None = None, **params):
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        if self.images.ndim != 4:
            raise ValueError(f"images must be float32 [N, C, H, W], got {self.images.shape}")
        if mask is not None and not self.takes_mask:
            raise OptionError("mask", f"{self.name} takes no mask")
        own = {o.name: o for o in self.options}
        unknown = sorted(set(params) - set(own))
        if unknown:
            raise OptionError(unknown[0], f"unknown option {unknown[0]!r} for {self.name}; "
                              f"it takes {', '.join(own) or 'none'}", kind="type")
        self.params = {name: option.check(option.default if params.get(name) is None
                                          else params[name]) for name, option in own.items()}
        self.mask = mask

    @property
    def n(self) -> int:
        return self.images.shape[0]

    def to_dict(self) -> dict[str, Any]:
        """The kind and its options: what a server echoes."""
        return {"edit": self.name, **self.params}

    def check(self, options: SampleOptions) -> None:
        """Raise :class:`OptionError` if the sampling options cannot serve this edit."""

    def calls(self, schedule: Schedule, record: ModelRecord) -> int:
        """Network calls per image on ``schedule`` (the request's respaced chain)."""
        raise NotImplementedError

    def make_run(self, schedule: Schedule, options: SampleOptions, lo: int, hi: int,
                 noise: Noise, record: ModelRecord, *, keep_x0: bool = False) -> Run:
        """The run for images lo..hi-1 of this request (noise: their streams)."""
        raise NotImplementedError


class Finished:
    """A run with nothing to do (img2img at a strength that keeps no step): ``x`` is the
    image. It has the run interface so every caller treats it like any other."""

    done = True
    num_steps = 0
    steps_done = 0
    x0 = None

    def __init__(self, x: np.ndarray):
        self.x = np.array(x, dtype=np.float32, order="C")
        self.shape = self.x.shape

    @property
    def rows(self) -> int:
        return self.shape[0]


@register
class Img2Img(Edit):
    name = "img2img"
    summary = "SDEdit: noise the image part of the way, then denoise it with any sampler"
    options = (Option("strength", float, 0.5, "how far the image is noised before it is "
                      "denoised again: 0 returns it, 1 samples anew", low=0.0, high=1.0),)

    def kept(self, schedule: Schedule, record: ModelRecord) -> int:
        """Steps of ``schedule`` below t = strength x T: the chain this edit runs."""
        limit = self.params["strength"] * record.num_timesteps
        return int(np.count_nonzero(schedule.timesteps < limit))

    def calls(self, schedule, record):
        return self.kept(schedule, record)

    def make_run(self, schedule, options, lo, hi, noise, record, *, keep_x0=False):
        k = self.kept(schedule, record)
        image = self.images[lo:hi]
        if k == 0:
            return Finished(image)
        shape = image.shape
        start = None  # the whole chain: x_T is pure noise, as in sampling
        if k < schedule.num_timesteps:
            # q(x_t | x_0) at the first step run (k - 1), with the first draw of the stream.
            start = schedule.q_sample(image.astype(np.float64), k - 1,
                                      draw_noise(noise, shape))
        return Run(schedule.first(k), options, shape, noise, start=start, keep_x0=keep_x0,
                   **run_kwargs(record))


@register
class Inpaint(Edit):
    name = "inpaint"
    summary = "RePaint: sample the pixels the mask does not keep, with resampling"
    takes_mask = True
    # Bounded: the calls grow as resamples x steps, and the walk is a list of them.
    options = (
        Option("jump_length", int, 10, "steps gone back by each resampling jump", low=1,
               high=1000),
        Option("resamples", int, 10, "times each stretch of jump_length steps is run "
               "(1: no resampling)", low=1, high=100),
    )

    def __init__(self, images, *, mask=None, **params):
        if mask is None:
            raise OptionError("mask", "inpaint needs a mask: 1 (white) where the image is "
                              "kept, 0 (black) where it is filled in")
        super().__init__(images, mask=mask, **params)
        if mask.shape[0] not in (1, self.n):
            raise OptionError("mask", f"{mask.shape[0]} masks were given for {self.n} images; "
                              "give one mask for all or one per image")

    def check(self, options: SampleOptions) -> None:
        if self.params["resamples"] > 1 and not sampler_class(options.sampler).restartable:
            able = _restartable()
            raise OptionError("sampler", f"inpainting with resamples > 1 jumps back in time, "
                              f"which the {options.sampler} sampler cannot (its steps read "
                              f"the steps before); use one of {able} or resamples 1")

    def plan(self, num_steps: int) -> list[int]:
        return repaint_plan(num_steps, self.params["jump_length"], self.params["resamples"])

    def calls(self, schedule, record):
        """Without building the walk: every step once, and each of the jumps
        (one per jump_length steps below the top stretch) repeats jump_length steps
        resamples - 1 more times."""
        n, jump, resamples = (schedule.num_timesteps, self.params["jump_length"],
                              self.params["resamples"])
        return n + (resamples - 1) * jump * len(range(0, n - jump, jump))

    def make_run(self, schedule, options, lo, hi, noise, record, *, keep_x0=False):
        keep = self.mask if self.mask.shape[0] == 1 else self.mask[lo:hi]
        return InpaintRun(schedule, options, self.images[lo:hi].shape, noise,
                          image=self.images[lo:hi], keep=keep,
                          plan=self.plan(schedule.num_timesteps), keep_x0=keep_x0,
                          **run_kwargs(record))


def _restartable() -> list[str]:
    from .samplers import REGISTRY

    return [name for name, cls in REGISTRY.items() if cls.restartable]


def repaint_plan(num_steps: int, jump_length: int, resamples: int) -> list[int]:
    """The schedule indices RePaint visits, in order (Lugmayr et al., fig. 9): a step down
    is a reverse step (a network call), a step up one step of the forward process. The same
    walk as diffusers' ``RePaintScheduler.set_timesteps``, in indices of the chain."""
    jumps = {j: resamples - 1 for j in range(0, num_steps - jump_length, jump_length)}
    plan, t = [], num_steps
    while t >= 1:
        t -= 1
        plan.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                plan.append(t)
    return plan


def forward_steps(plan: list[int]) -> list[int]:
    """Per network call of a RePaint plan: the forward steps that follow it."""
    ups: list[int] = []
    for prev, i in zip([plan[0] + 1, *plan], plan, strict=False):
        if i < prev:
            ups.append(0)
        else:
            ups[-1] += 1
    return ups


class InpaintRun(Run):
    """RePaint over ``schedule`` with any restartable sampler for the unknown pixels.

    Each reverse step takes one draw of noise, used by the sampler (if it takes noise) and
    by the known pixels' forward process (the two touch disjoint pixels), then each step of
    a jump back takes one more: the order diffusers' RePaint draws in.
    """

    def __init__(self, schedule, options, shape, noise, *, image, keep, plan, **kwargs):
        super().__init__(schedule, options, shape, noise, **kwargs)
        self.image = image.astype(np.float64)
        self.keep = np.broadcast_to(np.asarray(keep, bool), self.shape)
        self._ups = forward_steps(plan)
        self._calls = 0
        self._noised = np.empty(self.shape, np.float64)

    @property
    def num_steps(self) -> int:
        return len(self._ups)

    @property
    def steps_done(self) -> int:
        return self._calls

    @property
    def done(self) -> bool:
        return self._calls >= len(self._ups)

    def advance(self, output: np.ndarray, *, finite: bool = False) -> None:
        s, sched = self.sampler, self.schedule
        i = s.index
        eps = self.eps_of(output, i, finite=finite)
        if self.keep_x0:
            self.x0 = self.predicted_x0(eps, i)
        z = draw_noise(self.noise, self.shape)
        s.step(self.x, eps, z if s.needs_noise else None)
        # The kept pixels at step i - 1: q(x_{i-1} | image), 1 at i = 0 (the image itself).
        ab_prev = sched.alphas_cumprod_prev[i]
        np.multiply(self.image, np.sqrt(ab_prev), out=self._noised)
        self._noised += np.sqrt(1.0 - ab_prev) * z
        np.copyto(self.x, self._noised, where=self.keep, casting="same_kind")
        for _ in range(self._ups[self._calls]):
            # x at index j - 1 -> j, with the step's own beta: q(x_j | x_{j-1}).
            j = s.index + 1
            beta = sched.betas[j]
            z = draw_noise(self.noise, self.shape)
            np.copyto(self.x, np.sqrt(1.0 - beta) * self.x.astype(np.float64)
                      + np.sqrt(beta) * z, casting="same_kind")
            s.k -= 1
        self._calls += 1


class InvertRun(Run):
    """Deterministic DDIM inversion: ``image`` -> x_T over ``schedule``'s steps, ascending.

    The network is asked for eps at step i on the state one step below it (the usual
    approximation, exact as the steps get small), then x moves up:
    x_i = sqrt(ab_i) x0 + sqrt(1 - ab_i) eps with x0 = (x - sqrt(1 - ab_{i-1}) eps) /
    sqrt(ab_{i-1}). Unclipped, as :func:`decode_run` is, so the two are inverse steps.
    """

    def __init__(self, schedule: Schedule, image: np.ndarray, *, prediction: str = "eps"):
        super().__init__(schedule, SampleOptions.make("ddim"), image.shape, None, start=image,
                         clip_range=None, prediction=prediction)
        self._k = 0

    @property
    def t(self) -> float:
        return float(self.schedule.timesteps[self._k])

    @property
    def done(self) -> bool:
        return self._k >= self.schedule.num_timesteps

    @property
    def steps_done(self) -> int:
        return self._k

    def advance(self, output: np.ndarray, *, finite: bool = False) -> None:
        s, i = self.schedule, self._k
        eps = self.eps_of(output, i, finite=finite).astype(np.float64)
        ab_below = s.alphas_cumprod_prev[i]
        x0 = (self.x - np.sqrt(1.0 - ab_below) * eps) / np.sqrt(ab_below)
        np.copyto(self.x, s.sqrt_alphas_cumprod[i] * x0 + s.sqrt_one_minus_alphas_cumprod[i]
                  * eps, casting="same_kind")
        self._k += 1


def decode_run(schedule: Schedule, latent: np.ndarray, record: ModelRecord) -> Run:
    """Deterministic DDIM (eta 0, unclipped) from ``latent`` at the chain's last step: the
    inverse of :class:`InvertRun` on the same schedule."""
    return Run(schedule, SampleOptions.make("ddim", eta=0.0), latent.shape, None,
               start=latent, clip_range=None, prediction=record.prediction)


def slerp(a: np.ndarray, b: np.ndarray, w: float) -> np.ndarray:
    """Spherical interpolation between latents (Gaussian vectors keep their norm along it,
    a linear mix shrinks toward 0 midway): a at w = 0, b at w = 1."""
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    cos = np.dot(a64, b64) / (np.linalg.norm(a64) * np.linalg.norm(b64))
    theta = np.arccos(np.clip(cos, -1.0, 1.0))
    if theta < 1e-6:  # (nearly) parallel: the linear mix is the limit
        return ((1.0 - w) * a64 + w * b64).reshape(a.shape)
    mixed = (np.sin((1.0 - w) * theta) * a64 + np.sin(w * theta) * b64) / np.sin(theta)
    return mixed.reshape(a.shape)


# === Images and masks in ===

def images_from_uint8(images, image_shape: Sequence[int], data_range, *,
                      name: str = "image") -> np.ndarray:
    """uint8 [H, W, C] or [N, H, W, C] (what ``Pipeline.sample`` returns, what a PNG holds)
    -> float32 [N, C, H, W] in ``data_range``; ValueError naming ``name`` on a wrong dtype,
    size or channel count."""
    arr = np.asarray(images)
    c, h, w = (int(s) for s in image_shape)
    if arr.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 pixels [H, W, C] or [N, H, W, C] (0-255), got "
                         f"dtype {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be [H, W, C] or [N, H, W, C], got shape {arr.shape}")
    if arr.shape[1:3] != (h, w):
        raise ValueError(f"{name} is {arr.shape[2]}x{arr.shape[1]} pixels but the model takes "
                         f"{w}x{h}; resize it first")
    if arr.shape[3] != c:
        raise ValueError(f"{name} has {arr.shape[3]} channel(s) but the model takes {c} "
                         f"({_channels(c)}); convert it first")
    lo, hi = (float(v) for v in data_range)
    out = arr.transpose(0, 3, 1, 2).astype(np.float64) * ((hi - lo) / 255.0) + lo
    return out.astype(np.float32)


def mask_from_array(mask, image_shape: Sequence[int], *, name: str = "mask") -> np.ndarray:
    """A binary mask [H, W], [H, W, C], [N, H, W] or [N, H, W, C]: bool, or numbers that are
    all 0 or 1, or all 0 or 255 -> bool [N or 1, C or 1, H, W] (True: keep the pixel)."""
    arr = np.asarray(mask)
    c, h, w = (int(s) for s in image_shape)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be an array of 0/1 (or 0/255) values, got dtype "
                         f"{arr.dtype}")
    if arr.ndim == 2:
        arr = arr[None, :, :, None]
    elif arr.ndim == 3:
        arr = arr[None] if arr.shape[:2] == (h, w) and arr.shape[2] in (1, c) else arr[..., None]
    if arr.ndim != 4 or arr.shape[1:3] != (h, w) or arr.shape[3] not in (1, c):
        raise ValueError(f"{name} has shape {np.shape(mask)}; it must cover the model's "
                         f"{w}x{h} images: [H, W], [H, W, C], [N, H, W] or [N, H, W, C]")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf; it must be 0 or 1 everywhere")
    values = np.unique(arr)
    if arr.dtype != bool and not (set(values.tolist()) <= {0, 1}
                                  or set(values.tolist()) <= {0, 255}):
        shown = ", ".join(show_value(v) for v in values[:5].tolist())
        raise ValueError(f"{name} is not binary: it has the values {shown}"
                         f"{' ...' if values.size > 5 else ''}; use 0 (fill in) and 1 or 255 "
                         "(keep)")
    keep = arr.astype(bool).transpose(0, 3, 1, 2)
    if keep.all():
        raise ValueError(f"{name} keeps every pixel, so there is nothing to inpaint; mark the "
                         "pixels to fill in with 0 (black)")
    return keep


def _channels(c: int) -> str:
    return {1: "greyscale", 3: "RGB"}.get(c, f"{c} channels")


def broadcast_images(images: np.ndarray, n: int | None) -> np.ndarray:
    """``images`` [N, ...] as the request's n images: one image repeated n times, or N
    images when n is None or N."""
    if n is None or n == images.shape[0]:
        return images
    if images.shape[0] == 1:
        return np.repeat(images, n, axis=0)
    raise OptionError("n", f"n is {n} but {images.shape[0]} images were given; give one image "
                      "(repeated n times) or leave n out")


def make_edit(kind: str, images: np.ndarray, *, mask: np.ndarray | None = None,
              params: Mapping[str, Any] | None = None) -> Edit:
    cls = edit_class(kind)
    return cls(images, mask=mask, **dict(params or {}))


def edit_option_names() -> dict[str, Option]:
    """Every edit option by name (for request parsing and the CLI)."""
    return {o.name: o for cls in EDITS.values() for o in cls.options}
