"""Shared fixtures: small real networks exported by the real export code.

Also how the suite runs in parallel (``pytest -n 2``, what ``make test`` does): the costly
session fixtures are built once per run, not once per worker; modules that start a service
for all their tests run on one worker; and the slowest tests start first.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Set before torch (and its OpenMP) loads here or in any subprocess a test starts: a waiting
# OpenMP thread sleeps instead of spinning. Two workers share two cores, so a spinning thread
# holds the core the other worker needs (a 2-thread training test took 43 s with spinning
# and 9 s without, on a busy 2-core machine). It changes no result, only who waits how.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The pytest-xdist worker this process is ("gw0", ...), or None in a plain run.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")

# Tests that share one worker under xdist, by node id prefix: modules whose module-scoped
# fixtures start a service (a local Ray instance, a server process), so it starts once per
# run, and tests that share a costly module fixture. (xdist's own xdist_group marker is
# silently ignored with pytest 9.2 and xdist 3.8, hence the scheduler below.)
ONE_WORKER = {
    "tests/test_ray.py": "ray",
    "tests/test_server.py": "server",
    # Module fixtures (a folder per UNet layout, exported once) built on one worker only.
    "tests/test_diffusers_import.py": "diffusers_import",
    "tests/test_to_diffusers.py": "to_diffusers",
    "tests/test_export.py::test_export_is_deterministic": "cli_export",
    "tests/test_export.py::test_cli_export_prints_verification": "cli_export",
    "tests/test_export.py::test_to_trt_without_tensorrt_writes_onnx_and_exits_3": "cli_export",
}

# Whole modules that belong to the full suite only (`make test`), not the fast subset
# (`make test-fast`): real subprocesses, training runs, services, the paper's presets.
SLOW_MODULES = {"test_ddp.py", "test_export.py", "test_faults.py", "test_hostile.py",
                "test_loadtest.py", "test_packaging.py", "test_parity.py", "test_ray.py",
                "test_tools.py", "test_diffusers_import.py", "test_to_diffusers.py",
                "test_model_files.py"}
# A test that needs a trained model is slow wherever it lives: the training run and its
# export are the suite's costliest fixtures.
SLOW_FIXTURES = {"trained_run", "trained_onnx"}


def pytest_configure(config):
    if WORKER is not None:
        # Two workers on two cores: a torch op spread over both cores would wait on the
        # other worker's core at every synchronisation, which can make it 5x slower.
        # Tests that are about thread counts set their own.
        import torch

        torch.set_num_threads(1)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's load scheduling (one test at a time to whichever worker is free), but the
    tests of each ONE_WORKER group go to one worker together."""
    if config.getvalue("dist") not in ("load", "loadgroup"):
        return None
    from xdist.scheduler import LoadGroupScheduling

    # Hand out tests in the order pytest_collection_modifyitems leaves them, not the
    # groups first by size.
    config.option.loadscopereorder = False

    class OneWorkerGroups(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            for prefix, group in ONE_WORKER.items():
                if nodeid == prefix or nodeid.startswith(prefix + "::"):
                    return group
            return super()._split_scope(nodeid)

    return OneWorkerGroups(config, log)


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.name
        if module in SLOW_MODULES or SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
    if WORKER is not None:
        # The order workers take tests in. First the Ray group (its instance starts while
        # the other worker trains the tiny model), then the tests of the trained model, then
        # the other slow tests, so no worker is left with a 30-second test while the other
        # has finished; the many fast ones last, to even out the end. A stable sort: the
        # order within each kind stays.
        def rank(item):
            if item.get_closest_marker("slow") is None:
                return 3
            if SLOW_FIXTURES & set(item.fixturenames):
                return 1
            grouped = any(item.nodeid == prefix or item.nodeid.startswith(prefix + "::")
                          for prefix in ONE_WORKER)
            return 0 if grouped else 2

        items.sort(key=rank)


def tiny_model_config():
    from training.config import ModelConfig

    # Every block type of the paper's U-Net (res, attention, down, up) at the smallest size.
    return ModelConfig(image_size=8, in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                       attn_resolutions=(4,), dropout=0.0, num_groups=8)


def randomized_unet(config, seed: int = 0, scale: float = 0.05):
    """A UNet with every weight random: the reference zero-initialises the last layers,
    which would make eps identically 0 and every parity check vacuous."""
    import torch

    from training.unet import UNet

    torch.manual_seed(seed)
    model = UNet(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def export_model(model, path: Path, *, num_timesteps: int = 1000, num_levels: int = 17,
                 **record_overrides) -> Path:
    """Write ``model`` as an ONNX file with a ``ddpm`` record, through the export code."""
    from export.onnx_export import count_flops, to_onnx_bytes
    from runtime.metadata import ModelRecord
    from runtime.schedule import Schedule
    from runtime.util.fileio import write_bytes

    cfg = model.config
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    fields = dict(
        schedule=Schedule.linear(num_timesteps).config, image_shape=shape,
        data_range=(-1.0, 1.0), num_levels=num_levels, model_config=cfg.to_dict(),
        checkpoint_sha256="0" * 64, weights="ema", train_step=0,
        flops_per_image=_count_flops_without_weights(model, count_flops, shape),
    )
    fields.update(record_overrides)
    write_bytes(path, to_onnx_bytes(model, ModelRecord(**fields)))
    return path


def _count_flops_without_weights(model, count_flops, shape) -> int:
    """``count_flops(model, shape)`` on a weightless twin of ``model`` on the meta device:
    the counter counts shapes, so the number is the same (checked on every preset), without
    the arithmetic (497 GFLOP for celebahq256)."""
    import torch

    with torch.device("meta"):  # the twin and count_flops' inputs
        return count_flops(type(model)(model.config).eval(), shape)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: more threads only add synchronisation, which stalls on a busy CI box."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model():
    return randomized_unet(tiny_model_config())


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder ``build(folder)`` has filled, once per run: in a plain run, a new temporary
    folder; under pytest-xdist, one folder in the run's common temporary root that the
    first worker to need it fills while the others wait, and all then read."""
    if WORKER is None:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent  # the workers' folders are beside each other
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model, tmp_path_factory) -> Path:
    folder = built_once(tmp_path_factory, "onnx",
                        lambda folder: _export_tiny(tiny_model, folder / "tiny.onnx"))
    return folder / "tiny.onnx"


REPO = Path(__file__).resolve().parents[1]
# What the tiny network's file is a function of: the code that builds, records and exports
# it, and the libraries that trace it (the export is deterministic: test_export.py).
EXPORT_INPUTS = ["tests/conftest.py", "export", "training", "runtime/metadata.py",
                 "runtime/schedule.py", "runtime/stepmath.py"]


def _export_tiny(model, path: Path) -> None:
    """The tiny network's export, kept in .pytest_cache under a digest of everything it
    depends on: the edit-test loop skips a 4-second trace while none of that changed. A
    fresh clone (CI) has no cache and exports."""
    import hashlib
    import importlib.metadata

    digest = hashlib.sha256()
    for entry in EXPORT_INPUTS:
        target = REPO / entry
        for file in sorted(target.rglob("*.py")) if target.is_dir() else [target]:
            digest.update(str(file.relative_to(REPO)).encode() + b"\0" + file.read_bytes())
    for package in ("torch", "onnx", "onnxscript", "onnx-ir", "numpy"):
        digest.update(f"{package}=={importlib.metadata.version(package)}".encode())
    cached = REPO / ".pytest_cache" / "ddpm" / f"tiny-{digest.hexdigest()[:24]}.onnx"
    if cached.is_file():
        shutil.copyfile(cached, path)
        return
    export_model(model, path)
    from runtime.util.fileio import write_bytes

    cached.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(cached, path.read_bytes())


def _train_tiny(run: Path) -> None:
    from training.config import TrainConfig
    from training.data import load_dataset
    from training.trainer import train

    cfg = tiny_model_config()
    train_cfg = TrainConfig(lr=2e-3, warmup=20, batch_size=32, steps=300, ema_decay=0.99,
                            sample_every=0, save_every=300, log_every=100, preview_count=4,
                            preview_steps=5)
    train(cfg, train_cfg, load_dataset("digits", cfg.image_size, cfg.in_channels), run,
          device="cpu", progress=False)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A real training run of the tiny U-Net on the embedded digits: a few hundred steps,
    enough that eps is a trained function of (x, t), not a random one. Returns its folder."""
    return built_once(tmp_path_factory, "trained", _train_tiny)


def _export_trained(run: Path, folder: Path) -> None:
    from export.onnx_export import export_checkpoint

    _, _, check = export_checkpoint(run / "ckpt.pt", folder / "model.onnx")
    assert check.ok


@pytest.fixture(scope="session")
def trained_onnx(trained_run, tmp_path_factory) -> Path:
    """The trained checkpoint through the real export path (EMA weights, verified)."""
    folder = built_once(tmp_path_factory, "exported",
                        lambda folder: _export_trained(trained_run, folder))
    return folder / "model.onnx"
