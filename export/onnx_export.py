"""Checkpoint -> self-describing ONNX file, verified against the torch model.

Exporter: torch.onnx's torch.export-based exporter (``dynamo=True``, on onnxscript), opset 18.
Choices measured with ONNX Runtime CPU, one thread, against the TorchScript file (README):
- Opset 18: torchlib's own opset (no version conversion), inside the range every TensorRT
  10 parses (10.0: opsets 9-20). Opset 20 writes the same graph. Opset 21 and later lower
  GroupNorm to GroupNormalization, which TensorRT 10.0 cannot parse, TensorRT has mishandled
  (TensorRT issues #3956, #4756), and ONNX Runtime ran slower (digits 1.8x at batch 1,
  1.1x at batch 64), so GroupNorm stays Reshape + InstanceNormalization + Reshape, the
  form TensorRT parses into one normalisation layer.
- Attention stays MatMul + Softmax, as the network writes it: the same attention as two
  Einsum ops was no faster (digits batch 1: 16% slower; batch 64 and CIFAR-10: equal
  within noise) and Einsum is the less-travelled op in the parsers.
- The exporter leaves nodes that do nothing; :func:`_simplification_rules` removes them
  exactly, and the stack traces it records are dropped, so one checkpoint gives identical
  bytes wherever the code is checked out (tested).
``exporter="torchscript"`` keeps the deprecated TorchScript exporter (opset 17), what
export wrote before, while the installed torch has it; it warns. The record's ``exporter``
entry names which one wrote a file.
What is exported is :func:`export.rewrites.deploy_form` of the network (exact rewrites that
run faster, e.g. upsampling as a transposed convolution); verification compares the
file against the original network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from export.rewrites import REWRITES, deploy_form
from export.verification import Verification
from runtime.metadata import METADATA_KEY, ModelRecord, sha256_file
from runtime.util.fileio import atomic_output, check_free_space, check_output, fsync_dir, fsync_file

# Exporter name -> what the record calls it, and the opset it writes.
EXPORTERS = {"dynamo": "torch.onnx (torch.export)", "torchscript": "torch.onnx (TorchScript)"}
DEFAULT_EXPORTER = "dynamo"
OPSETS = {"dynamo": 18, "torchscript": 17}
# fp32 torch vs ONNX Runtime: the same math with different kernel orderings. Measured here
# (max |onnx - torch| / max |torch|): trained digits 3e-7, random-weight presets digits
# 1.3e-6, cifar10 2e-6, celebahq256 4.3e-6 (the deepest). 2e-5 leaves ~5x for other CPUs'
# kernels, and still catches one weight of a trained model moved by 0.05 (6.5e-5, tested).
DEFAULT_TOLERANCE = 2e-5


class ExportError(RuntimeError):
    """Export could not produce a verified model file."""


def count_flops(model: torch.nn.Module, image_shape) -> int:
    """FLOPs of one ε evaluation at batch 1 (torch's counter: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *image_shape)
    t = torch.zeros(1)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return int(counter.get_total_flops())


def exporter_info(exporter: str = DEFAULT_EXPORTER) -> dict:
    """The record's ``exporter`` entry: which exporter wrote the file, at which opset."""
    import onnx

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    return {"name": exporter, "tool": EXPORTERS[exporter], "torch": torch.__version__,
            "onnx": onnx.__version__, "opset": OPSETS[exporter], "rewrites": list(REWRITES)}


def make_record(ckpt: dict, *, sha256: str, weights: str, flops: int,
                exporter: str = DEFAULT_EXPORTER) -> ModelRecord:
    from training.checkpoint import steps_behind

    data = ckpt["data"]
    return ModelRecord(
        schedule=dict(ckpt["schedule"]),
        image_shape=tuple(int(v) for v in data["image_shape"]),
        data_range=tuple(float(v) for v in data["data_range"]),
        num_levels=int(data["num_levels"]),
        model_config=dict(ckpt["model_config"]),
        checkpoint_sha256=sha256,
        weights=weights,
        train_step=steps_behind(ckpt),
        flops_per_image=flops,
        exporter=exporter_info(exporter),
        **student_fields(ckpt),
    )


def student_fields(ckpt: dict) -> dict:
    """A distilled student's record fields: what its network predicts, the sampler it was
    distilled for as its ``defaults`` (DDIM, eta 0, its steps and timesteps) and
    ``distilled``; nothing for any other checkpoint."""
    from training.checkpoint import is_student, student_steps
    from training.config import DistillConfig

    if not is_student(ckpt):
        return {}
    steps = student_steps(ckpt)
    if steps is None:
        raise ExportError("the student has not taken a distillation step yet; export its "
                          "teacher, or distil first")
    plan = DistillConfig.from_dict(ckpt["distill"]["config"])
    return {"prediction": ckpt["prediction"],
            "defaults": {"sampler": "ddim", "steps": steps[0], "spacing": plan.spacing,
                         "eta": 0.0},
            "distilled": {"method": "progressive", "from_steps": plan.teacher_steps,
                          "steps": steps[0],
                          "teacher_sha256": ckpt["distill"]["teacher_sha256"],
                          # steps of distribution matching the weights went through
                          "matching_steps": max(0, ckpt["step"] - plan.rounds_end)}}


def to_onnx_bytes(model: torch.nn.Module, record: ModelRecord, *,
                  exporter: str = DEFAULT_EXPORTER) -> bytes:
    """``model``'s deploy form as one ONNX file's bytes (see :func:`to_onnx_proto`),
    checked by the ONNX checker."""
    import onnx

    proto = to_onnx_proto(model, record, exporter=exporter)
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def to_onnx_proto(model: torch.nn.Module, record: ModelRecord, *,
                  exporter: str = DEFAULT_EXPORTER):
    """``model``'s deploy form as an ONNX ModelProto: inputs x, t, output eps, and the ddpm
    record (docs/design.md, "The model file"). The record written names ``exporter``,
    whatever ``record`` said."""
    info = exporter_info(exporter)
    record = dataclasses.replace(record, exporter={**record.exporter, **info})
    model = deploy_form(model)
    c, h, w = record.image_shape
    x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, record.num_timesteps - 1.0])
    if exporter == "torchscript":
        proto = _torchscript_proto(model, (x, t))
    else:
        proto = _dynamo_proto(model, (x, t))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, record.to_json()
    return proto


