"""Training data: real images only, read from what ships with scikit-learn or the user's files.

``load_dataset(spec, image_size, channels)`` understands:
  ``digits``                        scikit-learn's 1,797 handwritten 8x8 digits (pixels 0..16)
  ``PATH.npz``                      an ``images`` uint8 array: NHWC, NCHW, or [N, H, W]
  ``DIR/`` with cifar-10 batches    CIFAR-10's python format (``data_batch_1`` .. ``data_batch_5``)
  ``DIR/`` with PNG/JPEG files      resized (shorter side) and centre-cropped to ``image_size``
Pixels are kept as integer levels (uint8) and scaled to [-1, 1] per batch, so a large
image set costs a byte per value in memory, not four.
"""

from __future__ import annotations

import math
import pickle
import warnings
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from runtime.util.clierrors import one_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
NPZ_FIX = "write it with np.savez(path, images=uint8_array)"  # how to make a good .npz


class DatasetError(ValueError):
    """A dataset path is missing, empty or not in an expected format (one-line message)."""


@dataclass(frozen=True)
class Dataset:
    """Images as integer levels: ``levels`` uint8 [N, C, H, W] with values 0..num_levels-1."""

    name: str  # "digits", "cifar10", or the file/folder name
    spec: str  # "digits" or the absolute path of the file/folder: enough to load it again
    levels: np.ndarray
    num_levels: int  # 17 for digits (0..16), 256 for 8-bit images

    def __len__(self) -> int:
        return int(self.levels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.levels.shape[1:])

    @property
    def images(self) -> np.ndarray:
        """All images as float32 [N, C, H, W] in [-1, 1] (a full float copy)."""
        return to_unit_range(self.levels, self.num_levels)


def to_unit_range(levels, num_levels: int):
    """Integer levels 0..L-1 -> float32 in [-1, 1]; numpy arrays or torch tensors."""
    scale = 2.0 / (num_levels - 1)
    if isinstance(levels, np.ndarray):
        return levels.astype(np.float32) * np.float32(scale) - np.float32(1.0)
    return levels.float() * scale - 1.0


def load_dataset(spec: str, image_size: int, channels: int) -> Dataset:
    """Load ``spec`` (see the module docstring) as images of [channels, image_size, image_size]."""
    if spec == "digits":
        return _digits(image_size, channels)
    if not str(spec).strip():
        raise DatasetError("empty data path (it would read the current folder); pass 'digits', "
                           "an .npz, a folder of images or cifar-10-batches-py")
    path = Path(spec).expanduser()
    if not path.exists():
        raise DatasetError(f"{spec}: no such file or directory; pass 'digits', an .npz with an "
                           "'images' array, a folder of PNG/JPEG images or cifar-10-batches-py")
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise DatasetError(f"{spec}: unsupported file type {path.suffix!r}; expected an .npz "
                               "with an 'images' uint8 array, or a folder of images")
        dataset = _npz(path, spec, image_size, channels)
    elif any((path / name).is_file() for name in CIFAR_BATCHES):
        dataset = _cifar10(path, spec, image_size, channels)
    else:
        dataset = _image_folder(path, spec, image_size, channels)
    # Recorded in checkpoints: an absolute path finds the data again from any folder.
    return replace(dataset, spec=str(path.resolve()))


def _check_shape(spec: str, levels: np.ndarray, image_size: int, channels: int) -> None:
    expected = (channels, image_size, image_size)
    if levels.shape[1:] != expected:
        raise DatasetError(
            f"{spec}: images are [C, H, W] = {list(levels.shape[1:])}, the model expects "
            f"{list(expected)}; choose a preset that matches or convert the data"
        )
    if levels.shape[0] == 0:
        raise DatasetError(f"{spec}: holds no images")


def _digits(image_size: int, channels: int) -> Dataset:
    from sklearn.datasets import load_digits  # ships with scikit-learn, nothing downloaded

    raw = load_digits().images  # float64 [1797, 8, 8], integer values 0..16
    levels = raw.astype(np.uint8)[:, None]
    _check_shape("digits", levels, image_size, channels)
    return Dataset(name="digits", spec="digits", levels=levels, num_levels=17)


# What reading a damaged or unusual .npz can raise: zipfile raises RuntimeError for an
# encrypted member and NotImplementedError for a compression method it lacks; zlib.error
# for a damaged deflate stream.
_UNREADABLE_NPZ = (OSError, ValueError, KeyError, EOFError, RuntimeError, NotImplementedError,
                   zipfile.BadZipFile, zlib.error)


