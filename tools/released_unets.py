"""A diffusers DDPM folder with the architecture of a released model and random weights.

    python tools/released_unets.py cifar10 OUT/      # google/ddpm-cifar10-32's UNet2DModel
    python tools/released_unets.py 256 OUT/          # google/ddpm-{celebahq,church,bedroom,cat}-256

What ``tools/bench_diffusers.py`` measures when the real weights are not at hand (speed and
memory do not depend on them): the configs are those of the released ``unet/config.json``
files, single-head attention included (``attention_head_dim`` null: one head over all
channels; diffusers' default of 8 would make 32 heads of 8 channels at 256, a different
and slower network). The scheduler is the released one: 1000 linear steps, fixed_small.
Nothing is downloaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402

from runtime.util.fileio import describe_os_error  # noqa: E402

COMMON = dict(in_channels=3, out_channels=3, layers_per_block=2, attention_head_dim=None,
              norm_num_groups=32, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1,
              downsample_padding=0, act_fn="silu", time_embedding_type="positional",
              mid_block_scale_factor=1, center_input_sample=False)
CONFIGS = {
    "cifar10": dict(sample_size=32, block_out_channels=(128, 256, 256, 256),
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                      "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    "256": dict(sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512),
                down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4),
}


@click.command()
@click.argument("arch", type=click.Choice(sorted(CONFIGS)))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
def main(arch: str, out: Path, seed: int) -> None:
    """Write ARCH's folder, random weights, to OUT (a new or empty folder)."""
    if out.exists() and not out.is_dir():
        raise click.BadParameter(f"{out} is a file; give a new or empty folder", param_hint="OUT")
    if out.is_dir() and any(out.iterdir()):
        raise click.BadParameter(f"{out} is not an empty folder; choose a new one",
                                 param_hint="OUT")
    try:  # before building 450 MB of weights
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise click.BadParameter(describe_os_error(err, out), param_hint="OUT") from None
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**COMMON, **CONFIGS[arch])
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                              variance_type="fixed_small", clip_sample=True)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out)
    params = sum(p.numel() for p in unet.parameters())
    click.echo(f"wrote {out} ({arch}: {params / 1e6:.1f}M parameters, random weights)")


if __name__ == "__main__":
    main()
