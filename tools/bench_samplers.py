"""Per-step cost of each sampler's own math, without the network: what a sampler adds.

    python tools/bench_samplers.py [--batch 64] [--shape 1,8,8] [--steps 20] [--rounds 5]

For each registered sampler: build it once per chain (tables, buffers) and step it
through a ``--steps`` chain with a precomputed ε; rounds alternate samplers so load on a
shared machine falls on all of them alike. Reports the median microseconds per step and
the ratio to DDPM's, and the build time per chain.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402
import numpy as np  # noqa: E402

from runtime.samplers import SAMPLERS, make_sampler  # noqa: E402
from runtime.schedule import Schedule  # noqa: E402


def one_chain(name: str, schedule: Schedule, x0: np.ndarray, eps: np.ndarray,
              noise: np.ndarray) -> tuple[float, float]:
    """Seconds to build the sampler and seconds per step, for one chain."""
    start = time.perf_counter()
    solver = make_sampler(name, schedule, x0.shape)
    built = time.perf_counter()
    x = x0.copy()
    while not solver.done:
        solver.step(x, eps, noise if solver.needs_noise else None)
    done = time.perf_counter()
    return built - start, (done - built) / schedule.num_timesteps


@click.command()
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--shape", default="1,8,8", show_default=True, help="C,H,W")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True)
def main(batch, shape, steps, rounds):
    shape = (batch, *(int(s) for s in shape.split(",")))
    rng = np.random.default_rng(0)
    x0, eps, noise = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    schedule = Schedule.linear(1000).respaced(steps)
    per_step = {name: [] for name in SAMPLERS}
    build = {name: [] for name in SAMPLERS}
    for name in SAMPLERS:  # warm-up
        one_chain(name, schedule, x0, eps, noise)
    for _ in range(rounds):
        for name in SAMPLERS:
            b, s = one_chain(name, schedule, x0, eps, noise)
            build[name].append(b)
            per_step[name].append(s)
    base = statistics.median(per_step["ddpm"])
    click.echo(f"batch {list(shape)}, {steps}-step chains, median of {rounds} rounds")
    click.echo("| sampler | us per step | vs DDPM | build per chain (us) |")
    click.echo("|---|---|---|---|")
    for name in SAMPLERS:
        med = statistics.median(per_step[name])
        click.echo(f"| {name} | {med * 1e6:.1f} | {med / base:.2f}x | "
                   f"{statistics.median(build[name]) * 1e6:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
