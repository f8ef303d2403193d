"""runtime.load(...).sample(...) on real ONNX files written by the export code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import runtime
from runtime.errors import BackendUnavailableError, ModelFileError, NonFiniteError
from runtime.images import make_grid, to_uint8
from runtime.metadata import METADATA_KEY

REPO = Path(__file__).resolve().parents[1]


def _rewrite_record(src: Path, dst: Path, edit) -> Path:
    """Copy an ONNX file with its ddpm record changed by ``edit(dict) -> dict | None``."""
    proto = onnx.load(str(src))
    record = json.loads(next(p.value for p in proto.metadata_props if p.key == METADATA_KEY))
    new = edit(record)
    del proto.metadata_props[:]
    if new is not None:
        entry = proto.metadata_props.add()
        entry.key = METADATA_KEY
        entry.value = new if isinstance(new, str) else json.dumps(new)
    onnx.save(proto, str(dst))
    return dst


def test_load_reads_the_record(tiny_onnx):
    with runtime.load(tiny_onnx) as pipe:
        assert pipe.image_shape == (1, 8, 8)
        assert pipe.record.num_levels == 17 and pipe.record.weights == "ema"
        assert pipe.schedule.num_timesteps == 1000
        assert pipe.backend_name == "onnxruntime:CPUExecutionProvider"
        assert pipe.record.flops_per_image > 0


def test_sample_shapes_types_and_range(tiny_onnx):
    with runtime.load(tiny_onnx, threads=1) as pipe:
        images = pipe.sample(3, seed=1, steps=5, progress=False)
        floats = pipe.sample_float(3, seed=1, steps=5, progress=False)
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8
    assert floats.shape == (3, 1, 8, 8) and floats.dtype == np.float32
    # The last step's x0 is clipped to the data range and the posterior mean stays inside it.
    assert floats.min() >= -1.0 - 1e-6 and floats.max() <= 1.0 + 1e-6
    np.testing.assert_array_equal(images, to_uint8(floats))


@pytest.mark.parametrize("sampler, kwargs", [("ddpm", {"variance": "fixedsmall"}),
                                             ("ddim", {"eta": 0.0}), ("ddim", {"eta": 1.0})])
def test_image_k_does_not_depend_on_batching(tiny_onnx, sampler, kwargs):
    with runtime.load(tiny_onnx) as pipe:
        common = dict(seed=7, sampler=sampler, steps=4, progress=False, **kwargs)
        whole = pipe.sample_float(5, batch_size=5, **common)
        split = pipe.sample_float(5, batch_size=2, **common)
        first = pipe.sample_float(2, **common)
    np.testing.assert_array_equal(whole, split)
    np.testing.assert_array_equal(whole[:2], first)
    assert not np.array_equal(whole[0], whole[1])


def test_cpu_threads_split_the_batch_and_change_nothing(tiny_onnx):
    """threads > 1 cuts a batch into concurrent one-thread shards (uneven ones too; a batch
    of one is one shard): the same eps either way."""
    from runtime.backends.ort import OrtBackend

    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 1, 8, 8), dtype=np.float32)
    t = np.linspace(0, 999, 7).round().astype(np.float32)
    with OrtBackend(tiny_onnx, threads=1) as one:
        want = one(x, t)
        assert one._pool is None
        for threads in (2, 3):
            with OrtBackend(tiny_onnx, threads=threads) as many:
                assert many.shards(7) == threads and many.shards(1) == 1
                np.testing.assert_array_equal(many(x, t), want)  # shards of 3/4, 2/2/3
                np.testing.assert_array_equal(many(x[:1], t[:1]), want[:1])
        # A non-contiguous batch (what a strided slice gives) is copied, not misread.
        np.testing.assert_array_equal(one(x[::2], t[::2]), want[::2])
    with runtime.load(tiny_onnx, threads=2) as pipe:
        two = pipe.sample_float(4, seed=3, steps=3, progress=False)
    with runtime.load(tiny_onnx, threads=1) as pipe:
        np.testing.assert_array_equal(two, pipe.sample_float(4, seed=3, steps=3, progress=False))


def test_ddim_eta0_is_deterministic_and_seeded(tiny_onnx):
    with runtime.load(tiny_onnx) as pipe:
        a = pipe.sample_float(2, seed=3, sampler="ddim", steps=3, progress=False)
        b = pipe.sample_float(2, seed=3, sampler="ddim", steps=3, progress=False)
        c = pipe.sample_float(2, seed=4, sampler="ddim", steps=3, progress=False)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_backend_checks_inputs(tiny_onnx):
    from runtime.backends.ort import OrtBackend

    with OrtBackend(tiny_onnx) as backend:
        x = np.zeros((2, 1, 8, 8), np.float32)
        assert backend(x, np.zeros(2, np.float32)).shape == (2, 1, 8, 8)
        with pytest.raises(ValueError, match="x must be float32"):
            backend(x.astype(np.float64), np.zeros(2, np.float32))
        with pytest.raises(ValueError, match="x must be float32"):
            backend(np.zeros((2, 1, 4, 4), np.float32), np.zeros(2, np.float32))
        with pytest.raises(ValueError, match="t must be float32"):
            backend(x, np.zeros(3, np.float32))


@pytest.mark.parametrize("edit, match", [
    (lambda r: None, "no 'ddpm' metadata"),
    (lambda r: "{not json", "not valid JSON"),
    (lambda r: "[" * 100_000, "nests too deeply"),
    (lambda r: {**r, "format_version": 99}, "format version 99, newer than"),
    (lambda r: {k: v for k, v in r.items() if k != "num_levels"}, "lacks"),
    (lambda r: {**r, "image_shape": [3, 8, 8]}, "metadata says"),
    (lambda r: {**r, "prediction": "score"}, "not supported"),
    (lambda r: {**r, "defaults": {"sampler": "euler"}}, "invalid sampling defaults"),
    (lambda r: {**r, "defaults": {"steps": 5000}}, "invalid sampling defaults"),
    (lambda r: {**r, "defaults": {"eta": 2.0}}, "invalid sampling defaults"),
    (lambda r: {**r, "defaults": {"colour": 1}}, "invalid sampling defaults"),
    (lambda r: {**r, "clip_x0": "no"}, "clip_x0 must be true or false"),
    (lambda r: {**r, "weights": "mine"}, "weights must be one of"),
    (lambda r: {**r, "schedule": {"kind": "quadratic"}}, "schedule kind"),
    # Valid numbers that cannot be sampled: alphas_cumprod leaves float64 (1/ab = inf).
    (lambda r: {**r, "schedule": {**r["schedule"], "num_timesteps": 100_000}}, "falls below"),
    (lambda r: {**r, "schedule": {**r["schedule"], "respaced": 10}}, "full training chain"),
])
def test_bad_model_files_are_refused(tiny_onnx, tmp_path, edit, match):
    bad = _rewrite_record(tiny_onnx, tmp_path / "bad.onnx", edit)
    with pytest.raises(ModelFileError, match=match) as info:
        runtime.load(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(ModelFileError, match="no such model file"):
        runtime.load(tmp_path / "absent.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not an onnx file" * 10)
    with pytest.raises(ModelFileError, match="cannot load"):
        runtime.load(garbage)


def test_explicit_provider_that_is_missing_is_an_error(tiny_onnx):
    from runtime.backends.ort import available_providers

    if "CUDAExecutionProvider" in available_providers():
        pytest.skip("onnxruntime-gpu is installed: the CUDA provider exists here")
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
        runtime.load(tiny_onnx, device="cuda")


def test_engine_without_tensorrt_or_sidecar_names_the_problem(tmp_path):
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"engine")
    with pytest.raises(ModelFileError, match="sidecar|json"):
        runtime.load(engine)


def _nan_model(path: Path, record: dict) -> Path:
    """An ONNX file honouring the contract whose eps is NaN once t < 500."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])
    t = helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch"])
    eps = helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["batch", 1, 8, 8])
    nodes = [
        helper.make_node("Constant", [], ["half"], value=helper.make_tensor(
            "half", TensorProto.FLOAT, [], [500.0])),
        # log(t - 500) is NaN for t < 500; reshape it to broadcast over the image.
        helper.make_node("Sub", ["t", "half"], ["shifted"]),
        helper.make_node("Log", ["shifted"], ["logt"]),
        helper.make_node("Constant", [], ["shape"], value=helper.make_tensor(
            "shape", TensorProto.INT64, [4], [-1, 1, 1, 1])),
        helper.make_node("Reshape", ["logt", "shape"], ["logt4"]),
        helper.make_node("Mul", ["x", "logt4"], ["scaled"]),
        helper.make_node("Mul", ["scaled", "half"], ["big"]),
        helper.make_node("Sub", ["big", "big"], ["zero_or_nan"]),
        helper.make_node("Add", ["x", "zero_or_nan"], ["eps"]),
    ]
    graph = helper.make_graph(nodes, "nan", [x, t], [eps])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(record)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def test_nan_output_stops_with_the_step(tiny_onnx, tmp_path):
    record = json.loads(next(p.value for p in onnx.load(str(tiny_onnx)).metadata_props))
    path = _nan_model(tmp_path / "nan.onnx", record)
    with runtime.load(path) as pipe, pytest.raises(NonFiniteError, match=r"step t=\d+"):
        pipe.sample(2, steps=10, progress=False)