def _check_npz_header(path: Path, spec: str) -> None:
    """Read the 'images' member's .npy header (shape, dtype) and refuse before loading what
    is not a zip archive, not uint8, or claims more bytes than the member holds."""
    fix = NPZ_FIX
    if not zipfile.is_zipfile(path):
        raise DatasetError(f"{spec}: not an .npz (zip) archive (a .npy file renamed?); {fix}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            member = next((n for n in ("images.npy", "images") if n in names), None)
            if member is None:
                found = [n.removesuffix(".npy") for n in names]
                raise DatasetError(f"{spec}: has no 'images' array (found {found}); {fix}")
            size = archive.getinfo(member).file_size
            with archive.open(member) as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(f)
    except (*_UNREADABLE_NPZ, DatasetError) as err:
        if isinstance(err, DatasetError):
            raise
        raise DatasetError(f"{spec}: not a readable .npz file ({one_line(err)}); {fix}") \
            from None
    if dtype != np.uint8:
        raise DatasetError(f"{spec}: 'images' has dtype {dtype}, expected uint8 "
                           "(0..255); convert with np.clip(x, 0, 255).astype(np.uint8)")
    # A uint8 array of this shape needs prod(shape) bytes; the member (uncompressed) holds
    # the header and the data, so a header claiming more is corrupt, not a real data set.
    if math.prod(shape) > size:
        raise DatasetError(f"{spec}: 'images' header claims shape {list(shape)} "
                           f"({math.prod(shape):,} bytes) but the file holds {size:,}; "
                           f"the file is truncated or corrupt, {fix}")


def _npz(path: Path, spec: str, image_size: int, channels: int) -> Dataset:
    _check_npz_header(path, spec)
    try:
        with np.load(path, allow_pickle=False) as archive:
            images = archive["images"]
    except MemoryError:
        raise DatasetError(f"{spec}: 'images' does not fit in this machine's memory; "
                           "train on a smaller subset") from None
    except _UNREADABLE_NPZ as err:
        raise DatasetError(f"{spec}: not a readable .npz file ({one_line(err)}); {NPZ_FIX}") \
            from None
    if images.ndim == 3 and channels == 1:
        images = images[:, None]
    nhwc = (images.ndim == 4 and images.shape[3] == channels
            and images.shape[1] == images.shape[2] == image_size)
    nchw = (images.ndim == 4 and images.shape[1] == channels
            and images.shape[2] == images.shape[3] == image_size)
    if nhwc and not nchw:
        images = images.transpose(0, 3, 1, 2)
    elif not nchw:
        raise DatasetError(
            f"{spec}: 'images' has shape {list(images.shape)}, expected "
            f"[N, {image_size}, {image_size}, {channels}] (NHWC) or "
            f"[N, {channels}, {image_size}, {image_size}] (NCHW)"
        )
    levels = np.ascontiguousarray(images)
    _check_shape(spec, levels, image_size, channels)
    return Dataset(name=path.stem, spec=spec, levels=levels, num_levels=256)


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR-10's batches are pickles; allow the numpy array pieces they hold and nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _cifar10(path: Path, spec: str, image_size: int, channels: int) -> Dataset:
    parts = []
    for name in CIFAR_BATCHES:
        batch_path = path / name
        if not batch_path.is_file():
            raise DatasetError(f"{batch_path}: missing; a cifar-10-batches-py folder holds "
                               f"{', '.join(CIFAR_BATCHES)} (the training set)")
        try:
            with open(batch_path, "rb") as f:
                batch = _CifarUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
            raise DatasetError(f"{batch_path}: not a CIFAR-10 python batch ({err}); "
                               "re-extract cifar-10-python.tar.gz") from err
        data = batch.get(b"data") if isinstance(batch, dict) else None
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == 3 * 32 * 32):
            raise DatasetError(f"{batch_path}: expected a dict with b'data' uint8 [N, 3072]; "
                               "re-extract cifar-10-python.tar.gz")
        parts.append(data.reshape(-1, 3, 32, 32))  # rows are R, G, B planes of 32x32
    levels = np.concatenate(parts)
    _check_shape(spec, levels, image_size, channels)
    return Dataset(name="cifar10", spec=spec, levels=levels, num_levels=256)


def _image_folder(path: Path, spec: str, image_size: int, channels: int) -> Dataset:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"{spec}: no PNG/JPEG images and no CIFAR-10 batches in this folder; "
                           "point --data at a folder of images, an .npz or cifar-10-batches-py")
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise DatasetError(f"{spec}: image folders give 1 or 3 channels, the model wants "
                           f"{channels}")
    levels = np.empty((len(files), channels, image_size, image_size), dtype=np.uint8)
    for i, file in enumerate(files):
        try:
            with warnings.catch_warnings():
                # Past Image.MAX_IMAGE_PIXELS pillow only warns; such a file (a decompression
                # bomb, or a photo far beyond any preset's size) is refused like one past 2x.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(file) as img:
                    arr = np.asarray(_resize_center_crop(img.convert(mode), image_size))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise DatasetError(f"{file}: refused, too many pixels to decode safely ({err}); "
                               "remove it or shrink it first") from None
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise DatasetError(f"{file}: not a readable image ({err}); remove or re-save it") \
                from None
        levels[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return Dataset(name=path.name, spec=spec, levels=levels, num_levels=256)


def _resize_center_crop(img, size: int):
    """Scale the shorter side to ``size`` (bicubic), then cut the central size x size square."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))
