"""Checkpoints: plain data and tensors only, written atomically, read with weights_only=True.

A checkpoint is enough to rebuild the network (``build_model``), the schedule and the
run (configs, step, optimizer, EMA, RNG states): export repeats no flags.
"""

from __future__ import annotations

import os
import pickle
import uuid
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .unet import UNet

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model_config", "train_config", "schedule", "data", "step",
                 "model", "ema")


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, unsafe or not one of ours (one-line message)."""


def make_checkpoint(*, model_config: dict, train_config: dict, schedule: dict, data: dict,
                    step: int, model: dict, ema: dict, **run_state: Any) -> dict[str, Any]:
    """A checkpoint in this module's format (docs/design.md, "Checkpoint").

    ``data``: name, spec, image_shape, data_range, num_levels. ``run_state``: what an exact
    resume also needs (optimizer, rng, world_size, elapsed_s, torch_version).
    """
    return {"format_version": FORMAT_VERSION, "model_config": model_config,
            "train_config": train_config, "schedule": schedule, "data": data, "step": step,
            "model": model, "ema": ema, **run_state}


def save_checkpoint(path: str | os.PathLike, ckpt: dict[str, Any]) -> None:
    """Write ``ckpt`` to ``path`` so that a crash leaves either the old file or the new one.

    temp file in the same directory -> fsync -> os.replace (atomic on POSIX) -> fsync dir.
    """
    _check_plain(ckpt, "ckpt")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name in the same directory (so os.replace is atomic), created with the
    # umask's permissions like any file the user writes.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Leave no half-written temp file behind, then let the error (or Ctrl-C) through.
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def _check_plain(value: Any, where: str) -> None:
    """Refuse to write what weights_only=True could not read back (e.g. numpy arrays)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is not a str or int")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for k, item in enumerate(value):
            _check_plain(item, f"{where}[{k}]")
    elif not (value is None or type(value) in (str, int, float, bool)
              or isinstance(value, torch.Tensor)):
        raise TypeError(f"{where}: {type(value).__name__} is not plain data or a tensor; "
                        "convert it before saving")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint as data (never code) and check that it is one of ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; train one with "
                              "`python training/train.py` or pass the path of ckpt.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err) or "GLOBAL" in str(err):
            raise CheckpointError(
                f"{path}: refused: it holds pickled Python objects, not only tensors and plain "
                "data (loaded with weights_only=True); use a checkpoint written by "
                "training/train.py and never unpickle files you do not trust"
            ) from err
        raise CheckpointError(f"{path}: not a torch checkpoint (unreadable pickle); "
                              "re-create it with training/train.py") from err
    except (RuntimeError, EOFError, KeyError, ValueError, IndexError, TypeError,
            AttributeError, OSError) as err:
        raise CheckpointError(f"{path}: truncated or corrupt ({type(err).__name__}); re-copy it "
                              "or resume from an earlier checkpoint") from err
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a DDPM training checkpoint (expected keys "
                              f"{list(REQUIRED_KEYS)}, found {found}); pass a ckpt.pt written "
                              "by training/train.py")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {ckpt['format_version']!r}, this code "
                              f"reads format {FORMAT_VERSION}; use the matching code version")
    return ckpt


def build_model(ckpt: dict[str, Any], weights: str = "ema") -> UNet:
    """The UNet of a loaded checkpoint, in eval mode, with its EMA or raw weights."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    model = UNet(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["ema" if weights == "ema" else "model"])
    return model.eval()