def test_grid_upscales_tiny_images():
    images = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8, 1)
    grid = make_grid(images, pad=1)
    assert grid.shape == (1 + 64 + 1, 1 + 2 * (64 + 1), 1)
    # Nearest neighbour: each source pixel becomes an 8x8 block of the same value.
    np.testing.assert_array_equal(grid[1:9, 1:9, 0], images[0, 0, 0, 0])


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "runtime", *args], capture_output=True,
                          text=True, cwd=cwd or REPO)


def test_cli_sample_writes_png_npz_and_each(tiny_onnx, tmp_path):
    from PIL import Image

    # The longest name the OS takes: its temporary must still be a legal name.
    grid_path = tmp_path / ("g" * (os.pathconf(tmp_path, "PC_NAME_MAX") - 4) + ".png")
    out = _cli("sample", str(tiny_onnx), "-n", "5", "--steps", "4", "--seed", "2",
               "-o", str(grid_path), "--npz", str(tmp_path / "s.npz"),
               "--each", str(tmp_path / "each"), "--batch-size", "2")
    assert out.returncode == 0, out.stderr
    assert "5 images, ddpm 4 steps" in out.stdout and "images/s" in out.stdout
    with Image.open(grid_path) as grid:
        assert grid.size[0] >= 3 * 64 and grid.mode == "L"
    images = np.load(tmp_path / "s.npz")["images"]
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == [
        f"{k:05d}.png" for k in range(5)]
    for k, image in enumerate(images):
        with Image.open(tmp_path / "each" / f"{k:05d}.png") as png:
            np.testing.assert_array_equal(np.asarray(png), image[..., 0])
    with runtime.load(tiny_onnx) as pipe:
        np.testing.assert_array_equal(images, pipe.sample(5, 2, steps=4, progress=False))


