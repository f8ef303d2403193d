"""Progressive distillation (Salimans & Ho 2022): students that take half their teacher's steps.

Round r's teacher is the network of the round before (round 0: the checkpoint given) under
its deterministic sampler, DDIM with eta 0 and x_0 clipped to the data range, on the
"trailing" timesteps: the grid of n steps is every other point of the grid of 2n, so one
student step spans exactly two teacher steps. The student starts as a copy of its teacher
and learns, at its own timesteps, the x_0 whose single DDIM step lands where the teacher's
two land (the paper's eq. 8); the runtime's DDIM then samples it unchanged.

The student predicts v = sqrt(ab) eps - sqrt(1 - ab) x_0 (the record's ``prediction``) and
is trained on the v error, the x_0 error weighted by 1 + SNR: at the noisiest step an
eps-network's x_0 is its input divided by sqrt(ab) ~ 0.006, so a few-step eps-student
cannot land anywhere precisely; x_0 = sqrt(ab) x_t - sqrt(1 - ab) v stays well conditioned.

Everything else is the trainer's (a Trainer subclass): data order, noise, Adam, clipping,
an EMA (restarted each round: the round's student is its EMA), checkpoints through the
same writer, log.jsonl cut back on resume, exact resume from any checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from runtime.schedule import spaced_timesteps

from .checkpoint import (
    build_model,
    is_student,
    save_checkpoint,
    steps_behind,
    student_checkpoint,
    without_run_state,
)
from .config import DistillConfig, ModelConfig, TrainConfig
from .data import Dataset
from .diffusion import extract, q_sample
from .distributed import DeviceError, dist_info_from_env
from .ema import EMA
from .preview import write_preview
from .trainer import LOG_NAME, Trainer, append_log, derive_seed, run_device, scheduled_lr

STUDENT_NAME = "student.pt"
STUDENT_PREDICTION = "v"
_GRID = 3  # seed-stream tag of the student's timesteps (the trainer's tags are 0-2)


def round_file(steps: int) -> str:
    """The file that keeps the student of ``steps`` network calls once its round ends."""
    return f"student-{steps}.pt"


def output_names(plan: DistillConfig) -> list[str]:
    """Every file a run of ``plan`` writes into its folder (previews aside)."""
    rounds = [round_file(plan.student_steps(r)) for r in range(plan.rounds)]
    return [STUDENT_NAME, LOG_NAME, *rounds]


def ddim_step(net: nn.Module, prediction: str, x: torch.Tensor, t: torch.Tensor,
              ab: torch.Tensor, ab_next: torch.Tensor, clip=(-1.0, 1.0)) -> torch.Tensor:
    """The runtime's DDIM step (eta 0) in torch, one row per timestep: x_0 from the
    network's output, clipped, eps re-derived from it, then x at the next timestep
    (``ab_next`` 1: x_0 itself). ``ab``, ``ab_next``: float64 [B] alphas_cumprod."""
    a, s = _rows(ab.sqrt(), x), _rows((1 - ab).sqrt(), x)
    out = net(x, t.to(torch.float32)).float()
    if prediction == "eps":
        x0 = (x - s * out) / a
    elif prediction == "v":
        x0 = a * x - s * out
    else:
        x0 = out
    x0 = x0.clamp(*clip)
    eps = (x - a * x0) / s
    return _rows(ab_next.sqrt(), x) * x0 + _rows((1 - ab_next).sqrt(), x) * eps


def v_target(x_t: torch.Tensor, x_end: torch.Tensor, ab: torch.Tensor,
             ab_end: torch.Tensor) -> torch.Tensor:
    """The v whose one DDIM step from x_t (at ``ab``) lands on ``x_end`` (at ``ab_end``):
    x_end = sqrt(ab_end) x_0 + sqrt(1 - ab_end) (x_t - sqrt(ab) x_0) / sqrt(1 - ab) solved
    for x_0, then v = (sqrt(ab) x_t - x_0) / sqrt(1 - ab). Coefficients in float64."""
    ratio = ((1 - ab_end) / (1 - ab)).sqrt()
    denom = ab_end.sqrt() - ratio * ab.sqrt()
    x0 = _rows(1 / denom, x_t) * x_end - _rows(ratio / denom, x_t) * x_t
    return (_rows(ab.sqrt(), x_t) * x_t - x0) / _rows((1 - ab).sqrt(), x_t)


def _rows(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-row float64 coefficients [B], rounded once to x's dtype, shaped to broadcast."""
    return extract(coef, slice(None), x)


