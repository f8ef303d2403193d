"""`python export/to_onnx.py CKPT|FOLDER [-o model.onnx]`: a verified, self-describing ONNX file.

FOLDER: a diffusers DDPM folder (``DDPMPipeline.save_pretrained``), or a bare UNet folder
with ``--scheduler scheduler_config.json`` (export/diffusers_import.py).

Also runs as a module: `python -m export.to_onnx`.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402

from runtime.util.clierrors import finite_float, guarded_command  # noqa: E402


def export_options(fn):
    """Options shared with to_trt.py."""
    fn = click.option("--raw-weights", is_flag=True,
                      help="export the trained weights instead of their EMA")(fn)
    fn = click.option("--scheduler", type=click.Path(dir_okay=False, path_type=Path),
                      default=None, help="a bare diffusers UNet folder's scheduler config "
                      "(scheduler_config.json); a pipeline folder has its own")(fn)
    fn = click.option("--tolerance", type=click.FloatRange(min=0.0), default=None,
                      callback=finite_float,
                      help="max |onnx - torch| / max |torch| accepted (default 2e-5)")(fn)
    fn = click.option("--external-data", type=click.Choice(["auto", "yes", "no"]),
                      default="auto", show_default=True,
                      help="weights in a data file beside the .onnx (auto: from 100 MiB of "
                      "weights, where ONNX Runtime maps them instead of copying; always over "
                      "2 GiB)")(fn)
    fn = click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]),
                      default="dynamo", show_default=True,
                      help="torch.onnx exporter: torch.export-based (dynamo), or the "
                      "deprecated TorchScript one, while the installed torch still has it")(fn)
    return fn


def default_out(source: Path, name: str) -> Path:
    """Beside a checkpoint; inside a diffusers folder."""
    return source / name if source.is_dir() else source.with_name(name)


def run_export(checkpoint: Path, out: Path, raw_weights: bool, tolerance: float | None,
               exporter: str = "dynamo", scheduler: Path | None = None,
               external_data: str = "auto") -> Path:
    """Export a checkpoint or a diffusers folder and print the verification; one-line
    errors become click errors, and warnings one line each on stderr."""
    from export.onnx_export import (
        DEFAULT_TOLERANCE,
        ExportError,
        export_checkpoint,
        export_diffusers,
    )
    from runtime.util.clierrors import one_line
    from training.checkpoint import CheckpointError

    folder = checkpoint.is_dir()
    if folder and raw_weights:
        raise click.BadParameter("a diffusers folder has one set of weights",
                                 param_hint="--raw-weights")
    if scheduler is not None and not folder:
        raise click.BadParameter("only a bare diffusers UNet folder takes a scheduler config",
                                 param_hint="--scheduler")
    tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", FutureWarning)
            if folder:
                path, record, check = export_diffusers(checkpoint, out, scheduler=scheduler,
                                                       tolerance=tolerance, exporter=exporter,
                                                       external_data=external_data)
            else:
                path, record, check = export_checkpoint(
                    checkpoint, out, weights="raw" if raw_weights else "ema",
                    tolerance=tolerance, exporter=exporter, external_data=external_data)
    except (CheckpointError, ExportError, ValueError) as err:
        raise click.ClickException(one_line(err)) from None
    finally:
        for warning in caught:
            click.echo(f"warning: {warning.message}", err=True)
    origin = ("diffusers weights" if folder
              else f"{record.weights} weights of step {record.train_step}")
    click.echo(f"wrote {path} ({origin}, {record.flops_per_image / 1e6:.1f} MFLOP per image)")
    click.echo(str(check))
    return path


@click.command(cls=guarded_command(), context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="ONNX file to write (default: model.onnx beside the checkpoint, or inside "
              "the diffusers folder)")
@export_options
def main(checkpoint: Path, out: Path | None, raw_weights: bool, scheduler: Path | None,
         tolerance: float | None, exporter: str, external_data: str):
    """Export CHECKPOINT's network (or a diffusers DDPM FOLDER's) to ONNX, with the metadata
    the runtime needs, and verify it against PyTorch in ONNX Runtime."""
    run_export(checkpoint, out or default_out(checkpoint, "model.onnx"), raw_weights,
               tolerance, exporter, scheduler, external_data)


if __name__ == "__main__":
    main()