def test_cli_info(tiny_onnx):
    out = _cli("info", str(tiny_onnx))
    assert out.returncode == 0, out.stderr
    assert "input: x tensor(float) ['batch', 1, 8, 8]" in out.stdout
    assert "CPUExecutionProvider" in out.stdout
    assert '"num_levels": 17' in out.stdout


def test_cli_errors_are_one_line(tmp_path):
    out = _cli("sample", str(tmp_path / "absent.onnx"))
    assert out.returncode == 1
    assert "no such model file" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    bad = _cli("sample", str(tmp_path / "absent.onnx"), "--sampler", "euler")
    assert bad.returncode == 2 and "euler" in bad.stderr


def test_sampling_an_onnx_file_never_imports_torch(tiny_onnx):
    code = (
        "import sys, runtime\n"
        f"images = runtime.load({str(tiny_onnx)!r}).sample(2, seed=0, steps=3, progress=False)\n"
        "assert images.shape == (2, 8, 8, 1), images.shape\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def _graph_file(record_from: Path, dst: Path, nodes, x_dims=("B", 1, 8, 8), extra=()) -> Path:
    """A hand-built ONNX file with inputs x, t and output eps, carrying ``record_from``'s
    ddpm record: a graph the metadata accepts and that breaks the contract when run."""
    from onnx import TensorProto, helper

    source = onnx.load(str(record_from))
    graph = helper.make_graph(
        nodes, "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_dims)),
         helper.make_tensor_value_info("t", TensorProto.FLOAT, ["B"])],
        [helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["B", 1, 8, 8])],
        initializer=list(extra))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    for prop in source.metadata_props:
        entry = model.metadata_props.add()
        entry.key, entry.value = prop.key, prop.value
    onnx.save(model, str(dst))
    return dst


def test_a_graph_that_breaks_the_contract_when_run_is_one_line(tiny_onnx, tmp_path):
    """Files that load but fail on a batch: a Reshape that fixes the batch at 1, and an
    output with twice the batch. Each is a ModelFileError naming the file, whatever the
    thread count (two threads cut the batch of 4 into shards of 2 run in a pool)."""
    from onnx import helper, numpy_helper

    fixed = numpy_helper.from_array(np.array([1, 1, 8, 8], np.int64), "shape")
    reshape = _graph_file(tiny_onnx, tmp_path / "reshape.onnx",
                          [helper.make_node("Reshape", ["x", "shape"], ["eps"])], extra=[fixed])
    double = _graph_file(tiny_onnx, tmp_path / "double.onnx",
                         [helper.make_node("Concat", ["x", "x"], ["eps"], axis=0)])
    for path, match in [(reshape, "ONNX Runtime failed on a batch of"),
                        (double, r"returned eps float32 \[(\d+), 1, 8, 8\] for x \[\d+, 1")]:
        for threads in (1, 2):
            with runtime.load(path, threads=threads) as pipe:
                with pytest.raises(ModelFileError, match=match) as info:
                    pipe.sample(4, seed=0, steps=2, progress=False)
            assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_symbolic_image_dims_are_refused_on_load(tiny_onnx, tmp_path):
    from onnx import helper

    path = _graph_file(tiny_onnx, tmp_path / "symbolic.onnx",
                       [helper.make_node("Identity", ["x"], ["eps"])], x_dims=("B", "C", 8, 8))
    with pytest.raises(ModelFileError, match=r"input x has shape \['B', 'C', 8, 8\]"):
        runtime.load(path)


