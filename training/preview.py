"""Preview grids: EMA samples drawn with the torch reference sampler, written as PNG."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from runtime.images import save_grid, to_uint8
from runtime.samplers import ImageNoise
from runtime.schedule import Schedule

from .reference import reference_sample


def write_preview(path: Path, model: nn.Module, schedule: Schedule, *, count: int, steps: int,
                  image_shape: tuple[int, int, int], seed: int,
                  device: torch.device | str, sampler: str = "ddpm",
                  spacing: str = "linspace", prediction: str = "eps") -> Path:
    """Sample ``count`` images on a respaced ``steps``-step chain and save a PNG grid.

    The same seed every time, so successive grids show the same chains improving. Training
    previews with DDPM's ancestral sampler (σ² = β); a distilled student with its own
    sampler, timesteps and ``prediction``.
    """
    x = reference_sample(model, schedule.respaced(steps, spacing), (count, *image_shape),
                         ImageNoise(seed, count), sampler=sampler, variance="fixedlarge",
                         prediction=prediction, device=device)
    return save_grid(to_uint8(x), path)
