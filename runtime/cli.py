"""`python -m runtime` (also `ddpm-sample`): sample a PNG grid, or describe a model file."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import click
import numpy as np

from . import backends
from .errors import MAX_THREADS, StudentSamplingWarning
from .options import SEED, SampleOptions, click_options
from .scale.cluster import RayClusterError
from .scale.shards import DEFAULT_SHARD_SIZE
from .util.clierrors import finite_float, guarded_group
from .util.fileio import (
    atomic_outputs,
    check_existing_targets,
    check_name_lengths,
    check_output,
    same_file,
)


@click.group(cls=guarded_group(RayClusterError),
             context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Torch-free DDPM sampling from an ONNX file or a TensorRT engine."""


def _backend_options(fn, threads_help="CPU threads for ONNX Runtime (default: all cores); a "
                     "batch is split into one shard per thread"):
    fn = click.option("--backend", type=click.Choice([backends.AUTO, *backends.names()]),
                      default=backends.AUTO, show_default=True,
                      help="auto: by the file's suffix (ort for .onnx, trt for .plan engines)")(fn)
    fn = click.option("--device", type=click.Choice(["cpu", "cuda", "tensorrt"]), default=None,
                      help="ONNX Runtime provider (default cpu)")(fn)
    fn = click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None,
                      help=threads_help)(fn)
    return fn


# The server allocates its batch buffers at start: rows beyond this are memory, not speed.
MAX_SERVE_BATCH = 4096
# One request's images are held in memory until it ends; a larger job belongs to `bulk`.
MAX_REQUEST_IMAGES = 4096

_ray_address_option = click.option(
    "--ray-address", default="local", show_default=True, envvar="RAY_ADDRESS",
    help="'local' (start Ray here), 'auto' (this machine's `ray start`), or host:port of a "
    "cluster's head")


class _Replicas(click.ParamType):
    name = "N|auto"

    def convert(self, value, param, ctx):
        if value == "auto" or (isinstance(value, int) and value >= 1):
            return value
        if isinstance(value, str) and value.isdigit() and int(value) >= 1:
            return int(value)
        self.fail(f"{value!r} is not a positive integer or 'auto'", param, ctx)


def _sampling_options(fn):
    """What decides the images: -n, --seed and every option of runtime.options' schema,
    generated from it (a sampler's new option becomes a flag here by itself)."""
    fn = click_options(fn)
    fn = click.option("--seed", type=click.IntRange(SEED.low, SEED.high), default=0,
                      show_default=True, help=SEED.help)(fn)
    fn = click.option("-n", "--num", "n", type=click.IntRange(min=1), default=64,
                      show_default=True)(fn)
    return fn


def _options(sampling: dict, defaults=None) -> SampleOptions:
    """The generated flags' values as checked options, what is not given from the model's
    ``defaults``: a flag given for a sampler that does not take it is one line naming it."""
    return SampleOptions.make(**sampling, defaults=defaults)


def _image_outputs(default: Path):
    """Where a command's images go (-o grid, --npz, --each), its batch size and progress
    bar: the same flags for every command that writes images."""
    def decorate(fn):
        fn = click.option("--progress/--no-progress", default=True, show_default=True)(fn)
        fn = click.option("--each", type=click.Path(file_okay=False, path_type=Path),
                          default=None, help="also write one PNG per image into this folder")(fn)
        fn = click.option("--npz", type=click.Path(dir_okay=False, path_type=Path),
                          default=None,
                          help="also write uint8 images [n, H, W, C] under key 'images'")(fn)
        fn = click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path),
                          default=default, show_default=True, help="PNG grid")(fn)
        return click.option("--batch-size", type=click.IntRange(min=1), default=None)(fn)
    return decorate


@main.command("sample")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@_sampling_options
@_image_outputs(Path("samples.png"))
@_backend_options
def sample_cmd(model, n, seed, batch_size, out, npz, each, progress, backend, device, threads,
               **sampling):
    """Sample N images from MODEL (.onnx or .plan) and write a PNG grid."""
    from .images import PNG_CHANNELS
    from .pipeline import load

    _options(sampling)  # a bad flag is one line before the model loads
    with load(model, backend=backend, device=device, threads=threads) as pipe:
        options = _options(sampling, pipe.record.defaults)
        each_png = _check_outputs(out, npz, each, n, inputs=[model])
        if pipe.image_shape[0] not in PNG_CHANNELS:
            raise click.UsageError(f"{model}: images of {pipe.image_shape[0]} channels cannot "
                                   "be written as PNG; sample them with the Python API")
        steps_run = options.steps or pipe.record.num_timesteps
        _say_off_distillation(pipe.record, options, model)
        start = time.perf_counter()
        with warnings.catch_warnings():  # said above, in one line
            warnings.simplefilter("ignore", StudentSamplingWarning)
            images = pipe.sample(n, seed, **options.to_dict(), batch_size=batch_size,
                                 progress=progress)
        seconds = time.perf_counter() - start
        backend_name = pipe.backend_name
    _write_images(images, seed, out, npz, each, each_png)
    click.echo(f"{n} images, {options.sampler} {steps_run} steps, {seconds:.1f} s, "
               f"{n / seconds:.2f} images/s, {backend_name} -> {out}")


