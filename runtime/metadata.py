"""The `ddpm` record: everything the runtime needs, stored in the model file.

Export writes it into the ONNX file's ``metadata_props`` (key ``ddpm``) and into
a TensorRT engine's JSON sidecar; the runtime reads it back and needs nothing else.
One module owns the format, so the writer and the reader cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .errors import ModelFileError
from .options import SampleOptions, sampler_options, show_value
from .schedule import Schedule
from .stepmath import PREDICTIONS

METADATA_KEY = "ddpm"
FORMAT_VERSION = 1


def sha256_file(path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks: how records name their source files."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelRecord:
    """The model file's description of itself (docs/design.md, "The model file")."""

    schedule: dict[str, Any]              # Schedule.config: kind, T and its parameters
    image_shape: tuple[int, int, int]     # (C, H, W) of x and eps
    data_range: tuple[float, float]       # what x_0 spans; the sampler clips to it
    num_levels: int                       # quantisation levels of the data: 17 digits, 256 8-bit
    model_config: dict[str, Any]          # the network's hyper-parameters
    checkpoint_sha256: str                # digest of the checkpoint it came from
    weights: str                          # "ema", "raw", or "imported" (another tool's file)
    prediction: str = "eps"               # what the network outputs: eps, v or x0
    clip_x0: bool = True                  # samplers clip predicted x_0 to data_range
    defaults: dict[str, Any] = field(default_factory=dict)  # this model's sampling defaults
    distilled: dict[str, Any] | None = None  # a student's: method, from_steps, steps, teacher
    train_step: int | None = None         # optimisation steps behind these weights
    flops_per_image: int | None = None    # one ε evaluation, counted at export
    exporter: dict[str, Any] = field(default_factory=dict)  # tool versions, opset
    format_version: int = FORMAT_VERSION

    @property
    def num_timesteps(self) -> int:
        return int(self.schedule["num_timesteps"])

    def build_schedule(self) -> Schedule:
        return Schedule.from_config(self.schedule)

    def to_json(self) -> str:
        record = asdict(self)
        if record["distilled"] is None:  # the files of every other model stay as they were
            del record["distilled"]
        return json.dumps(record, sort_keys=True)

    def off_distillation(self, options: SampleOptions, source: str) -> str | None:
        """For a distilled student asked to sample otherwise than it was distilled for
        (its ``defaults``: sampler, steps, spacing, eta), the one-line warning; else None."""
        if self.distilled is None:
            return None
        asked = options.to_dict()
        differ = [f"{k} {asked.get(k)}" for k, v in self.defaults.items() if asked.get(k) != v]
        if not differ:
            return None
        first = ("sampler", "steps", "spacing")
        keys = sorted(self.defaults, key=lambda k: (first.index(k) if k in first else 3, k))
        own = ", ".join(f"{k} {self.defaults[k]}" for k in keys)
        return (f"{source} is a student distilled for {own}; sampled with "
                f"{', '.join(differ)} it gives worse images than with its own (leave those "
                "options out to use them)")

    @classmethod
    def from_dict(cls, data: Any, source: str) -> ModelRecord:
        """Validate a decoded record; ``source`` names the file in every error.

        Every field's type, range and size is checked here, before anything (a schedule's
        tables, an image batch) is allocated from it.
        """
        if not isinstance(data, dict):
            raise ModelFileError(f"{source}: the '{METADATA_KEY}' record is not a JSON object")
        check_format_version(data.get("format_version"), FORMAT_VERSION, source,
                             f"the '{METADATA_KEY}' record", "re-export the model")
        required = ("schedule", "image_shape", "data_range", "num_levels", "model_config",
                    "checkpoint_sha256", "weights")
        missing = [k for k in required if k not in data]
        if missing:
            raise ModelFileError(f"{source}: the '{METADATA_KEY}' record lacks {missing}; "
                                 "re-export the model")
        known = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            kwargs["schedule"] = check_schedule_config(data["schedule"])
            kwargs["image_shape"] = check_image_shape(data["image_shape"])
            kwargs["data_range"] = check_data_range(data["data_range"])
            kwargs["num_levels"] = check_integer(data["num_levels"], "num_levels", 2, MAX_LEVELS)
            for name in ("train_step", "flops_per_image"):
                if data.get(name) is not None:
                    kwargs[name] = check_integer(data[name], name, 0, None)
            if "clip_x0" in data and not isinstance(data["clip_x0"], bool):
                raise ValueError(f"clip_x0 must be true or false, got {_kind(data['clip_x0'])}")
            for name in ("model_config", "exporter", "defaults"):
                if name in data and not isinstance(data[name], dict):
                    raise ValueError(f"{name} must be an object, got {_kind(data[name])}")
            if data.get("distilled") is not None:
                kwargs["distilled"] = check_distilled(data["distilled"],
                                                      kwargs["schedule"]["num_timesteps"])
            for name in ("checkpoint_sha256", "weights", "prediction"):
                if name in data and not isinstance(data[name], str):
                    raise ValueError(f"{name} must be a string, got {_kind(data[name])}")
        except ValueError as err:
            raise ModelFileError(f"{source}: invalid '{METADATA_KEY}' record: {err}; "
                                 "re-export the model") from None
        record = cls(**kwargs)
        record._validate(source)
        return record

    @classmethod
    def from_json(cls, text: str | None, source: str) -> ModelRecord:
        if text is None:
            raise ModelFileError(
                f"{source}: no '{METADATA_KEY}' metadata; export the model with "
                "python export/to_onnx.py CHECKPOINT"
            )
        return cls.from_dict(decode_json(text, source, f"the '{METADATA_KEY}' metadata",
                                         "re-export the model", ModelFileError), source)

    def _validate(self, source: str) -> None:
        """What from_dict has not checked yet: the enumerations and the schedule's tables."""
        if self.prediction not in PREDICTIONS:
            raise ModelFileError(f"{source}: prediction {self.prediction!r} is not supported; "
                                 f"this runtime samples {PREDICTIONS} models")
        if self.weights not in WEIGHTS:
            raise ModelFileError(f"{source}: weights must be one of {WEIGHTS}, got "
                                 f"{self.weights!r}")
        try:
            schedule = check_schedule(self.schedule)
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFileError(f"{source}: invalid '{METADATA_KEY}' record: {err}; "
                                 "re-export the model") from None
        try:  # the options schema checks them, and the chain must hold their steps
            SampleOptions.make(defaults=self.defaults).respace(schedule)
            known = sampler_options()
            unknown = sorted(set(self.defaults) - {"sampler", "steps", "spacing", *known})
            if unknown:
                raise ValueError(f"unknown options {unknown}")
            for name in set(self.defaults) & set(known):  # also those of other samplers
                known[name].check(self.defaults[name])
        except ValueError as err:
            raise ModelFileError(f"{source}: invalid sampling defaults in the '{METADATA_KEY}' "
                                 f"record ({err}); re-export the model") from None


