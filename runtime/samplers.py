"""Sampling loops over a plain ``eps_fn(x, t) -> eps`` callable, in numpy.

The network is an argument, never a field: an ONNX Runtime session, a TensorRT
engine, the torch model or a closed-form test model all plug in the same way.
``t`` handed to ``eps_fn`` is always the original T-step index (float32 [B]),
also when sampling a respaced chain.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from .errors import NonFiniteError
from .schedule import Schedule

SAMPLERS = ("ddpm", "ddim")
EpsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


class ImageNoise:
    """One noise stream per image, so image k of a seed never depends on the batch.

    Image k's generator is seeded by ``SeedSequence(seed, spawn_key=(k,))``,
    the k-th child of ``SeedSequence(seed).spawn``. Draws are buffered up to ``chunk``
    steps at a time per image (fewer when a step's noise is large, so the buffer stays
    under ``max_bytes``): one numpy call per image per chunk, not per step. A stream's
    values do not depend on the chunking.
    """

    def __init__(self, seed: int, indices: Sequence[int] | int, *, chunk: int = 64,
                 max_bytes: int = 32 << 20):
        if isinstance(indices, (int, np.integer)):
            indices = range(int(indices))
        self.indices = [int(k) for k in indices]
        if not self.indices:
            raise ValueError("ImageNoise needs at least one image index")
        self._generators = [
            np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(k,))))
            for k in self.indices
        ]
        self._chunk, self._max_bytes = chunk, max_bytes
        self._buffer: np.ndarray | None = None
        self._pos = 0

    def __len__(self) -> int:
        return len(self.indices)

    def standard_normal(self, shape: Sequence[int]) -> np.ndarray:
        """Next draw of float32 N(0, I) noise, shape ``(len(self), *shape)``.

        The result is a view into the buffer, valid until the next call.
        """
        shape = tuple(shape)
        if (self._buffer is None or self._pos == self._buffer.shape[1]
                or self._buffer.shape[2:] != shape):
            step_bytes = len(self) * 4 * math.prod(shape)
            chunk = max(1, min(self._chunk, self._max_bytes // max(step_bytes, 1)))
            if self._buffer is None or self._buffer.shape[1:] != (chunk, *shape):
                self._buffer = np.empty((len(self), chunk, *shape), np.float32)
            for generator, rows in zip(self._generators, self._buffer, strict=True):
                generator.standard_normal(dtype=np.float32, out=rows)
            self._pos = 0
        out = self._buffer[:, self._pos]
        self._pos += 1
        return out


Noise = np.random.Generator | ImageNoise


def draw_noise(rng: Noise, shape: Sequence[int]) -> np.ndarray:
    """float32 N(0, I) of ``shape`` ([B, ...]) from a Generator or per-image streams."""
    if isinstance(rng, ImageNoise):
        if len(rng) != shape[0]:
            raise ValueError(f"ImageNoise has {len(rng)} streams but the batch is {shape[0]}")
        return rng.standard_normal(shape[1:])
    if isinstance(rng, np.random.Generator):
        return rng.standard_normal(tuple(shape), dtype=np.float32)
    raise TypeError(f"rng must be a numpy.random.Generator or ImageNoise, got {type(rng).__name__}")


def sample(eps_fn: EpsFn, schedule: Schedule, shape: Sequence[int], rng: Noise, *,
           sampler: str = "ddpm", variance: str = "fixedlarge", eta: float = 0.0,
           clip_x0: bool = True, clip_range=(-1.0, 1.0),
           callback: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
    """Draw x_0 of ``shape`` by running ``schedule`` (full or respaced) from x_T ~ N(0, I).

    ``sampler="ddpm"`` is the paper's ancestral sampler (Algorithm 2) with
    ``variance`` "fixedlarge" (sigma^2 = beta) or "fixedsmall" (the posterior's);
    ``sampler="ddim"`` is Song et al.'s sampler with noise scale ``eta``.
    Noise order per stream: x_T first, then one draw per step with t > 0.
    ``callback(i, x)`` runs after each step with the steps done so far; ``x`` is the
    sampler's state, updated in place by the next step: copy it to keep it.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be [B, ...] with positive sizes, got {shape}")
    # Built first: it checks the mode strings before a network call is spent.
    step = _Stepper(schedule, shape, sampler=sampler, variance=variance, eta=eta,
                    clip_x0=clip_x0, clip_range=clip_range)
    x = np.array(draw_noise(rng, shape), dtype=np.float32, order="C")  # owned, updated in place
    t_model = np.empty(shape[0], np.float32)
    for done, i in enumerate(range(schedule.num_timesteps - 1, -1, -1), start=1):
        t_model.fill(schedule.timesteps[i])
        eps = np.asarray(eps_fn(x, t_model))
        if eps.shape != shape:
            raise ValueError(f"eps_fn returned shape {eps.shape}, expected {shape}")
        if not np.isfinite(eps).all():
            raise NonFiniteError(
                f"the network returned NaN or inf at step t={int(schedule.timesteps[i])} "
                f"({done} of {schedule.num_timesteps}); check the model file and its inputs"
            )
        needs_noise = i > 0 and (sampler == "ddpm" or eta > 0)
        step(x, i, eps, draw_noise(rng, shape) if needs_noise else None)
        if callback is not None:
            callback(done, x)
    return x


class _Stepper:
    """The loop's step math: :meth:`Schedule.step` and :meth:`Schedule.ddim_step` for a
    whole batch at one step, equal to them bit for bit (tested), without their per-call
    checks and allocations: coefficients are looked up in a table built once, and the
    float64 work happens in two reused buffers. Updates the float32 state in place.
    """

    def __init__(self, schedule: Schedule, shape, *, sampler: str, variance: str, eta: float,
                 clip_x0: bool, clip_range):
        s = schedule
        if sampler == "ddpm":
            columns = [s.posterior_mean_coef1, s.posterior_mean_coef2, s.sigma(variance)]
        else:
            sigma = s.ddim_sigma(eta)
            columns = [np.sqrt(s.alphas_cumprod_prev),
                       np.sqrt(np.maximum(1.0 - s.alphas_cumprod_prev - sigma**2, 0.0)), sigma]
        # Row i: sqrt(1/ab), sqrt(1/ab - 1), then the sampler's three coefficients.
        self.table = np.stack([s.sqrt_recip_alphas_cumprod, s.sqrt_recipm1_alphas_cumprod,
                               *columns], axis=1)
        self.ddim = sampler == "ddim"
        self.clip = (float(clip_range[0]), float(clip_range[1])) if clip_x0 else None
        self.x0 = np.empty(shape, np.float64)
        self.tmp = np.empty(shape, np.float64)

    def __call__(self, x: np.ndarray, i: int, eps: np.ndarray, noise: np.ndarray | None):
        recip, recipm1, c1, c2, sigma = self.table[i]
        x0, tmp = self.x0, self.tmp
        # 1. x_0 from eps, eq. (15) solved for x_0, clipped to the data range.
        np.multiply(x, recip, out=tmp, dtype=np.float64)
        np.multiply(eps, recipm1, out=x0, dtype=np.float64)
        np.subtract(tmp, x0, out=x0)
        if self.clip is not None:
            np.clip(x0, *self.clip, out=x0)
        if self.ddim:
            # 2. DDIM: eps re-derived from the clipped x_0, then eq. (12) of Song et al.
            if self.clip is not None:
                np.subtract(tmp, x0, out=tmp)
                np.divide(tmp, recipm1, out=tmp)
                np.multiply(tmp, c2, out=tmp)
            else:
                np.multiply(eps, c2, out=tmp, dtype=np.float64)
            np.multiply(x0, c1, out=x0)
        else:
            # 2. DDPM: the posterior mean, eq. (7).
            np.multiply(x0, c1, out=x0)
            np.multiply(x, c2, out=tmp, dtype=np.float64)
        np.add(x0, tmp, out=x0)
        # 3. sigma_t z, except at the last step.
        if noise is not None:
            np.multiply(noise, sigma, out=tmp, dtype=np.float64)
            np.add(x0, tmp, out=x0)
        np.copyto(x, x0, casting="same_kind")