def _write_images(images, seed: int, out: Path, npz: Path | None, each: Path | None,
                  each_png) -> None:
    """The grid, and the npz and one PNG per image if asked, as one set: a failure on the
    last file (a full disk) leaves every old file as it was."""
    from .images import make_grid, png_bytes

    with atomic_outputs() as outputs:
        outputs.write_bytes(out, png_bytes(make_grid(images)))
        if npz is not None:
            with open(outputs.add(npz), "xb") as f:
                np.savez_compressed(f, images=images, seed=seed)
        for k, image in enumerate(images if each is not None else ()):
            outputs.write_bytes(each_png(k), png_bytes(image))


def _say_off_distillation(record, options: SampleOptions, model: Path) -> None:
    """A distilled student asked for other sampling than its own: one line on stderr."""
    off = record.off_distillation(options, str(model))
    if off is not None:
        click.echo(f"warning: {off}", err=True)


def _check_outputs(out: Path, npz: Path | None, each: Path | None, n: int,
                   inputs: list[Path]):
    """Refuse bad destinations before sampling; returns k -> the path of --each's k-th PNG."""
    for path, option in ((out, "-o/--out"), (npz, "--npz"), (each, "--each")):
        if path is not None:
            check_name_lengths(path if option != "--each" else path / "00000.png", option)
    _check_suffix(out, ".png", "-o/--out", "the grid is written as PNG")
    check_output(out, inputs=inputs, option="-o/--out")
    if npz is not None:
        # numpy would quietly append .npz to any other name; ask for the name it will have.
        _check_suffix(npz, ".npz", "--npz", "numpy would add it")
        check_output(npz, inputs=[*inputs, out], option="--npz")

    def each_png(k: int) -> Path:
        return each / f"{k:05d}.png"

    if each is not None:
        if each.exists() and not each.is_dir():
            raise click.BadParameter(f"{each} is a file, not a folder", param_hint="--each")
        others = [*inputs, out] + ([npz] if npz is not None else [])
        check_output(each_png(0), inputs=others, option="--each")
        # Every PNG of the set, not only the first: one listing of the folder, not n stats.
        check_existing_targets(each, lambda name: _each_index(name, n) is not None,
                               option="--each")
        roles = {**{p: "an input" for p in inputs}, out: "-o/--out", npz: "--npz"}
        clash = _each_clash(each, n, others, each_png)
        if clash is not None:
            k, other = clash
            raise click.BadParameter(
                f"image {k} of {n} would be written to {each_png(k)}, which is also "
                f"{roles[other]} ({other}); choose another folder", param_hint="--each")
    return each_png


def _check_suffix(path: Path, suffix: str, option: str, why: str) -> None:
    if path.name.lower() == suffix:
        raise click.BadParameter(f"{path} has no name before {suffix}; give a file name "
                                 f"like samples{suffix}", param_hint=option)
    if path.suffix.lower() != suffix:
        raise click.BadParameter(f"{path} must end in {suffix} ({why})", param_hint=option)


def _each_index(name: str, n: int) -> int | None:
    """k if ``name`` is the name of --each's k-th PNG for some k < n, else None."""
    stem = name[:-len(".png")] if name.endswith(".png") else ""
    k = int(stem) if stem.isdigit() and stem.isascii() else -1
    return k if 0 <= k < n and f"{k:05d}.png" == name else None


def _each_clash(each: Path, n: int, others: list[Path], each_png) -> tuple[int, Path] | None:
    """The first --each PNG (k < n) that is one of ``others``, by name or by link."""
    folder = each.resolve()
    for other in others:  # an output that does not exist yet: by its name
        resolved = Path(other).resolve()
        k = _each_index(resolved.name, n) if resolved.parent == folder else None
        if k is not None:
            return k, other
    try:  # a file already there may be a link to an input
        names = [entry.name for entry in os.scandir(each)]
    except OSError:
        return None
    for k in sorted(k for k in (_each_index(name, n) for name in names) if k is not None):
        for other in others:
            if same_file(each_png(k), Path(other)):
                return k, other
    return None


