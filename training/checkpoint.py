"""Checkpoints: plain data and tensors only, written atomically, read with weights_only=True.

A checkpoint is enough to rebuild the network (``build_model``), the schedule and the
run (configs, step, optimizer, EMA, RNG states): export repeats no flags. A distilled
student's (training/distiller.py) is the same format, version 2, with what its network
predicts and how it was distilled.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.metadata import (
    MAX_LEVELS,
    check_data_range,
    check_format_version,
    check_image_shape,
    check_integer,
    check_schedule,
)
from runtime.stepmath import PREDICTIONS
from runtime.util.clierrors import one_line
from runtime.util.fileio import atomic_output

from .config import DistillConfig, ModelConfig, TrainConfig
from .unet import UNet

FORMAT_VERSION = 1
# A distilled student: 'prediction' (what its network returns) and 'distill' (its plan and
# teacher) are added, and a resumable one holds its round's 'teacher' weights. Its own
# version, so that an export older than students refuses the file ("newer than this
# release reads") instead of reading a v-network as an ε-network.
STUDENT_FORMAT_VERSION = 2
REQUIRED_KEYS = ("format_version", "model_config", "train_config", "schedule", "data", "step",
                 "model", "ema")
# What only a resume needs: left out of the per-round student files.
RUN_STATE_KEYS = ("optimizer", "rng", "teacher", "fake", "fake_optimizer")


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, unsafe or not one of ours (one-line message)."""


def make_checkpoint(*, model_config: dict, train_config: dict, schedule: dict, data: dict,
                    step: int, model: dict, ema: dict, **run_state: Any) -> dict[str, Any]:
    """A checkpoint in this module's format (docs/design.md, "Checkpoint").

    ``data``: name, spec, image_shape, data_range, num_levels. ``run_state``: what an exact
    resume also needs (optimizer, rng, world_size, threads, elapsed_s, torch_version).
    """
    return {"format_version": FORMAT_VERSION, "model_config": model_config,
            "train_config": train_config, "schedule": schedule, "data": data, "step": step,
            "model": model, "ema": ema, **run_state}


def student_checkpoint(ckpt: dict[str, Any], *, prediction: str, distill: dict,
                       teacher: dict | None = None, **matching: dict) -> dict[str, Any]:
    """``ckpt`` (:func:`make_checkpoint`'s) as a distilled student's, version 2.

    ``distill``: ``config`` (DistillConfig.to_dict()), ``teacher_sha256``,
    ``teacher_prediction``, ``teacher_train_step`` and ``round_started_s`` (training time
    when the current round began); ``teacher``: the current round's teacher weights;
    ``matching``: a plan with distribution matching's ``fake`` score network and its
    ``fake_optimizer``.
    """
    out = {**ckpt, "format_version": STUDENT_FORMAT_VERSION, "prediction": prediction,
           "distill": distill, **matching}
    if teacher is not None:
        out["teacher"] = teacher
    return out


