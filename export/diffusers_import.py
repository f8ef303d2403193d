"""A diffusers DDPM folder (``DDPMPipeline.save_pretrained``) as this project's model file.

The folders the paper's released models circulate in hold ``model_index.json``,
``unet/config.json`` + ``unet/diffusion_pytorch_model.safetensors`` and
``scheduler/scheduler_config.json``; a bare UNet folder (``config.json`` + the
safetensors) needs the scheduler config beside it. :func:`load_folder` checks every file
and field it relies on (one line naming the file and the field for anything missing,
broken or not honoured here), builds diffusers' own ``UNet2DModel`` from the config and the
safetensors weights (never a pickle), and the record the runtime needs from the scheduler
config. The network is exported as diffusers' module itself, with the project's exact
rewrites where they apply, and verified against diffusers' forward: no weight is mapped by
hand, so no mapping can be wrong. diffusers is needed here only (``pip install
.[import]``); the runtime that samples the file never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runtime.metadata import ModelRecord, decode_json, sha256_file
from runtime.util.fileio import NotRegularFileError, read_regular_file

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
INSTALL_HINT = "importing a diffusers folder needs diffusers: pip install .[import]"
PIPELINES = ("DDPMPipeline", "DDIMPipeline")
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
# The block types of the paper's networks as diffusers writes them; tested against
# diffusers' forward. Others may export too, but are refused rather than trusted untested.
DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
VARIANCES = {"fixed_small": "fixedsmall", "fixed_small_log": "fixedsmall",
             "fixed_large": "fixedlarge", "fixed_large_log": "fixedlarge"}
SPACINGS = ("linspace", "leading", "trailing")
# A config this large is not a model config; the bound keeps a hostile file from being read.
MAX_CONFIG_BYTES = 1 << 20


class DiffusersImportError(ValueError):
    """A diffusers folder this project cannot read or honour: one line, file and field."""


class DiffusersEps(nn.Module):
    """diffusers' UNet2DModel as this project's network contract: eps = f(x, t)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


