"""The command line: baselines, quality, nll, steps, all; inpaint, img2img,
ratedistortion (edits and the paper's progressive decoding, digits only)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import click

from runtime.samplers import SAMPLERS
from runtime.schedule import SPACINGS

from . import edits, ratedistortion
from .digits import DIGITS_LEVELS, DIGITS_SHAPE, FD_SET_SIZE
from .fid import DEFAULT_REFS, Evaluator, load_real_npz
from .nll import nll_text, run_nll
from .reports import environment, plot_steps, steps_markdown, summary, write_json
from .sampling import sample_timed
from .steps import DEFAULT_NFE, steps_table


def _open(model, threads):
    from runtime.errors import BackendUnavailableError, ModelFileError
    from runtime.pipeline import load

    try:
        return load(model, threads=threads)
    except (ModelFileError, BackendUnavailableError, ValueError) as err:
        raise click.ClickException(str(err)) from None


def _evaluator(record, n, real, inception_weights, refs):
    """For a model's record, or for the digits when ``record`` is None."""
    if record is None:
        shape, data_range, levels = DIGITS_SHAPE, (-1.0, 1.0), DIGITS_LEVELS
    else:
        shape, data_range, levels = record.image_shape, record.data_range, record.num_levels
    return Evaluator(shape, data_range, levels, n, real_npz=real,
                     inception_weights=inception_weights, refs=refs)


def _int_list(text: str, what: str = "step counts", minimum: int = 1) -> tuple[int, ...]:
    return _number_list(text, what, minimum)


