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


# PNG modes read as they are: 8 bits per value, grey or RGB ("1" is a bilevel mask).
_PNG_MODES = {"L": 1, "RGB": 3}
_MASK_MODES = {"L": 1, "1": 1, "RGB": 3}


def read_png(data: bytes, image_shape, name: str, *, mask: bool = False) -> np.ndarray:
    """PNG bytes -> uint8 [H, W, C] for a model of ``image_shape`` (C, H, W). ValueError,
    naming ``name``, for what is not a PNG, another size (read from the header, before the
    pixels are decoded) or a mode the model cannot take (a greyscale model takes mode L, an
    RGB one RGB; a mask may also be mode 1)."""
    from PIL import Image, UnidentifiedImageError

    c, h, w = (int(s) for s in image_shape)
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
    except (UnidentifiedImageError, OSError, ValueError):
        raise ValueError(f"{name} is not a PNG image") from None
    with image:
        if image.size != (w, h):
            raise ValueError(f"{name} is {image.size[0]}x{image.size[1]} pixels but the model "
                             f"takes {w}x{h}; resize it first")
        modes = _MASK_MODES if mask else _PNG_MODES
        if modes.get(image.mode, 0) not in ((1, c) if mask else (c,)):
            want = {1: "L (8-bit greyscale)", 3: "RGB"}.get(c, f"{c} channels")
            raise ValueError(f"{name} has PNG mode {image.mode}, but the model takes {want}"
                             f"{' (or a mode L/1 mask)' if mask else ''}; convert it first")
        try:
            pixels = np.asarray(image.convert("L") if image.mode == "1" else image)
        except (OSError, ValueError, SyntaxError) as err:
            raise ValueError(f"{name} is a damaged PNG ({err})") from None
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    if mask and image.mode == "1":
        pixels = (pixels > 0).astype(np.uint8) * 255
    return np.ascontiguousarray(pixels, dtype=np.uint8)


def read_image_file(path, image_shape, name: str, *, mask: bool = False) -> np.ndarray:
    """A .png (one image) or .npz (uint8 [N, H, W, C] under 'images', what ``sample --npz``
    writes) -> uint8 [N, H, W, C]; ValueError naming the file and what is wrong."""
    from .util.fileio import read_regular_file

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".npz"):
        raise ValueError(f"{name} {path} must be a .png or an .npz of uint8 images "
                         "[N, H, W, C]")
    try:
        data = read_regular_file(path, MAX_IMAGE_FILE)
    except FileNotFoundError:
        raise ValueError(f"{name} {path} does not exist") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{name} {path} cannot be read: {err.strerror or err}"
                         if isinstance(err, OSError) else f"{name} {path} {err}") from None
    if suffix == ".png":
        return read_png(data, image_shape, f"{name} {path}", mask=mask)[None]
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            images = f["images"] if "images" in f.files else None
            files = sorted(f.files)
    except (OSError, ValueError, EOFError, KeyError) as err:
        raise ValueError(f"{name} {path} is not a readable .npz ({err})") from None
    if images is None:
        raise ValueError(f"{name} {path} has no 'images' array (it has {files}); write uint8 "
                         "[N, H, W, C] under 'images'")
    return images


MAX_IMAGE_FILE = 256 << 20  # a PNG or npz of input images; more is not an image batch
