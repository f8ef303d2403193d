"""The `ddpm` record: everything the runtime needs, stored in the model file.

Export writes it into the ONNX file's ``metadata_props`` (key ``ddpm``) and into
a TensorRT engine's JSON sidecar; the runtime reads it back and needs nothing else.
One module owns the format, so the writer and the reader cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ModelFileError
from .schedule import Schedule

METADATA_KEY = "ddpm"
FORMAT_VERSION = 1
PREDICTIONS = ("eps",)


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
    weights: str                          # "ema" or "raw"
    prediction: str = "eps"               # what the network outputs
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
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, source: str) -> ModelRecord:
        """Validate a decoded record; ``source`` names the file in every error."""
        if not isinstance(data, dict):
            raise ModelFileError(f"{source}: the '{METADATA_KEY}' record is not a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ModelFileError(
                f"{source}: unknown '{METADATA_KEY}' format version {version!r} (this runtime "
                f"reads version {FORMAT_VERSION}); re-export the model with this release"
            )
        required = ("schedule", "image_shape", "data_range", "num_levels", "model_config",
                    "checkpoint_sha256", "weights")
        missing = [k for k in required if k not in data]
        if missing:
            raise ModelFileError(f"{source}: the '{METADATA_KEY}' record lacks {missing}; "
                                 "re-export the model")
        known = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            kwargs["image_shape"] = tuple(int(v) for v in data["image_shape"])
            kwargs["data_range"] = tuple(float(v) for v in data["data_range"])
            kwargs["num_levels"] = int(data["num_levels"])
        except (TypeError, ValueError) as err:
            raise ModelFileError(f"{source}: malformed '{METADATA_KEY}' record ({err})") from None
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
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ModelFileError(f"{source}: the '{METADATA_KEY}' metadata is not valid JSON "
                                 f"({err.msg} at char {err.pos}); re-export the model") from None
        return cls.from_dict(data, source)

    def _validate(self, source: str) -> None:
        c, h, w = self.image_shape if len(self.image_shape) == 3 else (0, 0, 0)
        if len(self.image_shape) != 3 or min(c, h, w) < 1:
            raise ModelFileError(f"{source}: image_shape must be [C, H, W] with positive sizes, "
                                 f"got {list(self.image_shape)}")
        lo, hi = self.data_range
        if not lo < hi:
            raise ModelFileError(f"{source}: data_range must be [low, high] with low < high")
        if self.num_levels < 2:
            raise ModelFileError(f"{source}: num_levels must be >= 2, got {self.num_levels}")
        if self.prediction not in PREDICTIONS:
            raise ModelFileError(f"{source}: prediction {self.prediction!r} is not supported; "
                                 f"this runtime samples {PREDICTIONS} models")
        if self.weights not in ("ema", "raw"):
            raise ModelFileError(f"{source}: weights must be 'ema' or 'raw', got {self.weights!r}")
        try:
            self.build_schedule()
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFileError(f"{source}: invalid schedule in the '{METADATA_KEY}' record "
                                 f"({err})") from None
