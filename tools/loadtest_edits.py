"""Throughput of edit requests mixed with sampling requests, against real localhost servers.

    python tools/loadtest_edits.py MODEL [--count 48] [--clients 8] [--threads 2]
                                   [--max-batch 64] [--steps-scale 1] [--out loadtest-edits/]

One list of requests (sampling: DDIM 20 steps n 1-4, DDPM 100 steps n 4; edits: img2img
strength 0.5 DDPM 100 steps n 4, inpaint RePaint DDPM 100 steps jump 10 resamples 2 n 2,
a quarter each) served at saturation by fresh ``python -m runtime serve`` processes: mixed
with batching, mixed with ``--no-batching``, and each half alone with batching. Reports
images/s and the server's network calls (``ddpm_ticks_total``) for each, and what mixing
saves; see tools/loadtesting/edits.py. Writes OUT/loadtest-edits.json and .md.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402

from tools.loadtesting import edits  # noqa: E402
from tools.loadtesting.report import cpu_name  # noqa: E402


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--count", type=click.IntRange(min=4), default=48, show_default=True,
              help="requests in the list, a quarter of each kind")
@click.option("--clients", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="ONNX Runtime threads (default: all cores)")
@click.option("--max-batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--steps-scale", type=click.FloatRange(min=0.0001, max=1), default=1.0,
              show_default=True, help="multiply every request's steps (smoke runs)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("loadtest-edits"), show_default=True)
def main(model, count, clients, threads, max_batch, steps_scale, seed, out):
    """Edits mixed with sampling: images/s and network calls, batching against serial."""
    from runtime.util.fileio import OutputError, check_output, write_text

    names = ("loadtest-edits.json", "loadtest-edits.md")
    try:
        for name in names:
            check_output(out / name, inputs=[model], option="--out")
    except OutputError as err:
        raise click.ClickException(str(err)) from None
    report = edits.run(model, count=count, clients=clients, max_batch=max_batch,
                       threads=threads, seed=seed, scale=steps_scale,
                       echo=lambda line: click.echo(line, err=True))
    report["meta"] = {"model": str(model), "cpu": cpu_name(), "cores": os.cpu_count(),
                      "threads": threads, "max_batch": max_batch, "clients": clients,
                      "count": count, "seed": seed, "steps_scale": steps_scale,
                      "python": sys.version.split()[0]}
    table = edits.markdown(report)
    write_text(out / names[0], json.dumps(report, indent=2, default=float) + "\n")
    write_text(out / names[1], table)
    click.echo(table)
    if report["errors"]:
        raise click.ClickException(f"{report['errors']} request(s) failed; see {out / names[0]}")


if __name__ == "__main__":
    main()
