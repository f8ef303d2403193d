"""Training speed on this machine: steps/s per thread count, and where a step's time goes.

    python tools/train_bench.py [--preset digits] [--threads 1,2] [--steps 20] [--rounds 5]
                                [--variant num_res_blocks=2 ...] [--profile] [--out bench/]

One trainer per contender (thread count, and the preset's network or a --variant of it),
all in this process, each continuing its own run of the preset's recipe; rounds of --steps
optimizer steps alternate between them, so a machine whose load drifts slows every
contender alike and the per-round ratios stay comparable. Reports median steps/s, the
ratio to the first contender (median, min and max over rounds) and the CPU. --profile
adds torch-profiler time per step phase (data, forward, backward, clip, optimizer, ema)
for each contender. --out writes OUT/train_bench.json.
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

import dataclasses  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import click  # noqa: E402

from runtime.util.fileio import OutputError, atomic_output, check_output  # noqa: E402
from tools.loadtesting.report import cpu_name  # noqa: E402
from training.config import PRESETS, ModelConfig, preset  # noqa: E402

if TYPE_CHECKING:
    from training.trainer import Trainer

PHASES = ("data", "forward", "backward", "clip", "optimizer", "ema")


def run_steps(trainer: Trainer, threads: int, steps: int) -> float:
    """Seconds for ``steps`` optimizer steps at ``threads`` intra-op threads."""
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(trainer.model)
    return time.perf_counter() - start


def profile_phases(trainer: Trainer, threads: int, steps: int) -> dict[str, float]:
    """Milliseconds per step in each labelled phase of Trainer.train_step."""
    import torch

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
@click.option("--variant", "variants", multiple=True, metavar="FIELD=VALUE[,FIELD=VALUE]",
              help="Also time the preset's network with these ModelConfig fields changed, "
                   "e.g. num_res_blocks=2 or ch_mult=1:2 (repeatable).")
@click.option("--profile", is_flag=True, help="Also time each phase of a step.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None)
def main(preset_name, data, threads_text, steps, rounds, variants, profile, out):
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
    networks = {"preset": model_config}
    for text in variants:
        networks[text] = _variant(model_config, text)
    # Imported once the arguments are checked: a bad one is refused without loading torch.
    from training.data import load_dataset
    from training.trainer import Trainer

    dataset = load_dataset(data, model_config.image_size, model_config.in_channels)
    contenders = [(name, n) for name in networks for n in counts]
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {c: Trainer(networks[c[0]], train_config, dataset, tmp, progress=False)
                    for c in contenders}
        for (_, n), trainer in trainers.items():
            run_steps(trainer, n, 3)  # set-up: kernel selection, allocator warm-up
        rates = {c: [] for c in contenders}
        for _ in range(rounds):
            for (name, n), trainer in trainers.items():
                rates[name, n].append(steps / run_steps(trainer, n, steps))
        phases = {c: profile_phases(trainer, c[1], steps) for c, trainer in trainers.items()} \
            if profile else {}
    result = {"cpu": cpu_name(), "preset": preset_name, "steps_per_round": steps,
              "rounds": rounds, "batch_size": train_config.batch_size, "threads": {},
              "variants": {}}
    click.echo(f"{result['cpu']}, preset {preset_name}, batch {train_config.batch_size}, "
               f"{rounds} rounds of {steps} steps")
    first = contenders[0]
    for name, n in contenders:
        ratios = [a / b for a, b in zip(rates[name, n], rates[first], strict=True)]
        row = {"steps_per_s": statistics.median(rates[name, n]), "rounds": rates[name, n],
               "ratio": statistics.median(ratios), "ratio_min": min(ratios),
               "ratio_max": max(ratios)}
        label = f"{n} thread(s)" + ("" if name == "preset" else f", {name}")
        line = (f"{label}: {row['steps_per_s']:.2f} steps/s, x{row['ratio']:.2f} of "
                f"{first[1]} thread(s) (rounds x{row['ratio_min']:.2f}..x{row['ratio_max']:.2f})")
        if (name, n) in phases:
            row["phase_ms"] = phases[name, n]
            total = sum(phases[name, n].values()) or 1.0
            line += "\n  " + ", ".join(f"{k} {v:.1f} ms ({100 * v / total:.0f}%)"
                                       for k, v in phases[name, n].items())
        if name == "preset":
            result["threads"][str(n)] = row
        else:
            result["variants"].setdefault(name, {})[str(n)] = row
        click.echo(line)
    if report:
        with atomic_output(report) as tmp:
            Path(tmp).write_text(json.dumps(result, indent=2) + "\n")
        click.echo(f"wrote {report}")


def _variant(config: ModelConfig, text: str) -> ModelConfig:
    """The preset's ModelConfig with FIELD=VALUE changes; tuples are written 1:2."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    changes = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise click.BadParameter(f"{item!r} is not FIELD=VALUE with a ModelConfig field "
                                     f"({', '.join(fields)})", param_hint="--variant")
        try:
            current = getattr(config, key)
            if isinstance(current, tuple):
                changes[key] = tuple(int(v) for v in value.split(":") if v)
            else:
                changes[key] = type(current)(value)
        except ValueError as err:
            raise click.BadParameter(f"{item!r}: {err}", param_hint="--variant") from err
    try:
        return dataclasses.replace(config, **changes)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--variant") from err


if __name__ == "__main__":
    main()