def _dynamo_proto(model: torch.nn.Module, args):
    import onnx_ir as ir
    from onnx_ir.passes import common
    from onnxscript import rewriter

    batch = torch.export.Dim("batch")
    with _quiet_exporter():
        try:
            program = torch.onnx.export(
                model, args, dynamo=True, opset_version=OPSETS["dynamo"], optimize=True,
                input_names=["x", "t"], output_names=["eps"], verbose=False,
                dynamic_shapes={"x": {0: batch}, "t": {0: batch}},
            )
        except torch.onnx.errors.OnnxExporterError as err:
            raise ExportError(f"torch.onnx could not export the network: {_root_cause(err)}; "
                              "a network export supports has no control flow on tensor "
                              "values") from err
        ir.passes.PassManager([
            common.ShapeInferencePass(),  # the rules need shapes propagated through Shape
            rewriter.RewritePass(_simplification_rules()),
            common.IdentityEliminationPass(),
            common.RemoveUnusedNodesPass(),
            common.LiftConstantsToInitializersPass(size_limit=1),
            # Stack traces name source files: the bytes would depend on the checkout's path.
            common.ClearMetadataAndDocStringPass(),
        ])(program.model)
    graph = program.model.graph
    for value in [*graph.inputs, *graph.outputs, *graph.initializers.values(),
                  *(out for node in graph for out in node.outputs)]:
        value.metadata_props.clear()  # torch's names for them: noise to every reader
    return ir.serde.serialize_model(program.model)


def _torchscript_proto(model: torch.nn.Module, args):
    import onnx

    warnings.warn("the TorchScript ONNX exporter is deprecated in torch and will be removed; "
                  "use the default exporter (dynamo)", FutureWarning, stacklevel=3)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch announces the deprecation on every call (said once above), and GroupNorm's
        # "more than one value per channel" check warns while tracing; the check is on the
        # image size, fixed by the model, so baking it in as a constant is correct.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Converting a tensor to a Python boolean",
                                category=torch.jit.TracerWarning)
        try:
            torch.onnx.export(
                model, args, buffer, dynamo=False, opset_version=OPSETS["torchscript"],
                input_names=["x", "t"], output_names=["eps"],
                dynamic_axes={"x": {0: "batch"}, "t": {0: "batch"}, "eps": {0: "batch"}},
                do_constant_folding=True,
            )
        except (TypeError, NotImplementedError, ImportError, AttributeError) as err:
            raise ExportError(f"torch {torch.__version__} cannot export with TorchScript "
                              f"({err}); use the default exporter (dynamo)") from None
    return onnx.load_from_string(buffer.getvalue())