def without_run_state(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint less what only a resume reads (optimizer, RNG, teacher): still a
    complete model to export."""
    return {k: v for k, v in ckpt.items() if k not in RUN_STATE_KEYS}


def is_student(ckpt: dict[str, Any]) -> bool:
    return ckpt.get("format_version") == STUDENT_FORMAT_VERSION


def student_steps(ckpt: dict[str, Any]) -> tuple[int, bool] | None:
    """A student checkpoint's network calls: those of the last round it trained in, and
    whether that round is finished. None for a checkpoint that is not a student or has not
    taken a step yet."""
    if not is_student(ckpt) or ckpt["step"] == 0:
        return None
    plan = DistillConfig.from_dict(ckpt["distill"]["config"])
    step = ckpt["step"]
    if step > plan.rounds_end:  # distribution matching at the last round's steps
        return plan.steps, step == plan.total_steps
    return plan.student_steps((step - 1) // plan.round_steps), step % plan.round_steps == 0


def steps_behind(ckpt: dict[str, Any]) -> int:
    """Optimizer steps behind a checkpoint's weights: a student counts its teachers'."""
    if is_student(ckpt):
        return int(ckpt["distill"]["teacher_train_step"]) + int(ckpt["step"])
    return int(ckpt["step"])


def save_checkpoint(path: str | os.PathLike, ckpt: dict[str, Any]) -> None:
    """Write ``ckpt`` to ``path`` so that a crash leaves either the old file or the new one.

    Through :func:`runtime.util.fileio.atomic_output`: a temporary beside it, fsync, rename, and
    the temporaries of killed runs removed. A full disk is a one-line OutputError.
    """
    _check_plain(ckpt, "ckpt")
    with atomic_output(path) as tmp, open(tmp, "xb") as f:
        try:
            torch.save(ckpt, f)
        except RuntimeError as err:
            # torch reports a failed write as "enforce fail at inline_container.cc"; the
            # OSError (ENOSPC, EIO) it swallowed is the real cause: raise that one.
            cause = _os_error_in(err)
            if cause is None:
                raise
            raise cause from None


def _os_error_in(err: BaseException) -> OSError | None:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


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


def load_checkpoint(path: str | os.PathLike, *, resume: bool = False) -> dict[str, Any]:
    """Read a checkpoint as data (never code) and check that it is one of ours and whole
    (:func:`validate_checkpoint`; ``resume`` adds the optimizer and RNG states)."""
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
    validate_checkpoint(ckpt, path, resume=resume)
    return ckpt


def validate_checkpoint(ckpt: dict[str, Any], path, *, resume: bool = False) -> None:
    """Check a checkpoint's contents against its own model config before torch touches them.

    The configs, schedule and data record, every weight of ``model`` and ``ema`` (names,
    shapes, finite values) and, for ``resume``, the optimizer and RNG states. Raises a
    one-line CheckpointError naming ``path`` and the field.
    """
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}; use a ckpt.pt written by training/train.py "
                               "(or an earlier copy of it)")

    version = ckpt["format_version"]
    student = type(version) is int and version == STUDENT_FORMAT_VERSION
    if not student:
        newest = (STUDENT_FORMAT_VERSION if type(version) is int and version > FORMAT_VERSION
                  else FORMAT_VERSION)
        check_format_version(version, newest, str(path), "the checkpoint",
                             "use the code version that wrote it", error=CheckpointError)
    checks = {
        "model_config": ModelConfig.from_dict,
        "train_config": TrainConfig.from_dict,
        "schedule": check_schedule,
        "data": lambda v: _check_data(v, resume),
        "step": lambda v: check_integer(v, "step", 0, None),
    }
    if student:
        missing = [k for k in ("prediction", "distill") if k not in ckpt]
        if missing:
            raise bad(f"format version {version} (a distilled student) but no {missing}")
        checks["prediction"] = _check_prediction
        checks["distill"] = _check_distill
    parsed = {}
    for name, check in checks.items():
        try:
            parsed[name] = check(ckpt[name])
        except (TypeError, ValueError, KeyError, AttributeError) as err:
            raise bad(f"invalid '{name}' ({one_line(err)})") from None
    # The configs against each other: training rebuilds its schedule from train_config,
    # export and the runtime read 'schedule'; they must be the same chain.
    disagree = _schedule_disagreement(parsed["train_config"], parsed["schedule"].config)
    if disagree:
        raise bad(f"its train_config and its 'schedule' disagree on {disagree}")
    if student:
        problem = _plan_problem(parsed["distill"], parsed["train_config"], parsed["step"])
        if problem:
            raise bad(f"invalid 'distill' ({problem})")
    config = parsed["model_config"]
    expected_shape = (config.in_channels, config.image_size, config.image_size)
    if parsed["data"] != expected_shape:
        raise bad(f"its data are {list(parsed['data'])} images but its model_config expects "
                  f"{list(expected_shape)}")
    with torch.device("meta"):  # shapes only: nothing is allocated for the reference
        reference = UNet(config)
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    weights = ["model", "ema"]
    if student and (resume or "teacher" in ckpt):  # a student resumes with its round's teacher
        weights.append("teacher")
    # ...and a plan that matches distributions with its fake score network and its Adam.
    matching = student and resume and parsed["distill"].match_steps > 0
    if matching:
        weights.append("fake")
    for name in weights:
        problem = _weights_problem(ckpt.get(name), shapes)
        if problem:
            raise bad(f"'{name}' weights do not fit its model_config: {problem}")
    if resume:
        params = [tuple(p.shape) for p in reference.parameters()]
        optimizers = ["optimizer"] + (["fake_optimizer"] if matching else [])
        for name, problem in ([(o, _optimizer_problem(ckpt.get(o), params)) for o in optimizers]
                              + [("rng", _rng_problem(ckpt.get("rng")))]):
            if problem:
                raise bad(f"cannot resume: '{name}' state {problem}")


def _check_data(data: Any, resume: bool) -> tuple[int, int, int]:
    if not isinstance(data, dict):
        raise TypeError(f"expected an object, got {type(data).__name__}")
    check_data_range(data["data_range"])
    check_integer(data["num_levels"], "num_levels", 2, MAX_LEVELS)
    for key in ("name", "spec"):
        value = data.get(key)
        # A resumed run reloads its data by 'spec'; export only names it.
        if (value is not None or (resume and key == "spec")) \
                and not (isinstance(value, str) and value.strip()):
            raise ValueError(f"{key} must be a non-empty string, got {value!r}")
    return check_image_shape(data["image_shape"])


def _check_prediction(value: Any) -> str:
    if value not in PREDICTIONS:
        raise ValueError(f"expected one of {PREDICTIONS}, got {value!r}")
    return value


def _check_distill(value: Any) -> DistillConfig:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    plan = DistillConfig.from_dict(value["config"])
    digest = value["teacher_sha256"]
    if not (isinstance(digest, str) and len(digest) == 64
            and all(c in "0123456789abcdef" for c in digest)):
        raise ValueError(f"teacher_sha256 must be 64 hex digits, got {digest!r}")
    _check_prediction(value["teacher_prediction"])
    check_integer(value["teacher_train_step"], "teacher_train_step", 0, None)
    started = value["round_started_s"]
    if isinstance(started, bool) or not isinstance(started, (int, float)) \
            or not 0 <= started < float("inf"):
        raise ValueError(f"round_started_s must be a number >= 0, got {started!r}")
    return plan


def _plan_problem(plan: DistillConfig, train: TrainConfig, step: int) -> str | None:
    if plan.teacher_steps > train.num_timesteps:
        return (f"{plan.teacher_steps} teacher steps are more than the schedule's "
                f"{train.num_timesteps}")
    if train.steps != plan.total_steps:
        return (f"train_config steps {train.steps} are not {plan.rounds} rounds of "
                f"{plan.round_steps} and {plan.match_steps} of matching")
    if step > train.steps:
        return f"step {step} is past the plan's last, {train.steps}"
    return None


def _schedule_disagreement(train: TrainConfig, schedule: dict[str, Any]) -> str | None:
    expected = {"kind": train.schedule_kind, "num_timesteps": train.num_timesteps}
    if train.schedule_kind == "linear":
        expected.update(beta_start=train.beta_start, beta_end=train.beta_end)
    diffs = [f"{key} ({value!r} vs {schedule.get(key)!r})"
             for key, value in expected.items() if schedule.get(key) != value]
    return ", ".join(diffs) or None


def nonfinite_tensor(tensors: dict[str, Any]) -> str | None:
    """The name of the first floating tensor holding NaN or inf, or None."""
    for key, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() \
                and not bool(torch.isfinite(value).all()):
            return key
    return None


def _weights_problem(state: Any, shapes: dict[str, tuple[int, ...]]) -> str | None:
    if not isinstance(state, dict):
        return f"expected a dict of tensors, got {type(state).__name__}"
    missing = [k for k in shapes if k not in state]
    extra = [k for k in state if k not in shapes]
    if missing or extra:
        return (f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} unexpected "
                f"(e.g. {extra[:2]})")
    for key, shape in shapes.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return f"{key} is not a floating-point tensor"
        if tuple(value.shape) != shape:
            return f"{key} has shape {list(value.shape)}, the model's is {list(shape)}"
    bad = nonfinite_tensor(state)
    return f"{bad} holds NaN or inf" if bad else None


def _optimizer_problem(state: Any, params: list[tuple[int, ...]]) -> str | None:
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) \
            or not isinstance(state.get("param_groups"), list) or not state["param_groups"]:
        return "is missing or empty (expected Adam's state and param_groups)"
    indices = [i for g in state["param_groups"] if isinstance(g, dict)
               for i in g.get("params", ())]
    if indices != list(range(len(params))):
        return f"covers {len(indices)} parameters, the model has {len(params)}"
    for index, entry in state["state"].items():
        if index not in range(len(params)) or not isinstance(entry, dict):
            return f"has an entry for unknown parameter {index!r}"
        for key in ("exp_avg", "exp_avg_sq"):
            value = entry.get(key)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != params[index]:
                return f"{key} of parameter {index} does not match its shape {list(params[index])}"
        bad = nonfinite_tensor(entry)
        if bad:
            return f"{bad} of parameter {index} holds NaN or inf"
    return None


def _rng_problem(state: Any) -> str | None:
    """Each state is tried on a fresh generator, so a malformed one is refused here, not by
    the global generators halfway through a resume."""
    np_state = state.get("numpy") if isinstance(state, dict) else None
    if not (isinstance(state, dict) and isinstance(state.get("torch"), torch.Tensor)
            and isinstance(state.get("cuda"), list) and isinstance(np_state, dict)
            and isinstance(np_state.get("keys"), list)):
        return "is missing or malformed"
    try:
        torch.Generator().set_state(state["torch"])
    except (RuntimeError, TypeError) as err:
        return f"'torch' is not a CPU generator state ({one_line(err)})"
    try:
        for cuda_state in state["cuda"]:
            if not isinstance(cuda_state, torch.Tensor) or cuda_state.dtype != torch.uint8:
                raise TypeError("not a uint8 tensor")
            if torch.cuda.is_available():
                torch.Generator("cuda").set_state(cuda_state)
    except (RuntimeError, TypeError) as err:
        return f"'cuda' is not a list of CUDA generator states ({one_line(err)})"
    fields = [np_state.get(k) for k in ("kind", "pos", "has_gauss", "cached_gaussian")]
    if not (len(np_state["keys"]) == 624 and all(type(k) is int for k in np_state["keys"])
            and type(fields[1]) is int and type(fields[2]) is int and type(fields[3]) is float):
        return "'numpy' is not a numpy RandomState state"
    try:
        np.random.RandomState().set_state((fields[0], np.array(np_state["keys"], np.uint32),
                                           *fields[1:]))
    except (ValueError, TypeError, OverflowError, IndexError) as err:
        return f"'numpy' is not a numpy RandomState state ({one_line(err)})"
    return None


def build_model(ckpt: dict[str, Any], weights: str = "ema") -> UNet:
    """The UNet of a loaded checkpoint, in eval mode, with its EMA or raw weights."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    model = UNet(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["ema" if weights == "ema" else "model"])
    return model.eval()
