"""Image output: data range -> uint8, PNG grids and single PNGs (pillow)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from .util.fileio import write_bytes

PNG_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA


def to_uint8(x: np.ndarray, data_range=(-1.0, 1.0)) -> np.ndarray:
    """float [N, C, H, W] in ``data_range`` -> uint8 [N, H, W, C], rounded and clipped."""
    lo, hi = data_range
    scaled = (np.asarray(x, dtype=np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def make_grid(images: np.ndarray, *, ncol: int | None = None, pad: int | None = None,
              min_size: int = 64) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows, cols, C] image.

    Tiny images are upscaled with nearest neighbour to at least ``min_size`` pixels
    so an 8x8 digit is visible; interpolation would blur its pixels together. Cells are
    parted by white gaps of half a scaled pixel (``pad``), since digits touch their borders.
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    scale = max(1, math.ceil(min_size / max(h, w)))
    pad = max(1, scale // 2) if pad is None else pad
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for k in range(n):
        r, q = divmod(k, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = images[k]
    return grid


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, C] (C = 1 or 3) encoded as PNG: grey for one channel, RGB for three."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(image: np.ndarray, path) -> Path:
    """Write uint8 [H, W, C] (C = 1 or 3) atomically: a reader never sees half a file."""
    return write_bytes(path, png_bytes(image))


def save_grid(images: np.ndarray, path, **kwargs) -> Path:
    return save_png(make_grid(images, **kwargs), path)
