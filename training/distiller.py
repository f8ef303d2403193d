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

Then, with ``plan.match_steps`` > 0, distribution matching (DMD, Yin et al. 2024) at the
last round's step count: a copy of the ODE can be no better than the ODE, and this
teacher's DDIM ODE scores lower than its ancestral chain on how clearly each digit is
drawn. The student, sampled end to end through its n DDIM steps with gradients, is moved
along the difference between two denoisers of its own samples noised at random t: the
original ε-teacher (the score of the data the chain samples) and a "fake" copy of it that
keeps learning the student's current samples (``MATCH_FAKE_UPDATES`` steps each). Where
the two differ, the student's samples are not yet the data's; the step pulls them toward
the teacher's answer. No data is used: the student draws from noise alone.

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
from .diffusion import extract, loss_simple, q_sample
from .distributed import DeviceError, dist_info_from_env
from .ema import EMA
from .preview import write_preview
from .trainer import LOG_NAME, Trainer, append_log, derive_seed, run_device, scheduled_lr

STUDENT_NAME = "student.pt"
STUDENT_PREDICTION = "v"
_GRID = 3  # seed-stream tag of the student's timesteps (the trainer's tags are 0-2)
_MATCH = 4  # seed-stream tag of distribution matching's draws
# Distribution matching's fixed recipe (tried on the digits model; README, Distillation):
# the fake score takes this many Adam steps per student step, at this rate, so that it
# keeps up with the student (DMD2's two time scales)...
MATCH_FAKE_UPDATES = 3
MATCH_FAKE_LR = 1e-4
# ...both with Adam's first moment off, as DMD does for a moving target...
MATCH_BETAS = (0.0, 0.99)
# ...and the student's samples are noised at t in this share of the chain: at t ~ 0 the
# two denoisers return their input, at t ~ T the mean image.
MATCH_T = (0.02, 0.98)


def round_file(steps: int, matched: bool = False) -> str:
    """The file that keeps the student of ``steps`` network calls once its round (or its
    distribution matching) ends."""
    return f"student-{steps}{'-matched' if matched else ''}.pt"


def output_names(plan: DistillConfig) -> list[str]:
    """Every file a run of ``plan`` writes into its folder (previews aside)."""
    rounds = [round_file(plan.student_steps(r)) for r in range(plan.rounds)]
    matched = [round_file(plan.steps, matched=True)] if plan.match_steps else []
    return [STUDENT_NAME, LOG_NAME, *rounds, *matched]


def predict_x0(net: nn.Module, prediction: str, x: torch.Tensor, t: torch.Tensor,
               ab: torch.Tensor) -> torch.Tensor:
    """The x_0 a network returning ``prediction`` implies at x (t per row, ``ab``: its
    float64 alphas_cumprod [B]), unclipped."""
    a, s = _rows(ab.sqrt(), x), _rows((1 - ab).sqrt(), x)
    out = net(x, t.to(torch.float32)).float()
    if prediction == "eps":
        return (x - s * out) / a
    if prediction == "v":
        return a * x - s * out
    return out


def ddim_step(net: nn.Module, prediction: str, x: torch.Tensor, t: torch.Tensor,
              ab: torch.Tensor, ab_next: torch.Tensor, clip=(-1.0, 1.0)) -> torch.Tensor:
    """The runtime's DDIM step (eta 0) in torch, one row per timestep: x_0 from the
    network's output, clipped, eps re-derived from it, then x at the next timestep
    (``ab_next`` 1: x_0 itself). ``ab``, ``ab_next``: float64 [B] alphas_cumprod."""
    return ddim_move(x, predict_x0(net, prediction, x, t, ab).clamp(*clip), ab, ab_next)


def ddim_move(x: torch.Tensor, x0: torch.Tensor, ab: torch.Tensor,
              ab_next: torch.Tensor) -> torch.Tensor:
    """DDIM's deterministic move from x (at ``ab``) to ``ab_next`` given its x_0."""
    a, s = _rows(ab.sqrt(), x), _rows((1 - ab).sqrt(), x)
    eps = (x - a * x0) / s
    return _rows(ab_next.sqrt(), x) * x0 + _rows((1 - ab_next).sqrt(), x) * eps


