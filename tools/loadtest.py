"""Load test: step-level batching against one request at a time, on one machine, in one run.

    python tools/loadtest.py MODEL [--saturation 100] [--duration 60] [--load 0.7]
                             [--clients 16] [--cancel 0] [--threads 2] [--max-batch 64]
                             [--repeats 1] [--out loadtest/]

Each mode (``batching``: ``serve``'s default; ``serial``: ``serve --no-batching``) gets a
fresh server on a free localhost port and two phases, modes alternating per repeat:

1. saturation: ``--clients`` closed-loop clients work through the same ``--saturation``
   requests, in the workload's proportions: images/s and requests/s at capacity;
2. load: open-loop Poisson arrivals for ``--duration`` seconds at ``--load`` times the
   request-at-a-time capacity measured in phase 1 (the same rate for both modes), then a
   drain; latency p50/p95/p99 per request class.

After each saturation phase the same requests go through the batch scheduler in this
process (no HTTP, no clients), with as many in flight: the report's "scheduler alone"
efficiency beside the served one tells the scheduler's loss from the HTTP side's.

Workload (``--steps-scale`` shrinks every chain, for smoke runs): short = DDIM 20 steps,
n = 1-4 (85%); medium = DDPM 100 steps, n = 8 (12%); long = DDPM 1000 steps, n = 1 (3%).
``--cancel p``: each request is cancelled with probability p after a random delay, by
DELETE or by hanging up (a soak). A 200 reply must carry exactly n images (else "lost");
any 5xx, connection failure or malformed reply is an error; 429 is counted as refused.
Latency runs from the scheduled arrival, so a lagging client is charged, not hidden.
Writes OUT/loadtest.json and OUT/loadtest.md.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402
import numpy as np  # noqa: E402

from tools.loadtesting.phases import (  # noqa: E402
    network_best,
    open_loop,
    saturate,
    scheduler_alone,
)
from tools.loadtesting.report import cpu_name, markdown, summarize  # noqa: E402
from tools.loadtesting.server import HOST, ServerProcess, load_test_args  # noqa: E402,F401
from tools.loadtesting.workload import WORKLOAD, draw_list  # noqa: E402

MODES = {"batching": [], "serial": ["--no-batching"]}


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--saturation", type=click.IntRange(min=1), default=100, show_default=True,
              help="requests in the capacity phase (the same list for every mode)")
@click.option("--duration", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="seconds of Poisson arrivals per mode")
@click.option("--load", type=click.FloatRange(min=0.01), default=0.7, show_default=True,
              help="arrival rate as a fraction of the request-at-a-time capacity")
@click.option("--rate", type=click.FloatRange(min=0.001), default=None,
              help="arrivals per second (default: --load x the serial capacity)")
@click.option("--modes", type=click.Choice(["both", "batching", "serial"]), default="both",
              show_default=True, help="one mode only: a soak of the server as deployed")
@click.option("--clients", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--cancel", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="share of requests cancelled at random (DELETE or hang-up)")
@click.option("--drain", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="seconds to wait for replies after the arrivals stop")
@click.option("--steps-scale", type=click.FloatRange(min=0.0001, max=1), default=1.0,
              show_default=True, help="multiply every class's steps (smoke runs)")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="ONNX Runtime threads (default: all cores)")
@click.option("--max-batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="rounds; modes alternate within each")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("loadtest"), show_default=True)
def main(model, saturation, duration, load, rate, modes, clients, cancel, drain, steps_scale,
         threads, max_batch, repeats, seed, out):
    """Batching vs request-at-a-time under a mixed load, against localhost servers."""
    from runtime.util.fileio import OutputError, atomic_output, check_output

    try:
        for name in ("loadtest.json", "loadtest.md"):
            check_output(out / name, inputs=[model], option="--out")
    except OutputError as err:
        raise click.ClickException(str(err)) from None
    server_args = load_test_args(max_batch, threads)
    if modes != "both" and rate is None:
        raise click.UsageError("--modes batching|serial needs --rate (there is no serial "
                               "capacity to take --load of)")
    chosen = list(MODES) if modes == "both" else [modes]
    runs, best = [], []
    for rep in range(repeats):
        order = chosen if rep % 2 == 0 else chosen[::-1]
        best.append(network_best(model, threads, max_batch))
        click.echo(f"[{rep}] network alone at batch {max_batch}: {best[-1]:.0f} rows/s",
                   err=True)
        sat = {}
        # One request list per repeat: every mode, and the scheduler alone, take the same.
        requests = draw_list(random.Random(seed + rep), saturation, steps_scale)
        for mode in order:  # saturation first for both: the load rate needs serial's capacity
            server = ServerProcess(model, *server_args, *MODES[mode])
            try:
                sat[mode] = saturate(server, clients, requests, seed + rep)
            finally:
                server.stop()
            click.echo(f"[{rep}] {mode} saturation: {sat[mode]['images_per_s']:.1f} images/s, "
                       f"fill {sat[mode]['batch_fill']:.2f}; until the drain "
                       f"{sat[mode]['steady_rows_per_s']:.0f} rows/s, fill "
                       f"{sat[mode]['steady_fill']:.2f}, busy {sat[mode]['steady_busy']:.2f}, "
                       f"server on {sat[mode]['steady_cores']:.2f} cores",
                       err=True)
            # The same requests through the scheduler in this process, no HTTP: what the
            # served rate loses to the server's HTTP side (and to clients on this machine).
            sat[mode]["scheduler_alone_rows_per_s"] = scheduler_alone(
                model, threads, max_batch, clients, requests, batching=mode == "batching")
            click.echo(f"[{rep}] {mode} scheduler alone: "
                       f"{sat[mode]['scheduler_alone_rows_per_s']:.0f} rows/s", err=True)
        if rate is None:
            rate = load * sat["serial"]["requests_per_s"]
        for mode in order:
            server = ServerProcess(model, *server_args, *MODES[mode])
            try:
                result = open_loop(server, rate, duration, steps_scale, seed + rep, cancel,
                                   drain)
            finally:
                code = server.stop()
            result["exit_code"] = code
            runs.append({"mode": mode, "repeat": rep, "saturation": sat[mode], "load": result})
            click.echo(f"[{rep}] {mode} load {rate:.2f} req/s: {result['outcomes']}, short "
                       f"p95 {result['latency']['short'].get('p95', math.nan):.3f} s, exit "
                       f"{code}", err=True)
    summary = summarize(runs, chosen)
    best_rows = float(np.median(best))
    for mode in chosen:  # served rows over what the network alone does at full batch
        summary[mode]["network_best_rows_per_s"] = best_rows
        summary[mode]["efficiency"] = summary[mode]["steady_rows_per_s"] / best_rows
        summary[mode]["efficiency_with_drain"] = (summary[mode]["saturation_rows_per_s"]
                                                  / best_rows)
        summary[mode]["scheduler_efficiency"] = (summary[mode]["scheduler_alone_rows_per_s"]
                                                 / best_rows)
    nan = {"saturation_images_per_s": math.nan, "latency": {"short": {}}, "errors": 0,
           "lost": 0}
    base, fast = summary.get("serial", nan), summary.get("batching", nan)
    short_base = base["latency"]["short"].get("p95")
    short_fast = fast["latency"]["short"].get("p95")
    report = {
        "meta": {"model": str(model), "cpu": cpu_name(), "cores": os.cpu_count(),
                 "threads": threads, "max_batch": max_batch, "clients": clients,
                 "saturation_requests": saturation, "duration_s": duration, "load": load,
                 "cancel": cancel, "steps_scale": steps_scale, "repeats": repeats,
                 "rate": rate,
                 "workload": [c.__dict__ for c in WORKLOAD], "python": sys.version.split()[0]},
        "summary": summary,
        "targets": {
            "throughput_ratio": fast["saturation_images_per_s"]
            / base["saturation_images_per_s"],
            "short_p95_ratio": (short_fast / short_base if short_base and short_fast
                                else math.nan),
            "errors": base["errors"] + fast["errors"], "lost": base["lost"] + fast["lost"]},
        "runs": runs,
    }
    out.mkdir(parents=True, exist_ok=True)
    with atomic_output(out / "loadtest.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=float))
    table = markdown(report)
    with atomic_output(out / "loadtest.md") as tmp:
        tmp.write_text(table)
    click.echo(table)


if __name__ == "__main__":
    main()
