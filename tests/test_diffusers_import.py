"""Deploying diffusers DDPM folders: export, parity with diffusers, and bad folders.

Small random-weight UNet2DModels with the block types and options the paper's released
models use are saved as diffusers writes them (``DDPMPipeline.save_pretrained``), exported
by the real CLI path, and checked against diffusers itself: one ε call of the ONNX file
against ``UNet2DModel.forward``, and whole DDPM and DDIM trajectories of the runtime
against diffusers' schedulers loaded from the same folder, driven from the same x_T and
noise. diffusers is the oracle here; the runtime never imports it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime.samplers import ImageNoise, draw_noise
from tests.test_hostile import run_table

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers", reason="diffusers is a dev dependency (parity only)")

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

# The CIFAR-10 model's block layout and embedding options (DownBlock2D, AttnDownBlock2D at
# the second level, single-head attention, flip_sin_to_cos False, freq_shift 1, norm_eps
# 1e-6, downsample_padding 0), and a second layout with the other settings (multi-head
# attention, attention at the first level, flip_sin_to_cos True, freq_shift 0, padding 1),
# each at a toy size.
CONFIGS = {
    "ddpm_cifar_like": dict(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, norm_eps=1e-6,
        flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, attention_head_dim=None),
    "other_options": dict(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"), norm_num_groups=4,
        norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
        attention_head_dim=8),
}
SCHEDULERS = {"ddpm_cifar_like": dict(variance_type="fixed_small"),
              # Not "trailing" with fixed_large: there diffusers' last step, at t = T/n - 1 > 0,
              # adds noise of variance beta to the image; the runtime's last step adds none
              # (Algorithm 2), whatever the spacing. Every other step agrees.
              "other_options": dict(variance_type="fixed_large", prediction_type="v_prediction",
                                    beta_schedule="squaredcos_cap_v2",
                                    timestep_spacing="linspace")}


def save_folder(path: Path, name: str, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**CONFIGS[name])
    with torch.no_grad():  # every weight random, so no part of the network is vacuous
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, **SCHEDULERS[name])
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, tmp_path_factory):
    from export.onnx_export import export_diffusers

    folder = save_folder(tmp_path_factory.mktemp(request.param) / "folder", request.param)
    path, record, check = export_diffusers(folder, folder.parent / "model.onnx")
    assert check.ok
    return request.param, folder, path


def test_eps_of_the_file_is_diffusers_forward(exported):
    name, folder, path = exported
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    rng = np.random.default_rng(1)
    c, h = CONFIGS[name]["in_channels"], CONFIGS[name]["sample_size"]
    x = rng.standard_normal((3, c, h, h), dtype=np.float32)
    t = np.array([0, 417, 999], np.float32)
    with runtime.load(path) as pipe, torch.inference_mode():
        got = pipe.eps_fn(x, t)
        want = unet(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
        record = pipe.record
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert record.prediction == {"epsilon": "eps", "v_prediction": "v"}[sched["prediction_type"]]
    assert record.defaults["variance"] == sched["variance_type"].replace("_", "")
    assert record.defaults["spacing"] == sched["timestep_spacing"]
    assert record.weights == "imported" and record.image_shape == (c, h, h)


def _their_loop(scheduler, net, x, stream, **step_kwargs):
    xt = torch.from_numpy(x.copy())
    for t in scheduler.timesteps:
        with torch.inference_mode():
            out = net(xt, t.reshape(1).expand(len(x)).float()).sample
        kwargs = dict(step_kwargs)
        if step_kwargs.get("eta", 0) > 0 and int(t) > 0:
            kwargs["variance_noise"] = torch.from_numpy(draw_noise(stream, x.shape).copy())
        xt = scheduler.step(out, t, xt, **kwargs).prev_sample
    return xt.numpy()


def test_trajectories_equal_diffusers_schedulers_from_the_folder(exported, monkeypatch):
    name, folder, path = exported
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    n, seed = 3, 4
    shape = (n, CONFIGS[name]["in_channels"], 8, 8)
    with runtime.load(path) as pipe:
        # DDPM with the folder's own variance type and spacing (the model's defaults).
        ours = pipe.sample_float(n, seed, steps=20, progress=False)
        ddpm = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler")
        ddpm.set_timesteps(20)
        stream = ImageNoise(seed, range(n))
        x = draw_noise(stream, shape).copy()  # x_T: the stream's first draw, as ours
        monkeypatch.setattr("diffusers.schedulers.scheduling_ddpm.randn_tensor",
                            lambda s, **_: torch.from_numpy(draw_noise(stream, s).copy()))
        np.testing.assert_allclose(ours, _their_loop(ddpm, unet, x, stream), rtol=0, atol=1e-4)
        # DDIM at eta 0 and 0.6, from the same folder's config. "leading": diffusers' DDIM
        # steps from t to t - T/n whatever its timesteps, which is the chain only there.
        for eta in (0.0, 0.6):
            ours = pipe.sample_float(n, seed, sampler="ddim", steps=10, eta=eta,
                                     spacing="leading", progress=False)
            ddim = diffusers.DDIMScheduler.from_config(ddpm.config, set_alpha_to_one=True,
                                                       timestep_spacing="leading")
            ddim.set_timesteps(10)
            stream = ImageNoise(seed, range(n))
            x = draw_noise(stream, shape).copy()
            theirs = _their_loop(ddim, unet, x, stream, eta=eta, use_clipped_model_output=True)
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


# === Folders that are missing, broken, or not what this runtime honours ===

def _edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_bad_folders_are_one_line_naming_the_file_and_field(tmp_path):
    good = save_folder(tmp_path / "good", "ddpm_cifar_like")
    cases = []

    def variant(name, edit, culprit):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        edit(folder)
        cases.append(([str(folder), "-o", str(tmp_path / f"{name}.onnx")], culprit))

    variant("no_unet_config", lambda f: (f / "unet" / "config.json").unlink(),
            "unet/config.json: missing")
    variant("broken_json", lambda f: (f / "scheduler" / "scheduler_config.json")
            .write_text("{oops"), "scheduler_config.json: the scheduler config is not valid JSON")
    variant("unknown_block", lambda f: _edit_json(
        f / "unet" / "config.json", down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"]),
        "down_block_types has 'CrossAttnDownBlock2D'")
    variant("contradicts_weights", lambda f: _edit_json(
        f / "unet" / "config.json", block_out_channels=[16, 64]), "has shape [32] but")
    variant("not_ddpm", lambda f: _edit_json(f / "model_index.json",
                                             _class_name="StableDiffusionPipeline"),
            "not an unconditional DDPM pipeline")
    variant("pickle_only", lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors")
            .rename(f / "unet" / "diffusion_pytorch_model.bin"), "is a pickle")
    variant("learned_variance", lambda f: _edit_json(
        f / "scheduler" / "scheduler_config.json", variance_type="learned_range"),
        "variance_type 'learned_range'")
    variant("thresholding", lambda f: _edit_json(
        f / "scheduler" / "scheduler_config.json", thresholding=True), "thresholding")
    variant("truncated_weights", lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors")
            .write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
            "not a readable safetensors file")
    cases.append(([str(good / "unet"), "-o", str(tmp_path / "bare.onnx")], "--scheduler"))
    cases.append(([str(good), "-o", str(tmp_path / "model.jpg")], "must end in .onnx"))
    run_table("export.to_onnx:main", cases, tmp_path)


def test_the_released_architectures_have_the_papers_sizes_and_one_attention_head():
    """tools/released_unets.py, what the benchmark measures: the configs of the released
    folders (35.7M and 113.7M parameters), attention over all channels in one head."""
    from diffusers.models.attention_processor import Attention

    from tools.released_unets import COMMON, CONFIGS

    for arch, want in [("cifar10", 35.7e6), ("256", 113.7e6)]:
        with torch.device("meta"):  # shapes only: no 450 MB of random weights
            unet = diffusers.UNet2DModel(**COMMON, **CONFIGS[arch])
        assert abs(sum(p.numel() for p in unet.parameters()) - want) < 0.05e6, arch
        heads = [m.heads for m in unet.modules() if isinstance(m, Attention)]
        assert heads and set(heads) == {1}, arch
