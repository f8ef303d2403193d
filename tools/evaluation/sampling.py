"""Sampling for the evaluation: cached per configuration, timed."""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import numpy as np


def sample_timed(pipe, n, seed, sampler, steps, batch_size, cache: Path | None, progress=True,
                 variance="fixedlarge", spacing="linspace"):
    """Images and wall time; reuses ``cache`` (.npz) from an identical earlier run."""
    from runtime.metadata import sha256_file
    from runtime.util.fileio import write_bytes

    steps = steps or pipe.record.num_timesteps
    key = {"model_sha256": sha256_file(pipe.source), "n": n, "seed": seed,
           "sampler": sampler, "steps": steps}
    if sampler == "ddpm" and variance != "fixedlarge":
        key["variance"] = variance
    if spacing != "linspace" and steps < pipe.record.num_timesteps:
        key["spacing"] = spacing
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if json.loads(str(z["key"])) == key:
                return z["images"], float(z["seconds"])
    start = time.perf_counter()
    images = pipe.sample_float(n, seed, sampler=sampler, steps=steps, spacing=spacing,
                               variance=variance, batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - start
    if cache is not None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, images=images, seconds=seconds, key=json.dumps(key))
        write_bytes(cache, buffer.getvalue())
    return images, seconds


def timed_images_per_s(pipe, images: int, sampler: str, steps: int, repeats: int = 2,
                       spacing: str = "linspace") -> float:
    """Best of ``repeats`` timings of ``images`` images in one batch: on a shared machine the
    fastest run is the one least disturbed by other jobs."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        pipe.sample_float(images, 0, sampler=sampler, steps=steps, spacing=spacing,
                          batch_size=images, progress=False)
        best = min(best, time.perf_counter() - start)
    return images / best
