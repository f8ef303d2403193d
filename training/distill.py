"""Distil a trained network into a few-step student: `python training/distill.py ckpt.pt`.

Progressive distillation (Salimans & Ho 2022; training/distiller.py): the checkpoint's
network under DDIM at --teacher-steps calls is the first teacher; each round trains a student
that takes half the steps, which then teaches the next round, down to --steps. Writes
OUT/student.pt (the run, resumable; the final student when done), OUT/student-N.pt as each
round ends, log.jsonl and a preview grid per round. Then --match-steps of distribution
matching move the last student's samples toward the data's distribution (the teacher's
ancestral chain rather than its ODE): OUT/student-N-matched.pt, and OUT/student.pt. Export
a student like any checkpoint: `python export/to_onnx.py OUT/student.pt`; its model file
samples with DDIM at its steps by default.

Also runs as a module: `python -m training.distill`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402

from runtime.errors import MAX_THREADS  # noqa: E402
from runtime.metadata import sha256_file  # noqa: E402
from runtime.util.clierrors import finite_float, guarded_command  # noqa: E402
from runtime.util.fileio import check_output, folder_lock  # noqa: E402
from training.checkpoint import (  # noqa: E402
    CheckpointError,
    is_student,
    load_checkpoint,
    student_steps,
)
from training.config import MAX_LR, MAX_SEED, DistillConfig, TrainConfig  # noqa: E402
from training.data import DatasetError, load_dataset  # noqa: E402
from training.distiller import STUDENT_NAME, distill, output_names  # noqa: E402
from training.distributed import DeviceError  # noqa: E402
from training.train import (  # noqa: E402
    check_data,
    check_device,
    check_fresh,
    check_out,
    check_out_outside_data,
)
from training.trainer import DivergedError  # noqa: E402

DEFAULTS = DistillConfig()
# Options a resumed run takes from its checkpoint: giving another value is an error.
FIXED_ON_RESUME = {"steps": "--steps", "teacher_steps": "--teacher-steps",
                   "round_steps": "--round-steps", "match_steps": "--match-steps",
                   "match_lr": "--match-lr", "lr": "--lr", "batch_size": "--batch-size",
                   "seed": "--seed"}
# Distribution matching after the rounds, for a teacher that is an ε-network (a student is
# not a score of the data at every t, so its own students are not matched).
MATCH_STEPS = 2000


@click.command(cls=guarded_command(CheckpointError, DatasetError, DeviceError, DivergedError),
               context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help=f"The student's network calls: the teacher's halved one or more times. "
                   f"[default: {DEFAULTS.steps}]")
@click.option("--teacher-steps", type=click.IntRange(min=2), default=None,
              help=f"The first teacher's DDIM calls. [default: {DEFAULTS.teacher_steps}; a "
                   "student checkpoint's own]")
@click.option("--round-steps", type=click.IntRange(min=1), default=None,
              help=f"Optimizer steps per round. [default: {DEFAULTS.round_steps}]")
@click.option("--match-steps", type=click.IntRange(min=0), default=None,
              help=f"Steps of distribution matching after the last round (0: none). "
                   f"[default: {MATCH_STEPS}; 0 from a student]")
@click.option("--match-lr", type=click.FloatRange(0, MAX_LR, min_open=True), default=None,
              callback=finite_float,
              help=f"Adam learning rate of the matching. [default: {DEFAULTS.match_lr}]")
@click.option("--lr", type=click.FloatRange(0, MAX_LR, min_open=True), default=None,
              callback=finite_float, help="Adam learning rate at the top of each round.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=None)
@click.option("--data", default=None, callback=check_data,
              help="The data to distil on. [default: the teacher's training data]")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              callback=check_out, help="Run folder. [default: distill/ beside CHECKPOINT]")
@click.option("--resume", is_flag=True, help="Continue the run in OUT (OUT/student.pt).")
@click.option("--overwrite", is_flag=True, help="Start afresh in an OUT that holds a run.")
@click.option("--device", default="auto", callback=check_device,
              help="auto (CUDA when available), cpu, cuda or cuda:N.")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None,
              help="CPU threads. [default: OMP_NUM_THREADS, else the cores no other work "
                   "keeps busy; a resumed run keeps its own count]")
@click.option("--progress/--no-progress", default=True, help="A progress bar per round.")
def main(checkpoint, steps, teacher_steps, round_steps, match_steps, match_lr, lr, batch_size,
         seed, data, out_dir, resume, overwrite, device, threads, progress):
    """Distil CHECKPOINT's network (its EMA weights) into a student that samples in --steps
    DDIM calls, round by round."""
    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite contradict each other; pick one")
    out_dir = out_dir or checkpoint.parent / "distill"
    student_path = out_dir / STUDENT_NAME
    teacher = load_checkpoint(checkpoint)
    plan_given = {"steps": steps, "teacher_steps": teacher_steps, "round_steps": round_steps,
                  "match_steps": match_steps, "match_lr": match_lr}
    recipe_given = {"lr": lr, "batch_size": batch_size, "seed": seed}
    given = {k: v for k, v in {**plan_given, **recipe_given}.items() if v is not None}
    digest = sha256_file(checkpoint)
    if resume:
        resume_from = load_checkpoint(student_path, resume=True)
        plan, train_config = _resumed(resume_from, student_path, checkpoint, digest, given)
    else:
        check_fresh(student_path, overwrite)
        resume_from = None
        plan = _plan(teacher, checkpoint, {k: v for k, v in plan_given.items() if v is not None})
        train_config = plan.train_config(TrainConfig.from_dict(teacher["train_config"]),
                                         **{k: v for k, v in recipe_given.items()
                                            if v is not None})
    if plan.match_steps and is_student(teacher):
        raise click.BadParameter(f"{checkpoint} is a student, not a score of the data at every "
                                 "t, which distribution matching needs; match the students of "
                                 "an ε-network checkpoint, or give --match-steps 0",
                                 param_hint="--match-steps")
    if resume_from is not None and resume_from["step"] >= train_config.steps:
        click.echo(f"{student_path} is finished: {plan.steps} steps, distilled from "
                   f"{plan.teacher_steps}; export it with python export/to_onnx.py "
                   f"{student_path}")
        return
    data = data or (resume_from or teacher)["data"]["spec"]
    check_out_outside_data(out_dir, data)
    inputs = [checkpoint] + ([data] if data != "digits" else [])
    for name in output_names(plan):
        check_output(out_dir / name, inputs=inputs, option="--out")
    with folder_lock(out_dir, what="distillation"):
        if resume_from is None:  # a run that ended while we were checking left its file
            check_fresh(student_path, overwrite)
        shape = teacher["data"]["image_shape"]
        dataset = load_dataset(data, shape[1], shape[0])
        run = distill(teacher, plan, train_config, dataset, out_dir, teacher_sha256=digest,
                      device=device, resume_from=resume_from, progress=progress,
                      threads=threads, report=click.echo)
    matched = f" and {plan.match_steps} steps of matching" if plan.match_steps else ""
    click.echo(f"distilled {plan.teacher_steps} -> {plan.steps} steps in {plan.rounds} rounds"
               f"{matched}, {run.elapsed_s / 60:.1f} min of training; student {student_path} "
               f"(export: python export/to_onnx.py {student_path})")


def _plan(teacher: dict, path: Path, given: dict) -> DistillConfig:
    """A new run's plan: the options given, the defaults, and a student checkpoint's own
    steps as its teacher steps (it was distilled for those)."""
    if is_student(teacher):
        own = student_steps(teacher)
        if own is None or not own[1]:
            raise CheckpointError(f"{path}: a student in the middle of a round; distil from a "
                                  "finished student (student-N.pt) or finish its run first")
        if given.setdefault("teacher_steps", own[0]) != own[0]:
            raise click.BadParameter(f"{path} is a student distilled for {own[0]} steps, its "
                                     f"only sampler; drop --teacher-steps or give {own[0]}",
                                     param_hint="--teacher-steps")
    given.setdefault("match_steps", 0 if is_student(teacher) else MATCH_STEPS)
    T = TrainConfig.from_dict(teacher["train_config"]).num_timesteps
    teacher_steps = given.get("teacher_steps", DEFAULTS.teacher_steps)
    if teacher_steps > T:
        raise click.BadParameter(f"{teacher_steps} is more than the {T} timesteps of "
                                 f"{path}'s schedule", param_hint="--teacher-steps")
    try:
        return DistillConfig(**{**DEFAULTS.to_dict(), **given})
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--steps") from None


def _resumed(ckpt: dict, path: Path, teacher_path: Path, digest: str,
             given: dict) -> tuple[DistillConfig, TrainConfig]:
    """A resumed run's plan and recipe, from its checkpoint: of this teacher, and with no
    option given otherwise."""
    if not is_student(ckpt):
        raise CheckpointError(f"{path}: not a distillation run (no 'distill' record); resume "
                              "training with training/train.py, or choose another --out")
    theirs = ckpt["distill"]["teacher_sha256"]
    if theirs != digest:
        raise click.BadParameter(f"{path} was distilled from another teacher (sha256 "
                                 f"{theirs[:12]}...), not {teacher_path} ({digest[:12]}...); pass "
                                 "that run's teacher, or start a new run with another --out",
                                 param_hint="CHECKPOINT")
    plan = DistillConfig.from_dict(ckpt["distill"]["config"])
    train_config = TrainConfig.from_dict(ckpt["train_config"])
    # Until matching begins, a run (a finished one too) may add it or change it.
    plan = plan.with_matching(ckpt["step"], **{k: given[k] for k in ("match_steps", "match_lr")
                                               if k in given})
    train_config = train_config.replace(steps=plan.total_steps)
    for name, flag in FIXED_ON_RESUME.items():
        have = getattr(plan if hasattr(plan, name) else train_config, name)
        if name in given and given[name] != have:
            raise click.UsageError(f"{flag} {given[name]} differs from {path}'s {have}; a "
                                   "resumed run keeps its plan (drop the option, or start a "
                                   "new --out)")
    return plan, train_config


if __name__ == "__main__":
    main()
