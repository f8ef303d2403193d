"""Bad input at every entry point: a one-line error naming the culprit, a non-zero exit,
no traceback, and no file that existed before changed.

Each table runs its cases through the real CLI (``tests/cli_batch.py``: one process per
table, the command's own click main per case) and a few through their own interpreter.
The files the cases point at are real: a trained checkpoint and its variants, model files
with edited records, a decompression-bomb PNG, an unrelated ONNX graph.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_runtime import _rewrite_record

ROOT = Path(__file__).resolve().parents[1]


# === Running a table and checking what it did ===

def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_table(target: str, cases: list[tuple], folder: Path, *, new_files=()) -> None:
    """Run ``cases`` ([(argv, culprit)]) with ``target`` ("module:command") and check each."""
    before = snapshot(folder)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "cli_batch.py"), target,
                           json.dumps([[str(a) for a in argv] for argv, _ in cases])],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for (argv, culprit), result in zip(cases, results, strict=True):
        check_refused(argv, culprit, result["code"], result["err"])
    after = snapshot(folder)
    changed = [name for name, digest in before.items() if after.get(name) != digest]
    assert not changed, f"pre-existing files changed or lost: {changed}"
    assert sorted(set(after) - set(before)) == sorted(new_files)


def check_refused(argv, culprit: str, code: int, err: str) -> None:
    where = f"{argv}: {err[-1500:]}"
    assert code not in (0, 70), where
    assert "Traceback" not in err, where
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and str(culprit) in errors[0], where


# === Files the cases use ===

@pytest.fixture(scope="module")
def ckpt(trained_run):
    import torch

    return torch.load(trained_run / "ckpt.pt", weights_only=True)


def write_ckpt(path: Path, ckpt: dict, edit) -> Path:
    import copy

    import torch

    ckpt = copy.deepcopy(ckpt)
    edit(ckpt)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def _first(state: dict) -> str:
    return next(iter(state))


# How a checkpoint can be wrong, and what the error must name besides the file.
CKPT_EDITS = {
    "missing": lambda c: c["ema"].pop(_first(c["ema"])),
    "extra": lambda c: c["model"].update({"bogus.weight": c["model"][_first(c["model"])]}),
    "misshaped": lambda c: c["ema"].update({_first(c["ema"]): c["ema"][_first(c["ema"])][:1]}),
    "other_config": lambda c: c["model_config"].update(ch=32),
    "newer": lambda c: c.update(format_version=3),  # 2 is a distilled student's
    "student_without_plan": lambda c: c.update(format_version=2),
    "t0": lambda c: c["schedule"].update(num_timesteps=0),
    "nan": lambda c: c["ema"][_first(c["ema"])].view(-1).__setitem__(0, float("nan")),
    # The configs must agree with each other and sample in float32.
    "t_mismatch": lambda c: c["train_config"].update(num_timesteps=500),
    "huge_t": lambda c: c["train_config"].update(num_timesteps=10**9),
    "tiny_beta": lambda c: (c["train_config"].update(beta_start=1e-20),
                            c["schedule"].update(beta_start=1e-20)),
    "wide_range": lambda c: c["data"].update(data_range=[-3e38, 3e38]),
    "huge_ch": lambda c: c["model_config"].update(ch=2**40),
    "huge_levels": lambda c: c["data"].update(num_levels=10**12),
}


def bomb_png(path: Path, side: int = 30_000) -> Path:
    """A valid PNG header announcing side x side pixels (pillow refuses it at open)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def patched_npz(path: Path, *, flag: int | None = None, method: int | None = None) -> Path:
    """A real .npz of 40 digits whose one member claims to be encrypted (``flag``) or
    compressed by another method (``method``), in both zip headers."""
    np.savez(path, images=np.zeros((40, 8, 8), np.uint8))
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.index(signature) + offset
        if flag is not None:
            struct.pack_into("<H", data, at, flag)
        if method is not None:
            struct.pack_into("<H", data, at + 2, method)
    path.write_bytes(bytes(data))
    return path


def unrelated_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(path))
    return path


