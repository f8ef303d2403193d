"""Scale-out on a real local Ray instance: `python -m runtime bulk` (same images as `sample`,
resumable) and `python -m runtime serve --ray` (the server's API through Ray Serve's proxy)."""

from __future__ import annotations

import http.client
import importlib.util
import io
import itertools
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime.metadata import sha256_file
from runtime.scale.shards import MANIFEST, BulkJob, read_images
from tools.loadtest import ServerProcess

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
try:
    import ray
except ImportError:
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed (pip install .[ray])")
MISSING = [m for m in ("ray", "starlette", "uvicorn", "prometheus_client")
           if importlib.util.find_spec(m) is None]
needs_serve = pytest.mark.skipif(bool(MISSING), reason=f"{MISSING} not installed "
                                 "(pip install .[ray])")

# ddpm draws noise at every step: this exercises every image's own stream, not only x_T.
OPTIONS = ["-n", "7", "--seed", "3", "--steps", "3", "--sampler", "ddpm"]


def cli(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "runtime", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray instance (2 CPUs) for this module; the CLIs under test join it."""
    if ray is None:
        pytest.skip("Ray is not installed (pip install .[ray])")
    from runtime.scale.cluster import runtime_env

    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                       runtime_env=runtime_env())
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_onnx, tmp_path_factory) -> np.ndarray:
    """The same images from the plain one-process CLI."""
    out = tmp_path_factory.mktemp("sample")
    cli("sample", tiny_onnx, *OPTIONS, "-o", out / "grid.png", "--npz", out / "ref.npz",
        "--no-progress")
    with np.load(out / "ref.npz") as data:
        return data["images"]


def bulk(model, out, address, *extra, check=True):
    return cli("bulk", model, *OPTIONS, "--out", out, "--ray-address", address,
               "--shard-size", 3, "--no-progress", *extra, check=check)


@pytest.fixture(scope="module")
def two_worker_job(tiny_onnx, ray_address, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bulk") / "job"
    assert "2 workers" in bulk(tiny_onnx, out, ray_address, "--workers", 2).stdout
    return out


def check_job(out: Path, model: Path, reference: np.ndarray) -> None:
    images, indices = read_images(out)
    np.testing.assert_array_equal(indices, np.arange(len(reference)))
    np.testing.assert_array_equal(images, reference)          # bit for bit
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["model_sha256"] == sha256_file(model)
    assert manifest["complete"] is True
    assert [s["count"] for s in manifest["shards"]] == [3, 3, 1]
    assert manifest["options"]["seed"] == 3 and manifest["options"]["steps"] == 3


@needs_ray
def test_one_and_two_workers_draw_the_images_of_sample(tiny_onnx, ray_address, reference,
                                                       two_worker_job, tmp_path):
    check_job(two_worker_job, tiny_onnx, reference)
    one = tmp_path / "one"
    assert "1 worker x" in bulk(tiny_onnx, one, ray_address, "--workers", 1).stdout
    check_job(one, tiny_onnx, reference)
    # Not only the images: the files are the same bytes, whoever wrote them and when.
    for shard in sorted(one.glob("shard-*.npz")):
        assert shard.read_bytes() == (two_worker_job / shard.name).read_bytes()


@needs_ray
def test_rerun_writes_only_missing_or_broken_shards(tiny_onnx, ray_address, reference,
                                                    two_worker_job, tmp_path):
    out = Path(shutil.copytree(two_worker_job, tmp_path / "job"))
    kept = out / "shard-00002.npz"
    stamp = (kept.stat().st_ino, kept.stat().st_mtime_ns)
    (out / "shard-00000.npz").unlink()
    broken = out / "shard-00001.npz"
    broken.write_bytes(broken.read_bytes()[:100])   # as if copied in part
    proc = bulk(tiny_onnx, out, ray_address)
    assert "2 of 3 shards written" in proc.stdout
    assert (kept.stat().st_ino, kept.stat().st_mtime_ns) == stamp   # not rewritten
    check_job(out, tiny_onnx, reference)
    assert not list(out.glob(".*.tmp"))
    # A finished job is recognised without starting any worker.
    assert "nothing to do" in bulk(tiny_onnx, out, ray_address).stdout


def test_any_damaged_shard_counts_as_missing(tmp_path):
    """No Ray needed: what a rerun decides about each shard file it finds."""
    job = BulkJob(tmp_path, model_sha256="0" * 64, image_shape=(1, 4, 4), n=2, seed=0,
                  shard_size=2, sample_options={"steps": 2})
    shard = job.shards[0]
    images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 1), dtype=np.uint8)
    whole = job.write_shard(shard, images).read_bytes()
    assert job.is_done(shard)
    for data in [whole[:k] for k in range(0, len(whole), 7)] + [b"half a shard"]:
        (tmp_path / shard.name).write_bytes(data)
        assert not job.is_done(shard), len(data)
    for k, flip in itertools.product(range(len(whole)), (0xFF, 0x01)):  # headers, data, CRCs
        (tmp_path / shard.name).write_bytes(whole[:k] + bytes([whole[k] ^ flip]) + whole[k + 1:])
        if job.is_done(shard):  # a byte nobody reads (a date, say): the images are whole
            with np.load(tmp_path / shard.name) as data:
                np.testing.assert_array_equal(data["images"], images)


def test_a_shard_of_another_job_is_never_read_as_this_jobs(tmp_path):
    """No Ray needed: a shard file copied in from another folder (another job id), or one of
    this job under another shard's name, is refused naming the file."""
    from runtime.scale.shards import JobMismatchError

    rng = np.random.default_rng(0)
    jobs = {}
    for seed in (0, 1):
        job = BulkJob(tmp_path / f"job{seed}", model_sha256="0" * 64, image_shape=(1, 4, 4),
                      n=4, seed=seed, shard_size=2, sample_options={"steps": 2})
        job.prepare()
        for shard in job.shards:
            job.write_shard(shard, rng.integers(0, 256, (2, 4, 4, 1), dtype=np.uint8))
        job.write_manifest(complete=True)
        jobs[seed] = job
    images, indices = read_images(jobs[0].out)
    assert images.shape == (4, 4, 4, 1) and list(indices) == [0, 1, 2, 3]
    mine = jobs[0].out / "shard-00000.npz"
    shutil.copyfile(jobs[1].out / "shard-00000.npz", mine)
    with pytest.raises(JobMismatchError, match=f"{mine}: a shard of another job"):
        read_images(jobs[0].out)
    shutil.copyfile(jobs[0].out / "shard-00001.npz", mine)
    with pytest.raises(JobMismatchError, match=f"{mine}: holds images other than 0..1"):
        read_images(jobs[0].out)


@needs_ray
def test_bad_sizes_and_damaged_manifests_are_one_line(tiny_onnx, tmp_path):
    from tests.test_hostile import run_table

    options = ["-n", "6", "--shard-size", "2", "--steps", "2", "--no-progress"]
    cases = [(["bulk", tiny_onnx, "-n", 10**10, "--shard-size", "1", "--out",
               tmp_path / "huge"], "--shard-size 100000")]
    for name, edit in {"list": {"options": [["n", 6]]}, "none": {"options": None},
                       "sha": {"model_sha256": 7}}.items():
        out = tmp_path / name
        out.mkdir()
        manifest = {"format": "ddpm-bulk", "format_version": 1, "options": {"n": 6},
                    "model_sha256": "0" * 64, **edit}
        (out / MANIFEST).write_text(json.dumps(manifest))
        cases.append((["bulk", tiny_onnx, *options, "--out", out], str(out / MANIFEST)))
    for name, text in {"deep": "[" * 100_000, "digits": '{"n": ' + "9" * 5000 + "}"}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / MANIFEST).write_text(text)
        cases.append((["bulk", tiny_onnx, *options, "--out", tmp_path / name],
                      str(tmp_path / name / MANIFEST)))
    run_table("runtime.cli:main", cases, tmp_path)