def _number_list(text: str, what: str, minimum, maximum=None, kind=int, hint=None) -> tuple:
    try:
        values = tuple(kind(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated {what}, got {text!r}",
                                 param_hint=hint) from None
    if not values or any(not minimum <= v <= (math.inf if maximum is None else maximum)
                         for v in values):
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise click.BadParameter(f"{what} must be {bounds}, got {text!r}", param_hint=hint)
    return values


def _sampler_list(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in names if s not in SAMPLERS]
    if unknown or not names:
        raise click.BadParameter(f"unknown sampler(s) {', '.join(unknown) or text!r}; "
                                 f"choose from {','.join(SAMPLERS)}")
    return names


def _common(fn):
    opts = [
        click.option("-n", "--num", "n", type=click.IntRange(min=2), default=FD_SET_SIZE,
                     show_default=True, help="images per set, generated and real alike"),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--real", type=click.Path(dir_okay=False, exists=True, path_type=Path),
                     default=None,
                     help="real images (non-digit data): .npz, 'images' uint8 NHWC or NCHW"),
        click.option("--inception-weights", type=click.Path(dir_okay=False, exists=True,
                                                            path_type=Path),
                     default=None, help="local TorchScript Inception file for FID"),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="report folder (JSON, markdown, PNG)"),
        click.option("--refs", type=click.IntRange(min=1), default=DEFAULT_REFS,
                     show_default=True, help="random reference halves each FD is averaged over"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _model_opts(fn):
    return click.argument("model", type=click.Path(dir_okay=False, path_type=Path))(
        _run_opts(fn))


def _run_opts(fn):
    for opt in reversed([
        click.option("--batch-size", type=click.IntRange(min=1), default=250, show_default=True),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="ONNX Runtime CPU threads (default: all cores)"),
        click.option("--progress/--no-progress", default=True, show_default=True),
    ]):
        fn = opt(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Sample quality (FD/FID, digit-IS) and likelihood (bits/dim) of a DDPM model file."""


@main.command("baselines")
@_common
def baselines_cmd(n, seed, real, inception_weights, out, refs):
    """Real-vs-real floor and fitted-Gaussian FD for the digits (or --real data)."""
    ev = _evaluator(None, n, real, inception_weights, refs)
    result = ev.baselines(seed)
    click.echo(summary(f"baselines at N = {n}", result))
    if out:
        write_json({"baselines": result, "environment": environment()}, out / "baselines.json")


@main.command("quality")
@_common
@_model_opts
@click.option("--sampler", type=click.Choice(SAMPLERS), default="ddpm",
              show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="respaced steps (default: the model's full T)")
@click.option("--variance", type=click.Choice(["fixedlarge", "fixedsmall"]), default="fixedlarge",
              show_default=True, help="ddpm only: sigma^2 = beta, or the posterior variance")
def quality_cmd(model, n, seed, real, inception_weights, out, refs, batch_size, threads, progress,
                sampler, steps, variance):
    """FD (or FID) of N samples of MODEL, with both baselines, digit-IS and class shares."""
    with _open(model, threads) as pipe:
        ev = _evaluator(pipe.record, n, real, inception_weights, refs)
        result = _quality(pipe, ev, n, seed, sampler, steps, batch_size, out, progress,
                          variance)
    click.echo(summary(f"{model}: {sampler} {result['steps']} steps, N = {n}", result))
    click.echo(summary("baselines", result["baselines"]))
    if out:
        write_json({"quality": result, "environment": environment()}, out / "quality.json")


def _quality(pipe, ev, n, seed, sampler, steps, batch_size, out, progress,
             variance="fixedlarge"):
    steps = steps or pipe.record.num_timesteps
    name = f"{sampler}-{steps}" + ("-small" if sampler == "ddpm" and variance == "fixedsmall"
                                   else "")
    cache = out / "samples" / f"{name}-n{n}-seed{seed}.npz" if out else None
    images, seconds = sample_timed(pipe, n, seed, sampler, steps, batch_size, cache, progress,
                                   variance)
    result = {"model": pipe.source, "sampler": sampler, "steps": steps, "n": n, "seed": seed,
              "variance": variance if sampler == "ddpm" else None,
              "seconds": seconds, "images_per_s": n / seconds, "backend": pipe.backend_name,
              "baselines": ev.baselines(seed)}
    if ev.available:
        result["metric"] = ev.metric
        result["fd"], result["fd_std"] = ev.fd(images)
        if "real_vs_real" in result["baselines"]:
            result["fd_over_floor"] = result["fd"] / result["baselines"]["real_vs_real"]
    else:
        result["note"] = ev.note
    result.update(ev.digit_stats(images))
    if out:
        from runtime.images import make_grid, save_png, to_uint8

        save_png(make_grid(to_uint8(images[:100], pipe.record.data_range)),
                 out / f"samples-{name}.png")
    return result


def _nll_source(pipe, ev, real):
    if ev.digits:
        return ev
    if real is None:
        raise click.ClickException("bits/dim on non-digit data needs --real IMAGES.npz")
    return load_real_npz(real, pipe.record.image_shape, pipe.record.data_range)


@main.command("nll")
@_common
@_model_opts
@click.option("--nll-images", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--variance", type=click.Choice(["fixedlarge", "fixedsmall"]), default="fixedlarge",
              show_default=True)
def nll_cmd(model, n, seed, real, inception_weights, out, refs, batch_size, threads, progress,
            nll_images, variance):
    """Bits/dim of MODEL by the variational bound (prior + T-1 KL terms + decoder)."""
    with _open(model, threads) as pipe:
        ev = _evaluator(pipe.record, min(n, FD_SET_SIZE), real, inception_weights, refs)
        result = run_nll(pipe, _nll_source(pipe, ev, real), nll_images, seed=seed,
                         batch_size=batch_size, variance=variance, progress=progress)
    click.echo(nll_text(result))
    if out:
        write_json({"nll": result, "environment": environment()}, out / "nll.json")


def _table_opts(fn):
    for opt in reversed([
        click.option("--samplers", default=",".join(SAMPLERS), show_default=True,
                     help="comma-separated samplers for the table"),
        click.option("--nfe", default=",".join(map(str, DEFAULT_NFE)), show_default=True,
                     help="network calls per image for each sampler (the full chain is added)"),
        click.option("--spacing", type=click.Choice(SPACINGS), default="linspace",
                     show_default=True, help="which timesteps the shorter chains keep"),
    ]):
        fn = opt(fn)
    return _row_opts(fn)


def _row_opts(fn):
    for opt in reversed([
        click.option("--seeds", default=None,
                     help="comma-separated seeds to average each row over (default: --seed)"),
        click.option(
            "--timing-images", type=click.IntRange(min=0), default=0, show_default=True,
            help="time each configuration in a separate best-of-2 run of this many images "
                 "(0: time the FD sampling runs themselves); steadier on a shared machine"),
    ]):
        fn = opt(fn)
    return fn


def _table_args(seed, samplers, nfe, seeds):
    return dict(seeds=_int_list(seeds, "seeds", minimum=0) if seeds else (seed,),
                samplers=_sampler_list(samplers), nfes=_int_list(nfe, "NFE"))


@main.command("steps")
@_common
@_model_opts
@_table_opts
def steps_cmd(model, n, seed, real, inception_weights, out, refs, batch_size, threads, progress,
              samplers, nfe, seeds, spacing, timing_images):
    """FD and images/s of every sampler at a few network calls: table, PNG, JSON."""
    out = out or Path("out/eval")
    table_args = _table_args(seed, samplers, nfe, seeds)
    with _open(model, threads) as pipe:
        ev = _evaluator(pipe.record, n, real, inception_weights, refs)
        report = _steps_report(pipe, ev, n, seed, batch_size, out, progress, timing_images,
                               spacing, "steps.json", **table_args)
    click.echo(report["markdown"])
    click.echo(f"report: {out / 'steps.json'}, {out / 'steps.md'}, {out / 'steps.png'}")


def _steps_report(pipe, ev, n, seed, batch_size, out, progress, timing_images, spacing, name,
                  *, seeds, samplers, nfes, extra=None):
    from runtime.util.fileio import write_text

    baselines = ev.baselines(seed)
    table = steps_table(pipe, ev, n, seeds, samplers, nfes, batch_size, out / "samples",
                        progress, timing_images, spacing)
    md = steps_markdown(table, baselines, n)
    write_text(out / "steps.md", md)
    plot_steps(table, baselines, out / "steps.png")
    report = {"model": pipe.source, "n": n, "seed": seed, "backend": pipe.backend_name,
              "metric": ev.metric, "baselines": baselines, "steps": table,
              "environment": environment(), **(extra or {})}
    write_json(report, out / name)
    report["markdown"] = md
    return report


@main.command("students")
@_common
@click.argument("teacher", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("students", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=Path))
@_run_opts
@_row_opts
def students_cmd(teacher, students, n, seed, real, inception_weights, out, refs, batch_size,
                 threads, progress, seeds, timing_images):
    """Distilled STUDENTS (model files of training/distill.py's students) against their
    TEACHER's model file: its full chain, and its fast solvers at each student's calls."""
    import contextlib

    from .reports import students_markdown
    from .students import students_table

    out = out or Path("out/eval-students")
    seeds = _int_list(seeds, "seeds", minimum=0) if seeds else (seed,)
    with contextlib.ExitStack() as stack:
        teacher_pipe = stack.enter_context(_open(teacher, threads))
        pipes = [stack.enter_context(_open(path, threads)) for path in students]
        for path, pipe in zip(students, pipes, strict=True):
            if pipe.record.distilled is None:
                raise click.BadParameter(f"{path} is not a distilled student (its record has "
                                         "no 'distilled' entry)", param_hint="STUDENTS")
        ev = _evaluator(teacher_pipe.record, n, real, inception_weights, refs)
        baselines = ev.baselines(seed)
        table = students_table(teacher_pipe, pipes, ev, n, seeds, batch_size, out / "samples",
                               progress, timing_images)
    md = students_markdown(table, baselines, n)
    write_json({"teacher": str(teacher), "students": [str(p) for p in students], "n": n,
                "metric": ev.metric, "baselines": baselines, "table": table,
                "environment": environment()}, out / "students.json")
    from runtime.util.fileio import write_text

    write_text(out / "students.md", md)
    click.echo(md)
    click.echo(f"report: {out / 'students.json'}, {out / 'students.md'}")


@main.command("all")
@_common
@_model_opts
@click.option("--nll-images", type=click.IntRange(min=0), default=100, show_default=True,
              help="0 skips bits/dim")
@_table_opts
def all_cmd(model, n, seed, real, inception_weights, out, refs, batch_size, threads, progress,
            nll_images, samplers, nfe, seeds, spacing, timing_images):
    """Everything: the full-chain FD, baselines, digit-IS, bits/dim and the steps table."""
    out = out or Path("out/eval")
    table_args = _table_args(seed, samplers, nfe, seeds)
    with _open(model, threads) as pipe:
        ev = _evaluator(pipe.record, n, real, inception_weights, refs)
        T = pipe.record.num_timesteps
        quality = _quality(pipe, ev, n, seed, "ddpm", T, batch_size, out, progress)
        nll = None
        if nll_images:
            nll = run_nll(pipe, _nll_source(pipe, ev, real), nll_images, seed=seed,
                          batch_size=batch_size, variance="fixedlarge", progress=progress)
        report = _steps_report(pipe, ev, n, seed, batch_size, out, progress, timing_images,
                               spacing, "report.json", extra={"quality": quality, "nll": nll},
                               **table_args)
    click.echo(summary(f"{model}: ddpm {T} steps, N = {n}", quality))
    click.echo(summary("baselines", quality["baselines"]))
    if nll:
        click.echo(nll_text(nll))
    click.echo(report["markdown"])
    click.echo(f"report: {out / 'report.json'}, {out / 'steps.md'}, {out / 'steps.png'}")


# === Edits and progressive decoding (digits) ===

def _edit_opts(default_n: int):
    def wrap(fn):
        for opt in reversed([
            click.option("-n", "--num", "n", type=click.IntRange(2, FD_SET_SIZE),
                         default=default_n, show_default=True,
                         help="held-out digits edited (and per reference set)"),
            click.option("--seed", type=int, default=0, show_default=True),
            click.option("--refs", type=click.IntRange(min=1), default=DEFAULT_REFS,
                         show_default=True, help="reference sets each FD is averaged over"),
            click.option("--out", type=click.Path(file_okay=False, path_type=Path),
                         default=Path("out/eval"), show_default=True,
                         help="report folder (JSON, markdown, PNG)"),
            click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True,
                         help="respaced steps of the chain"),
            click.option("--sampler", type=click.Choice(SAMPLERS), default="ddpm",
                         show_default=True),
        ]):
            fn = opt(fn)
        return fn
    return wrap


def _check_outputs(out: Path, names, model: Path) -> None:
    from runtime.util.fileio import OutputError, check_output

    try:
        for name in names:
            check_output(out / name, inputs=[model], option="--out")
    except OutputError as err:
        raise click.ClickException(str(err)) from None


def _edit_evaluator(pipe, n, refs):
    ev = Evaluator(pipe.record.image_shape, pipe.record.data_range, pipe.record.num_levels, n,
                   refs=refs, fixed_inputs=True)
    if not ev.digits:
        raise click.ClickException("edit measurements need a digits model (1x8x8, 17 levels): "
                                   "they score with the digits classifier")
    return ev


def _write_report(out: Path, name: str, result: dict, md: str, plotter) -> None:
    from runtime.util.fileio import write_text

    write_text(out / f"{name}.md", md)
    plotter(result, out / f"{name}.png")
    write_json({name: result, "environment": environment()}, out / f"{name}.json")
    click.echo(md)
    click.echo(f"report: {out / name}.json, .md, .png")


@main.command("inpaint")
@_model_opts
@_edit_opts(default_n=200)
@click.option("--resamples", default="1,2,5,10", show_default=True,
              help="comma-separated RePaint resample counts to sweep")
@click.option("--jump-length", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--masks", default=",".join(edits.MASKS), show_default=True,
              help=f"comma-separated, of {', '.join(edits.MASKS)}")
def inpaint_cmd(model, batch_size, threads, progress, n, seed, refs, out, steps, sampler,
                resamples, jump_length, masks):
    """RePaint on held-out digits: original label kept, FD, against the noise-filled input."""
    resamples = _number_list(resamples, "resample counts", 1, hint="--resamples")
    masks = tuple(m.strip() for m in masks.split(",") if m.strip())
    if not masks or set(masks) - set(edits.MASKS):
        raise click.BadParameter(f"masks must be of {', '.join(edits.MASKS)}, got {masks}",
                                 param_hint="--masks")
    _check_outputs(out, ["inpaint.json", "inpaint.md", "inpaint.png",
                         *(f"inpaint-examples-{m}.png" for m in masks)], model)
    with _open(model, threads) as pipe:
        ev = _edit_evaluator(pipe, n, refs)
        result = _as_click(edits.inpaint_sweep, pipe, ev, masks=masks, resamples=resamples,
                           jump_length=jump_length, steps=steps, sampler=sampler, seed=seed,
                           batch_size=batch_size, progress=progress, examples=out)
        result.update(model=pipe.source, backend=pipe.backend_name, baselines=ev.baselines(seed))
    _write_report(out, "inpaint", result, edits.inpaint_markdown(result, result["baselines"]),
                  edits.plot_inpaint)


@main.command("img2img")
@_model_opts
@_edit_opts(default_n=200)
@click.option("--strengths", default="0.2,0.3,0.4,0.5,0.6,0.7,0.8", show_default=True,
              help="comma-separated strengths in [0, 1]")
def img2img_cmd(model, batch_size, threads, progress, n, seed, refs, out, steps, sampler,
                strengths):
    """SDEdit on held-out digits: RMSE to the input and the classifier's view per strength."""
    strengths = _number_list(strengths, "strengths", 0.0, 1.0, kind=float, hint="--strengths")
    _check_outputs(out, ["img2img.json", "img2img.md", "img2img.png", "img2img-examples.png"],
                   model)
    with _open(model, threads) as pipe:
        ev = _edit_evaluator(pipe, n, refs)
        result = _as_click(edits.img2img_sweep, pipe, ev, strengths=strengths, steps=steps,
                           sampler=sampler, seed=seed, batch_size=batch_size,
                           progress=progress, examples=out)
        result.update(model=pipe.source, backend=pipe.backend_name, baselines=ev.baselines(seed))
    _write_report(out, "img2img", result, edits.img2img_markdown(result, result["baselines"]),
                  edits.plot_img2img)


@main.command("ratedistortion")
@_model_opts
@click.option("--nll-images", type=click.IntRange(1, 2 * FD_SET_SIZE), default=200,
              show_default=True, help="held-out digits the bound and the predictions run on")
@click.option("--variance", type=click.Choice(["fixedlarge", "fixedsmall"]), default="fixedlarge",
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("out/eval"), show_default=True)
def ratedistortion_cmd(model, batch_size, threads, progress, nll_images, variance, seed, out):
    """Rate (bits/dim) and distortion (RMSE of predicted x_0) over t, as in the paper's fig 5."""
    _check_outputs(out, ["ratedistortion.json", "ratedistortion.md", "ratedistortion.png"],
                   model)
    with _open(model, threads) as pipe:
        ev = _edit_evaluator(pipe, 2, 1)
        result = ratedistortion.run_ratedistortion(pipe, ev, nll_images, seed=seed,
                                                   batch_size=batch_size, variance=variance,
                                                   progress=progress)
        result.update(model=pipe.source, backend=pipe.backend_name)
    _write_report(out, "ratedistortion", result, ratedistortion.markdown(result),
                  ratedistortion.plot)


def _as_click(fn, *args, **kwargs):
    """Bad options the runtime refuses (a sampler inpainting cannot use, a strength that
    keeps no step) as one line, not a traceback."""
    from runtime.errors import OptionError

    try:
        return fn(*args, **kwargs)
    except (OptionError, ValueError) as err:
        raise click.ClickException(str(err)) from None


if __name__ == "__main__":
    sys.exit(main())
