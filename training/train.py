"""Train the DDPM epsilon-network: `python training/train.py` (digits, CPU, ~6 min on 2 cores).

Also runs as a module: `python -m training.train`.

Multi-GPU / multi-node: `torchrun --nproc_per_node N training/train.py --preset cifar10 ...`.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402

from runtime.errors import MAX_THREADS  # noqa: E402
from runtime.util.clierrors import finite_float, guarded_command  # noqa: E402
from runtime.util.fileio import (  # noqa: E402
    OutputError,
    check_name_lengths,
    check_output,
    folder_lock,
)
from training.checkpoint import CheckpointError, is_student, load_checkpoint  # noqa: E402
from training.config import (  # noqa: E402
    LR_DECAYS,
    MAX_LR,
    MAX_SEED,
    PRESETS,
    ModelConfig,
    TrainConfig,
    preset,
)
from training.data import DatasetError, load_dataset  # noqa: E402
from training.distributed import DeviceError, dist_info_from_env  # noqa: E402
from training.trainer import CKPT_NAME, LOG_NAME, DivergedError, train  # noqa: E402

# Options a resumed run takes from its checkpoint; giving a different value is an error.
FIXED_ON_RESUME = {"batch_size": "--batch-size", "lr": "--lr", "lr_decay": "--lr-decay",
                   "seed": "--seed"}


def check_device(ctx, param, value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise click.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
    return value


def check_out(ctx, param, value):
    # Checked as typed: Path("") is Path("."), which would train into the current folder.
    if value is not None and not value.strip():
        raise click.BadParameter("is empty; pass the run's folder, e.g. runs/digits")
    if value is not None:  # before anything stats it: ENAMETOOLONG was an internal error
        try:
            check_name_lengths(Path(value) / CKPT_NAME, "--out")
        except OutputError as err:
            raise click.BadParameter(str(err)) from None
    return None if value is None else Path(value)


def check_data(ctx, param, value):
    if value is not None and not value.strip():
        raise click.BadParameter("is empty; pass 'digits', an .npz, an image folder or a "
                                 "cifar-10-batches-py folder")
    return value


@click.command(cls=guarded_command(CheckpointError, DatasetError, DeviceError, DivergedError),
               context_settings={"help_option_names": ["-h", "--help"],
                                 "show_default": True})
@click.option("--preset", "preset_name", type=click.Choice(sorted(PRESETS)), default="digits",
              help="Model size and training recipe.")
@click.option("--data", default=None, callback=check_data,
              help="'digits', an .npz with an 'images' uint8 array, a folder of PNG/JPEG "
                   "images, or a cifar-10-batches-py folder. [default: digits for --preset "
                   "digits]")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Total optimizer steps. [default: the preset's]")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Global batch size, split over DDP ranks. [default: the preset's]")
@click.option("--lr", type=click.FloatRange(0, MAX_LR, min_open=True), default=None,
              callback=finite_float,
              help="Adam learning rate after warmup. [default: the preset's]")
@click.option("--lr-decay", type=click.Choice(LR_DECAYS), default=None,
              help="After warmup: keep the learning rate (none), or decay it to 0 at --steps "
                   "along a half cosine (a resume with a larger --steps stretches the curve). "
                   "[default: the preset's]")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              callback=check_out,
              help="Run directory for ckpt.pt, log.jsonl and sample grids. [default: "
                   "runs/<preset>]")
@click.option("--resume", is_flag=True, help="Continue the run whose checkpoint is OUT/ckpt.pt.")
@click.option("--overwrite", is_flag=True, help="Start afresh in an OUT that holds a checkpoint.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=None,
              help="Seed of weights, data order and noise. [default: the preset's]")
@click.option("--sample-every", type=click.IntRange(min=0), default=None,
              help="Steps between sample grids; 0 = only at the end. [default: the preset's]")
@click.option("--save-every", type=click.IntRange(min=0), default=None,
              help="Steps between checkpoints; 0 = only at the end. [default: the preset's]")
@click.option("--device", default="auto", callback=check_device,
              help="auto (CUDA when available), cpu, cuda or cuda:N.")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None,
              help="CPU threads per process. [default: OMP_NUM_THREADS, else the cores that "
                   "no other work keeps busy; a resumed run keeps its own count]")
@click.option("--bf16", is_flag=True, help="bfloat16 autocast for the network's forward pass.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def main(preset_name, data, steps, batch_size, lr, lr_decay, out_dir, resume, overwrite, seed,
         sample_every, save_every, device, threads, bf16, progress):
    """Train the DDPM epsilon-network and write a checkpoint that export can use alone."""
    out_dir = out_dir or Path("runs") / preset_name
    ckpt_path = out_dir / CKPT_NAME
    options = {"steps": steps, "batch_size": batch_size, "lr": lr, "lr_decay": lr_decay,
               "seed": seed, "sample_every": sample_every, "save_every": save_every}
    given = {k: v for k, v in options.items() if v is not None}
    resume_from = None
    if resume:
        if overwrite:
            raise click.UsageError("--resume and --overwrite contradict each other; pick one")
        resume_from = load_checkpoint(ckpt_path, resume=True)
        if is_student(resume_from):  # L_simple would train its v-network as an eps-network
            raise CheckpointError(f"{ckpt_path} is a distilled student; continue its run with "
                                  "python training/distill.py TEACHER --resume")
        model_config = ModelConfig.from_dict(resume_from["model_config"])
        train_config = TrainConfig.from_dict(resume_from["train_config"])
        _check_resume_options(ctx_preset=preset_name, model_config=model_config,
                              train_config=train_config, given=given)
        data = _resume_data(data, resume_from["data"]["spec"], ckpt_path)
    else:
        check_fresh(ckpt_path, overwrite)
        model_config, train_config = preset(preset_name)
        if data is None:
            if preset_name != "digits":
                raise click.UsageError(f"--preset {preset_name} needs --data (an .npz, an image "
                                       "folder or a cifar-10-batches-py folder)")
            data = "digits"
    check_out_outside_data(out_dir, data)
    try:
        train_config = train_config.replace(**given)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    if resume_from is not None and resume_from["step"] >= train_config.steps:
        click.echo(f"{ckpt_path} is already at step {resume_from['step']} of "
                   f"{train_config.steps}; pass a larger --steps to train further")
        return
    # The run's outputs are checked now, not after the first hour of training.
    for name in (CKPT_NAME, LOG_NAME):
        check_output(out_dir / name, inputs=[data] if data != "digits" else [], option="--out")
    # A run folder has one owner: a second training into it (started at the same time)
    # is refused here, before it reads the data or writes anything. Under torchrun only
    # rank 0 writes, so only it owns the folder.
    owner = (folder_lock(out_dir, what="training") if dist_info_from_env().is_main
             else contextlib.nullcontext())
    with owner:
        if resume_from is None:  # a run that ended while we were checking left its ckpt.pt
            check_fresh(ckpt_path, overwrite)
        dataset = load_dataset(data, model_config.image_size, model_config.in_channels)
        # Nothing was written or removed so far: a refused command leaves OUT as it was (a
        # fresh run's log is emptied by the trainer, once it has accepted the data and
        # options).
        trainer = train(model_config, train_config, dataset, out_dir, device=device,
                        bf16=bf16, resume_from=resume_from, progress=progress,
                        threads=threads)
    if trainer.info.is_main:
        click.echo(f"trained to step {trainer.step} in {trainer.elapsed_s / 60:.1f} min of "
                   f"training; checkpoint {ckpt_path}, log {out_dir / LOG_NAME}, "
                   f"samples {out_dir}/samples_{trainer.step:07d}.png")


def check_fresh(ckpt_path: Path, overwrite: bool) -> None:
    if ckpt_path.exists() and not overwrite:
        raise click.UsageError(f"{ckpt_path} exists; pass --resume to continue that run, "
                               "--overwrite to start afresh, or choose another --out")


def _same_data(given: str, recorded: str) -> bool:
    if given == recorded:
        return True
    if "digits" in (given, recorded):
        return False
    return Path(given).expanduser().resolve() == Path(recorded).expanduser().resolve()


def _resume_data(given: str | None, recorded: str, ckpt_path: Path) -> str:
    """The data a resumed run reads: the checkpoint's own. A --data given must name it.

    Checkpoints record an absolute path; older ones the path as typed, relative to the
    folder that run started in. Where that is not found from here, a --data whose path
    ends in the recorded one is taken as the same data (its shape is checked on load).
    """
    stored = Path(recorded).expanduser()
    if recorded == "digits" or stored.is_absolute() or stored.exists():
        if given is not None and not _same_data(given, recorded):
            raise click.BadParameter(f"{given!r} is not the data {ckpt_path} was trained on "
                                     f"({recorded!r}); drop --data when resuming, or start a "
                                     "new run with --out", param_hint="--data")
        return recorded if given is None else given
    if given is None:
        raise DatasetError(f"{ckpt_path} records its data as {recorded!r}, relative to the "
                           f"folder that run started in, and it is not found from {Path.cwd()}"
                           "; pass --data with that data's path (or resume from that folder)")
    tail = [part for part in Path(os.path.normpath(recorded)).parts if part != ".."]
    if list(Path(given).expanduser().resolve().parts[-len(tail):]) != tail:
        raise click.BadParameter(f"{given!r} is not the data {ckpt_path} was trained on "
                                 f"({recorded!r}, relative to the folder that run started "
                                 "in); pass the path of that same file or folder",
                                 param_hint="--data")
    return given


def check_out_outside_data(out_dir: Path, data: str) -> None:
    """A run never writes into its data: preview grids in an image folder would become
    training images on resume."""
    if data == "digits":
        return
    source = Path(data).expanduser().resolve()
    out = out_dir.expanduser().resolve()
    if out == source or (source.is_dir() and source in out.parents):
        raise click.BadParameter(f"{out_dir} is or lies inside --data {data}: the checkpoint, log "
                                 "and sample grids would be written into the training data; "
                                 "choose an --out outside it", param_hint="--out")


def _check_resume_options(*, ctx_preset: str, model_config: ModelConfig,
                          train_config: TrainConfig, given: dict) -> None:
    ctx = click.get_current_context()
    source = ctx.get_parameter_source("preset_name")
    if source == click.core.ParameterSource.COMMANDLINE and \
            preset(ctx_preset)[0] != model_config:
        raise click.UsageError(f"--preset {ctx_preset} does not match the checkpoint's model; "
                               "drop --preset when resuming or choose another --out")
    for name, flag in FIXED_ON_RESUME.items():
        if name in given and given[name] != getattr(train_config, name):
            raise click.UsageError(
                f"{flag} {given[name]} differs from the checkpoint's {getattr(train_config, name)}"
                "; a resumed run keeps its recipe (drop the option, or start a new --out)"
            )


if __name__ == "__main__":
    main()
