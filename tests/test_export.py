"""Export: checkpoint -> verified, self-describing ONNX; to_trt.py where TensorRT is absent."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import runtime
from export.onnx_export import (
    OPSETS,
    export_checkpoint,
    sha256_file,
    verify_onnx,
)
from runtime.backends.ort import OrtBackend
from runtime.backends.trt import trt_unavailable_reason
from runtime.metadata import METADATA_KEY, ModelRecord
from runtime.schedule import Schedule
from training.checkpoint import build_model, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _cli(script: str, *args):
    return subprocess.run([sys.executable, str(REPO / "export" / script), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO)


def test_contract_names_dtypes_and_dynamic_batch(trained_onnx):
    proto = onnx.load(str(trained_onnx))
    onnx.checker.check_model(proto, full_check=True)
    inputs = {i.name: i.type.tensor_type for i in proto.graph.input}
    outputs = {o.name: o.type.tensor_type for o in proto.graph.output}
    assert set(inputs) == {"x", "t"} and set(outputs) == {"eps"}
    for tensor in [*inputs.values(), *outputs.values()]:
        assert tensor.elem_type == onnx.TensorProto.FLOAT
        assert tensor.shape.dim[0].dim_param  # symbolic: any batch
    assert [d.dim_value for d in inputs["x"].shape.dim[1:]] == [1, 8, 8]
    with OrtBackend(trained_onnx) as backend:
        for b in (1, 7):
            eps = backend(np.zeros((b, 1, 8, 8), np.float32), np.full(b, 3.0, np.float32))
            assert eps.shape == (b, 1, 8, 8)


def test_metadata_round_trip(trained_run, trained_onnx):
    ckpt = load_checkpoint(trained_run / "ckpt.pt")
    proto = onnx.load(str(trained_onnx))
    (entry,) = [p for p in proto.metadata_props if p.key == METADATA_KEY]
    record = ModelRecord.from_json(entry.value, "test")
    assert record.schedule == ckpt["schedule"]
    assert record.model_config == ckpt["model_config"]
    assert list(record.image_shape) == ckpt["data"]["image_shape"]
    assert record.num_levels == 17 and record.data_range == (-1.0, 1.0)
    assert record.checkpoint_sha256 == sha256_file(trained_run / "ckpt.pt")
    assert record.weights == "ema" and record.train_step == ckpt["step"]
    assert record.exporter["name"] == "dynamo" and record.exporter["opset"] == OPSETS["dynamo"]
    assert [o.version for o in proto.opset_import if o.domain == ""] == [OPSETS["dynamo"]]
    assert record.flops_per_image > 0
    # The runtime rebuilds the training schedule exactly from the record.
    np.testing.assert_array_equal(record.build_schedule().betas,
                                  Schedule.from_config(ckpt["schedule"]).betas)


def test_raw_weights_differ_from_ema(trained_run, tmp_path):
    path, record, check = export_checkpoint(trained_run / "ckpt.pt", tmp_path / "raw.onnx",
                                            weights="raw")
    assert check.ok and record.weights == "raw"
    ckpt = load_checkpoint(trained_run / "ckpt.pt")
    raw, ema = build_model(ckpt, "raw"), build_model(ckpt, "ema")
    assert verify_onnx(raw, path).ok
    assert not verify_onnx(ema, path).ok  # the file really holds the raw weights


@pytest.fixture(scope="module")
def cli_export(trained_run, tmp_path_factory):
    """`to_trt.py` on the trained checkpoint, run once for the tests below (on one worker
    under xdist: tests/conftest.py's ONE_WORKER): (its completed process, the ONNX file it
    writes beside the engine). The ONNX step is to_onnx.py's, output included; without
    TensorRT it is the whole command (exit 3)."""
    out = tmp_path_factory.mktemp("cli_export") / "m.plan"
    return _cli("to_trt.py", trained_run / "ckpt.pt", "-o", out), out.with_suffix(".onnx")


def test_export_is_deterministic(cli_export, trained_onnx):
    # The same checkpoint exported by the CLI, in another process, to another folder.
    result, again = cli_export
    assert result.returncode in (0, 3), result.stderr  # 3: no TensorRT here
    data = again.read_bytes()
    assert data == trained_onnx.read_bytes()
    # torch.export records stack traces; none may survive, or the bytes would depend on
    # where the code is checked out.
    assert str(REPO).encode() not in data and b"stack_trace" not in data


# Ops TensorRT 10's ONNX parser imports natively (onnx-tensorrt's operator support matrix),
# of those a U-Net can plausibly be exported to.
TRT10_OPS = {"Add", "BatchNormalization", "Concat", "Constant", "Conv", "ConvTranspose", "Cos",
             "Div", "Einsum", "Gemm", "InstanceNormalization", "MatMul", "Mul", "Reshape",
             "Sigmoid", "Sin", "Softmax", "Sub", "Transpose", "Unsqueeze"}


def test_graph_is_simplified_and_parsable_by_tensorrt(trained_onnx):
    graph = onnx.load(str(trained_onnx)).graph
    ops = {node.op_type for node in graph.node}
    assert ops <= TRT10_OPS, ops - TRT10_OPS
    # What the exporter leaves and export removes: Identity and Shape nodes, and x * 1 or
    # x + 0 against constants (a GroupNorm's absent affine).
    assert not ops & {"Identity", "Shape"}
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        neutral = {"Mul": 1.0, "Add": 0.0}.get(node.op_type)
        for name in node.input if neutral is not None else ():
            assert name not in consts or not np.all(consts[name] == neutral), node.name


def test_exporters_sample_the_same_images(trained_run, trained_onnx, tmp_path):
    """A file from the deprecated TorchScript exporter (what export wrote before) still
    loads, names its exporter, and samples what the default exporter's file samples."""
    old = tmp_path / "torchscript.onnx"
    result = _cli("to_onnx.py", trained_run / "ckpt.pt", "-o", old, "--exporter", "torchscript")
    assert result.returncode == 0, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("warning:") and "deprecated" in line
    assert "verification ok" in result.stdout
    images = {}
    for path in (old, trained_onnx):
        with runtime.load(path, threads=1) as pipe:
            images[pipe.record.exporter["name"]] = pipe.sample_float(
                6, seed=3, sampler="ddim", steps=8, progress=False)
    assert set(images) == {"torchscript", "dynamo"}
    assert np.abs(images["dynamo"]).max() > 0.1  # a trained network: not a vacuous image
    # Both files are the same fp32 network up to kernel order (eps differs by ~1e-6 of its
    # scale); 8 DDIM steps keep that well below 1e-5 of the [-1, 1] range.
    np.testing.assert_allclose(images["dynamo"], images["torchscript"], rtol=0, atol=1e-5)


