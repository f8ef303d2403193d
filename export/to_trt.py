"""`python export/to_trt.py CKPT|FOLDER|MODEL.onnx [-o model.plan]`: ONNX, then an engine.

Also runs as a module: `python -m export.to_trt`.

From a checkpoint it first writes and verifies the ONNX file (beside the engine).
Where TensorRT or a GPU is missing it stops after the ONNX file with exit code 3
and one line saying what is missing; the ONNX file runs with `python -m runtime`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402

from export.to_onnx import default_out, export_options, run_export  # noqa: E402
from runtime.sidecar import sidecar_path  # noqa: E402
from runtime.util.clierrors import finite_float, guarded_command  # noqa: E402
from runtime.util.fileio import check_output  # noqa: E402

EXIT_NO_TENSORRT = 3  # distinct from click's usage errors (2) and export failures (1)


@click.command(cls=guarded_command(), context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="engine file (default: model.plan beside SOURCE); its sidecar is OUT.json")
@click.option("--fp16", "precision", flag_value="fp16", help="reduced precision: fp16")
@click.option("--bf16", "precision", flag_value="bf16", help="reduced precision: bf16")
@click.option("--min-batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--opt-batch", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--workspace", type=click.FloatRange(min=0.0, min_open=True), default=None,
              callback=finite_float,
              help="builder workspace limit in GiB (default: TensorRT's)")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="reuse and update this timing cache file")
@click.option("--device-id", type=click.IntRange(min=0), default=0, show_default=True)
@export_options
def main(source: Path, out: Path | None, precision: str | None, min_batch: int, opt_batch: int,
         max_batch: int, workspace: float | None, timing_cache: Path | None, device_id: int,
         raw_weights: bool, scheduler: Path | None, tolerance: float | None, exporter: str,
         external_data: str):
    """Build a TensorRT engine from SOURCE: a checkpoint or a diffusers DDPM folder (exported
    to ONNX first), or an ONNX file written by export/to_onnx.py."""
    precision = precision or "fp32"
    if not min_batch <= opt_batch <= max_batch:
        raise click.BadParameter(f"need --min-batch <= --opt-batch <= --max-batch, got "
                                 f"{min_batch}, {opt_batch}, {max_batch}",
                                 param_hint="--opt-batch")
    out = out or default_out(source, "model.plan")
    if out.suffix.lower() == ".onnx":
        # From a checkpoint the ONNX file is written to OUT with .onnx: the engine would
        # replace the verified model it was built from.
        raise click.BadParameter(f"{out}: .onnx is the ONNX model's suffix; give the engine "
                                 f"another, e.g. {out.with_suffix('.plan')}",
                                 param_hint="-o/--out")
    from_onnx = source.suffix.lower() == ".onnx"  # M.ONNX is an ONNX file too
    onnx_path = source if from_onnx else out.with_suffix(".onnx")
    # Every destination is checked before the (long) export and build; none may be an input.
    inputs = [source, onnx_path, timing_cache]
    check_output(out, inputs=inputs, option="-o/--out")
    check_output(sidecar_path(out), inputs=inputs, option="-o/--out (sidecar)")
    if timing_cache is not None:  # read, then rewritten after the build
        check_output(timing_cache, inputs=[source, onnx_path, out, sidecar_path(out)],
                     option="--timing-cache")
    if not from_onnx:
        run_export(source, onnx_path, raw_weights, tolerance, exporter, scheduler,
                   external_data)

    from export.trt_build import build_engine, verify_engine
    from runtime.backends.ort import read_record
    from runtime.backends.trt import trt_unavailable_reason

    record = read_record(onnx_path)  # an ONNX file not written by export is refused here
    from runtime.errors import BackendUnavailableError, ModelFileError

    missing = trt_unavailable_reason(device_id)
    if missing is not None:
        click.echo(f"no TensorRT engine built: {missing}. The ONNX model runs with "
                   f"python -m runtime sample {onnx_path}", err=True)
        sys.exit(EXIT_NO_TENSORRT)
    try:
        build_engine(onnx_path, out, precision=precision, min_batch=min_batch,
                     opt_batch=opt_batch, max_batch=max_batch, workspace_gib=workspace,
                     timing_cache=timing_cache, record=record, device=device_id)
        # fp32 engines must match ONNX Runtime closely; reduced precision gets a documented
        # looser bound (see tests/test_trt.py for the measured figures).
        limit = {"fp32": 1e-3, "fp16": 3e-2, "bf16": 1e-1}[precision]
        check = verify_engine(out, onnx_path, batch_sizes=sorted({min_batch, max_batch}),
                              tolerance=limit, device=device_id)
    except (BackendUnavailableError, ModelFileError, ValueError, RuntimeError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"wrote {out} and {out}.json ({precision}, batch {min_batch}..{max_batch})")
    click.echo(f"engine vs ONNX Runtime: max abs diff {check.max_abs:.3e}, max rel diff "
               f"{check.max_rel:.3e} (tolerance {limit:.0e})")
    if not check.ok:
        raise click.ClickException(f"{out}: the engine does not match the ONNX model; "
                                   "do not deploy it")


if __name__ == "__main__":
    main()
