"""Noise streams for the samplers: a numpy Generator, or one stream per image."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


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
