"""The runtime matches PyTorch: one ε evaluation, and whole sampling trajectories.

Tolerances are measured, not guessed (figures from this 2-core CPU machine):
- ε: torch and ONNX Runtime run the same fp32 math with different kernel orderings;
  the max difference is ~1e-6 of the output's scale on every preset.
- trajectories: each step scales eps by sqrt(1/ab_t - 1) (~157 at t = T) to form x0,
  so an ε difference is amplified early in the chain; the posterior mean weights that
  x0 by ~sqrt(ab_{t-1}) and the chain contracts it back. Measured on a trained model:
  the final images differ by < 1e-6 after 1000 steps (TRAJECTORY_MAX_ABS below).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import runtime
from export.onnx_export import DEFAULT_TOLERANCE, verify_onnx
from runtime.backends.ort import read_record
from runtime.backends.trt import trt_unavailable_reason
from runtime.images import to_uint8
from runtime.samplers import ImageNoise
from runtime.schedule import Schedule
from tests.conftest import export_model, randomized_unet
from training.checkpoint import build_model, load_checkpoint
from training.config import preset
from training.reference import reference_sample

EPS_TOLERANCE = DEFAULT_TOLERANCE  # relative to max |eps|: export's own verification bound


# The digits preset is not among them: its layers are the tiny network's (every parity test
# below) with cifar10's two residual blocks per level. The deepest preset (six levels,
# 113.7M parameters) runs at 32x32 instead of 256x256 and with one residual block per level
# instead of two: every level, width and layer kind is still there (the last level on 1x1
# maps, attention on 16x16 maps), two blocks per level are cifar10's, and the export costs
# 9 s instead of 15 (at full size it exports and verifies the same: README).
@pytest.mark.parametrize("name, batch_sizes", [
    ("cifar10", (1, 3)),
    ("celebahq256", (1,)),
])
def test_eps_parity_per_preset(name, batch_sizes, tmp_path):
    config = preset(name)[0]
    if name == "celebahq256":
        config = dataclasses.replace(config, image_size=32, num_res_blocks=1)
    model = randomized_unet(config, scale=0.02)
    path = export_model(model, tmp_path / f"{name}.onnx")
    check = verify_onnx(model, path, batch_sizes=batch_sizes, tolerance=EPS_TOLERANCE)
    print(f"{name}: {check}")
    assert check.ok, str(check)
    assert check.scale > 0.1  # random weights: eps is far from the zero-init output


# === Trajectories: torch reference sampler + torch model vs the runtime + ONNX Runtime ===

TRAJECTORIES = [
    # (sampler, steps, variance, eta)
    ("ddpm", None, "fixedlarge", 0.0),   # the paper's full 1000-step chain
    ("ddpm", 100, "fixedlarge", 0.0),    # respaced
    ("ddpm", 100, "fixedsmall", 0.0),    # the other variance, on the respaced chain
    ("ddim", 50, "fixedlarge", 0.0),     # deterministic
    ("ddim", 50, "fixedlarge", 1.0),
]
N_IMAGES = 16
# Measured on the trained tiny model, 16 images: max |torch - runtime| of the final images
# is 4e-7..7e-7 for every sampler below, and no uint8 pixel differs. eps itself differs by
# ~1e-6 of its scale (kernel order), so other CPUs' kernels may move that by several x;
# 2e-5 leaves ~25x room and nothing more: a wrong coefficient, a noise draw out of order
# or a timestep off by one moves the images by >1e-2.
TRAJECTORY_MAX_ABS = 2e-5
MAX_DIFFERING_PIXELS = 0.002  # fraction of uint8 pixels: a rounding-boundary flip or two


def _trajectories(trained_run, trained_onnx, sampler, steps, variance, eta, device="cpu",
                  pipe=None):
    record = load_checkpoint(trained_run / "ckpt.pt")
    model = build_model(record).to(device)
    schedule = Schedule.from_config(record["schedule"])
    if steps is not None:
        schedule = schedule.respaced(steps)
    shape = (N_IMAGES, *record["data"]["image_shape"])
    ref = reference_sample(model, schedule, shape, ImageNoise(0, N_IMAGES), sampler=sampler,
                           variance=variance, eta=eta, clip_range=(-1.0, 1.0), device=device)
    pipe = pipe or runtime.load(trained_onnx)
    got = pipe.sample_float(N_IMAGES, seed=0, sampler=sampler, steps=steps, variance=variance,
                            eta=eta, progress=False)
    return ref, got


def _report(ref, got, label):
    max_abs = float(np.max(np.abs(ref.astype(np.float64) - got)))
    differing = float(np.mean(to_uint8(ref) != to_uint8(got)))
    print(f"{label}: max |torch - runtime| {max_abs:.2e}, uint8 pixels differing {differing:.4%}")
    return max_abs, differing


@pytest.mark.parametrize("sampler, steps, variance, eta", TRAJECTORIES)
def test_trajectory_parity(trained_run, trained_onnx, sampler, steps, variance, eta):
    ref, got = _trajectories(trained_run, trained_onnx, sampler, steps, variance, eta)
    max_abs, differing = _report(ref, got, f"{sampler} {steps or 1000} {variance} eta={eta}")
    assert max_abs < TRAJECTORY_MAX_ABS
    assert differing <= MAX_DIFFERING_PIXELS
    # Not vacuous: the images are distinct and span the data range.
    assert np.std(ref) > 0.1 and not np.allclose(ref[0], ref[1], atol=1e-2)


# === The same on GPUs, where present (tools/gpu_check.sh runs these) ===

def _cuda_reason() -> str | None:
    return None if torch.cuda.is_available() else "torch sees no CUDA GPU"


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_reason() is not None, reason=f"needs a CUDA GPU: {_cuda_reason()}")
@pytest.mark.parametrize("sampler, steps, variance, eta", TRAJECTORIES[:1] + TRAJECTORIES[3:4])
def test_trajectory_parity_torch_cuda(trained_run, trained_onnx, sampler, steps, variance, eta):
    """The torch reference on CUDA (TF32 off) vs the runtime on the CPU."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    ref, got = _trajectories(trained_run, trained_onnx, sampler, steps, variance, eta, "cuda")
    max_abs, differing = _report(ref, got, f"torch CUDA {sampler}")
    assert max_abs < TRAJECTORY_MAX_ABS and differing <= MAX_DIFFERING_PIXELS


# fp32 engines: kernel order only, as on the CPU but with GPU reductions; fp16 engines keep
# ~3 significant digits of eps, which the 1000-step chain amplifies early and contracts late.
TRT_BOUNDS = {"fp32": (TRAJECTORY_MAX_ABS * 10, 0.01), "fp16": (0.1, 0.10)}


@pytest.mark.gpu
@pytest.mark.skipif(trt_unavailable_reason() is not None,
                    reason=f"needs TensorRT and a CUDA GPU: {trt_unavailable_reason()}")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_trajectory_parity_tensorrt(trained_run, trained_onnx, tmp_path, precision):
    from export.trt_build import build_engine

    engine = tmp_path / f"model_{precision}.plan"
    build_engine(trained_onnx, engine, precision=precision, min_batch=1, opt_batch=N_IMAGES,
                 max_batch=N_IMAGES, record=read_record(trained_onnx))
    with runtime.load(engine) as pipe:
        ref, got = _trajectories(trained_run, trained_onnx, "ddpm", None, "fixedlarge", 0.0,
                                 pipe=pipe)
    max_abs, differing = _report(ref, got, f"TensorRT {precision}")
    bound_abs, bound_pixels = TRT_BOUNDS[precision]
    assert max_abs < bound_abs and differing <= bound_pixels