def _root_cause(err: BaseException) -> str:
    """The first line of the innermost cause: torch.onnx wraps torch.export's error in a
    page of advice."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


@contextlib.contextmanager
def _quiet_exporter():
    """torch.export and torch.onnx log a line per skipped optional op library, warn about
    internals (axis renaming, pytree deprecations) and print graphs when tracing fails:
    none of it concerns the user. Errors still raise, and name their cause."""
    loggers = [logging.getLogger(name) for name in (
        "torch.onnx", "torch.export", "torch._export", "torch.fx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with (warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()),
              contextlib.redirect_stderr(io.StringIO())):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _simplification_rules():
    """Exact rewrites of what the exporter leaves behind, each measured with ONNX Runtime:

    - Reshape back to ``Shape(x)`` after each GroupNorm's InstanceNormalization becomes a
      Reshape to a constant (``[-1, C, H, W]``): one Shape node less per GroupNorm, 8% less
      time per call for digits at batch 1 (per-node overhead; no change at batch 64).
    - ``x * 1`` and ``x + 0`` against [C, 1, 1] constants, the affine of a GroupNorm that
      has none (the BatchNormalization applies it), are removed. Exact, but for the sign
      of a zero (-0 + 0 is +0), which nothing downstream can see.
    """
    from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet
    from onnxscript.rewriter.rules.common import materialize_reshape_shape_rule

    class NeutralOperand(RewriteRuleClassBase):
        def __init__(self, op_type: str, neutral: float):
            super().__init__(f"Neutral{op_type}")
            self.op_type, self.neutral = op_type, neutral

        def pattern(self, op, x, c):
            return getattr(op, self.op_type)(x, c)

        def check(self, context, x, c) -> MatchResult:
            result = MatchResult()
            value = c.const_value
            if value is None or x.shape is None or x.dtype != c.dtype:
                return result.fail("not a constant operand of a known shape")
            value = value.numpy()
            if not np.all(value == self.neutral):
                return result.fail("constant is not neutral")
            shape = list(x.shape)
            if value.ndim > len(shape) or not all(
                    n == 1 or n == s for n, s in zip(value.shape, shape[len(shape) - value.ndim:],
                                                     strict=True)):
                return result.fail("broadcasting would grow x")
            return result

        def rewrite(self, op, x, c):
            return op.Identity(x)

    neutral = [NeutralOperand.rule("Mul", 1.0), NeutralOperand.rule("Add", 0.0)]
    return RewriteRuleSet([materialize_reshape_shape_rule,
                           *[r for rule in neutral for r in rule.commute()]])


def verify_onnx(model: torch.nn.Module, onnx_path, *, batch_sizes=(1, 5),
                tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> Verification:
    """Run the file in ONNX Runtime (CPU) and the torch model on the same random inputs.

    Timesteps are spread over [0, T) so every part of the embedding is exercised.
    """
    from runtime.backends.ort import OrtBackend

    rng = np.random.default_rng(seed)
    max_abs, max_rel, max_scale = 0.0, 0.0, 0.0
    with OrtBackend(onnx_path, device="cpu") as backend:
        c, h, w = backend.image_shape
        T = backend.record.num_timesteps
        for b in batch_sizes:
            x = rng.standard_normal((b, c, h, w), dtype=np.float32)
            t = np.linspace(0, T - 1, b).round().astype(np.float32)
            got = backend(x, t)
            with torch.inference_mode():
                want = model(torch.from_numpy(x), torch.from_numpy(t)).numpy()
            diff = float(np.max(np.abs(got.astype(np.float64) - want)))
            scale = float(np.max(np.abs(want)))
            max_abs, max_scale = max(max_abs, diff), max(max_scale, scale)
            max_rel = max(max_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else np.inf))
    return Verification(max_abs, max_rel, tolerance, tuple(batch_sizes), max_scale)


def unverified_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.unverified{path.suffix}")


def export_checkpoint(ckpt_path, out_path, *, weights: str = "ema",
                      tolerance: float = DEFAULT_TOLERANCE,
                      batch_sizes=(1, 5), exporter: str = DEFAULT_EXPORTER,
                      external_data: str = "auto",
                      ) -> tuple[Path, ModelRecord, Verification]:
    """Checkpoint -> ONNX file with metadata, verified against torch.

    The file is written to a temporary beside ``out_path`` and verified there; only a
    verified file is renamed to ``out_path``, so a failure leaves the previous file as it
    was. A file that fails verification is kept as ``*.unverified.onnx`` for inspection, and
    :class:`ExportError` says so: a user never picks up an unverified model by accident.
    """
    from training.checkpoint import build_model, load_checkpoint, student_steps

    ckpt_path, out_path = Path(ckpt_path), Path(out_path)
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    check_onnx_output(out_path, inputs=[ckpt_path])
    ckpt = load_checkpoint(ckpt_path)  # validated: a bad record fails here, nothing written
    steps = student_steps(ckpt)
    if steps is not None and not steps[1]:
        warnings.warn(f"{ckpt_path} is a student in the middle of its {steps[0]}-step round; "
                      f"its finished students are the student-N.pt files beside it",
                      stacklevel=2)
    model = build_model(ckpt, weights=weights)
    flops = count_flops(model, ckpt["data"]["image_shape"])
    record = make_record(ckpt, sha256=sha256_file(ckpt_path), weights=weights, flops=flops,
                         exporter=exporter)
    check = write_verified(model, record, out_path, tolerance=tolerance,
                           batch_sizes=batch_sizes, exporter=exporter,
                           external_data=external_data)
    return out_path, record, check


def export_diffusers(folder, out_path, *, scheduler=None, tolerance: float = DEFAULT_TOLERANCE,
                     batch_sizes=(1, 5), exporter: str = DEFAULT_EXPORTER,
                     external_data: str = "auto",
                     ) -> tuple[Path, ModelRecord, Verification]:
    """A diffusers DDPM folder -> ONNX file with metadata, verified against diffusers'
    own forward (:mod:`export.diffusers_import`), written as :func:`export_checkpoint`
    writes."""
    from export.diffusers_import import load_folder

    out_path = Path(out_path)
    imported = load_folder(folder, scheduler=scheduler)  # reads only: nothing written yet
    check_onnx_output(out_path, inputs=imported.inputs)
    flops = count_flops(imported.network, imported.record.image_shape)
    record = dataclasses.replace(imported.record, flops_per_image=flops,
                                 exporter=exporter_info(exporter))
    check = write_verified(imported.network, record, out_path, tolerance=tolerance,
                           batch_sizes=batch_sizes, exporter=exporter,
                           external_data=external_data)
    return out_path, record, check


def check_onnx_output(out_path: Path, inputs: list[Path]) -> None:
    """Before any work: ``-o`` names an .onnx file, and neither it nor its
    ``*.unverified.onnx`` can be one of ``inputs`` or unwritable."""
    if out_path.suffix.lower() != ".onnx" or out_path.name.lower() == ".onnx":
        # The runtime picks a model's backend by its suffix: model.jpg would be "a JPEG".
        raise ValueError(f"-o/--out {out_path}: an ONNX file's name must end in .onnx; "
                         f"give e.g. {out_path.with_name('model.onnx')}")
    for path in (out_path, unverified_path(out_path)):
        check_output(path, inputs=inputs, option="-o/--out")


def write_verified(model: torch.nn.Module, record: ModelRecord, out_path: Path, *,
                   tolerance: float, batch_sizes, exporter: str,
                   external_data: str = "auto") -> Verification:
    """Write ``model`` as ONNX to a temporary beside ``out_path``, verify it against
    ``model`` there, and rename it only if it passes (else keep it as *.unverified.onnx and
    raise ExportError). ``external_data``: "auto" (weights of EXTERNAL_DATA_MIN_BYTES or
    more go to a data file beside the model, see :func:`_write_external`), "yes" or "no"."""
    if external_data not in EXTERNAL_DATA_CHOICES:
        raise ValueError(f"external_data must be one of {EXTERNAL_DATA_CHOICES}, got "
                         f"{external_data!r}")
    # The file holds every weight: a disk without room for them fails now, not after a
    # trace that takes minutes for the 256x256 network.
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    check_free_space(out_path, weights, "the model's weights", option="-o/--out")
    proto = to_onnx_proto(model, record, exporter=exporter)
    return write_proto_verified(model, proto, out_path, tolerance=tolerance,
                                batch_sizes=batch_sizes, external_data=external_data)


def write_proto_verified(model: torch.nn.Module, proto, out_path: Path, *, tolerance: float,
                         batch_sizes, external_data: str = "auto") -> Verification:
    """Write the ONNX ``proto`` of ``model`` as :func:`write_verified` does."""
    if writes_external_data(_initializer_bytes(proto), external_data):
        return _write_external(model, proto, out_path, tolerance=tolerance,
                               batch_sizes=batch_sizes)
    import onnx

    onnx.checker.check_model(proto, full_check=True)
    with atomic_output(out_path) as tmp:
        tmp.write_bytes(proto.SerializeToString())
        check = verify_onnx(model, tmp, batch_sizes=batch_sizes, tolerance=tolerance)
        if not check.ok:
            bad = unverified_path(out_path)
            os.replace(tmp, bad)
            raise _unverified(bad, check, out_path)
    return check


# Networks with this many bytes of weights are written as model.onnx plus one data file:
# ONNX Runtime then maps the weights from the file instead of parsing them out of the
# protobuf and copying them (the 256x256 network, 114M parameters, batch 1: peak 1118 MiB
# against 1446 MiB as one file). Over 2 GiB it is the only way: protobuf cannot serialise a
# larger message.
EXTERNAL_DATA_MIN_BYTES = 100 << 20
PROTOBUF_LIMIT = 2 << 30
EXTERNAL_DATA_CHOICES = ("auto", "yes", "no")


def writes_external_data(weights: int, choice: str) -> bool:
    """Whether ``weights`` bytes of tensors go to a data file under ``--external-data
    choice``; ValueError where one file cannot hold them."""
    if choice == "no" and weights >= PROTOBUF_LIMIT:
        raise ValueError(f"the network's weights are {weights / 2**30:.1f} GiB, over the 2 GiB "
                         "one ONNX file can hold; export with --external-data auto or yes")
    return choice == "yes" or (choice == "auto" and weights >= EXTERNAL_DATA_MIN_BYTES)


def _initializer_bytes(proto) -> int:
    return sum(len(t.raw_data) for t in proto.graph.initializer)


def _unverified(bad: Path, check: Verification, out_path: Path) -> ExportError:
    return ExportError(f"{bad}: ONNX output differs from torch ({check}); the file is kept "
                       f"for inspection but must not be deployed ({out_path} is unchanged)")


def data_file_name(out_path: Path, digest: str) -> str:
    """The data file of ``out_path``'s weights: named by their SHA-256, so a new export never
    writes over the data an older model file still reads."""
    return f"{out_path.stem}.{digest[:16]}.onnx.data"


def _write_external(model: torch.nn.Module, proto, out_path: Path, *, tolerance: float,
                    batch_sizes) -> Verification:
    """Write ``proto`` as ``out_path`` plus its weights in one data file beside it, verified.

    Both are written into a temporary folder beside ``out_path`` (the model file names its
    data by a path relative to itself) and verified there. Then the data file moves into
    place under a name it alone has (:func:`data_file_name`), and the model file's rename is
    the commit: until it, the old model file and its own data are untouched; after it, the
    data file the old one named (if this export wrote it) is removed.
    """
    import shutil
    import tempfile

    import onnx

    from runtime.backends.onnx_files import external_data_names

    folder = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        staged = folder / out_path.name
        onnx.save_model(proto, staged, save_as_external_data=True,
                        all_tensors_to_one_file=True, location="weights.data",
                        size_threshold=1024)
        name = data_file_name(out_path, sha256_file(folder / "weights.data"))
        os.rename(folder / "weights.data", folder / name)
        # onnx writes it owner-only; it is as readable as the model file that names it.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(folder / name, 0o666 & ~umask)
        for tensor in proto.graph.initializer:  # save_model left them naming the file
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = name
        staged.write_bytes(proto.SerializeToString())
        onnx.checker.check_model(str(staged), full_check=True)
        for path in (staged, folder / name):
            fsync_file(path)
        check = verify_onnx(model, staged, batch_sizes=batch_sizes, tolerance=tolerance)
        if not check.ok:
            bad = unverified_path(out_path)
            os.replace(folder / name, out_path.parent / name)
            os.replace(staged, bad)
            raise _unverified(bad, check, out_path)
        old = []
        if out_path.is_file():
            with contextlib.suppress(ValueError, OSError):
                old = external_data_names(out_path)
        os.replace(folder / name, out_path.parent / name)
        os.replace(staged, out_path)
        fsync_dir(out_path.parent)
        prefix = f"{out_path.stem}."
        for stale in old:  # only a data file an export of this name wrote
            if stale != name and "/" not in stale and stale.startswith(prefix) \
                    and stale.endswith(".onnx.data"):
                with contextlib.suppress(OSError):
                    (out_path.parent / stale).unlink()
        return check
    finally:
        shutil.rmtree(folder, ignore_errors=True)