class Round:
    """One round's timesteps: the teacher's grid of 2n (ascending; the student's n are its
    odd points) and, per grid point, the alphas_cumprod of that point and of the point its
    step lands on (1 for the first: the step to x_0)."""

    def __init__(self, plan: DistillConfig, index: int, alphas_cumprod: torch.Tensor):
        self.index = index
        self.steps = plan.student_steps(index)
        T = alphas_cumprod.numel()
        teacher = spaced_timesteps(T, 2 * self.steps, plan.spacing)
        if not np.array_equal(teacher[1::2], spaced_timesteps(T, self.steps, plan.spacing)):
            raise AssertionError(f"{plan.spacing} grids of {self.steps} and {2 * self.steps} "
                                 "steps do not nest")  # DISTILL_SPACINGS says they do
        device = alphas_cumprod.device
        self.t = torch.as_tensor(teacher, device=device)
        self.ab = alphas_cumprod[self.t]
        self.ab_next = torch.cat([torch.ones(1, dtype=self.ab.dtype, device=device),
                                  self.ab[:-1]])


class Distiller(Trainer):
    """A progressive distillation run in this process: build, optionally ``load_state``,
    then ``fit``. ``teacher``: the round-0 teacher network, returning ``teacher_prediction``;
    the student starts as a copy of it. ``train_config``: the optimizer's recipe for all
    rounds (``plan.train_config``). ``report(line)`` gets one line per finished round."""

    checkpoint_name = STUDENT_NAME

    def __init__(self, teacher: nn.Module, model_config: ModelConfig, train_config: TrainConfig,
                 plan: DistillConfig, dataset: Dataset, out_dir: str | Path, *,
                 teacher_sha256: str, teacher_prediction: str = "eps",
                 teacher_train_step: int = 0, device: torch.device | str = "cpu",
                 progress: bool = True, resuming: bool = False,
                 report: Callable[[str], Any] | None = None):
        if train_config.steps != plan.rounds * plan.round_steps:
            raise ValueError(f"train_config.steps must be {plan.rounds} rounds of "
                             f"{plan.round_steps} steps; build it with plan.train_config()")
        if plan.teacher_steps > train_config.num_timesteps:
            raise ValueError(f"{plan.teacher_steps} teacher steps are more than the schedule's "
                             f"{train_config.num_timesteps} timesteps")
        super().__init__(model_config, train_config, dataset, out_dir, device=device,
                         progress=progress, resuming=resuming, model=copy.deepcopy(teacher))
        self.plan = plan
        # Its own copy: each round overwrites it with the round's student.
        self.teacher = copy.deepcopy(teacher).to(self.device).eval().requires_grad_(False)
        self.teacher_prediction = teacher_prediction
        self.origin = {"teacher_sha256": teacher_sha256, "teacher_prediction": teacher_prediction,
                       "teacher_train_step": int(teacher_train_step)}
        self.ema = EMA(self.model, train_config.ema_decay, warmup=train_config.ema_warmup,
                       period=plan.round_steps)
        self.round_started_s = 0.0  # training time when the current round began
        self.report = report
        self.round = Round(plan, 0, self.st.alphas_cumprod)

    # === State ===

    def state_dict(self) -> dict[str, Any]:
        distill = {"config": self.plan.to_dict(), **self.origin,
                   "round_started_s": self.round_started_s}
        return student_checkpoint(super().state_dict(), prediction=STUDENT_PREDICTION,
                                  distill=distill, teacher=self.teacher.state_dict())

    def load_state(self, ckpt: dict[str, Any]) -> None:
        """Continue from a student checkpoint of this plan and teacher (call before fit)."""
        if not is_student(ckpt) or ckpt["distill"]["config"] != self.plan.to_dict():
            raise ValueError("the checkpoint is not a student of this distillation plan")
        super().load_state(ckpt)
        self.teacher.load_state_dict(ckpt["teacher"])
        # The teacher saved is that of the round of the last step taken (at a round's end,
        # the round that ended: the next promotes its student first).
        self.teacher_prediction = (self.origin["teacher_prediction"]
                                   if self.step <= self.plan.round_steps else STUDENT_PREDICTION)
        self.round_started_s = float(ckpt["distill"]["round_started_s"])

    # === One step ===

    def lr_at(self, step: int) -> float:
        """Each round warms up and decays on its own: a new student, a fresh Adam."""
        R = self.plan.round_steps
        return scheduled_lr(self.config, step % R, R)

    def batch(self, step: int):
        """(x_0, index into the student's grid, noise): the trainer's images and noise of
        ``step``, and a timestep of the round's student grid from its own seed stream."""
        x0, _, noise = super().batch(step)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(derive_seed(self.config.seed, _GRID, self.info.rank, step))
        k = torch.randint(0, self.round.steps, (len(x0),), generator=gen, device=self.device)
        return x0, k, noise

    def loss(self, net: nn.Module, batch) -> torch.Tensor:
        """The student's v error against the v that spans two teacher steps (the x_0 error
        weighted by 1 + SNR)."""
        x0, k, noise = batch
        rd = self.round
        m = 2 * k + 1  # the student's timestep on the teacher's grid
        x_t = q_sample(self.st, x0, rd.t[m], noise)
        with torch.no_grad():
            x_mid = ddim_step(self.teacher, self.teacher_prediction, x_t, rd.t[m], rd.ab[m],
                              rd.ab_next[m])
            x_end = ddim_step(self.teacher, self.teacher_prediction, x_mid, rd.t[m - 1],
                              rd.ab[m - 1], rd.ab_next[m - 1])
            target = v_target(x_t, x_end, rd.ab[m], rd.ab_next[m - 1])
        v = net(x_t, rd.t[m].to(torch.float32)).float()
        return torch.mean((v - target) ** 2)

    # === Rounds ===

    def fit(self) -> None:
        """Distil round by round until the plan's last; each round ends with its student
        saved (``student-N.pt``), logged, previewed and reported."""
        self.prepare_fit()
        R, rounds = self.plan.round_steps, self.plan.rounds
        while self.step < self.config.steps:
            index = self.step // R
            if self.step == index * R:  # the round starts here
                if index > 0:
                    self._promote()
                self.round_started_s = self.elapsed_s
            self.round = Round(self.plan, index, self.st.alphas_cumprod)
            n = self.round.steps
            bar = self.progress_bar(R, self.step - index * R,
                                    desc=f"round {index + 1}/{rounds}: {2 * n}->{n} steps")
            self.train_until((index + 1) * R, bar)

    def _promote(self) -> None:
        """The round's student (its EMA) becomes the next round's teacher and student;
        Adam starts afresh (its moments were the previous student's)."""
        weights = self.ema.state_dict()
        self.teacher.load_state_dict(weights)
        self.model.load_state_dict(weights)
        self.teacher_prediction = STUDENT_PREDICTION
        self.optimizer.state.clear()

    def log_fields(self) -> dict[str, Any]:
        return {"round": self.round.index + 1, "student_steps": self.round.steps}

    def save(self) -> Path:
        """The checkpoint; at a round's end first the round's student file and the round's
        log record (a crash between them repeats the round's end on resume)."""
        R = self.plan.round_steps
        if self.step % R == 0 and self.info.is_main:
            self.check_finite()
            n = self.round.steps
            seconds = self.elapsed_s - self.round_started_s
            append_log(self.out_dir / LOG_NAME, {
                "step": self.step, "round": self.round.index + 1, "round_done": True,
                "teacher_steps": 2 * n, "student_steps": n, "round_steps": R,
                "round_s": seconds, "steps_per_s": R / max(seconds, 1e-9),
                "elapsed_s": self.elapsed_s})
            path = self.out_dir / round_file(n)
            save_checkpoint(path, without_run_state(self.state_dict()))
            if self.report is not None:
                self.report(f"round {self.round.index + 1}/{self.plan.rounds}: {2 * n} -> {n} "
                            f"DDIM steps, {R} steps in {seconds / 60:.1f} min "
                            f"({R / max(seconds, 1e-9):.1f} steps/s) -> {path}")
        return super().save()

    def preview(self) -> Path | None:
        """The round's student (EMA) with its own sampler, steps and timesteps."""
        if not self.info.is_main:
            return None
        n, cfg = self.round.steps, self.config
        return write_preview(self.out_dir / f"samples_{n:04d}steps.png", self.ema.model,
                             self.schedule, count=cfg.preview_count, steps=n,
                             image_shape=self.dataset.image_shape, seed=cfg.seed,
                             device=self.device, sampler="ddim", spacing=self.plan.spacing,
                             prediction=STUDENT_PREDICTION)


