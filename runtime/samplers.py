"""Sampling loops over a plain ``eps_fn(x, t) -> eps`` callable, in numpy.

The network is an argument, never a field: an ONNX Runtime session, a TensorRT
engine, the torch model or a closed-form test model all plug in the same way.
``t`` handed to ``eps_fn`` is always the original T-step index (float32 [B]),
also when sampling a respaced chain.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .errors import NonFiniteError
from .schedule import Schedule

SAMPLERS = ("ddpm", "ddim")
EpsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


class ImageNoise:
    """One noise stream per image, so image k of a seed never depends on the batch.

    Image k's generator is seeded by ``SeedSequence(seed, spawn_key=(k,))``,
    the k-th child of ``SeedSequence(seed).spawn``. Draws are buffered ``chunk``
    steps at a time per image: one numpy call per image per chunk, not per step.
    """

    def __init__(self, seed: int, indices: Sequence[int] | int, *, chunk: int = 64):
        if isinstance(indices, (int, np.integer)):
            indices = range(int(indices))
        self.indices = [int(k) for k in indices]
        if not self.indices:
            raise ValueError("ImageNoise needs at least one image index")
        self._generators = [
            np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(k,))))
            for k in self.indices
        ]
        self._chunk = chunk
        self._buffer: np.ndarray | None = None
        self._pos = 0

    def __len__(self) -> int:
        return len(self.indices)

    def standard_normal(self, shape: Sequence[int]) -> np.ndarray:
        """Next draw of float32 N(0, I) noise, shape ``(len(self), *shape)``."""
        shape = tuple(shape)
        if self._buffer is None or self._pos == self._chunk or self._buffer.shape[2:] != shape:
            self._buffer = np.stack([
                g.standard_normal((self._chunk, *shape), dtype=np.float32)
                for g in self._generators
            ])
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
    ``callback(i, x)`` runs after each step with the steps done so far.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be [B, ...] with positive sizes, got {shape}")
    # Validate the mode strings before spending a network call.
    if sampler == "ddpm":
        schedule.sigma(variance)
    else:
        schedule.ddim_sigma(eta)
    x = draw_noise(rng, shape)
    for done, i in enumerate(range(schedule.num_timesteps - 1, -1, -1), start=1):
        t_model = np.full(shape[0], schedule.timesteps[i], dtype=np.float32)
        eps = np.asarray(eps_fn(x, t_model))
        if eps.shape != shape:
            raise ValueError(f"eps_fn returned shape {eps.shape}, expected {shape}")
        if not np.all(np.isfinite(eps)):
            raise NonFiniteError(
                f"the network returned NaN or inf at step t={int(schedule.timesteps[i])} "
                f"({done} of {schedule.num_timesteps}); check the model file and its inputs"
            )
        needs_noise = i > 0 and (sampler == "ddpm" or eta > 0)
        noise = draw_noise(rng, shape) if needs_noise else None
        if sampler == "ddpm":
            x = schedule.step(x, i, eps, noise, variance=variance, clip_x0=clip_x0,
                              clip_range=clip_range)
        else:
            x = schedule.ddim_step(x, i, eps, noise, eta=eta, clip_x0=clip_x0,
                                   clip_range=clip_range)
        if callback is not None:
            callback(done, x)
    return x
