"""export/to_diffusers.py: a checkpoint as a diffusers folder that diffusers loads with the
same ε, and that comes back through the import as a model sampling the same images."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import runtime
from tests.conftest import randomized_unet, tiny_model_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers", reason="diffusers is a dev dependency (parity only)")
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def random_ckpt(trained_run, tmp_path_factory):
    """The trained run's checkpoint with every EMA weight random: no zero-initialised layer
    can hide a misplaced weight."""
    ckpt = torch.load(trained_run / "ckpt.pt", weights_only=True)
    ckpt["ema"] = randomized_unet(tiny_model_config(), seed=3, scale=0.1).state_dict()
    path = tmp_path_factory.mktemp("rand") / "ckpt.pt"
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def folder(random_ckpt, tmp_path_factory):
    """The checkpoint through the real CLI."""
    out = tmp_path_factory.mktemp("to_diffusers") / "folder"
    run = subprocess.run([sys.executable, str(ROOT / "export" / "to_diffusers.py"),
                          str(random_ckpt), str(out)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "matches the checkpoint's network" in run.stdout
    return out


def test_diffusers_loads_the_folder_with_the_checkpoints_eps(random_ckpt, folder):
    from training.checkpoint import build_model, load_checkpoint

    out = folder
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    model = build_model(load_checkpoint(random_ckpt))
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 1, 8, 8),
                                                                  dtype=np.float32))
    t = torch.tensor([0.0, 10.0, 600.0, 999.0])
    with torch.inference_mode():
        want, got = model(x, t), pipe.unet(x, t).sample
    assert want.abs().max() > 0.1  # a network that computes something
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    assert pipe.scheduler.config.variance_type == "fixed_large"
    # An existing folder with files in it is never written into.
    from click.testing import CliRunner

    from export.to_diffusers import main

    again = CliRunner().invoke(main, [str(random_ckpt), str(out)])
    assert again.exit_code == 2 and "not an empty folder" in again.output


def test_round_trip_through_diffusers_samples_the_same_images(random_ckpt, folder, tmp_path):
    """Checkpoint -> diffusers folder -> import -> ONNX: the runtime samples the images
    the checkpoint's own torch network gives with the same sampler and noise."""
    from export.onnx_export import export_diffusers
    from runtime.samplers import ImageNoise
    from training.checkpoint import build_model, load_checkpoint
    from training.reference import reference_sample

    back, record, _ = export_diffusers(folder, tmp_path / "back.onnx")
    assert record.defaults == {"variance": "fixedlarge", "spacing": "linspace"}
    model = build_model(load_checkpoint(random_ckpt))
    with runtime.load(back) as pipe:
        for options in (dict(sampler="ddim", steps=8),):
            want = reference_sample(model, pipe.schedule.respaced(options["steps"]),
                                    (3, 1, 8, 8), ImageNoise(2, 3), sampler=options["sampler"])
            np.testing.assert_allclose(pipe.sample_float(3, 2, progress=False, **options),
                                       want, rtol=0, atol=5e-4)  # 1e-6 in eps, over a chain
