"""The editing commands of `python -m runtime`: img2img, inpaint, invert, decode, interpolate.

Images come from a PNG (one image) or an .npz (uint8 [N, H, W, C] under 'images', what
``sample --npz`` writes); every input is read and checked, and every output checked,
before the model runs.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import click
import numpy as np

from .cli import (
    _backend_options,
    _check_outputs,
    _check_suffix,
    _image_outputs,
    _options,
    _write_images,
    main,
)
from .edits import EDITS
from .images import to_uint8
from .options import SEED, click_options, flag
from .schedule import SPACINGS
from .util.fileio import atomic_outputs, check_name_lengths, check_output

_IMAGE = click.Path(dir_okay=False, path_type=Path)


def _edit_flags(kind: str):
    """One flag per option of the edit ``kind``, from its declarations (default None: the
    schema's default is filled in by the edit itself)."""
    def decorate(fn):
        for option in reversed(EDITS[kind].options):
            fn = flag(option, None, f"{option.help} (default {option.default})")(fn)
        return fn
    return decorate


def _request(fn):
    fn = click_options(fn)
    fn = click.option("--seed", type=click.IntRange(SEED.low, SEED.high), default=0,
                      show_default=True, help=SEED.help)(fn)
    fn = click.option("-n", "--num", "n", type=click.IntRange(min=1), default=None,
                      help="images to make from one input image (default: one per input)")(fn)
    return fn


def _read(path: Path, pipe, name: str, *, mask: bool = False) -> np.ndarray:
    """The file's images as read (its format checked; their values by ``make_edit``)."""
    from .images import read_image_file

    return read_image_file(path, pipe.image_shape, name, mask=mask)


def _edit(kind: str, model, image, mask, n, seed, batch_size, out, npz, each, progress,
          backend, device, threads, params, sampling):
    from .pipeline import load

    _options(sampling)  # a bad flag is one line before the model loads
    inputs = [model, image] + ([mask] if mask is not None else [])
    with load(model, backend=backend, device=device, threads=threads) as pipe:
        pixels = _read(image, pipe, "image")
        keep = None if mask is None else _read(mask, pipe, "mask", mask=True)
        if keep is not None and len(keep) == 1:
            keep = keep[0]
        options = _options(sampling, pipe.record.defaults)
        edit = pipe.make_edit(kind, pixels, mask=keep, n=n, options=params,
                              names=(f"image {image}", f"mask {mask}"))
        each_png = _check_outputs(out, npz, each, edit.n, inputs=inputs)
        start = time.perf_counter()
        images = to_uint8(pipe.run_edit(edit, seed, batch_size=batch_size, progress=progress,
                                        **options.to_dict()), pipe.record.data_range)
        seconds = time.perf_counter() - start
    _write_images(images, seed, out, npz, each, each_png)
    what = ", ".join(f"{k} {v}" for k, v in edit.params.items())
    click.echo(f"{len(images)} images, {kind} ({what}), {options.sampler}, {seconds:.1f} s "
               f"-> {out}")


@main.command("img2img")
@click.argument("model", type=_IMAGE)
@click.argument("image", type=_IMAGE)
@_request
@_edit_flags("img2img")
@_image_outputs(Path("edited.png"))
@_backend_options
def img2img_cmd(model, image, n, seed, batch_size, out, npz, each, progress, backend, device,
                threads, strength, **sampling):
    """Image-to-image (SDEdit): noise IMAGE (.png, or .npz of images) part of the way and
    denoise it with MODEL; --strength 0 keeps it, 1 samples anew."""
    _edit("img2img", model, image, None, n, seed, batch_size, out, npz, each, progress,
          backend, device, threads, {"strength": strength}, sampling)


@main.command("inpaint")
@click.argument("model", type=_IMAGE)
@click.argument("image", type=_IMAGE)
@click.option("--mask", type=_IMAGE, required=True,
              help="PNG (or .npz): white (255) where IMAGE is kept, black (0) where it is "
              "filled in")
@_request
@_edit_flags("inpaint")
@_image_outputs(Path("edited.png"))
@_backend_options
def inpaint_cmd(model, image, mask, n, seed, batch_size, out, npz, each, progress, backend,
                device, threads, jump_length, resamples, **sampling):
    """Inpaint (RePaint): keep IMAGE where --mask is white and sample the rest with MODEL."""
    _edit("inpaint", model, image, mask, n, seed, batch_size, out, npz, each, progress,
          backend, device, threads, {"jump_length": jump_length, "resamples": resamples},
          sampling)


def _chain_flags(fn):
    fn = click.option("--spacing", type=click.Choice(SPACINGS), default=None,
                      help="which timesteps --steps keeps (invert: default linspace; decode: "
                      "default the latents' own)")(fn)
    fn = click.option("--steps", type=click.IntRange(min=1), default=None,
                      help="DDIM steps (invert: default all T of the model; decode: default "
                      "the steps the latents were inverted with)")(fn)
    return fn


@main.command("invert")
@click.argument("model", type=_IMAGE)
@click.argument("image", type=_IMAGE)
@_chain_flags
@click.option("-o", "--out", type=_IMAGE, default=Path("latents.npz"), show_default=True,
              help="float32 latents x_T [N, C, H, W] under 'latents'")
@click.option("--progress/--no-progress", default=True, show_default=True)
@_backend_options
def invert_cmd(model, image, steps, spacing, out, progress, backend, device, threads):
    """Deterministic DDIM inversion: IMAGE -> the latent x_T that `decode` turns back into it."""
    from .pipeline import load

    check_name_lengths(out, "-o/--out")
    _check_suffix(out, ".npz", "-o/--out", "numpy would add it")
    check_output(out, inputs=[model, image], option="-o/--out")
    spacing = spacing or "linspace"
    with load(model, backend=backend, device=device, threads=threads) as pipe:
        latents = pipe.invert(_read(image, pipe, "image"), steps=steps, spacing=spacing,
                              progress=progress)
        steps = steps or pipe.record.num_timesteps
    # The chain goes with the latents: decode walks it back by default.
    with atomic_outputs() as outputs, open(outputs.add(out), "xb") as f:
        np.savez_compressed(f, latents=latents, steps=steps, spacing=spacing)
    click.echo(f"{len(latents)} latents, DDIM {steps} steps ({spacing}) -> {out}")


@main.command("decode")
@click.argument("model", type=_IMAGE)
@click.argument("latents", type=_IMAGE)
@_chain_flags
@_image_outputs(Path("edited.png"))
@_backend_options
def decode_cmd(model, latents, steps, spacing, batch_size, out, npz, each, progress, backend,
               device, threads):
    """Deterministic DDIM from LATENTS (an .npz that `invert` wrote) back to images."""
    from .pipeline import load
    from .util.fileio import read_regular_file

    try:
        with np.load(io.BytesIO(read_regular_file(latents, 1 << 30)),
                     allow_pickle=False) as f:
            z = f["latents"]
            steps = steps or (int(f["steps"]) if "steps" in f.files else None)
            spacing = spacing or (str(f["spacing"]) if "spacing" in f.files else "linspace")
    except (OSError, ValueError, KeyError, EOFError, TypeError) as err:
        raise click.BadParameter(f"{latents} is not an .npz with 'latents' that invert "
                                 f"wrote ({err})", param_hint="LATENTS") from None
    each_png = _check_outputs(out, npz, each, len(z), inputs=[model, latents])
    with load(model, backend=backend, device=device, threads=threads) as pipe:
        images = pipe.decode(z, steps=steps, spacing=spacing, batch_size=batch_size,
                             progress=progress)
    _write_images(images, 0, out, npz, each, each_png)
    click.echo(f"{len(images)} images decoded -> {out}")


@main.command("interpolate")
@click.argument("model", type=_IMAGE)
@click.argument("a", type=_IMAGE)
@click.argument("b", type=_IMAGE)
@click.option("--num", type=click.IntRange(min=2), default=9, show_default=True,
              help="images from A to B, ends included")
@click.option("--strength", type=click.FloatRange(0, 1, min_open=True), default=0.5,
              show_default=True, help="noise both to t = strength x T, mix, denoise (the "
              "paper's); ignored with --latent")
@click.option("--latent", is_flag=True, help="mix the DDIM-inverted latents spherically "
              "instead")
@click.option("--seed", type=click.IntRange(SEED.low, SEED.high), default=0, show_default=True)
@click_options
@click.option("-o", "--out", type=_IMAGE, default=Path("interpolation.png"), show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
@_backend_options
def interpolate_cmd(model, a, b, num, strength, latent, seed, out, progress, backend, device,
                    threads, **sampling):
    """Images between A and B (PNGs of one image each), as a one-row grid."""
    from .images import make_grid, png_bytes
    from .pipeline import load

    _options(sampling)
    _check_outputs(out, None, None, num, inputs=[model, a, b])
    with load(model, backend=backend, device=device, threads=threads) as pipe:
        first, second = _read(a, pipe, "a"), _read(b, pipe, "b")
        for name, img in (("a", first), ("b", second)):
            if len(img) != 1:
                raise click.BadParameter(f"{name} holds {len(img)} images; give one",
                                         param_hint=name.upper())
        options = _options(sampling, pipe.record.defaults)
        images = pipe.interpolate(first[0], second[0], num=num, strength=strength,
                                  latent=latent, seed=seed, progress=progress,
                                  **options.to_dict())
    with atomic_outputs() as outputs:
        outputs.write_bytes(out, png_bytes(make_grid(images, ncol=num)))
    click.echo(f"{num} images from {a} to {b} ({'latent' if latent else 'paper'}) -> {out}")
