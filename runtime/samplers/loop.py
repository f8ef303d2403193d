"""The sampling loop: a registered sampler driven by a network callable."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..errors import NonFiniteError
from ..schedule import Schedule
from .base import REGISTRY, make_sampler, sampler_class
from .noise import Noise, draw_noise

EpsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
# The loop's options and their defaults; each sampler takes the ones it lists.
OPTION_DEFAULTS = {"variance": "fixedlarge", "eta": 0.0}


def sampler_options(sampler: str, **options) -> dict:
    """The options ``sampler`` takes; the others must be None or at their default."""
    takes = sampler_class(sampler).options
    for key, value in options.items():
        if key not in takes and value is not None and value != OPTION_DEFAULTS.get(key):
            raise ValueError(f"{key} does not apply to the {sampler} sampler (only to "
                             f"{', '.join(n for n in REGISTRY if key in REGISTRY[n].options)})")
    return {k: v for k, v in options.items() if k in takes and v is not None}


def sample(eps_fn: EpsFn, schedule: Schedule, shape: Sequence[int], rng: Noise, *,
           sampler: str = "ddpm", variance: str = "fixedlarge", eta: float = 0.0,
           clip_x0: bool = True, clip_range=(-1.0, 1.0),
           callback: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
    """Draw x_0 of ``shape`` by running ``schedule`` (full or respaced) from x_T ~ N(0, I).

    ``sampler`` is a registered name (``runtime.samplers.SAMPLERS``): "ddpm" is the
    paper's ancestral sampler with ``variance`` "fixedlarge" (sigma^2 = beta, the
    default) or "fixedsmall"; "ddim" is Song et al.'s with noise scale ``eta`` (default
    0); "dpmpp_2m", "dpmpp_3m" and "unipc" are deterministic multistep solvers. An
    option the sampler does not take must keep its default. ``eps_fn`` gets ``t`` as float32 [B]
    of original T-step indices, also on a respaced chain. Noise order per stream: x_T
    first, then one draw per step that takes noise. ``callback(i, x)`` runs after each
    step with the steps done so far; ``x`` is the state, updated in place by the next
    step: copy it to keep it.
    """
    shape = tuple(int(s) for s in shape)
    # Built first: it checks the options before a network call is spent.
    solver = make_sampler(sampler, schedule, shape, clip_x0=clip_x0, clip_range=clip_range,
                          **sampler_options(sampler, variance=variance, eta=eta))
    x = np.array(draw_noise(rng, shape), dtype=np.float32, order="C")  # owned, updated in place
    t_model = np.empty(shape[0], np.float32)
    while not solver.done:
        t_model.fill(solver.t)
        eps = np.asarray(eps_fn(x, t_model))
        if eps.shape != shape:
            raise ValueError(f"eps_fn returned shape {eps.shape}, expected {shape}")
        if not np.isfinite(eps).all():
            raise NonFiniteError(
                f"the network returned NaN or inf at step t={int(solver.t)} "
                f"({solver.k + 1} of {solver.num_steps}); check the model file and its inputs"
            )
        solver.step(x, eps, draw_noise(rng, shape) if solver.needs_noise else None)
        if callback is not None:
            callback(solver.k, x)
    return x