@main.command("bulk")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@_sampling_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="folder for manifest.json and shard-*.npz; a rerun resumes it")
@click.option("--shard-size", type=click.IntRange(min=1), default=DEFAULT_SHARD_SIZE,
              show_default=True, help="images per shard file (the unit of work and resume)")
@_ray_address_option
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Ray actors, one model copy each (default: cluster CPUs / --threads)")
@click.option("--progress/--no-progress", default=True, show_default=True)
@functools.partial(_backend_options, threads_help="ONNX Runtime threads per worker, each "
                   "reserved from Ray (default 1)")
def bulk_cmd(model, n, seed, out, shard_size, ray_address, workers, progress, backend, device,
             threads, **sampling):
    """Sample N images of MODEL on Ray workers into shards under --out (resumable).

    Image k depends only on (seed, k): the shards hold the same images as
    `sample --npz` with the same options, whatever the number of workers. --threads is
    per worker (default 1).
    """
    from .pipeline import load
    from .scale.bulk import run
    from .scale.cluster import import_ray
    from .scale.shards import BulkJob, check_job_size

    _options(sampling)  # a bad flag is one line before Ray starts or the model loads
    check_job_size(n, shard_size)
    threads = threads or 1
    load_kwargs = {"backend": backend, "device": device}
    import_ray()
    # Fail here, in a second, on a bad model or options, not on every worker later.
    with load(model, threads=1, **load_kwargs) as pipe:
        options = _options(sampling, pipe.record.defaults)
        options = options.with_steps(options.steps or pipe.record.num_timesteps)
        options.respace(pipe.schedule)
        _say_off_distillation(pipe.record, options, model)
        image_shape = pipe.image_shape
    files = backends.model_files(model, backend)
    job = BulkJob(out, model_sha256=backends.model_digest(files), image_shape=image_shape,
                  n=n, seed=seed,
                  shard_size=shard_size, sample_options=options.to_dict())
    job.prepare(inputs=files)
    stats = run(job, files, address=ray_address, workers=workers, threads=threads,
                load_kwargs=load_kwargs, progress=progress)
    if not stats.shards_written:
        click.echo(f"all {stats.shards_total} shards are already in {out}; nothing to do")
        return
    rate = stats.images_written / max(stats.sampling_s, 1e-9)
    gap = stats.overhead_per_shard_s
    notes = f", Ray {gap * 1e3:.1f} ms between shards" if gap is not None else ""
    if stats.workers_replaced:
        notes += f", {_count(stats.workers_replaced, 'worker')} replaced"
    click.echo(f"{stats.shards_written} of {stats.shards_total} shards written "
               f"({stats.images_written} images) in {stats.sampling_s:.1f} s, {rate:.2f} "
               f"images/s, {_count(stats.workers, 'worker')} x "
               f"{_count(stats.threads, 'thread')}, start-up {stats.startup_s:.1f} s{notes} "
               f"-> {out}")


def _count(k: int, noun: str) -> str:
    return f"{k} {noun}{'' if k == 1 else 's'}"


@main.command("info")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@_backend_options
def info_cmd(model, backend, device, threads):
    """Print MODEL's metadata, inputs/outputs and what its backend says about itself."""
    opened = backends.open_backend(model, backend=backend, device=device, threads=threads)
    try:
        record = json.loads(opened.record.to_json())
        lines = [f"model: {model}", f"backend: {opened.name}"]
        lines += [f"{label}: {text}" for label, text in opened.describe()]
    finally:
        opened.close()
    lines.append("metadata:")
    lines.append(json.dumps(record, indent=2, sort_keys=True))
    click.echo("\n".join(lines))


def _host(ctx, param, value):
    """click callback: an empty host would bind every interface without saying so."""
    if not value.strip():
        raise click.BadParameter("an empty host binds every interface; give an address such as "
                                 "127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")
    return value


def _seconds(name: str, default: float, help_text: str):
    return click.option(name, type=click.FloatRange(min=0, min_open=True), default=default,
                        show_default=True, callback=finite_float, help=help_text)


@main.command("serve")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, callback=_host,
              help="address to listen on; beyond loopback (0.0.0.0, ::, a LAN address) the "
              "start line says so")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="0 picks a free port (printed)")
@click.option("--max-batch", type=click.IntRange(1, MAX_SERVE_BATCH), default=64,
              show_default=True, help="images in flight: rows of one network call (its "
              "buffers are allocated at start)")
@click.option("--max-queue", type=click.IntRange(min=1), default=256, show_default=True,
              help="requests waiting for rows; more are refused with 429")
@click.option("--max-n", type=click.IntRange(1, MAX_REQUEST_IMAGES), default=64,
              show_default=True, help="images per request (larger jobs: bulk)")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="steps per request, at most the model's T (default: T)")