def wide_onnx(path: Path, record: dict, image_shape: list[int]) -> Path:
    """A model of ``image_shape`` images whose network is eps = x - x (never run here)."""
    import onnx
    from onnx import TensorProto, helper

    from runtime.metadata import METADATA_KEY

    def tensor(name, dims):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *dims])

    graph = helper.make_graph([helper.make_node("Sub", ["x", "x"], ["eps"])], "g",
                              [tensor("x", image_shape), tensor("t", [])],
                              [tensor("eps", image_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps({**record, "image_shape": image_shape})
    onnx.save(model, str(path))
    return path


def engine_with_sidecar(folder: Path, name: str, record: dict, text: bytes | None = None):
    """An engine file (any bytes: it is refused before TensorRT reads it) and its sidecar."""
    engine = folder / f"{name}.plan"
    engine.write_bytes(b"not an engine")
    info = {"version": "10.0", "gpu": "none", "compute_capability": [8, 0],
            "precision": "fp32", "profile": {"min": 1, "opt": 1, "max": 4}}
    sidecar = text if text is not None else json.dumps({**record, "tensorrt": info}).encode()
    (folder / f"{name}.plan.json").write_bytes(sidecar)
    return engine


def latin_record(src: Path, dst: Path) -> Path:
    """A model whose record is not UTF-8 (protobuf strings must be): one byte changed."""
    from tests.test_runtime import _rewrite_record

    marker = "\u00e9ma-in-the-record"
    _rewrite_record(src, dst, lambda r: json.dumps({**r, "weights": marker},
                                                   ensure_ascii=False))
    data = dst.read_bytes()
    assert data.count(marker.encode()) == 1
    # The same length (protobuf's length prefix stays right), and no longer UTF-8.
    dst.write_bytes(data.replace(marker.encode(), b"\xe9A" + marker[1:].encode()))
    return dst


def onnx_record(path: Path) -> dict:
    import onnx

    from runtime.metadata import METADATA_KEY

    proto = onnx.load(str(path))
    return json.loads(next(p.value for p in proto.metadata_props if p.key == METADATA_KEY))


# What a model record can hold that it must not: each is refused, naming the file.
RECORD_EDITS = {
    "schedule_string": lambda r: {**r, "schedule": "linear"},
    "schedule_list": lambda r: {**r, "schedule": [1, 2]},
    "huge_t": lambda r: {**r, "schedule": {**r["schedule"], "num_timesteps": 100_000_000}},
    "beta_string": lambda r: {**r, "schedule": {**r["schedule"], "beta_end": "0.02"}},
    "beta_nan": lambda r: {**r, "schedule": {**r["schedule"], "beta_end": float("nan")}},
    "infinite_range": lambda r: {**r, "data_range": [-float("inf"), float("inf")]},
    "three_range": lambda r: {**r, "data_range": [-1, 0, 1]},
    "fractional_shape": lambda r: {**r, "image_shape": [1, 8.5, 8]},
    "fractional_levels": lambda r: {**r, "num_levels": 16.5},
    "bool_levels": lambda r: {**r, "num_levels": True},
    "huge_image": lambda r: {**r, "image_shape": [3, 100_000, 100_000]},
    "five_channels": lambda r: {**r, "image_shape": [5, 8, 8]},
    "newer": lambda r: {**r, "format_version": 2},
    # Schedules and ranges that load but cannot sample (all-black images, NaN).
    "tiny_beta": lambda r: {**r, "schedule": {**r["schedule"], "beta_start": 1e-20}},
    "cosine_underflow": lambda r: {**r, "schedule": {"kind": "cosine",
                                                     "num_timesteps": 100_000, "s": 0.0}},
    "steep": lambda r: {**r, "schedule": {**r["schedule"], "beta_end": 0.5}},
    "overflow_range": lambda r: {**r, "data_range": [-3e38, 3e38]},
    "subnormal_range": lambda r: {**r, "data_range": [0.0, 1e-40]},
    "point_range": lambda r: {**r, "data_range": [1.0, 1.0 + 1e-9]},
    "long_int": lambda r: json.dumps(r).replace('"num_levels": 17',
                                                '"num_levels": ' + "9" * 5000),
}


# === python -m runtime ===

def test_runtime_cli_refuses_bad_input(tiny_onnx, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(tiny_onnx.read_bytes())
    model_png = tmp_path / "model.png"  # a model under a PNG name: -o must not replace it
    model_png.write_bytes(tiny_onnx.read_bytes())
    record = onnx_record(tiny_onnx)
    bad = {name: _rewrite_record(tiny_onnx, tmp_path / f"{name}.onnx", edit)
           for name, edit in RECORD_EDITS.items()}
    not_utf8 = engine_with_sidecar(tmp_path, "latin", record,
                                   json.dumps(record).encode().replace(b'"ema"', b'"\xe9ma"'))
    long_int = engine_with_sidecar(tmp_path, "digits", record, json.dumps(record).replace(
        '"num_levels": 17', '"num_levels": ' + "9" * 5000).encode())
    zero = engine_with_sidecar(tmp_path, "zero", record)
    (tmp_path / "zero.plan.json").unlink()
    (tmp_path / "zero.plan.json").symlink_to("/dev/zero")
    fifo = engine_with_sidecar(tmp_path, "fifo", record)
    (tmp_path / "fifo.plan.json").unlink()
    os.mkfifo(tmp_path / "fifo.plan.json")
    bad["latin_onnx"] = latin_record(tiny_onnx, tmp_path / "latin_onnx.onnx")
    sidecar_schedule = engine_with_sidecar(tmp_path, "sched", {**record, "schedule": "linear"})
    quick = ["--steps", "2", "-n", "2", "--no-progress"]
    # --each must not write over the model or the other outputs, at any index below -n.
    (tmp_path / "each1").mkdir()
    model_in_each = tmp_path / "each1" / "00001.png"
    model_in_each.write_bytes(tiny_onnx.read_bytes())
    (tmp_path / "each2").mkdir()
    (tmp_path / "each2" / "00002.png").hardlink_to(model)
    # One set: a later --each PNG that no rename can replace fails before -o and --npz are.
    (tmp_path / "each4" / "00001.png").mkdir(parents=True)
    (tmp_path / "g4.png").write_bytes(b"the old grid")
    (tmp_path / "a4.npz").write_bytes(b"the old arrays")
    deep = tmp_path.joinpath(*["d" * 200] * 21)  # over PATH_MAX
    cases = [
        (["sample", model, "-o", tmp_path / "g4.png", "--npz", tmp_path / "a4.npz",
          "--each", tmp_path / "each4", *quick], "00001.png is a folder"),
        (["sample", model, "-o", tmp_path / ("n" * 252 + ".png"), *quick], "-o/--out"),
        (["sample", model, "--npz", tmp_path / ("n" * 252 + ".npz"), *quick], "--npz"),
        (["sample", model, "--each", tmp_path / ("n" * 256), *quick], "--each"),
        (["sample", model, "-o", deep / "s.png", *quick], "-o/--out"),
        (["sample", model, "--npz", deep / "a.npz", *quick], "--npz"),
        (["sample", model, "--each", deep, *quick], "--each"),
        (["sample", model_in_each, "--each", tmp_path / "each1", "--backend", "ort",
          "-o", tmp_path / "g.png", *quick], "also an input"),
        (["sample", model, "--each", tmp_path / "each2", "-o", tmp_path / "g.png",
          "--steps", "2", "-n", "3", "--no-progress"], "image 2 of 3"),
        (["sample", model, "--each", tmp_path / "each3", "-o", tmp_path / "each3" / "00003.png",
          "--steps", "2", "-n", "4", "--no-progress"], "00003.png, which is also -o/--out"),
        (["sample", model, "--each", tmp_path / "each3", "--npz", tmp_path / "each3" / "a.npz",
          "-o", tmp_path / "each3" / "00000.png", *quick], "--each"),
        (["sample", model, "-o", tmp_path / ".png", *quick], "no name before .png"),
        (["sample", model, "--npz", tmp_path / ".NPZ", *quick], "no name before .npz"),
        (["sample", model_png, "--backend", "ort", "-o", model_png, *quick], "also an input"),
        (["sample", model, "-o", tmp_path / "s.jpg", *quick], "-o/--out"),
        (["sample", model, "-o", "/proc/no/s.png", *quick], "-o/--out"),
        (["sample", model, "--npz", model, *quick], "--npz"),
        (["sample", model, "--npz", tmp_path / "arrays", *quick], "--npz"),
        (["sample", model, "--each", model, *quick], "--each"),
        (["sample", model, "-n", 10**9, "--steps", "2"], "n=1000000000"),
        (["sample", model, "--seed", "-1", *quick], "--seed"),
        (["sample", model, "--seed", str(2**63), *quick], "--seed"),
        (["sample", model, "--sampler", "ddim", "--eta", "1000", *quick], "--eta"),
        (["sample", model, "--sampler", "ddim", "--eta", "nan", *quick], "--eta"),
        (["sample", model, "--threads", 10**9, *quick], "--threads"),
        (["sample", model, "--steps", "5000", "-n", "2"], "steps"),
        (["sample", bad["infinite_range"], *quick, "-o", tmp_path / "black.png"],
         "infinite_range.onnx"),
        (["sample", not_utf8, "--backend", "trt", *quick], "latin.plan.json"),
        (["sample", sidecar_schedule, "--backend", "trt", *quick], "sched.plan"),
        (["sample", long_int, "--backend", "trt", *quick], "digits.plan.json"),
        (["sample", zero, "--backend", "trt", *quick], "zero.plan.json"),
        (["sample", fifo, "--backend", "trt", *quick], "fifo.plan.json"),
        (["sample", tmp_path / "fifo.plan.json", "--backend", "ort", *quick],
         "not a regular file"),
        (["sample", tmp_path / ("n" * 256 + ".onnx"), *quick], "cannot open the model"),
        (["sample", bad["tiny_beta"], *quick, "-o", tmp_path / "black.png"], "beta"),
        (["sample", bad["overflow_range"], *quick, "-o", tmp_path / "black.png"],
         "data_range"),
        *[(["info", path], path.name) for path in bad.values()],
    ]
    run_table("runtime.cli:main", cases, tmp_path)


def test_serve_refuses_limits_it_cannot_keep(tiny_onnx, tmp_path):
    import importlib.util

    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{missing} not installed (pip install .[serve])")
    steps = onnx_record(tiny_onnx)["schedule"]["num_timesteps"]
    port = ["--port", "0"]
    # The largest images a record may hold: 4096 rows of them are 1 TiB of float32.
    wide = wide_onnx(tmp_path / "wide.onnx", onnx_record(tiny_onnx), [4, 4096, 4096])
    cases = [
        # Its buffers are allocated at start: a huge batch was a numpy MemoryError.
        (["serve", tiny_onnx, "--max-batch", 10**12, *port], "--max-batch"),
        (["serve", wide, "--max-batch", 4096, *port], "1024.0 GiB"),
        # /v1/model would report a limit that no request can reach.
        (["serve", tiny_onnx, "--max-steps", steps + 1, *port], f"at most {steps}"),
        # A request's images stay in memory until it ends: larger jobs are bulk's.
        (["serve", tiny_onnx, "--max-n", 10**9, *port], "--max-n"),
    ]
    if importlib.util.find_spec("ray") is not None:
        cases.append((["serve", tiny_onnx, "--ray", "--max-steps", steps + 1, *port],
                      f"at most {steps}"))
    run_table("runtime.cli:main", cases, tmp_path)


def test_runtime_api_refuses_bad_calls(tiny_onnx, tmp_path):
    import runtime
    from runtime.errors import ModelFileError

    with pytest.raises(ModelFileError, match=f"{tmp_path} is a folder, not a model file"):
        runtime.load(tmp_path)
    with pytest.raises(ModelFileError, match="no such model file"):
        runtime.load(tmp_path / "none.onnx")

    pipe = runtime.load(tiny_onnx)
    for kwargs, match in [({"seed": None}, "seed"), ({"seed": -1}, "seed"),
                          ({"seed": 2**63}, "seed"),
                          ({"n": 10**12}, "n=1000000000000"), ({"eta": 1000.0}, "eta"),
                          ({"eta": float("nan")}, "eta"), ({"n": True}, "n")]:
        call = {"n": 2, "seed": 0, "steps": 2, "progress": False, **kwargs}
        with pytest.raises(ValueError, match=match):
            pipe.sample(call.pop("n"), call.pop("seed"), **call)
    assert pipe.sample(2, 0, steps=2, progress=False).shape == (2, 8, 8, 1)
    pipe.close()
    with pytest.raises(ValueError, match="closed"):
        pipe.sample(2, 0, steps=2, progress=False)
    # A thread count is checked before any session or pool is made: a billion threads would
    # otherwise ask for a billion stacks.
    for threads in (0, -1, 1025, 10**9, 2.0, True):
        with pytest.raises(ValueError, match="threads"):
            runtime.load(tiny_onnx, threads=threads)


# === training/train.py ===

def test_train_cli_refuses_bad_input(ckpt, tmp_path):
    data = tmp_path / "data"
    (data / "bombs").mkdir(parents=True)
    bomb_png(data / "bombs" / "bomb.png")
    np.savez(data / "three.npz", images=np.zeros((3, 8, 8), np.uint8))
    np.savez(data / "other.npz", images=np.zeros((300, 8, 8), np.uint8))
    runs = {name: write_ckpt(tmp_path / "runs" / name / "ckpt.pt", ckpt, edit).parent
            for name, edit in CKPT_EDITS.items()}
    runs["no_spec"] = write_ckpt(tmp_path / "runs" / "no_spec" / "ckpt.pt", ckpt,
                                 lambda c: c["data"].pop("spec")).parent
    runs["empty_optimizer"] = write_ckpt(tmp_path / "runs" / "empty_optimizer" / "ckpt.pt",
                                         ckpt, lambda c: c.update(optimizer={})).parent
    good = write_ckpt(tmp_path / "runs" / "good" / "ckpt.pt", ckpt, lambda c: None).parent
    fresh = ["--out", tmp_path / "never", "--no-progress"]
    cases = [
        (["--lr", "inf", *fresh], "--lr"),
        (["--lr", "nan", *fresh], "--lr"),
        (["--lr", "1e30", *fresh], "--lr"),
        (["--seed", str(2**70), *fresh], "--seed"),
        (["--data", "", *fresh], "--data"),
        (["--threads", 10**9, *fresh], "--threads"),
        (["--out", "/proc/no/run", "--no-progress"], "--out"),
        (["--out", tmp_path / ("n" * 256), "--no-progress"], "--out"),
        (["--out", tmp_path.joinpath(*["d" * 200] * 21), "--no-progress"], "--out"),
        (["--data", data / "bombs", *fresh], "bomb.png"),
        (["--data", data / "three.npz", *fresh], "--batch-size"),
        (["--out", good, "--resume", "--data", data / "other.npz"], "--data"),
        *[(["--out", run, "--resume", "--no-progress"], run / "ckpt.pt")
          for run in runs.values()],
    ]
    run_table("training.train:main", cases, tmp_path)


def test_refused_train_commands_leave_the_run_and_the_data_untouched(ckpt, tmp_path):
    """Every check (options, data, outputs, resume) runs before anything is removed or
    written: an --overwrite with bad data keeps the old log, a run never writes into its
    image folder, and a malformed checkpoint or a shrunk data set is one line."""
    data = tmp_path / "data"
    images = data / "images"
    images.mkdir(parents=True)
    for k in range(3):
        Image.fromarray(np.full((8, 8), 40 * k, np.uint8)).save(images / f"{k}.png")
    np.savez(data / "f32.npz", images=np.zeros((40, 8, 8), np.float32))
    np.savez(data / "five.npz", images=np.zeros((5, 8, 8), np.uint8))
    np.save(data / "renamed.npy", np.zeros((40, 8, 8), np.uint8))
    (data / "renamed.npy").rename(data / "renamed.npz")
    with zipfile.ZipFile(data / "huge.npz", "w") as z:  # a header claiming 6.4 TB
        header = {"descr": "|u1", "fortran_order": False, "shape": (10**11, 8, 8)}
        z.writestr("images.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", 118)
                   + repr(header).encode().ljust(117) + b"\n")
    patched_npz(data / "encrypted.npz", flag=0x1)  # zipfile: RuntimeError, password
    patched_npz(data / "method97.npz", method=97)  # zipfile: NotImplementedError
    run = write_ckpt(tmp_path / "run" / "ckpt.pt", ckpt, lambda c: None).parent
    (run / "log.jsonl").write_text('{"step": 100, "loss": 0.5}\n{"step": 300, "loss": 0.4}\n')
    shrunk = write_ckpt(tmp_path / "shrunk" / "ckpt.pt", ckpt,
                        lambda c: c["data"].update(spec=str(data / "five.npz"))).parent
    rngs = {
        "short_rng": lambda c: c["rng"].update(torch=c["rng"]["torch"][:100]),
        "zero_rng": lambda c: c["rng"].update(torch=c["rng"]["torch"] * 0),
        "numpy_rng": lambda c: c["rng"]["numpy"].update(keys=[2**40] * 624),
        "cuda_rng": lambda c: c["rng"].update(cuda=["state"]),
    }
    bad_rng = [write_ckpt(tmp_path / name / "ckpt.pt", ckpt, edit) for name, edit in rngs.items()]
    over = ["--out", run, "--overwrite", "--steps", "5", "--no-progress", "--data"]
    cases = [
        ([*over, data / "f32.npz"], "f32.npz"),
        ([*over, tmp_path / "nonexistent.npz"], "nonexistent.npz"),
        ([*over, data / "renamed.npz"], "renamed.npz"),
        ([*over, data / "huge.npz"], "huge.npz"),
        ([*over, data / "encrypted.npz"], "encrypted.npz"),
        ([*over, data / "method97.npz"], "method97.npz"),
        ([*over, data / "five.npz", "--batch-size", "8"], "--batch-size"),
        (["--data", images, "--out", images, "--no-progress"], "--out"),
        (["--data", images, "--out", images / "run", "--no-progress"], "--out"),
        (["--data", data / "five.npz", "--out", data / "five.npz", "--no-progress"], "--out"),
        (["--out", shrunk, "--resume", "--steps", "301", "--no-progress"],
         "keeps its batch size"),
        *[(["--out", path.parent, "--resume", "--steps", "301", "--no-progress"], path)
          for path in bad_rng],
    ]
    run_table("training.train:main", cases, tmp_path)
    assert not (images / "run").exists()


def test_training_stops_on_nan_gradients_before_saving(tmp_path, one_torch_thread):
    import torch

    from tests.conftest import tiny_model_config
    from training.config import TrainConfig
    from training.data import load_dataset
    from training.trainer import CKPT_NAME, LOG_NAME, DivergedError, Trainer

    cfg = tiny_model_config()
    dataset = load_dataset("digits", cfg.image_size, cfg.in_channels)
    train_cfg = TrainConfig(batch_size=8, steps=6, save_every=2, log_every=100,
                            sample_every=0, warmup=0, preview_count=1, preview_steps=2)
    trainer = Trainer(cfg, train_cfg, dataset, tmp_path, device="cpu", progress=False)
    trainer.config = train_cfg.replace(steps=2)
    trainer.fit()
    saved = (tmp_path / CKPT_NAME).read_bytes()
    weight = next(trainer.model.parameters())
    weight.register_hook(lambda grad: grad * float("nan"))
    trainer.config = train_cfg
    with pytest.raises(DivergedError, match="gradient.*NaN or inf by step 4"):
        trainer.fit()
    assert (tmp_path / CKPT_NAME).read_bytes() == saved  # the step-2 checkpoint, untouched
    for line in (tmp_path / LOG_NAME).read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in log.jsonl"))
    assert not bool(torch.isfinite(weight).all())  # the poison reached the weights


# === export/to_onnx.py and export/to_trt.py ===

def test_export_clis_refuse_bad_input(ckpt, trained_run, tiny_onnx, tmp_path):
    good = tmp_path / "c.pt"
    good.write_bytes((trained_run / "ckpt.pt").read_bytes())
    variants = {name: write_ckpt(tmp_path / f"{name}.pt", ckpt, edit)
                for name, edit in CKPT_EDITS.items()}
    deployed = tmp_path / "model.onnx"
    deployed.write_bytes(tiny_onnx.read_bytes())
    cases = [
        ([good, "-o", good], "-o/--out"),
        ([good, "-o", "/proc/no/model.onnx"], "-o/--out"),
        ([good, "-o", good / "model.onnx"], f"{good} is a file, not a folder"),
        ([good, "-o", tmp_path / "x.onnx", "--tolerance", "nan"], "--tolerance"),
        # An ONNX file under another name would be picked up as what its suffix says.
        ([good, "-o", tmp_path / "model.jpg"], ".onnx"),
        ([good, "-o", tmp_path / ("n" * 252 + ".onnx")], "-o/--out"),
        ([good, "-o", tmp_path.joinpath(*["d" * 200] * 21, "m.onnx")], "-o/--out"),
        # A failed verification: model.onnx stays as it was, the new file is set aside (with
        # the TorchScript exporter: the same verification, after a trace 3 s shorter).
        ([good, "-o", deployed, "--tolerance", "1e-12", "--exporter", "torchscript"],
         "model.unverified.onnx"),
        *[([path, "-o", tmp_path / f"{name}.onnx"], path.name)
          for name, path in variants.items()],
    ]
    run_table("export.to_onnx:main", cases, tmp_path, new_files=["model.unverified.onnx"])

    random_onnx = tmp_path / "random.onnx"
    random_onnx.write_bytes(np.random.default_rng(0).bytes(4096))
    cases = [
        ([random_onnx], "random.onnx"),
        ([unrelated_onnx(tmp_path / "plain.onnx")], "no 'ddpm' metadata"),
        ([deployed, "-o", deployed], "-o/--out"),
        # From a checkpoint the ONNX file goes to OUT with .onnx: that is OUT itself.
        ([good, "-o", tmp_path / "e.onnx"], "-o/--out"),
        ([deployed, "-o", tmp_path / "e.ONNX"], "-o/--out"),
        # The timing cache is written too: never over an input, and checked before the build.
        ([deployed, "-o", tmp_path / "e.plan", "--timing-cache", deployed], "--timing-cache"),
        ([good, "-o", tmp_path / "e.plan", "--timing-cache", good], "--timing-cache"),
        ([good, "-o", tmp_path / "e.plan", "--timing-cache", tmp_path / "e.onnx"],
         "--timing-cache"),
        ([deployed, "-o", tmp_path / "e.plan", "--timing-cache", "/proc/no/cache"],
         "--timing-cache"),
        ([variants["t0"], "-o", tmp_path / "t0.plan"], "t0.pt"),
        ([deployed, "-o", tmp_path / "e.plan", "--min-batch", "8", "--max-batch", "2"],
         "--opt-batch"),
        ([deployed, "-o", tmp_path / ("n" * 252 + ".plan")], "-o/--out"),
    ]
    run_table("export.to_trt:main", cases, tmp_path)


def test_bench_refuses_bad_out(tmp_path):
    run_table("tools.bench:main", [(["--out", "/proc/no/bench"], "--out")], tmp_path)


# === The interpreter-level entry points: exit code, one line, the guard for bugs ===

@pytest.mark.parametrize("script, args, culprit", [
    (["-m", "runtime", "sample"], ["{model}", "--backend", "ort", "-o", "{model}"],
     "also an input"),
    (["export/to_onnx.py"], ["{ckpt}", "-o", "{ckpt}"], "-o/--out"),
    (["training/train.py"], ["--lr", "inf", "--out", "{tmp}/run"], "--lr"),
])
def test_entry_points_exit_cleanly(script, args, culprit, trained_run, tiny_onnx, tmp_path):
    paths = {"model": tmp_path / "model.png", "ckpt": tmp_path / "c.pt", "tmp": tmp_path}
    paths["model"].write_bytes(tiny_onnx.read_bytes())  # a model under a PNG name
    paths["ckpt"].write_bytes((trained_run / "ckpt.pt").read_bytes())
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, *script, *[a.format(**paths) for a in args]],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    check_refused(args, culprit, proc.returncode, proc.stderr)
    assert snapshot(tmp_path) == before


def test_an_internal_error_says_it_is_a_bug():
    import click
    from click.testing import CliRunner

    from runtime.util.clierrors import BUG_LINE, EXIT_BUG, guarded_command

    @click.command(cls=guarded_command())
    @click.option("--what", default="user")
    def cmd(what):
        raise ValueError("a bad value, said once") if what == "user" else KeyError("internal")

    result = CliRunner().invoke(cmd, [])
    assert result.exit_code == 1 and result.output.strip() == "Error: a bad value, said once"
    result = CliRunner().invoke(cmd, ["--what", "bug"])
    assert result.exit_code == EXIT_BUG
    assert "Traceback" in result.output and result.output.strip().endswith(BUG_LINE)


def test_a_closed_stdout_is_not_a_bug(tiny_onnx, tmp_path):
    """`sample ... | head`: the reader leaves early. One line on stderr, exit 1, and the
    grid, written before the report line, is whole."""
    out = tmp_path / "grid.png"
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "sample", str(tiny_onnx), "-n",
                             "2", "--steps", "2", "--no-progress", "-o", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # nobody will read what it prints
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1, stderr
    assert "broken pipe" in stderr and "Traceback" not in stderr and "bug" not in stderr
    from PIL import Image

    with Image.open(out) as png:
        assert png.format == "PNG"