@needs_ray
def test_other_options_in_the_same_folder_are_refused(tiny_onnx, ray_address, two_worker_job,
                                                      tmp_path):
    out = Path(shutil.copytree(two_worker_job, tmp_path / "job"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for changed in (["--seed", "4"], ["--steps", "4"]):
        options = dict(zip(OPTIONS[::2], OPTIONS[1::2], strict=True))
        options.update(dict([changed]))
        proc = cli("bulk", tiny_onnx, *[x for kv in options.items() for x in kv], "--out", out,
                   "--ray-address", ray_address, "--shard-size", 3, check=False)
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        flag = changed[0][2:]
        assert len(lines) == 1 and f"{flag} 3 != 4" in lines[0] and "--out" in lines[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@needs_ray
def test_a_worker_killed_mid_run_is_replaced(tiny_onnx, ray_address, tmp_path):
    """As if a worker's machine went away: its shards are drawn again by a new worker."""
    import psutil

    from runtime.scale.bulk import run
    from runtime.scale.shards import BulkJob

    n, steps = 12, 300   # one-image shards slow enough that the kill lands mid-run
    job = BulkJob(tmp_path / "job", model_sha256=sha256_file(tiny_onnx), image_shape=(1, 8, 8),
                  n=n, seed=3, shard_size=1, sample_options={
                      "sampler": "ddpm", "steps": steps, "variance": "fixedlarge", "eta": 0.0})
    job.prepare()
    killed = []

    def kill_a_worker():
        while not list(job.out.glob("shard-*.npz")):
            time.sleep(0.005)
        me = psutil.Process()
        for proc in me.children(recursive=True):
            if "SampleWorker" in " ".join(proc.cmdline()):
                proc.kill()
                killed.append(proc.pid)
                return

    killer = threading.Thread(target=kill_a_worker)
    killer.start()
    stats = run(job, [tiny_onnx], address=ray_address, workers=2, progress=False)
    killer.join()
    assert killed and stats.workers_replaced == 1
    images, indices = read_images(job.out)
    np.testing.assert_array_equal(indices, np.arange(n))
    with runtime.load(tiny_onnx, threads=1) as pipe:
        want = pipe.sample(n, 3, steps=steps, progress=False)
    np.testing.assert_array_equal(images, want)


def test_without_ray_the_error_names_the_extra(tiny_onnx, tmp_path):
    """Ray hidden from the interpreter: one line saying how to install it."""
    code = ("import sys; sys.modules['ray'] = None; from runtime.cli import main; "
            "sys.exit(main())")
    proc = subprocess.run([sys.executable, "-c", code, "bulk", str(tiny_onnx), "-n", "2",
                           "--steps", "2", "--out", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "pip install .[ray]" in proc.stderr


@needs_serve
@pytest.mark.parametrize("command", [["bulk", "-n", "2", "--out", "o"], ["serve", "--ray"]])
def test_unreachable_address_is_one_line(tiny_onnx, tmp_path, command):
    with socket.socket() as s:   # a port nothing listens on
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    name, *rest = command
    rest = [str(tmp_path / a) if a == "o" else a for a in rest]
    proc = cli(name, tiny_onnx, *rest, "--ray-address", f"{HOST}:{port}", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert f"cannot reach the Ray cluster at {HOST}:{port}" in proc.stderr


def test_first_index_draws_that_range_of_the_seed(tiny_onnx):
    """The API bulk stands on (no Ray needed): images i.. of a seed, alone."""
    import runtime

    with runtime.load(tiny_onnx, threads=1) as pipe:
        common = dict(seed=5, sampler="ddim", eta=1.0, steps=3, progress=False)
        whole = pipe.sample_float(6, **common)
        part = pipe.sample_float(3, first_index=2, batch_size=2, **common)
        np.testing.assert_array_equal(part, whole[2:5])
        with pytest.raises(ValueError, match="first_index"):
            pipe.sample_float(1, first_index=-1, **common)


@needs_ray
def test_more_workers_than_the_cluster_has_cores_is_refused(tiny_onnx, ray_address, tmp_path):
    """The test cluster has 2 CPUs: 2 workers x 2 threads would wait forever; say so."""
    proc = bulk(tiny_onnx, tmp_path / "job", ray_address, "--workers", 2, "--threads", 2,
                check=False)
    assert proc.returncode == 1
    line = proc.stderr.strip()
    assert "\n" not in line and "need 4 CPUs; the Ray cluster has 2" in line
    assert not list((tmp_path / "job").glob("shard-*.npz"))


# === Ray Serve ===


@needs_serve
def test_two_replicas_answer_concurrent_requests_with_local_images(tiny_onnx, ray_address):
    from ray import serve

    server = ServerProcess(tiny_onnx, "--ray", "--replicas", "2", "--ray-address", ray_address,
                           "--threads", "1", "--max-batch", "8", "--grace", "5", host=HOST)
    try:
        status = serve.status().applications["ddpm"].deployments["sampler"]
        assert status.replica_states.get("RUNNING") == 2
        # Mixed samplers and step counts, all at once: both replicas batch their share.
        bodies = [{"n": 1 + k % 3, "seed": 100 + k, "sampler": ("ddpm", "ddim")[k % 2],
                   "steps": 2 + k % 3, "eta": 1.0 if k % 4 == 1 else 0.0, "format": "npz"}
                  for k in range(10)]
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda b: server.request("POST", "/v1/samples", b),
                                    bodies))
        with runtime.load(tiny_onnx, threads=1) as pipe:
            for body, (code, headers, data) in zip(bodies, answers, strict=True):
                assert code == 200, data[:300]
                assert json.loads(headers["x-sample-options"])["seed"] == body["seed"]
                with np.load(io.BytesIO(data)) as npz:
                    got = npz["images"]
                want = pipe.sample(body["n"], body["seed"], sampler=body["sampler"],
                                   steps=body["steps"], eta=body["eta"], progress=False)
                np.testing.assert_array_equal(got, want)      # bit for bit
        # DELETE reaches the request whichever replica Ray's router sends it to (the idle
        # one, mostly: not the one running the request).
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(server.request, "POST", "/v1/samples",
                               {"n": 8, "seed": 1, "steps": 1000, "id": "long-one"})
            deleted = None
            while deleted != 202 and not long.done():
                deleted = server.request("DELETE", "/v1/samples/long-one")[0]
                time.sleep(0.02)
            assert deleted == 202 and long.result()[0] == 409
        _an_id_in_use_is_refused_on_every_replica(server)
        assert server.request("DELETE", "/v1/samples/no-such-id")[0] == 404
        # The same JSON errors and routes as the one-process server.
        code, _, data = server.request("POST", "/v1/samples", {"n": "x"})
        assert code == 400 and "n must be an integer" in json.loads(data)["error"]
        assert server.request("GET", "/healthz")[0] == 200
        code, _, data = server.request("GET", "/v1/model")
        assert code == 200 and json.loads(data)["record"] == json.loads(pipe.record.to_json())
    finally:
        code = server.stop()
    assert code == 0, "".join(server.stderr)[-2000:]
    with pytest.raises(OSError):   # SIGTERM took the deployment and its proxy down
        server.request("GET", "/healthz", timeout=5)



def _an_id_in_use_is_refused_on_every_replica(server) -> None:
    """One id, one request, on N replicas as on one server: a second POST with a running
    request's id is refused 409 id_in_use (whichever replica gets it), and DELETE still
    cancels the first; then the id is free again."""
    conn = http.client.HTTPConnection(HOST, server.port, timeout=120)
    try:
        conn.request("POST", "/v1/samples", body=json.dumps(
            {"n": 8, "seed": 2, "steps": 1000, "id": "owned", "stream": True}))
        stream = conn.getresponse()
        assert stream.status == 200
        # "accepted" comes once the request holds its id.
        assert stream.readline().decode().strip() == "event: accepted"
        # Several tries: Ray's router spreads them, mostly to the idle replica.
        for _ in range(4):
            code, _, data = server.request("POST", "/v1/samples",
                                           {"n": 1, "seed": 0, "steps": 2, "id": "owned"})
            assert code == 409, (code, data[:200])  # not a second request under one id
            error = json.loads(data)
            assert (error["code"], error["field"]) == ("id_in_use", "id"), error
        assert server.request("DELETE", "/v1/samples/owned")[0] == 202
        events = stream.read().decode()
    finally:
        conn.close()
    last = [chunk for chunk in events.split("\n\n") if chunk.strip()][-1]
    kind, data = last.split("\n", 1)
    error = json.loads(data.removeprefix("data: "))
    assert kind == "event: error" and (error["status"], error["code"]) == (409, "cancelled")
    # The owner releases the id on the board as it finishes (a message on its way): the
    # other replica may see it a moment later.
    deadline = time.monotonic() + 10
    while True:
        code, _, data = server.request("POST", "/v1/samples",
                                       {"n": 1, "seed": 0, "steps": 2, "id": "owned"})
        if code != 409 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert code == 200, data[:300]


@needs_ray
def test_a_model_with_external_data_ships_all_its_files(tiny_onnx, ray_address, tmp_path):
    """The workers get the .onnx and the data file it names (the backend's declared files),
    each checked against its SHA-256, and draw the images of a local pipeline."""
    from runtime import backends
    from runtime.scale.bulk import run
    from runtime.scale.shards import BulkJob
    from tests.test_model_files import with_external_data

    model = with_external_data(tiny_onnx, tmp_path / "m" / "model.onnx")
    files = backends.model_files(model)
    assert len(files) == 2
    options = {"sampler": "ddim", "steps": 3, "spacing": "linspace", "variance": "fixedlarge",
               "eta": 0.0}
    job = BulkJob(tmp_path / "job", model_sha256=backends.model_digest(files),
                  image_shape=(1, 8, 8), n=4, seed=2, shard_size=2, sample_options=options)
    job.prepare(inputs=files)
    run(job, files, address=ray_address, workers=1, progress=False)
    images, _ = read_images(job.out)
    with runtime.load(model, threads=1) as pipe:
        np.testing.assert_array_equal(images, pipe.sample(4, 2, progress=False, **options))
