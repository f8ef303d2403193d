"""`python export/to_diffusers.py CKPT OUT/`: a checkpoint as a diffusers DDPM folder.

The reverse of importing one: ``DDPMPipeline.from_pretrained(OUT)`` loads the folder and
its UNet2DModel computes this project's ε (checked before the folder is renamed into
place). The project's U-Net is the paper's, which diffusers' UNet2DModel writes with
``DownBlock2D``/``AttnDownBlock2D`` levels, a [sin, cos] embedding with ``freq_shift`` 1
and GroupNorm eps 1e-6; the one difference is the stride-2 convolution's padding, which
is symmetric here (``downsample_padding`` 1). Each weight is renamed, none is recomputed
(attention's 1x1 convolutions become the Linear layers they are). Also runs as a module:
`python -m export.to_diffusers`. Needs diffusers (``pip install .[import]``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402

from runtime.util.clierrors import guarded_command  # noqa: E402

# fp32 torch against fp32 torch with another kernel order (attention as Linear + SDPA).
TOLERANCE = 1e-5


def unet_config(model_config, image_shape) -> dict:
    """UNet2DModel's config for a project ModelConfig."""
    levels = list(zip(model_config.ch_mult, model_config.resolutions, strict=True))
    attn = [res in model_config.attn_resolutions for _, res in levels]
    return {
        "sample_size": int(image_shape[1]), "in_channels": int(image_shape[0]),
        "out_channels": int(image_shape[0]), "layers_per_block": model_config.num_res_blocks,
        "block_out_channels": [model_config.ch * m for m, _ in levels],
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "norm_num_groups": model_config.num_groups, "norm_eps": 1e-6,
        "flip_sin_to_cos": False, "freq_shift": 1, "downsample_padding": 1,
        "attention_head_dim": None, "act_fn": "silu", "dropout": model_config.dropout,
        "time_embedding_type": "positional", "center_input_sample": False,
    }


def _res(prefix: str, source: str) -> dict[str, str]:
    names = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj",
             "norm2": "norm2", "conv2": "conv2", "skip": "conv_shortcut"}
    return {f"{source}.{a}": f"{prefix}.{b}" for a, b in names.items()}


def _attn(prefix: str, source: str) -> dict[str, str]:
    names = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
             "proj_out": "to_out.0"}
    return {f"{source}.{a}": f"{prefix}.{b}" for a, b in names.items()}


def rename_table(model_config) -> dict[str, str]:
    """Project module path -> diffusers module path, for every module with weights."""
    table = {"temb.0": "time_embedding.linear_1", "temb.2": "time_embedding.linear_2",
             "conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"}
    n_levels, per = len(model_config.ch_mult), model_config.num_res_blocks
    i = 0
    for level in range(n_levels):
        for j in range(per):
            table |= _res(f"down_blocks.{level}.resnets.{j}", f"down.{i}.res")
            table |= _attn(f"down_blocks.{level}.attentions.{j}", f"down.{i}.attn")
            i += 1
        if level != n_levels - 1:
            table[f"down.{i}.conv"] = f"down_blocks.{level}.downsamplers.0.conv"
            i += 1
    table |= _res("mid_block.resnets.0", "mid.0") | _attn("mid_block.attentions.0", "mid.1")
    table |= _res("mid_block.resnets.1", "mid.2")
    i = 0
    for k, level in enumerate(reversed(range(n_levels))):
        for j in range(per + 1):
            table |= _res(f"up_blocks.{k}.resnets.{j}", f"up.{i}.res")
            table |= _attn(f"up_blocks.{k}.attentions.{j}", f"up.{i}.attn")
            i += 1
        if level != 0:
            table[f"up.{i}.conv"] = f"up_blocks.{k}.upsamplers.0.conv"
            i += 1
    return table


def diffusers_state(model) -> dict:
    """The project model's weights under diffusers' names (attention 1x1 convs as Linear)."""
    table = rename_table(model.config)
    out = {}
    for name, tensor in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module not in table:
            raise KeyError(f"no diffusers name for {name}")
        target = f"{table[module]}.{leaf}"
        if ".attentions." in target and leaf == "weight" and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]  # a 1x1 convolution is a Linear over channels
        out[target] = tensor.detach().clone().contiguous()
    return out


def scheduler_config(schedule: dict, data_range) -> dict:
    lo, hi = data_range
    if lo != -hi:
        raise ValueError(f"data_range {list(data_range)} is not symmetric; diffusers clips "
                         "x_0 to [-r, r]")
    common = {"num_train_timesteps": int(schedule["num_timesteps"]), "clip_sample": True,
              "clip_sample_range": float(hi), "variance_type": "fixed_large",
              "prediction_type": "epsilon", "timestep_spacing": "linspace"}
    if schedule["kind"] == "linear":
        return common | {"beta_schedule": "linear", "beta_start": schedule["beta_start"],
                         "beta_end": schedule["beta_end"]}
    if schedule["kind"] == "cosine" and (schedule.get("s"), schedule.get("max_beta")) == (
            0.008, 0.999):
        return common | {"beta_schedule": "squaredcos_cap_v2"}
    from runtime.schedule import Schedule

    return common | {"trained_betas": Schedule.from_config(schedule).betas.tolist()}


def write_folder(ckpt_path: Path, out: Path, *, weights: str = "ema") -> float:
    """Write ``out`` (a new folder); returns the max |diffusers - project| / max |project|."""
    import numpy as np
    import torch

    try:
        from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    except ImportError:
        raise click.ClickException("writing a diffusers folder needs diffusers: "
                                   "pip install .[import]") from None
    from training.checkpoint import build_model, load_checkpoint

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise click.BadParameter(f"{out} exists and is not an empty folder; give a new one",
                                 param_hint="OUT")
    ckpt = load_checkpoint(ckpt_path)
    model = build_model(ckpt, weights=weights)
    image_shape = ckpt["data"]["image_shape"]
    unet = UNet2DModel(**unet_config(model.config, image_shape)).eval()
    unet.load_state_dict(diffusers_state(model), strict=True)
    sched = DDPMScheduler(**scheduler_config(ckpt["schedule"], ckpt["data"]["data_range"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp)
        # What a user gets: the folder loaded back by diffusers, against the project's model.
        loaded = UNet2DModel.from_pretrained(tmp / "unet").eval()
        rng = np.random.default_rng(0)
        x = torch.from_numpy(rng.standard_normal((3, *image_shape), dtype=np.float32))
        t = torch.tensor([0.0, 500.0, float(ckpt["schedule"]["num_timesteps"] - 1)])
        with torch.inference_mode():
            want, got = model(x, t), loaded(x, t).sample
        rel = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
        if not rel <= TOLERANCE:
            raise click.ClickException(f"{out}: the diffusers UNet differs from the checkpoint's "
                                       f"network by {rel:.2e} (> {TOLERANCE:.0e}); not written")
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return rel


@click.command(cls=guarded_command(), context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--raw-weights", is_flag=True, help="the trained weights instead of their EMA")
def main(checkpoint: Path, out: Path, raw_weights: bool):
    """Write CHECKPOINT as a diffusers DDPM folder OUT (DDPMPipeline.from_pretrained(OUT))."""
    from runtime.util.clierrors import one_line
    from training.checkpoint import CheckpointError

    try:
        rel = write_folder(checkpoint, out, weights="raw" if raw_weights else "ema")
    except (CheckpointError, ValueError) as err:
        raise click.ClickException(one_line(err)) from None
    click.echo(f"wrote {out} (diffusers DDPMPipeline; its UNet matches the checkpoint's "
               f"network to {rel:.1e})")


if __name__ == "__main__":
    main()
