"""Shared fixtures: small real networks exported by the real export code."""

from __future__ import annotations

from pathlib import Path

import pytest


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
        flops_per_image=count_flops(model, shape),
    )
    fields.update(record_overrides)
    write_bytes(path, to_onnx_bytes(model, ModelRecord(**fields)))
    return path


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


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model, tmp_path_factory) -> Path:
    return export_model(tiny_model, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A real training run of the tiny U-Net on the embedded digits: a few hundred steps,
    enough that eps is a trained function of (x, t), not a random one. Returns its folder."""
    from training.config import TrainConfig
    from training.data import load_dataset
    from training.trainer import train

    cfg = tiny_model_config()
    run = tmp_path_factory.mktemp("trained")
    train_cfg = TrainConfig(lr=2e-3, warmup=20, batch_size=32, steps=300, ema_decay=0.99,
                            sample_every=0, save_every=300, log_every=100, preview_count=4,
                            preview_steps=5)
    train(cfg, train_cfg, load_dataset("digits", cfg.image_size, cfg.in_channels), run,
          device="cpu", progress=False)
    return run


@pytest.fixture(scope="session")
def trained_onnx(trained_run, tmp_path_factory) -> Path:
    """The trained checkpoint through the real export path (EMA weights, verified)."""
    from export.onnx_export import export_checkpoint

    path, _, check = export_checkpoint(trained_run / "ckpt.pt",
                                       tmp_path_factory.mktemp("exported") / "model.onnx")
    assert check.ok
    return path
