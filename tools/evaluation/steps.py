"""Quality per network call: FD of every sampler at a few NFE against the full chain."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from .sampling import sample_timed, timed_images_per_s

DEFAULT_NFE = (5, 10, 20, 50)
WITHIN = 1.1             # "as good as the full chain": FD within 1.1x of it


def steps_table(pipe, ev, n: int, seeds, samplers, nfes, batch_size: int,
                samples_dir: Path | None, progress: bool = True, timing_images: int = 0,
                spacing: str = "linspace") -> dict:
    """FD (and digit-IS) of N samples per sampler and NFE, averaged over ``seeds``, and
    images/s: from the sampling runs themselves, or with ``timing_images`` from a separate
    best-of-2 timing run. The first row is the full T-step ancestral chain."""
    T = pipe.record.num_timesteps
    configs = [("ddpm", T)] + [(s, k) for s in samplers for k in sorted({min(k, T) for k in nfes})
                               if (s, k) != ("ddpm", T)]
    rows = [measure(pipe, ev, n, seeds, sampler, steps, batch_size, samples_dir, progress,
                    timing_images, spacing) for sampler, steps in configs]
    full = rows[0]
    compare(rows, full)
    recommended = None
    if "fd" in full:
        ok = [r for r in rows if r["fd"] <= WITHIN * full["fd"]]
        best = min(ok, key=lambda r: (r["steps"], r["fd"]))
        recommended = {"sampler": best["sampler"], "steps": best["steps"], "fd": best["fd"],
                       "fd_ratio": best["fd_ratio"], "speedup": best["speedup"],
                       "nominal_speedup": T / best["steps"]}
    return {"rows": rows, "full_steps": T, "recommended": recommended,
            "timing": timing_note(timing_images, n, batch_size),
            "spacing": spacing, "seeds": list(seeds),
            "rule": f"fewest network calls with FD <= {WITHIN} x the {T}-step DDPM FD"}


def measure(pipe, ev, n: int, seeds, sampler: str, steps: int, batch_size: int,
            samples_dir: Path | None, progress: bool = True, timing_images: int = 0,
            spacing: str = "linspace", prefix: str = "") -> dict:
    """One row: FD and digit-IS of N samples of ``pipe`` per seed (their mean and spread
    over the seeds) and images/s. Samples are cached under ``samples_dir``, named by
    ``prefix`` and the configuration."""
    T = pipe.record.num_timesteps
    per_seed, seconds = [], 0.0
    for seed in seeds:
        name = prefix + f"{sampler}-{steps}" + ("" if spacing == "linspace" or steps == T
                                                else f"-{spacing}")
        cache = samples_dir / f"{name}-n{n}-seed{seed}.npz" if samples_dir else None
        images, took = sample_timed(pipe, n, seed, sampler, steps, batch_size, cache,
                                    progress, spacing=spacing)
        seconds += took
        stats = ev.digit_stats(images)
        if ev.available:
            stats["fd"], stats["fd_refs_std"] = ev.fd(images)
        per_seed.append(stats)
    row = {"sampler": sampler, "steps": steps, "nfe": steps, "spacing": spacing,
           "seeds": list(seeds), "seconds": seconds, "images_per_s": n * len(seeds) / seconds}
    if timing_images:
        row["images_per_s_sampling_run"] = row["images_per_s"]
        row["images_per_s"] = timed_images_per_s(pipe, timing_images, sampler, steps,
                                                 spacing=spacing)
    for key in ("fd", "digit_is"):
        if key in per_seed[0]:
            values = [s[key] for s in per_seed]
            row[key] = float(np.mean(values))
            row[f"{key}_by_seed"] = values
            # The spread over seeds (sample noise), and over reference halves.
            row[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    if "fd" in row:
        row["fd_refs_std"] = float(np.mean([s["fd_refs_std"] for s in per_seed]))
    click.echo(f"  {prefix}{sampler:9s} {steps:5d} NFE: " + (f"FD {row['fd']:.3f}, "
               if "fd" in row else "") + f"{row['images_per_s']:.1f} images/s", err=True)
    return row


def timing_note(timing_images: int, n: int, batch_size: int) -> str:
    """Where a table's images/s come from, for its report."""
    if timing_images:
        return f"best of 2 runs of {timing_images} images in one batch"
    return f"the sampling runs themselves ({n} images per seed, batches of {batch_size})"


def compare(rows: list[dict], full: dict) -> None:
    """Each row's speed-up over ``full`` and FD as a ratio of its FD."""
    for row in rows:
        row["speedup"] = row["images_per_s"] / full["images_per_s"]
        if "fd" in row:
            row["fd_ratio"] = row["fd"] / full["fd"]
