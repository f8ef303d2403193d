"""`python -m runtime` (also `ddpm-sample`): sample a PNG grid, or describe a model file."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import numpy as np

from . import backends
from .errors import BackendUnavailableError, ModelFileError, NonFiniteError
from .samplers import SAMPLERS
from .schedule import VARIANCES

# Errors a user can act on: print the one line, no traceback.
USER_ERRORS = (ModelFileError, BackendUnavailableError, NonFiniteError, ValueError)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Torch-free DDPM sampling from an ONNX file or a TensorRT engine."""


def _backend_options(fn):
    fn = click.option("--backend", type=click.Choice([backends.AUTO, *backends.names()]),
                      default=backends.AUTO, show_default=True,
                      help="auto: by the file's suffix (ort for .onnx, trt for .plan engines)")(fn)
    fn = click.option("--device", type=click.Choice(["cpu", "cuda", "tensorrt"]), default=None,
                      help="ONNX Runtime provider (default cpu)")(fn)
    fn = click.option("--threads", type=click.IntRange(min=1), default=None,
                      help="CPU threads for ONNX Runtime (default: all cores); a batch is "
                      "split into one shard per thread")(fn)
    return fn


@main.command("sample")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-n", "--num", "n", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sampler", type=click.Choice(SAMPLERS), default="ddpm", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="respaced steps (default: all T of the model)")
@click.option("--variance", type=click.Choice(VARIANCES), default="fixedlarge",
              show_default=True, help="ddpm only")
@click.option("--eta", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="ddim only; 0 is deterministic")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("samples.png"), show_default=True, help="PNG grid")
@click.option("--npz", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write uint8 images [n, H, W, C] under key 'images'")
@click.option("--each", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="also write one PNG per image into this folder")
@click.option("--progress/--no-progress", default=True, show_default=True)
@_backend_options
def sample_cmd(model, n, seed, sampler, steps, variance, eta, batch_size, out, npz, each,
               progress, backend, device, threads):
    """Sample N images from MODEL (.onnx or .plan) and write a PNG grid."""
    from .images import make_grid, save_png
    from .pipeline import load

    try:
        with load(model, backend=backend, device=device, threads=threads) as pipe:
            steps_run = steps or pipe.record.num_timesteps
            start = time.perf_counter()
            images = pipe.sample(n, seed, sampler=sampler, steps=steps, variance=variance,
                                 eta=eta, batch_size=batch_size, progress=progress)
            seconds = time.perf_counter() - start
            backend_name = pipe.backend_name
    except USER_ERRORS as err:
        raise click.ClickException(str(err)) from None
    save_png(make_grid(images), out)
    if npz is not None:
        npz.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(npz, images=images, seed=seed)
    if each is not None:
        for k, image in enumerate(images):
            save_png(image, each / f"{k:05d}.png")
    click.echo(f"{n} images, {sampler} {steps_run} steps, {seconds:.1f} s, "
               f"{n / seconds:.2f} images/s, {backend_name} -> {out}")


@main.command("info")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@_backend_options
def info_cmd(model, backend, device, threads):
    """Print MODEL's metadata, inputs/outputs and what its backend says about itself."""
    try:
        opened = backends.open_backend(model, backend=backend, device=device, threads=threads)
        try:
            record = json.loads(opened.record.to_json())
            lines = [f"model: {model}", f"backend: {opened.name}"]
            lines += [f"{label}: {text}" for label, text in opened.describe()]
        finally:
            opened.close()
    except USER_ERRORS as err:
        raise click.ClickException(str(err)) from None
    lines.append("metadata:")
    lines.append(json.dumps(record, indent=2, sort_keys=True))
    click.echo("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
