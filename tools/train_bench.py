"""Training speed on this machine: steps/s per thread count, and where a step's time goes.

    python tools/train_bench.py [--preset digits] [--threads 1,2] [--steps 20] [--rounds 5]
                                [--profile] [--out bench/]

One trainer per thread count, all in this process, each continuing its own run of the
preset's recipe; rounds of --steps optimizer steps alternate between them, so a machine
whose load drifts slows every contender alike and the per-round ratios stay comparable.
Reports median steps/s, the ratio to the first thread count (median, min and max over
rounds) and the CPU. --profile adds torch-profiler time per step phase (data, forward,
backward, clip, optimizer, ema) for each thread count. --out writes OUT/train_bench.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402
import torch  # noqa: E402

from runtime.fileio import OutputError, atomic_output, check_output  # noqa: E402
from training.config import PRESETS, preset  # noqa: E402
from training.data import load_dataset  # noqa: E402
from training.trainer import Trainer  # noqa: E402

PHASES = ("data", "forward", "backward", "clip", "optimizer", "ema")


def cpu_description() -> str:
    """The CPU's model name and its widest vector extension, e.g. 'AMD EPYC (avx512f)'."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), "unknown CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines()
                      if line.startswith("flags")), []))
    widest = next((f for f in ("avx512f", "avx2", "avx") if f in flags), "no avx")
    return f"{name} ({widest})"


def run_steps(trainer: Trainer, threads: int, steps: int) -> float:
    """Seconds for ``steps`` optimizer steps at ``threads`` intra-op threads."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(trainer.model)
    return time.perf_counter() - start


def profile_phases(trainer: Trainer, threads: int, steps: int) -> dict[str, float]:
    """Milliseconds per step in each labelled phase of Trainer.train_step."""
    torch.set_num_threads(threads)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            trainer.train_step(trainer.model)
    totals = {e.key: e.cpu_time_total for e in prof.key_averages() if e.key in PHASES}
    return {phase: totals.get(phase, 0.0) / 1e3 / steps for phase in PHASES}


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--preset", "preset_name", type=click.Choice(sorted(PRESETS)), default="digits")
@click.option("--data", default="digits", help="Dataset spec, as training/train.py --data.")
@click.option("--threads", "threads_text", default="1,2", help="Thread counts to compare.")
@click.option("--steps", type=click.IntRange(min=1), default=20, help="Steps per round.")
@click.option("--rounds", type=click.IntRange(min=1), default=5)
@click.option("--profile", is_flag=True, help="Also time each phase of a step.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None)
def main(preset_name, data, threads_text, steps, rounds, profile, out):
    """Steps/s of the preset's training step per thread count, alternating rounds."""
    try:
        counts = [int(v) for v in threads_text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"{threads_text!r} is not a list of positive integers like "
                                 "1,2", param_hint="--threads")
    report = None
    if out:
        try:
            report = check_output(out / "train_bench.json", option="--out")
        except OutputError as err:
            raise click.ClickException(str(err)) from err
    model_config, train_config = preset(preset_name)
    dataset = load_dataset(data, model_config.image_size, model_config.in_channels)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {n: Trainer(model_config, train_config, dataset, tmp, progress=False)
                    for n in counts}
        for n, trainer in trainers.items():
            run_steps(trainer, n, 3)  # set-up: kernel selection, allocator warm-up
        rates = {n: [] for n in counts}
        for _ in range(rounds):
            for n, trainer in trainers.items():
                rates[n].append(steps / run_steps(trainer, n, steps))
        phases = {n: profile_phases(trainer, n, steps) for n, trainer in trainers.items()} \
            if profile else {}
    result = {"cpu": cpu_description(), "preset": preset_name, "steps_per_round": steps,
              "rounds": rounds, "batch_size": train_config.batch_size, "threads": {}}
    click.echo(f"{result['cpu']}, preset {preset_name}, batch {train_config.batch_size}, "
               f"{rounds} rounds of {steps} steps")
    for n in counts:
        ratios = [a / b for a, b in zip(rates[n], rates[counts[0]], strict=True)]
        row = {"steps_per_s": statistics.median(rates[n]), "rounds": rates[n],
               "ratio": statistics.median(ratios), "ratio_min": min(ratios),
               "ratio_max": max(ratios)}
        line = (f"{n} thread(s): {row['steps_per_s']:.2f} steps/s, x{row['ratio']:.2f} of "
                f"{counts[0]} (rounds x{row['ratio_min']:.2f}..x{row['ratio_max']:.2f})")
        if n in phases:
            row["phase_ms"] = phases[n]
            total = sum(phases[n].values()) or 1.0
            line += "\n  " + ", ".join(f"{k} {v:.1f} ms ({100 * v / total:.0f}%)"
                                       for k, v in phases[n].items())
        result["threads"][str(n)] = row
        click.echo(line)
    if report:
        with atomic_output(report) as tmp:
            Path(tmp).write_text(json.dumps(result, indent=2) + "\n")
        click.echo(f"wrote {report}")


if __name__ == "__main__":
    main()