def matching_gradient(x0: torch.Tensor, real_x0: torch.Tensor,
                      fake_x0: torch.Tensor) -> torch.Tensor:
    """DMD's per-pixel gradient of KL(student || data) with respect to a sample x0: the
    fake denoiser's answer minus the real one's (the difference of the two scores, up to
    a positive factor per t), normalised per image by x0's mean distance from the real
    answer so that every t weighs alike."""
    scale = (x0 - real_x0).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
    return (fake_x0 - real_x0) / scale.clamp_min(1e-4)


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


def student_grid(plan: DistillConfig, alphas_cumprod: torch.Tensor):
    """The final student's sampler: its timesteps, noisiest first, and per step the
    alphas_cumprod it starts from and lands on (1 after the last: x_0)."""
    t = torch.as_tensor(spaced_timesteps(alphas_cumprod.numel(), plan.steps,
                                         plan.spacing)[::-1].copy(),
                        device=alphas_cumprod.device)
    ab = alphas_cumprod[t]
    return t, ab, torch.cat([ab[1:], torch.ones(1, dtype=ab.dtype, device=ab.device)])


class Distiller(Trainer):
    """A progressive distillation run in this process: build, optionally ``load_state``,
    then ``fit``. ``teacher``: the round-0 teacher network, returning ``teacher_prediction``;
    the student starts as a copy of it. ``train_config``: the optimizer's recipe for all
    rounds (``plan.train_config``). ``report(line)`` gets one line per finished round.
    A plan with ``match_steps`` needs an ε-network teacher: it is the matching's score."""

    checkpoint_name = STUDENT_NAME

    def __init__(self, teacher: nn.Module, model_config: ModelConfig, train_config: TrainConfig,
                 plan: DistillConfig, dataset: Dataset, out_dir: str | Path, *,
                 teacher_sha256: str, teacher_prediction: str = "eps",
                 teacher_train_step: int = 0, device: torch.device | str = "cpu",
                 progress: bool = True, resuming: bool = False,
                 report: Callable[[str], Any] | None = None):
        if train_config.steps != plan.total_steps:
            raise ValueError(f"train_config.steps must be {plan.rounds} rounds of "
                             f"{plan.round_steps} steps and {plan.match_steps} of matching; "
                             "build it with plan.train_config()")
        if plan.match_steps and teacher_prediction != "eps":
            raise ValueError("distribution matching needs the ε-network the students come "
                             "from as its score, not a student; distil from it")
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
        self.ema = EMA(self.model, train_config.ema_decay, warmup=train_config.ema_warmup)
        self.round_started_s = 0.0  # training time when the current round began
        self.report = report
        self.round = Round(plan, 0, self.st.alphas_cumprod)
        if plan.match_steps:
            # The data's score (frozen) and the student's, learnt as the student moves.
            self.score = copy.deepcopy(teacher).to(self.device).eval().requires_grad_(False)
            self.fake = copy.deepcopy(teacher).to(self.device).train()
            self.fake_optimizer = torch.optim.Adam(
                self.fake.parameters(), lr=MATCH_FAKE_LR, betas=MATCH_BETAS,
                fused=self.device.type in ("cpu", "cuda"))
            self.grid = student_grid(plan, self.st.alphas_cumprod)
            # The rounds' warmup, then match_lr held (no decay): the trainer's one rule.
            self.match_recipe = self.config.replace(lr=plan.match_lr, lr_decay="none")
        # The student's last samples and the fake score's draws, for its steps.
        self._samples = None

    # === State ===

    def state_dict(self) -> dict[str, Any]:
        distill = {"config": self.plan.to_dict(), **self.origin,
                   "round_started_s": self.round_started_s}
        matching = ({"fake": self.fake.state_dict(),
                     "fake_optimizer": self.fake_optimizer.state_dict()}
                    if self.plan.match_steps else {})
        return student_checkpoint(super().state_dict(), prediction=STUDENT_PREDICTION,
                                  distill=distill, teacher=self.teacher.state_dict(),
                                  **matching)

    def load_state(self, ckpt: dict[str, Any]) -> None:
        """Continue from a student checkpoint of this plan and teacher (call before fit)."""
        if not is_student(ckpt):
            raise ValueError("the checkpoint is not a distilled student")
        theirs = DistillConfig.from_dict(ckpt["distill"]["config"]).with_matching(
            ckpt["step"], match_steps=self.plan.match_steps, match_lr=self.plan.match_lr)
        if theirs != self.plan:
            raise ValueError("the checkpoint is not a student of this distillation plan")
        super().load_state(ckpt)
        self.teacher.load_state_dict(ckpt["teacher"])
        # The teacher saved is that of the round of the last step taken (at a round's end,
        # the round that ended: the next promotes its student first).
        self.teacher_prediction = (self.origin["teacher_prediction"]
                                   if self.step <= self.plan.round_steps else STUDENT_PREDICTION)
        self.round_started_s = float(ckpt["distill"]["round_started_s"])
        if self.plan.match_steps and "fake" in ckpt:  # absent until matching begins
            self.fake.load_state_dict(ckpt["fake"])
            self.fake_optimizer.load_state_dict(ckpt["fake_optimizer"])

    # === One step ===

    def phase_start(self, step: int) -> int:
        """The first step of the round (or of the matching) that ``step`` belongs to."""
        plan = self.plan
        return plan.rounds_end if plan.matching(step) else step - step % plan.round_steps

    def ema_updates(self, step: int) -> int:
        return step - self.phase_start(step)

    def lr_at(self, step: int) -> float:
        """Each round warms up and decays on its own: a new student, a fresh Adam. The
        matching warms up to ``plan.match_lr`` and stays there."""
        k = step - self.phase_start(step)
        if self.plan.matching(step):
            return scheduled_lr(self.match_recipe, k, self.plan.match_steps)
        return scheduled_lr(self.config, k, self.plan.round_steps)

    def batch(self, step: int):
        """(x_0, index into the student's grid, noise): the trainer's images and noise of
        ``step``, and a timestep of the round's student grid from its own seed stream.
        Matching: :meth:`matching_batch`."""
        if self.plan.matching(step):
            return self.matching_batch(step)
        x0, _, noise = super().batch(step)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(derive_seed(self.config.seed, _GRID, self.info.rank, step))
        k = torch.randint(0, self.round.steps, (len(x0),), generator=gen, device=self.device)
        return x0, k, noise

    def matching_batch(self, step: int):
        """(z, t, noise, fake_t, fake_noise) of a matching step, from its own seed stream:
        the student's x_T, the t and noise its samples are diffused with, and those of the
        fake score's ``MATCH_FAKE_UPDATES`` steps."""
        b, shape = self.local_batch, self.dataset.image_shape
        gen = torch.Generator(device=self.device)
        gen.manual_seed(derive_seed(self.config.seed, _MATCH, self.info.rank, step))
        T = self.schedule.num_timesteps
        lo, hi = int(MATCH_T[0] * T), max(int(MATCH_T[1] * T), int(MATCH_T[0] * T) + 1)

        def draw(*lead):
            return torch.randn((*lead, b, *shape), generator=gen, device=self.device)

        z, noise = draw(), draw()
        t = torch.randint(lo, hi, (b,), generator=gen, device=self.device)
        fake_t = torch.randint(0, T, (MATCH_FAKE_UPDATES, b), generator=gen, device=self.device)
        return z, t, noise, fake_t, draw(MATCH_FAKE_UPDATES)

    def loss(self, net: nn.Module, batch) -> torch.Tensor:
        """The student's v error against the v that spans two teacher steps (the x_0 error
        weighted by 1 + SNR); in matching, :meth:`matching_loss`."""
        if self.plan.matching(self.step):  # the step being taken
            return self.matching_loss(net, batch)
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

    def student_x0(self, net: nn.Module, z: torch.Tensor) -> torch.Tensor:
        """The student's sample from x_T = z under its own DDIM, differentiable through
        every step; its last x_0 unclipped (the runtime clips it to the data range)."""
        t, ab, ab_next = self.grid
        x, rows = z, len(z)
        for k in range(len(t)):
            x0 = predict_x0(net, STUDENT_PREDICTION, x, t[k].expand(rows), ab[k].expand(rows))
            if k == len(t) - 1:
                return x0
            x = ddim_move(x, x0.clamp(-1.0, 1.0), ab[k].expand(rows), ab_next[k].expand(rows))
        raise AssertionError("a student takes at least one step")

    def matching_loss(self, net: nn.Module, batch) -> torch.Tensor:
        """A loss whose gradient on each sample is :func:`matching_gradient` (its value:
        half that gradient's mean square). Keeps the samples for the fake score's steps."""
        z, t, noise, fake_t, fake_noise = batch
        x0 = self.student_x0(net, z)
        with torch.no_grad():
            sample = x0.clamp(-1.0, 1.0)
            ab = self.st.alphas_cumprod[t]
            x_t = q_sample(self.st, sample, t, noise)
            real = predict_x0(self.score, "eps", x_t, t, ab).clamp(-1.0, 1.0)
            fake = predict_x0(self.fake, "eps", x_t, t, ab).clamp(-1.0, 1.0)
            grad = matching_gradient(sample, real, fake)
        self._samples = (sample, fake_t, fake_noise)
        return 0.5 * torch.mean((x0 - (x0 - grad).detach()) ** 2)

    def train_step(self, net: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The trainer's step; in matching, then the fake score's steps on the samples the
        student just drew (L_simple, as the teacher was trained)."""
        out = super().train_step(net)
        if self._samples is not None:
            sample, fake_t, fake_noise = self._samples
            self._samples = None
            for k in range(MATCH_FAKE_UPDATES):
                loss = loss_simple(self.fake, self.st, sample, fake_t[k], fake_noise[k])
                self.fake_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.fake_optimizer.step()
        return out

    # === Rounds ===

    def fit(self) -> None:
        """Distil round by round until the plan's last; each round ends with its student
        saved (``student-N.pt``), logged, previewed and reported."""
        self.prepare_fit()
        plan = self.plan
        R, rounds = plan.round_steps, plan.rounds
        while self.step < plan.rounds_end:
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
        if self.step < self.config.steps:  # distribution matching
            self.round = Round(plan, rounds - 1, self.st.alphas_cumprod)
            if self.step == plan.rounds_end:
                self._promote()
                for group in self.optimizer.param_groups:
                    group["betas"] = MATCH_BETAS
                self.round_started_s = self.elapsed_s
            bar = self.progress_bar(plan.match_steps, self.step - plan.rounds_end,
                                    desc=f"matching: {plan.steps} steps")
            self.train_until(self.config.steps, bar)

    def _promote(self) -> None:
        """The round's student (its EMA) becomes the next round's teacher and student (or
        the student that matching moves); Adam starts afresh (its moments were the
        previous student's)."""
        weights = self.ema.state_dict()
        self.teacher.load_state_dict(weights)
        self.model.load_state_dict(weights)
        self.teacher_prediction = STUDENT_PREDICTION
        self.optimizer.state.clear()

    def log_fields(self) -> dict[str, Any]:
        fields = {"round": self.round.index + 1, "student_steps": self.round.steps}
        if self.plan.matching(self.step - 1):
            fields["matching"] = True
        return fields

    def save(self) -> Path:
        """The checkpoint; at a round's end first the round's student file and the round's
        log record (a crash between them repeats the round's end on resume)."""
        plan = self.plan
        R = plan.round_steps
        round_end = self.step % R == 0 and self.step <= plan.rounds_end
        matching_end = plan.match_steps and self.step == plan.total_steps
        if (round_end or matching_end) and self.info.is_main:
            self.check_finite()
            n = self.round.steps
            seconds = self.elapsed_s - self.round_started_s
            steps = R if round_end else plan.match_steps
            per_s = steps / max(seconds, 1e-9)
            rate = f"{steps} steps in {seconds / 60:.1f} min ({per_s:.1f} steps/s)"
            record = {"step": self.step, "student_steps": n, "elapsed_s": self.elapsed_s,
                      "steps_per_s": per_s}
            if round_end:
                record.update(round=self.round.index + 1, round_done=True, teacher_steps=2 * n,
                              round_steps=R, round_s=seconds)
                line = f"round {self.round.index + 1}/{plan.rounds}: {2 * n} -> {n} DDIM steps"
            else:
                record.update(matching_done=True, match_steps=steps, match_s=seconds)
                line = f"distribution matching at {n} DDIM steps"
            append_log(self.out_dir / LOG_NAME, record)
            path = self.out_dir / round_file(n, matched=not round_end)
            save_checkpoint(path, without_run_state(self.state_dict()))
            if self.report is not None:
                self.report(f"{line}, {rate} -> {path}")
        return super().save()

    def preview(self) -> Path | None:
        """The round's student (EMA) with its own sampler, steps and timesteps."""
        if not self.info.is_main:
            return None
        n, cfg = self.round.steps, self.config
        tag = "_matched" if self.plan.matching(self.step - 1) else ""
        return write_preview(self.out_dir / f"samples_{n:04d}steps{tag}.png", self.ema.model,
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

