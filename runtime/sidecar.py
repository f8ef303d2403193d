"""The engine sidecar ``<engine>.json``: a TensorRT engine's description of itself.

A serialized engine carries no metadata, so ``export/to_trt.py`` writes this JSON file
beside it and the TensorRT backend reads it back. This module is the format's only
owner: it defines, writes, reads and validates it. Fields (docs/design.md, "Engine sidecar"):

- every field of the model's ``ddpm`` record, at the top level (validated by
  :class:`runtime.metadata.ModelRecord`);
- ``"tensorrt"``: ``version`` (of the TensorRT that built the engine), ``gpu`` (device
  name), ``compute_capability`` ([major, minor]), ``precision`` (fp32, fp16 or bf16) and
  ``profile`` ({"min", "opt", "max"}: the batch sizes the engine takes);
- ``"sidecar_version"``: this format's version. Sidecars written before the field
  existed are version 1; a newer version is refused with a line saying to upgrade.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelFileError
from .metadata import ModelRecord, decode_json
from .util.fileio import NotRegularFileError, read_regular_file, write_text

SIDECAR_VERSION = 1
VERSION_KEY = "sidecar_version"
ENGINE_KEY = "tensorrt"
PRECISIONS = ("fp32", "fp16", "bf16")
# A sidecar is ~2 KB of JSON; anything much larger is not one (and is not read whole).
MAX_SIDECAR_BYTES = 1 << 20
REBUILD_HINT = "rebuild it with python export/to_trt.py MODEL.onnx on this machine"


def sidecar_path(engine_path) -> Path:
    """``model.plan`` -> ``model.plan.json``."""
    return Path(f"{engine_path}.json")


@dataclass(frozen=True)
class EngineBuild:
    """What built the engine and what it accepts: the sidecar's ``tensorrt`` object."""

    version: str                          # TensorRT version that built it
    gpu: str                              # the GPU's name
    compute_capability: tuple[int, int]   # the GPU's (major, minor)
    precision: str                        # fp32, fp16 or bf16
    profile: tuple[int, int, int]         # batch sizes (min, opt, max)

    @property
    def min_batch(self) -> int:
        return self.profile[0]

    @property
    def max_batch(self) -> int:
        return self.profile[2]

    def to_dict(self) -> dict[str, Any]:
        lo, opt, hi = self.profile
        return {"version": self.version, "gpu": self.gpu,
                "compute_capability": list(self.compute_capability),
                "precision": self.precision, "profile": {"min": lo, "opt": opt, "max": hi}}

    @classmethod
    def from_dict(cls, info: Any, source) -> EngineBuild:
        def bad(what: str) -> ModelFileError:
            return ModelFileError(f"{source}: engine sidecar {what}; {REBUILD_HINT}")

        if not isinstance(info, dict):
            raise bad(f'has no "{ENGINE_KEY}" object')
        for key in ("version", "gpu"):
            if not isinstance(info.get(key), str):
                raise bad(f'has no string "{ENGINE_KEY}.{key}"')
        cc = info.get("compute_capability")
        if not (isinstance(cc, list) and len(cc) == 2 and all(_is_int(v) for v in cc)):
            raise bad(f'has no "{ENGINE_KEY}.compute_capability" [major, minor]')
        if info.get("precision") not in PRECISIONS:
            raise bad(f'"{ENGINE_KEY}.precision" is {info.get("precision")!r}, not one of '
                      f"{PRECISIONS}")
        profile = info.get("profile")
        keys = ("min", "opt", "max")
        if not (isinstance(profile, dict) and all(_is_int(profile.get(k)) for k in keys)):
            raise bad(f'has no "{ENGINE_KEY}.profile" with integer min, opt and max')
        if not 1 <= profile["min"] <= profile["opt"] <= profile["max"]:
            raise bad(f'"{ENGINE_KEY}.profile" {profile} is not 1 <= min <= opt <= max')
        return cls(info["version"], info["gpu"], (cc[0], cc[1]), info["precision"],
                   (profile["min"], profile["opt"], profile["max"]))


@dataclass(frozen=True)
class EngineSidecar:
    """The whole sidecar: the model's record plus how its engine was built."""

    record: ModelRecord
    engine: EngineBuild
    version: int = SIDECAR_VERSION

    def to_dict(self) -> dict[str, Any]:
        data = json.loads(self.record.to_json())
        data[ENGINE_KEY] = self.engine.to_dict()
        data[VERSION_KEY] = self.version
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source) -> EngineSidecar:
        """Validate a decoded sidecar; ``source`` (the sidecar's path) names it in errors."""
        if not isinstance(data, dict):
            raise ModelFileError(f"{source}: engine sidecar is not a JSON object; {REBUILD_HINT}")
        version = data.get(VERSION_KEY, 1)  # written before the field existed: version 1
        if not _is_int(version) or version < 1:
            raise ModelFileError(f"{source}: engine sidecar has a malformed "
                                 f'"{VERSION_KEY}" {version!r}; {REBUILD_HINT}')
        if version > SIDECAR_VERSION:
            raise ModelFileError(
                f"{source}: engine sidecar version {version} is newer than this runtime reads "
                f"(version {SIDECAR_VERSION}); upgrade the runtime, or {REBUILD_HINT}")
        engine = EngineBuild.from_dict(data.get(ENGINE_KEY), source)
        fields = {k: v for k, v in data.items() if k not in (ENGINE_KEY, VERSION_KEY)}
        record = ModelRecord.from_dict(fields, f"{source} (engine sidecar)")
        return cls(record, engine, version)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_sidecar(engine_path) -> EngineSidecar:
    """Read and validate ``<engine>.json``; a one-line ModelFileError naming that path if not."""
    path = sidecar_path(engine_path)
    try:
        raw = read_regular_file(path, MAX_SIDECAR_BYTES)
    except FileNotFoundError:
        raise ModelFileError(
            f"{path}: engine sidecar not found; it must sit next to {Path(engine_path).name} "
            f"(export/to_trt.py writes both): copy it along, or {REBUILD_HINT}"
        ) from None
    except NotRegularFileError as err:
        raise ModelFileError(f"{path}: the engine sidecar {err}; {REBUILD_HINT}") from None
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read the engine sidecar ({exc.strerror}); "
                             f"{REBUILD_HINT}") from None
    data = decode_json(raw, path, "the engine sidecar", REBUILD_HINT)
    return EngineSidecar.from_dict(data, path)


def write_sidecar(engine_path, sidecar: EngineSidecar) -> Path:
    """Write ``<engine>.json`` atomically; returns its path."""
    return write_text(sidecar_path(engine_path), sidecar.to_json())
