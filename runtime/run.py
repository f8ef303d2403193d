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
from .samplers.noise import Noise, draw_noise
from .schedule import Schedule
from .stepmath import PREDICTIONS, eps_from_output


class Run:
    """Sample ``shape`` ([B, C, H, W]) on ``schedule`` (already respaced) with ``options``.

    ``noise``: a numpy Generator or :class:`~runtime.samplers.ImageNoise` (one stream per
    image); x_T is its first draw, then one draw per step that takes noise. The sampler
    predicts x_0 clipped to ``clip_range`` (None: unclipped). ``prediction``: what the
    network returns (the model record's ``prediction``: "eps", "v" or "x0"); the samplers
    step on the eps it implies, computed here in float64.
    """

    def __init__(self, schedule: Schedule, options: SampleOptions, shape: Sequence[int],
                 noise: Noise, *, clip_range=(-1.0, 1.0), prediction: str = "eps"):
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
        # Owned, C-contiguous float32: the sampler updates it in place.
        self.x = np.array(draw_noise(noise, self.shape), dtype=np.float32, order="C")

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

    def advance(self, output: np.ndarray) -> None:
        """One step with the network's output for this run's rows: checked for shape and
        NaN/inf (:class:`~runtime.errors.NonFiniteError` names the step), turned into eps if
        the network predicts v or x_0, then ``x`` is updated in place."""
        eps = np.asarray(output)
        if eps.shape != self.shape:
            raise ValueError(f"the network returned shape {eps.shape}, expected {self.shape}")
        if not np.isfinite(eps).all():
            raise NonFiniteError(
                f"the network returned NaN or inf at step t={int(self.t)} "
                f"({self.steps_done + 1} of {self.num_steps}); check the model file and its "
                "inputs")
        s = self.sampler
        if self._eps is not None:
            i = s.index
            eps = eps_from_output(self.prediction, self.x, eps,
                                  self.schedule.sqrt_alphas_cumprod[i],
                                  self.schedule.sqrt_one_minus_alphas_cumprod[i], self._eps)
        s.step(self.x, eps, draw_noise(self.noise, self.shape) if s.needs_noise else None)