@click.option("--batching/--no-batching", default=True, show_default=True,
              help="step-level batching across requests, or one request at a time")
@click.option("--grace", type=click.FloatRange(min=0), default=30.0, show_default=True,
              callback=finite_float,
              help="seconds in-flight requests get to finish on SIGTERM before cancelling")
@_seconds("--header-timeout", 10.0, "seconds a connection gets to send a request's headers "
          "(from connecting, or from the next request's first byte); then it is closed")
@_seconds("--body-timeout", 10.0, "seconds a request gets to send its body; then it is "
          "answered 408 and closed")
@_seconds("--keep-alive", 5.0, "seconds an idle connection is kept open between requests")
@click.option("--max-client-connections", type=click.IntRange(min=1), default=64,
              show_default=True, help="connections one client address may hold open; more are "
              "answered 429 (behind a reverse proxy every client has the proxy's address). "
              "With --ray only --body-timeout and --keep-alive apply (Ray's proxy serves HTTP)")
@click.option("--ray", "on_ray", is_flag=True,
              help="run as a Ray Serve deployment: replicas of this server behind Ray's proxy")
@click.option("--replicas", type=_Replicas(), default=1, show_default=True,
              help="with --ray: engines (model copies), or 'auto' for Ray's autoscaler")
@_ray_address_option
@_backend_options
def serve_cmd(model, host, port, max_batch, max_queue, max_n, max_steps, batching, grace,
              header_timeout, body_timeout, keep_alive, max_client_connections, on_ray,
              replicas, ray_address, backend, device, threads):
    """Serve MODEL over HTTP: POST /v1/samples, /healthz, /v1/model, /metrics."""
    try:
        from .serving.server import serve
    except ImportError as err:
        raise click.ClickException(f"the server needs its extra ({err.name} is missing): "
                                   "pip install .[serve]") from None
    from .pipeline import load

    if on_ray:
        _serve_on_ray(model, host=host, port=port, replicas=replicas, address=ray_address,
                      threads=threads or 1, grace=grace, keep_alive=keep_alive,
                      load_kwargs={"backend": backend, "device": device},
                      limits={"max_batch": max_batch, "max_queue": max_queue, "max_n": max_n,
                              "max_steps": max_steps, "batching": batching,
                              "body_timeout": body_timeout})
        return
    try:
        with load(model, backend=backend, device=device, threads=threads) as pipe:
            _check_limits(max_batch, max_steps, pipe)
            serve(pipe, host=host, port=port, max_batch=max_batch, max_queue=max_queue,
                  max_n=max_n, max_steps=max_steps, batching=batching, grace=grace,
                  header_timeout=header_timeout, body_timeout=body_timeout,
                  keep_alive=keep_alive, max_client_connections=max_client_connections,
                  log=lambda line: click.echo(line))
    except OSError as err:  # the address is taken or not ours
        raise click.ClickException(f"cannot listen on {host}:{port}: {err.strerror}") from None


def _check_limits(max_batch: int, max_steps: int | None, pipe) -> None:
    """Refuse limits the server cannot keep, before it binds its port."""
    from .pipeline import available_memory

    # /v1/model reports --max-steps: none above what any request can get (T).
    steps = pipe.record.num_timesteps
    if max_steps is not None and max_steps > steps:
        raise click.BadParameter(f"{max_steps} is more than the {steps} steps of "
                                 f"{pipe.source}; give at most {steps}",
                                 param_hint="--max-steps")
    # The batch buffers (float32 images) are allocated at start.
    need, have = max_batch * math.prod(pipe.image_shape) * 4, available_memory()
    if have is not None and need > have:
        raise click.BadParameter(f"{max_batch} rows of {list(pipe.image_shape)} images need "
                                 f"about {need / 2**30:.1f} GiB, more than the "
                                 f"{have / 2**30:.1f} GiB available; give a smaller one",
                                 param_hint="--max-batch")


def _serve_on_ray(model, *, threads, load_kwargs, **kwargs):
    from .pipeline import load
    from .scale.cluster import import_ray
    from .scale.ray_serve import serve_on_ray

    import_ray()
    with load(model, threads=1, **load_kwargs) as pipe:
        # A bad model file or limit is one line here, not a failed replica later.
        _check_limits(kwargs["limits"]["max_batch"], kwargs["limits"]["max_steps"], pipe)
    serve_on_ray(model, files=backends.model_files(model, load_kwargs["backend"]),
                 threads=threads, load_kwargs=load_kwargs, log=click.echo, **kwargs)


if __name__ == "__main__":
    sys.exit(main())

from . import cli_edits  # noqa: E402, F401  (registers the editing commands on main)
