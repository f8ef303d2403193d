"""The sampling loop: a registered sampler driven by a network callable."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..schedule import Schedule
from .noise import Noise

EpsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def sample(eps_fn: EpsFn, schedule: Schedule, shape: Sequence[int], rng: Noise, *,
           sampler: str = "ddpm", clip_x0: bool = True, clip_range=(-1.0, 1.0),
           callback: Callable[[int, np.ndarray], None] | None = None,
           prediction: str = "eps", **options) -> np.ndarray:
    """Draw x_0 of ``shape`` by running ``schedule`` (full or respaced) from x_T ~ N(0, I).

    ``sampler`` is a registered name (``runtime.samplers.SAMPLERS``); ``options`` are the
    sampler's own (``variance`` for "ddpm": "fixedlarge", sigma^2 = beta, the default, or
    "fixedsmall"; ``eta`` for "ddim", default 0), checked against its schema: an option it
    does not take must keep its default. ``eps_fn`` gets ``t`` as float32 [B] of original
    T-step indices, also on a respaced chain. Noise order per stream: x_T first, then one
    draw per step that takes noise. ``callback(i, x)`` runs after each step with the steps
    done so far; ``x`` is the state, updated in place by the next step: copy it to keep it.
    ``prediction``: what ``eps_fn`` returns, "eps" (the default), "v" or "x0".
    """
    from ..options import SampleOptions
    from ..run import Run

    opts = SampleOptions.make(sampler, **options)
    run = Run(schedule, opts, shape, rng, clip_range=clip_range if clip_x0 else None,
              prediction=prediction)
    t_model = np.empty(run.rows, np.float32)
    while not run.done:
        t_model.fill(run.t)
        run.advance(eps_fn(run.x, t_model))
        if callback is not None:
            callback(run.steps_done, run.x)
    return run.x
