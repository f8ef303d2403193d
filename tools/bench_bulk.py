"""Bulk sampling on Ray against one `python -m runtime sample` process, same options.

    python tools/bench_bulk.py MODEL [-n 2048] [--sampler ddim] [--steps 20]
                               [--shard-size 256] [--repeats 3] [--out bench_bulk/]

Contenders, each a real CLI subprocess, alternating order over --repeats rounds:
`sample --threads 1` and `--threads 2` (the baselines), and `bulk` with 1 worker x 1
thread and 2 workers x 1 thread. The bulk runs join one Ray instance this tool starts
(num_cpus = the cores here), so Ray's start-up is timed once, apart. images/s counts the
sampling itself (each CLI's own figure: after the model is loaded / the workers are up);
"end to end" is the subprocess's wall time, start-up included. Ray's overhead per shard is
the bulk CLI's: the median time a worker waits between the end of one shard and the start
of the next (returning the images, dispatching the next call; the driver writes meanwhile).
Writes OUT/bench_bulk.json and OUT/bench_bulk.md.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]  # run as a file: the runtime and bench.py
from bench import machine  # noqa: E402

# name: (command, workers, threads per worker, the baseline on as many cores)
CONTENDERS = {
    "sample, 1 thread": ("sample", 1, 1, None),
    "sample, 2 threads": ("sample", 1, 2, None),
    "bulk, 1 worker x 1 thread": ("bulk", 1, 1, "sample, 1 thread"),
    "bulk, 2 workers x 1 thread": ("bulk", 2, 1, "sample, 2 threads"),
}
RATE = re.compile(r"([\d.]+) images/s")
OVERHEAD = re.compile(r"Ray ([\d.]+) ms between shards")


def run_one(name, model, args, address, tmp: Path) -> dict:
    kind, workers, threads, _ = CONTENDERS[name]
    common = ["-n", args["n"], "--sampler", args["sampler"], "--steps", args["steps"],
              "--seed", 0, "--threads", threads, "--no-progress"]
    if kind == "sample":
        cmd = ["sample", model, *common, "-o", tmp / "grid.png", "--npz", tmp / "out.npz"]
    else:
        out = Path(tempfile.mkdtemp(dir=tmp))
        cmd = ["bulk", model, *common, "--out", out, "--workers", workers,
               "--shard-size", args["shard_size"], "--ray-address", address]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "runtime", *map(str, cmd)], cwd=REPO,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise click.ClickException(f"{name} failed: {proc.stderr.strip()[-500:]}")
    result = {"images_per_s": float(RATE.search(proc.stdout).group(1)), "wall_s": wall}
    overhead = OVERHEAD.search(proc.stdout)
    if overhead:
        result["overhead_ms_per_shard"] = float(overhead.group(1))
    return result


def markdown(report: dict) -> str:
    a = report["args"]
    lines = [f"`{a['model']}`, n = {a['n']}, {a['sampler']} {a['steps']} steps, shards of "
             f"{a['shard_size']}, median of {a['repeats']} alternating rounds; "
             f"{report['machine']}; Ray start-up (local instance) "
             f"{report['ray_start_s']:.1f} s, not in the figures.", "",
             "| contender | images/s | vs sample, same cores | end to end (s) "
             "| Ray overhead per shard |", "|---|---|---|---|---|"]
    for name, row in report["rows"].items():
        ratio = f"{row['vs_sample']:.2f}x" if row.get("vs_sample") else "1.00x (baseline)"
        overhead = (f"{row['overhead_ms_per_shard']:.1f} ms"
                    if row.get("overhead_ms_per_shard") is not None else "-")
        lines.append(f"| {name} | {row['images_per_s']:.1f} | {ratio} | "
                     f"{row['wall_s']:.1f} | {overhead} |")
    return "\n".join(lines) + "\n"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("-n", type=click.IntRange(min=1), default=2048, show_default=True)
@click.option("--sampler", default="ddim", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--shard-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("bench_bulk"), show_default=True)
def main(model, n, sampler, steps, shard_size, repeats, out):
    """Time bulk sampling on Ray (1 and 2 workers) against the one-process sample CLI."""
    import ray

    from runtime.scale.cluster import runtime_env

    args = {"model": str(model), "n": n, "sampler": sampler, "steps": steps,
            "shard_size": shard_size, "repeats": repeats}
    start = time.perf_counter()
    context = ray.init(include_dashboard=False, log_to_driver=False, runtime_env=runtime_env())
    ray_start = time.perf_counter() - start
    runs: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            names = list(CONTENDERS)
            for round_ in range(repeats):
                for name in names if round_ % 2 == 0 else names[::-1]:
                    result = run_one(name, model, args, context.address_info["gcs_address"],
                                     Path(tmp))
                    runs[name].append(result)
                    click.echo(f"round {round_ + 1}/{repeats} {name}: "
                               f"{result['images_per_s']:.1f} images/s", err=True)
    finally:
        ray.shutdown()
    rows = {}
    for name, results in runs.items():
        row = {key: statistics.median(r[key] for r in results) for key in results[0]}
        row["images_per_s_all"] = [r["images_per_s"] for r in results]
        rows[name] = row
    for name, row in rows.items():
        baseline = CONTENDERS[name][3]
        if baseline:
            row["vs_sample"] = row["images_per_s"] / rows[baseline]["images_per_s"]
    report = {"args": args, "machine": machine(), "ray_start_s": ray_start, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_bulk.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (out / "bench_bulk.md").write_text(table)
    click.echo(table)


if __name__ == "__main__":
    main()