def test_automatic_shards_leave_cores_busy_elsewhere_alone(tiny_onnx):
    """threads=None: one shard per core the other processes leave free, measured while
    the backend works; an explicit count is kept whatever the load."""
    import multiprocessing

    from runtime.backends.ort import OrtBackend
    from runtime.util.cpus import cpu_count

    cores = os.cpu_count() or 1
    if cores < 2 or cpu_count() < 2:
        pytest.skip("needs two cores")
    with OrtBackend(tiny_onnx) as auto, OrtBackend(tiny_onnx, threads=2) as fixed:
        stop = multiprocessing.Event()
        hogs = [multiprocessing.Process(target=_spin, args=(stop,)) for _ in range(cores)]
        for hog in hogs:
            hog.start()
        try:
            auto._load.period = 0.2
            auto._load.cores()
            time.sleep(0.5)
            busy = auto._load.cores()
            assert busy > cores - 1.5, busy  # every core taken by the spinners
            assert auto.shards(8) == 1 and fixed.shards(8) == 2
        finally:
            stop.set()
            for hog in hogs:
                hog.join()


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def test_close_while_another_thread_samples_lets_that_call_finish(tiny_onnx):
    """Real threads: close() from one thread while another is inside sample(). The running
    call ends with its images (the backend is released after it), later calls are refused
    with the one-line 'closed' error, and close() itself does not wait for the sampler."""
    import threading

    from runtime.backends import open_backend
    from runtime.pipeline import Pipeline

    started, closed, result, events = threading.Event(), threading.Event(), {}, []

    def hold(step, total):
        events.append(step)
        if step == 1:
            started.set()
            assert closed.wait(30)

    def run():
        try:
            result["images"] = pipe.sample(2, 0, steps=4, callback=hold, progress=False)
        except BaseException as err:  # noqa: BLE001 - reported below
            result["error"] = err

    backend = open_backend(tiny_onnx)
    pipe = Pipeline(backend, backend.record, source=str(tiny_onnx), backend_name=backend.name,
                    closer=lambda: (events.append("released"), backend.close()))
    worker = threading.Thread(target=run)
    worker.start()
    assert started.wait(60)
    pipe.close()
    closed.set()
    worker.join(60)
    assert not worker.is_alive() and "error" not in result, result.get("error")
    assert events == [1, 2, 3, 4, "released"]  # released once, after the running call
    with runtime.load(tiny_onnx) as fresh:
        np.testing.assert_array_equal(result["images"], fresh.sample(2, 0, steps=4,
                                                                     progress=False))
    with pytest.raises(ValueError, match="closed"):
        pipe.sample(2, 0, steps=2, progress=False)


def test_a_network_of_large_operators_threads_them_with_the_same_eps(tiny_onnx, tmp_path):
    """A record claiming >= WIDE_MIN_FLOPS per image: one session whose operators take the
    threads (no shards, one copy of the weights), and the same eps as one thread; a batch
    over HEAVY_CALL_FLOPS runs in slices, each row's eps what it is alone."""
    from runtime.backends.ort import HEAVY_CALL_FLOPS, WIDE_MIN_FLOPS, OrtBackend

    assert HEAVY_CALL_FLOPS / 2 >= WIDE_MIN_FLOPS
    heavy = _rewrite_record(tiny_onnx, tmp_path / "heavy.onnx",
                            lambda r: {**r, "flops_per_image": int(HEAVY_CALL_FLOPS / 2)})
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8), dtype=np.float32)
    t = np.array([0, 250, 500, 750, 999], np.float32)
    with OrtBackend(heavy, threads=2) as wide, OrtBackend(heavy, threads=1) as one:
        assert wide._heavy and dict(wide.describe())["threads"].startswith("2 (on each")
        assert wide._heavy_rows == 2  # slices of 2, 2 and 1 rows
        got = wide(x, t)
        np.testing.assert_allclose(got, one(x, t), rtol=0, atol=1e-6)
        alone = np.concatenate([wide(x[i:i + 1], t[i:i + 1]) for i in range(5)])
        np.testing.assert_array_equal(got, alone)
