"""Preview grids: EMA samples drawn with the torch reference sampler, written as PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from runtime.samplers import ImageNoise
from runtime.schedule import Schedule

from .reference import reference_sample


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] float [N, C, H, W] -> uint8 [N, H, W, C]."""
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def image_grid(images: np.ndarray, *, min_cell: int = 64) -> Image.Image:
    """Tile uint8 [N, H, W, C] into a square-ish grid, scaled up (nearest) to >= min_cell px.

    Cells are parted by white gaps of half a scaled pixel: digits touch their borders.
    """
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    scale = max(1, math.ceil(min_cell / max(h, w)))
    pad = max(1, scale // 2)
    ch, cw = h * scale, w * scale
    grid = np.full((rows * (ch + pad) + pad, cols * (cw + pad) + pad, c), 255, dtype=np.uint8)
    for k in range(n):
        r, col = divmod(k, cols)
        cell = images[k].repeat(scale, axis=0).repeat(scale, axis=1)
        top, left = pad + r * (ch + pad), pad + col * (cw + pad)
        grid[top:top + ch, left:left + cw] = cell
    return Image.fromarray(grid[..., 0] if c == 1 else grid, mode="L" if c == 1 else "RGB")


def write_preview(path: Path, model: nn.Module, schedule: Schedule, *, count: int, steps: int,
                  image_shape: tuple[int, int, int], seed: int,
                  device: torch.device | str) -> Path:
    """Sample ``count`` images on a respaced ``steps``-step chain and save a PNG grid.

    The same seed every time, so successive grids show the same chains improving.
    """
    x = reference_sample(model, schedule.respaced(steps), (count, *image_shape),
                         ImageNoise(seed, count), sampler="ddpm", variance="fixedlarge",
                         device=device)
    tmp = path.with_name(path.name + ".tmp")
    image_grid(to_uint8(x)).save(tmp, format="PNG")
    tmp.replace(path)
    return path