def distill(teacher_ckpt: dict[str, Any], plan: DistillConfig, train_config: TrainConfig,
            dataset: Dataset, out_dir: str | Path, *, teacher_sha256: str, device: str = "auto",
            resume_from: dict[str, Any] | None = None, progress: bool = True,
            threads: int | None = None, report=None) -> Distiller:
    """Run (or continue) a distillation in this process from a loaded teacher checkpoint
    (its EMA weights; a student checkpoint continues from its own steps)."""
    info = dist_info_from_env()
    if info.enabled:
        raise DeviceError("distillation runs in one process; start it without torchrun")
    torch_device = run_device(info, device, resume_from, threads)
    prediction = teacher_ckpt.get("prediction", "eps") if is_student(teacher_ckpt) else "eps"
    model_config = ModelConfig.from_dict(teacher_ckpt["model_config"])
    distiller = Distiller(build_model(teacher_ckpt), model_config, train_config, plan, dataset,
                          out_dir, teacher_sha256=teacher_sha256, teacher_prediction=prediction,
                          teacher_train_step=steps_behind(teacher_ckpt),
                          device=torch_device, progress=progress,
                          resuming=resume_from is not None, report=report)
    if resume_from is not None:
        distiller.load_state(resume_from)
    distiller.fit()
    return distiller