def test_tampered_file_fails_verification(trained_run, trained_onnx, tmp_path):
    proto = onnx.load(str(trained_onnx))
    # Change one weight of the largest initializer by a small, plausible amount.
    init = max(proto.graph.initializer, key=lambda i: int(np.prod(i.dims)))
    weights = numpy_helper.to_array(init).copy()
    weights.flat[0] += 0.05
    init.CopyFrom(numpy_helper.from_array(weights, init.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(proto, str(tampered))
    model = build_model(load_checkpoint(trained_run / "ckpt.pt"))
    assert verify_onnx(model, trained_onnx).ok
    check = verify_onnx(model, tampered)
    assert not check.ok and check.max_rel > check.tolerance


def test_cli_export_prints_verification(cli_export):
    result, out = cli_export
    assert result.returncode in (0, 3), result.stderr
    assert out.is_file()
    assert "verification ok" in result.stdout and "max rel diff" in result.stdout
    # The exporter's progress lines and warnings stay quiet: at most the line saying no
    # engine was built (test_to_trt_without_tensorrt_writes_onnx_and_exits_3).
    assert len(result.stderr.strip().splitlines()) == (result.returncode == 3)
    assert len(result.stdout.strip().splitlines()) == 2 + 2 * (result.returncode == 0)  # + engine


def test_unknown_exporter_is_refused(trained_run, tmp_path):
    with pytest.raises(ValueError, match="exporter must be one of dynamo, torchscript"):
        export_checkpoint(trained_run / "ckpt.pt", tmp_path / "m.onnx", exporter="jit")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.skipif(trt_unavailable_reason() is None, reason="TensorRT and a GPU are present here")
def test_to_trt_without_tensorrt_writes_onnx_and_exits_3(cli_export):
    result, onnx_path = cli_export
    plan = onnx_path.with_suffix(".plan")
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "no TensorRT engine built" in line and "python -m runtime sample" in line
    assert "verification ok" in result.stdout and onnx_path.is_file()
    assert not plan.exists()
    with OrtBackend(onnx_path) as backend:
        assert backend.record.num_levels == 17


@pytest.mark.skipif(trt_unavailable_reason() is None, reason="TensorRT and a GPU are present here")
def test_to_trt_takes_an_upper_case_onnx_suffix_as_onnx(tiny_onnx, tmp_path):
    """M.ONNX is an ONNX file: read as one (its record), never loaded as a checkpoint."""
    model = tmp_path / "M.ONNX"
    model.write_bytes(tiny_onnx.read_bytes())
    result = _cli("to_trt.py", model, "-o", tmp_path / "e.plan")
    assert result.returncode == 3, result.stderr
    assert "no TensorRT engine built" in result.stderr and "checkpoint" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["M.ONNX"]


@pytest.mark.parametrize("content, match", [
    (None, "no such (checkpoint )?file"),
    (b"", "empty|truncated|corrupt|not a"),
    (b"PK\x03\x04 truncated zip", "truncated|corrupt|not a"),
    (b"hello, I am a text file\n", "corrupt|not a"),
])
def test_cli_bad_checkpoint_is_one_line(tmp_path, content, match):
    ckpt = tmp_path / "ckpt.pt"
    if content is not None:
        ckpt.write_bytes(content)
    result = _cli("to_onnx.py", ckpt)
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert str(ckpt) in line
    assert re.search(match, line, re.IGNORECASE), line


def test_truncated_real_checkpoint_is_refused(trained_run, tmp_path):
    data = (trained_run / "ckpt.pt").read_bytes()
    cut = tmp_path / "ckpt.pt"
    cut.write_bytes(data[: len(data) // 2])
    result = _cli("to_onnx.py", cut)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and str(cut) in result.stderr


def test_checkpoint_without_network_is_refused(tmp_path):
    import torch

    path = tmp_path / "notours.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=str(path)):
        export_checkpoint(path, tmp_path / "m.onnx")


def test_network_torch_export_cannot_trace_is_one_error():
    import torch

    from export.onnx_export import ExportError, to_onnx_bytes
    from runtime.schedule import Schedule

    class Branchy(torch.nn.Module):  # control flow on a tensor's value: not exportable
        def forward(self, x, t):
            return x if x.sum() > 0 else -x

    record = ModelRecord(schedule=Schedule.linear(10).config, image_shape=(1, 4, 4),
                         data_range=(-1.0, 1.0), num_levels=17, model_config={},
                         checkpoint_sha256="0" * 64, weights="ema", train_step=0,
                         flops_per_image=1)
    with pytest.raises(ExportError, match="torch.onnx could not export the network") as err:
        to_onnx_bytes(Branchy(), record)
    assert "\n" not in str(err.value)