def check_distilled(value: Any, num_timesteps: int) -> dict[str, Any]:
    """A student's ``distilled`` entry: ``method`` (a string), ``from_steps`` and ``steps``
    (its teacher's network calls and its own, 1 <= steps < from_steps <= T) and
    ``teacher_sha256`` (the teacher checkpoint's digest); other keys are kept as they are."""
    if not isinstance(value, dict):
        raise ValueError(f"distilled must be an object, got {_kind(value)}")
    for name in ("method", "teacher_sha256"):
        if not isinstance(value.get(name), str):
            raise ValueError(f"distilled.{name} must be a string, got "
                             f"{show_value(value.get(name))}")
    steps = check_integer(value.get("steps"), "distilled.steps", 1, num_timesteps)
    from_steps = check_integer(value.get("from_steps"), "distilled.from_steps", steps + 1,
                               num_timesteps)
    return {**value, "steps": steps, "from_steps": from_steps}


def decode_json(text: str | bytes, source, what: str, fix: str,
                error: type[Exception] = ModelFileError) -> Any:
    """JSON text of a small file or record, any failure one line naming ``source``:
    invalid JSON or UTF-8, nesting too deep for the parser, an integer of more digits than
    Python converts (a ValueError of its own), a number too large for a float."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError as err:
        raise error(f"{source}: cannot read {what}: it is not UTF-8 text (byte "
                    f"{err.start}); {fix}") from None
    except json.JSONDecodeError as err:
        raise error(f"{source}: {what} is not valid JSON ({err.msg} at char {err.pos}); "
                    f"{fix}") from None
    except RecursionError:  # e.g. '[' * 100000: not a record, whatever else it is
        raise error(f"{source}: {what} nests too deeply to be read; {fix}") from None
    except (ValueError, OverflowError) as err:  # a 5000-digit integer
        raise error(f"{source}: {what} holds a number that cannot be read "
                    f"({str(err).split(';')[0]}); {fix}") from None


# === Field checks shared by the record and the training checkpoint ===
# Limits far above any real model, low enough that a hostile file cannot make the runtime
# allocate gigabytes: a schedule is ~15 float64 tables of T entries, an image C*H*W floats.
MAX_TIMESTEPS = 100_000
MAX_IMAGE_SIDE = 4096
MAX_CHANNELS = 4
MAX_LEVELS = 65_536
WEIGHTS = ("ema", "raw", "imported")
SCHEDULE_PARAMS = {"linear": ("beta_start", "beta_end"), "cosine": ("s", "max_beta"),
                   "scaled_linear": ("beta_start", "beta_end"), "explicit": ("betas",)}


def _kind(value: Any) -> str:
    return type(value).__name__


def check_integer(value: Any, name: str, low: int, high: int | None) -> int:
    """An int (an integral float such as 8.0 too; never a bool or 8.5) in [low, high]."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _real(value: Any, name: str) -> float:
    """A finite int or float, never a bool or a string."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def check_image_shape(value: Any) -> tuple[int, int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"image_shape must be [C, H, W], got {value!r}")
    c = check_integer(value[0], "image_shape C", 1, MAX_CHANNELS)
    h = check_integer(value[1], "image_shape H", 1, MAX_IMAGE_SIDE)
    w = check_integer(value[2], "image_shape W", 1, MAX_IMAGE_SIDE)
    return c, h, w


# The samplers clip x_0 to data_range in float32 and images are cut into up to 256 levels
# of it: both ends must be finite float32 numbers, their difference too (a span of 1e39
# overflows, all pixels black), and the span at least this many float32 steps of its ends
# (a subnormal span, or [1, 1 + 1e-9], cannot be told from a point).
MIN_RANGE_STEPS = 1024


def check_data_range(value: Any) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"data_range must be [low, high], got {value!r}")
    lo, hi = _real(value[0], "data_range low"), _real(value[1], "data_range high")
    if not lo < hi:
        raise ValueError(f"data_range must be [low, high] with low < high, got {[lo, hi]}")
    with np.errstate(over="ignore"):
        lo32, hi32 = np.float32(lo), np.float32(hi)
        span = hi32 - lo32
    if not (np.isfinite(lo32) and np.isfinite(hi32) and np.isfinite(span)):
        raise ValueError(f"data_range {[lo, hi]} overflows float32, where images are sampled; "
                         "give a range within +-1e38")
    if not span >= MIN_RANGE_STEPS * np.spacing(max(abs(lo32), abs(hi32), np.float32(0))) \
            or span < np.finfo(np.float32).tiny:
        raise ValueError(f"data_range {[lo, hi]} is too narrow for float32, where images are "
                         f"sampled (fewer than {MIN_RANGE_STEPS} float32 steps wide)")
    return lo, hi


def check_schedule_config(value: Any) -> dict[str, Any]:
    """A schedule config (``Schedule.config``) with known keys, sane sizes and finite numbers."""
    if not isinstance(value, dict):
        raise ValueError(f"schedule must be an object, got {_kind(value)}")
    kind = value.get("kind")
    if kind not in SCHEDULE_PARAMS:
        raise ValueError(f"schedule kind must be one of {sorted(SCHEDULE_PARAMS)}, got {kind!r}")
    if "respaced" in value:
        # A network is trained on every timestep; which of them a sampler visits is chosen
        # per call (--steps, --spacing), never stored with the model.
        raise ValueError("schedule has 'respaced': a model's schedule is the full training "
                         "chain; choose the sampling steps with --steps instead")
    allowed = {"kind", "num_timesteps", *SCHEDULE_PARAMS[kind]}
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ValueError(f"schedule has unknown keys {unknown}")
    if "num_timesteps" not in value:
        raise ValueError("schedule lacks num_timesteps")
    config = {"kind": kind,
              "num_timesteps": check_integer(value["num_timesteps"], "schedule num_timesteps", 1,
                                        MAX_TIMESTEPS)}
    for name in SCHEDULE_PARAMS[kind]:
        if name == "betas":
            config[name] = _betas(value.get(name), config["num_timesteps"])
        elif name in value:
            config[name] = _real(value[name], f"schedule {name}")
    return config


def _betas(value: Any, num_timesteps: int) -> list[float]:
    if not isinstance(value, list) or len(value) != num_timesteps:
        raise ValueError(f"an explicit schedule's betas must be a list of num_timesteps "
                         f"({num_timesteps}) numbers")
    return [_real(b, "schedule betas") for b in value]


# A schedule the samplers can run in float32 (float64 tables), whatever the spacing:
# - every beta >= MIN_BETA: the first steps divide by 1 - alphas_cumprod = ~beta; below
#   ~1e-16 that is 0 in float64 (NaN, all-black images), 1e-8 keeps 8 digits of it. The
#   paper's 1e-4 and the cosine schedule's ~4e-7 at T = 100000 pass.
# - the last alphas_cumprod >= MIN_ALPHAS_CUMPROD: a respaced beta is 1 - (ratio of two
#   kept alphas_cumprod) >= ... and must stay below 1 in float64 (1 - 1e-15 does); x_0 =
#   x_t / sqrt(ab) then stays within 3e7 x_t. The paper's schedule ends at 4e-5, the cosine
#   one at ~2e-13 for T = 100000.
MIN_BETA = 1e-8
MIN_ALPHAS_CUMPROD = 1e-15


def check_schedule(value: Any) -> Schedule:
    """A schedule config (:func:`check_schedule_config`) whose schedule can be sampled
    with any number of steps; returns the schedule. ValueError naming the bound if not."""
    with np.errstate(divide="ignore", invalid="ignore"):  # refused below, not warned about
        schedule = Schedule.from_config(check_schedule_config(value))
    low = int(np.argmin(schedule.betas))
    if schedule.betas[low] < MIN_BETA:
        raise ValueError(f"schedule beta at t={low} is {schedule.betas[low]:.3g}, below "
                         f"{MIN_BETA:g} (the first steps would divide by ~0 in float64); "
                         "use larger betas (beta_start, or the cosine schedule's s)")
    last = schedule.alphas_cumprod[-1]
    if last < MIN_ALPHAS_CUMPROD:
        raise ValueError(f"schedule alphas_cumprod falls to {last:.3g} at "
                         f"t={schedule.num_timesteps - 1}, below {MIN_ALPHAS_CUMPROD:g} (fewer "
                         "sampling steps would need betas of 1); use fewer timesteps or "
                         "smaller betas (beta_end, max_beta)")
    return schedule


def check_format_version(version: Any, current: int, source: str, what: str, fix: str,
                         error: type[Exception] = ModelFileError) -> None:
    """Refuse another format version, saying whether this code is too old or the file is."""
    if isinstance(version, int) and not isinstance(version, bool) and version > current:
        raise error(f"{source}: {what} has format version {version}, newer than this "
                             f"release reads ({current}); upgrade ddpm-deploy")
    if version != current or isinstance(version, bool):
        raise error(f"{source}: {what} has unknown format version {version!r} (this "
                             f"release reads version {current}); {fix}")