@dataclass
class ImportedModel:
    network: DiffusersEps
    record: ModelRecord        # without flops_per_image and exporter (export adds them)
    weights_path: Path
    inputs: list[Path]         # every file read: export never writes onto one


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """A config file: a regular file of at most MAX_CONFIG_BYTES holding a JSON object;
    anything else is one line naming the file (the readers of every small file's)."""
    fix = "download the folder again"
    try:
        raw = read_regular_file(path, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise DiffusersImportError(f"{path}: missing; a diffusers folder needs its "
                                   f"{what}") from None
    except (OSError, NotRegularFileError) as err:
        reason = err.strerror if isinstance(err, OSError) else f"it {err}"
        raise DiffusersImportError(f"{path}: cannot read the {what} ({reason})") from None
    data = decode_json(raw, path, f"the {what}", fix, DiffusersImportError)
    if not isinstance(data, dict):
        raise DiffusersImportError(f"{path}: the {what} must be a JSON object")
    return data


def _field(data: dict, name: str, path: Path, kind, default=None, *, required=False):
    if name not in data or data[name] is None:
        if required:
            raise DiffusersImportError(f"{path}: field {name!r} is missing")
        return default
    value = data[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise DiffusersImportError(f"{path}: field {name!r} must be "
                                   f"{'/'.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


def find_parts(folder: Path, scheduler: Path | None = None) -> tuple[Path, Path]:
    """(the UNet folder, the scheduler config) of a pipeline folder or a bare UNet folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DiffusersImportError(f"{folder}: not a folder")
    index_path = folder / "model_index.json"
    if index_path.is_file():
        index = _read_json(index_path, "pipeline index")
        name = index.get("_class_name")
        if name not in PIPELINES:
            raise DiffusersImportError(f"{index_path}: _class_name {name!r} is not an "
                                       f"unconditional DDPM pipeline ({', '.join(PIPELINES)}); "
                                       "this project deploys those only")
        for part in ("unet", "scheduler"):
            if part not in index:
                raise DiffusersImportError(f"{index_path}: field {part!r} is missing")
        unet_dir = folder / "unet"
        scheduler = scheduler or folder / "scheduler" / "scheduler_config.json"
    else:
        unet_dir = folder
        if scheduler is None:
            raise DiffusersImportError(f"{folder}: no model_index.json, so a bare UNet folder: "
                                       "give its scheduler config with --scheduler "
                                       "scheduler_config.json")
    return unet_dir, Path(scheduler)


def _unet_config(path: Path) -> dict[str, Any]:
    cfg = _read_json(path, "UNet config")
    if cfg.get("_class_name") != "UNet2DModel":
        raise DiffusersImportError(f"{path}: _class_name {cfg.get('_class_name')!r} is not "
                                   "UNet2DModel, the unconditional U-Net of DDPM")
    for field, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        blocks = _field(cfg, field, path, list, required=True)
        for block in blocks:
            if block not in allowed:
                raise DiffusersImportError(f"{path}: {field} has {block!r}; this project "
                                           f"imports {', '.join(allowed)}")
    for field, want in (("class_embed_type", None), ("num_class_embeds", None),
                        ("time_embedding_type", "positional")):
        if cfg.get(field, want) != want:
            raise DiffusersImportError(f"{path}: {field} {cfg[field]!r} is not supported "
                                       f"(an unconditional model has {want!r})")
    size = _field(cfg, "sample_size", path, (int, list), required=True)
    c_in = _field(cfg, "in_channels", path, int, 3)
    c_out = _field(cfg, "out_channels", path, int, 3)
    if c_out != c_in:
        raise DiffusersImportError(f"{path}: out_channels {c_out} != in_channels {c_in}: a "
                                   "network that also predicts its variance is not supported")
    if isinstance(size, list) and (len(size) != 2 or not all(isinstance(s, int) for s in size)):
        raise DiffusersImportError(f"{path}: sample_size must be an integer or [H, W]")
    return cfg


def schedule_config(sched: dict[str, Any], path: Path) -> dict[str, Any]:
    """The runtime's ``Schedule.config`` for a diffusers scheduler config."""
    T = _field(sched, "num_train_timesteps", path, int, 1000)
    trained = _field(sched, "trained_betas", path, list)
    if trained is not None:
        if len(trained) != T:
            raise DiffusersImportError(f"{path}: trained_betas has {len(trained)} entries, "
                                       f"num_train_timesteps is {T}")
        return {"kind": "explicit", "num_timesteps": T, "betas": [float(b) for b in trained]}
    kind = _field(sched, "beta_schedule", path, str, "linear")
    start = float(_field(sched, "beta_start", path, (int, float), 0.0001))
    end = float(_field(sched, "beta_end", path, (int, float), 0.02))
    if kind == "linear":
        return {"kind": "linear", "num_timesteps": T, "beta_start": start, "beta_end": end}
    if kind == "scaled_linear":
        return {"kind": "scaled_linear", "num_timesteps": T, "beta_start": start,
                "beta_end": end}
    if kind == "squaredcos_cap_v2":  # Improved DDPM's cosine, s = 0.008, betas capped at 0.999
        return {"kind": "cosine", "num_timesteps": T, "s": 0.008, "max_beta": 0.999}
    raise DiffusersImportError(f"{path}: beta_schedule {kind!r} is not supported (linear, "
                               "scaled_linear, squaredcos_cap_v2 or trained_betas)")


def _record_fields(sched: dict[str, Any], path: Path) -> dict[str, Any]:
    if sched.get("_class_name") not in SCHEDULERS:
        raise DiffusersImportError(f"{path}: _class_name {sched.get('_class_name')!r} is not "
                                   f"one of {', '.join(SCHEDULERS)}")
    for field in ("thresholding", "rescale_betas_zero_snr"):
        if _field(sched, field, path, bool, False):
            raise DiffusersImportError(f"{path}: {field} true is not supported by this runtime")
    prediction = _field(sched, "prediction_type", path, str, "epsilon")
    if prediction not in PREDICTIONS:
        raise DiffusersImportError(f"{path}: prediction_type {prediction!r} is not supported "
                                   f"({', '.join(PREDICTIONS)})")
    defaults: dict[str, Any] = {}
    variance = _field(sched, "variance_type", path, str, "fixed_small")
    if sched.get("_class_name") == "DDPMScheduler":
        if variance not in VARIANCES:
            raise DiffusersImportError(f"{path}: variance_type {variance!r} is not supported "
                                       f"({', '.join(VARIANCES)}); a learned variance needs "
                                       "a network output this runtime does not read")
        defaults["variance"] = VARIANCES[variance]
    else:
        defaults["sampler"] = "ddim"  # what the folder's own pipeline runs
    spacing = _field(sched, "timestep_spacing", path, str, "leading")
    if spacing not in SPACINGS:
        raise DiffusersImportError(f"{path}: timestep_spacing {spacing!r} is not supported "
                                   f"({', '.join(SPACINGS)})")
    defaults["spacing"] = spacing  # how diffusers would pick a shorter chain's steps
    clip = _field(sched, "clip_sample", path, bool, True)
    clip_range = float(_field(sched, "clip_sample_range", path, (int, float), 1.0))
    if not clip_range > 0:
        raise DiffusersImportError(f"{path}: clip_sample_range must be > 0, got {clip_range}")
    return {"schedule": schedule_config(sched, path), "prediction": PREDICTIONS[prediction],
            "defaults": defaults, "clip_x0": clip, "data_range": (-clip_range, clip_range)}


def load_folder(folder, *, scheduler: Path | None = None) -> ImportedModel:
    """Read and check a diffusers folder; build the network with its weights."""
    try:
        from diffusers import UNet2DModel
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise DiffusersImportError(INSTALL_HINT) from None
    unet_dir, sched_path = find_parts(Path(folder), scheduler)
    cfg_path = unet_dir / "config.json"
    cfg = _unet_config(cfg_path)
    fields = _record_fields(_read_json(sched_path, "scheduler config"), sched_path)
    weights_path = unet_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        pickled = [p.name for p in unet_dir.glob("*.bin")]
        hint = (f" ({', '.join(pickled)} is a pickle, which this project never loads: "
                "convert it to safetensors)") if pickled else ""
        raise DiffusersImportError(f"{weights_path}: missing{hint}")
    try:
        unet = UNet2DModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise DiffusersImportError(f"{cfg_path}: diffusers cannot build a UNet2DModel from it "
                                   f"({str(err).splitlines()[0]})") from None
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise DiffusersImportError(f"{weights_path}: not a readable safetensors file "
                                   f"({str(err).splitlines()[0]}); download it again") from None
    _check_weights(unet, state, weights_path, cfg_path)
    unet.load_state_dict(state, strict=True)
    unet.eval()
    size = cfg["sample_size"]
    h, w = (size, size) if isinstance(size, int) else size
    record = ModelRecord(
        image_shape=(int(cfg.get("in_channels", 3)), int(h), int(w)), num_levels=256,
        model_config={"source": "diffusers", "class": "UNet2DModel",
                      "config": {k: v for k, v in cfg.items() if not k.startswith("_")}},
        checkpoint_sha256=sha256_file(weights_path), weights="imported", **fields)
    return ImportedModel(DiffusersEps(unet), record, weights_path,
                         [p for p in (unet_dir / "config.json", sched_path, weights_path,
                                      Path(folder) / "model_index.json") if p.is_file()])


def _check_weights(unet: nn.Module, state: dict, weights_path: Path, cfg_path: Path) -> None:
    """Every weight the config's network has, of its shape, finite; nothing else."""
    want = unet.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        name = (missing or extra)[0]
        raise DiffusersImportError(
            f"{weights_path}: {'lacks' if missing else 'has an unexpected'} weight {name!r} "
            f"({len(missing)} missing, {len(extra)} unexpected): it does not match "
            f"{cfg_path}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(want[name].shape):
            raise DiffusersImportError(
                f"{weights_path}: weight {name!r} has shape {list(tensor.shape)} but "
                f"{cfg_path} makes it {list(want[name].shape)}")
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise DiffusersImportError(f"{weights_path}: weight {name!r} is not finite floats")
