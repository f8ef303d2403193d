"""The stepping core: one sampler run over a block of images, one network call at a time.

A :class:`Run` owns what one block of images needs between network calls: the sampler
(its coefficient tables and multistep history), the noise streams, the state ``x`` and
the step's ``t``. The caller evaluates the network on ``run.x`` at ``run.t`` (alone, or
as rows of a larger batch) and hands the result to :meth:`Run.advance`, which checks it
and steps. :func:`runtime.samplers.sample`, :class:`~runtime.pipeline.Pipeline` and the
batching scheduler (:mod:`runtime.serving.scheduler`) all step through this class, so an
image served in a shared batch is the image the library draws, by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import NonFiniteError
from .options import SampleOptions
from .samplers.base import sampler_class
from .samplers.noise import ImageNoise, Noise, draw_noise
from .schedule import Schedule
from .stepmath import PREDICTIONS, eps_from_output, predict_x0


class Run:
    """Sample ``shape`` ([B, C, H, W]) on ``schedule`` (already respaced) with ``options``.

    ``noise``: a numpy Generator or :class:`~runtime.samplers.ImageNoise` (one stream per
    image); x_T is its first draw, then one draw per step that takes noise. The sampler
    predicts x_0 clipped to ``clip_range`` (None: unclipped). ``prediction``: what the
    network returns (the model record's ``prediction``: "eps", "v" or "x0"); the samplers
    step on the eps it implies, computed here in float64.

    ``start``: the state x to start from (at the schedule's last step), instead of x_T
    drawn from ``noise``: an edit's noised image. ``keep_x0``: after each step, ``x0``
    holds the x_0 the network predicted at that step (clipped like the sampler's), for
    progressive previews.
    """

    def __init__(self, schedule: Schedule, options: SampleOptions, shape: Sequence[int],
                 noise: Noise, *, clip_range=(-1.0, 1.0), prediction: str = "eps",
                 start: np.ndarray | None = None, keep_x0: bool = False):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of "
                             f"{PREDICTIONS}")
        self.shape = tuple(int(s) for s in shape)
        # Built first: it checks the shape before noise is drawn. The options were checked
        # when SampleOptions was made, so the class is built without checking them again.
        self.sampler = sampler_class(options.sampler)(
            schedule, self.shape, clip_x0=clip_range is not None,
            clip_range=(-1.0, 1.0) if clip_range is None else clip_range, **options.kwargs)
        self.noise = noise
        self.prediction = prediction
        self.schedule = schedule
        self._eps = None if prediction == "eps" else np.empty(self.shape, np.float64)
        self.clip = clip_range
        self.keep_x0 = keep_x0
        self.x0: np.ndarray | None = None
        # Owned, C-contiguous float32: the sampler updates it in place.
        if start is None:
            start = draw_noise(noise, self.shape)
        elif np.shape(start) != self.shape:
            raise ValueError(f"start has shape {np.shape(start)}, expected {self.shape}")
        self.x = np.array(start, dtype=np.float32, order="C")

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def done(self) -> bool:
        return self.sampler.done

    @property
    def t(self) -> float:
        """The network's t for this step (an index of the original T-step chain)."""
        return self.sampler.t

    @property
    def steps_done(self) -> int:
        return self.sampler.k

    @property
    def num_steps(self) -> int:
        return self.sampler.num_steps

    def advance(self, output: np.ndarray, *, finite: bool = False) -> None:
        """One step with the network's output for this run's rows: checked for shape and
        NaN/inf (:class:`~runtime.errors.NonFiniteError` names the step; ``finite``: the
        caller has checked the whole batch it came from), turned into eps if the network
        predicts v or x_0, then ``x`` is updated in place."""
        s = self.sampler
        eps = self.eps_of(output, s.index, finite=finite)
        if self.keep_x0:
            self.x0 = self.predicted_x0(eps, s.index)
        s.step(self.x, eps, draw_noise(self.noise, self.shape) if s.needs_noise else None)

    def eps_of(self, output: np.ndarray, index: int, *, finite: bool = False) -> np.ndarray:
        """The network's output at schedule ``index`` for ``x``, checked, as eps."""
        eps = np.asarray(output)
        if eps.shape != self.shape:
            raise ValueError(f"the network returned shape {eps.shape}, expected {self.shape}")
        if not finite and not np.isfinite(eps).all():
            raise NonFiniteError(
                f"the network returned NaN or inf at step t={int(self.t)} "
                f"({self.steps_done + 1} of {self.num_steps}); check the model file and its "
                "inputs")
        if self._eps is None:
            return eps
        return eps_from_output(self.prediction, self.x, eps,
                               self.schedule.sqrt_alphas_cumprod[index],
                               self.schedule.sqrt_one_minus_alphas_cumprod[index], self._eps)

    def predicted_x0(self, eps: np.ndarray, index: int) -> np.ndarray:
        """float32 x_0 predicted from ``x`` and ``eps`` at schedule ``index``."""
        s = self.schedule
        x0 = predict_x0(self.x, eps, s.sqrt_recip_alphas_cumprod[index],
                        s.sqrt_recipm1_alphas_cumprod[index], self.clip,
                        np.empty(self.shape), np.empty(self.shape))
        return x0.astype(np.float32)


def run_kwargs(record) -> dict:
    """How a model's record (:class:`~runtime.metadata.ModelRecord`) asks to step: its clip
    range and what its network predicts."""
    return {"clip_range": record.data_range if record.clip_x0 else None,
            "prediction": record.prediction}


def image_run(schedule: Schedule, options: SampleOptions, record, seed: int,
              indices: range, *, keep_x0: bool = False) -> Run:
    """The run that draws images ``indices`` of ``seed`` with the model of ``record``: the
    one the library and the batch scheduler both step."""
    return Run(schedule, options, (len(indices), *record.image_shape),
               ImageNoise(seed, indices), keep_x0=keep_x0, **run_kwargs(record))
