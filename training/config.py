"""Model and training configurations, and the presets the paper (and this repo) use.

Both dataclasses are written into every checkpoint as plain dicts (``to_dict``), so a
checkpoint alone rebuilds the network and the run (``from_dict``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from runtime.metadata import MAX_CHANNELS, MAX_IMAGE_SIDE, check_schedule
from runtime.schedule import Schedule

SCHEDULE_KINDS = ("linear", "cosine")
MAX_WIDTH = 8192
MAX_RES_BLOCKS = 32
MAX_LEVELS_DOWN = 12
LR_DECAYS = ("none", "cosine")
MAX_SEED = 2**63 - 1
# Adam moves each weight by about lr per step; beyond 1 a step outweighs any trained weight.
MAX_LR = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """The paper's U-Net (Ho et al. 2020, appendix B), sized by a handful of numbers."""

    image_size: int  # height = width of the images; divisible by 2 ** (len(ch_mult) - 1)
    in_channels: int  # 1 for grey-scale digits, 3 for RGB; the output has as many
    ch: int  # base width; level i has ch * ch_mult[i] channels, the time embedding 4 * ch
    ch_mult: tuple[int, ...]  # one multiplier per resolution; each further level halves H, W
    num_res_blocks: int  # residual blocks per level going down (the up path has one more)
    attn_resolutions: tuple[int, ...]  # feature-map sizes (e.g. 16) that get self-attention
    dropout: float  # in every residual block, between its two convolutions
    num_groups: int = 32  # GroupNorm groups, the paper's 32; must divide every width

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        for name in ("image_size", "in_channels", "ch", "num_res_blocks", "num_groups"):
            value = getattr(self, name)
            if _bad_int(value, minimum=1):
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"ModelConfig.ch_mult must be positive integers, got {self.ch_mult}")
        # Sizes far above any real U-Net (the paper's widest level is 256 channels, 6
        # levels, 2 blocks), checked before a network is built from a file's numbers.
        for name, value, limit in (
                ("image_size", self.image_size, MAX_IMAGE_SIDE),
                ("in_channels", self.in_channels, MAX_CHANNELS),
                ("num_res_blocks", self.num_res_blocks, MAX_RES_BLOCKS),
                ("len(ch_mult)", len(self.ch_mult), MAX_LEVELS_DOWN),
                ("width ch * max(ch_mult)", self.ch * max(self.ch_mult), MAX_WIDTH)):
            if value > limit:
                raise ValueError(f"ModelConfig.{name} is {value}, more than {limit}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must lie in [0, 1), got {self.dropout}")
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size {self.image_size} cannot be halved {len(self.ch_mult) - 1} times "
                f"(ch_mult {self.ch_mult}); use a multiple of {factor}"
            )
        for width in {self.ch * m for m in self.ch_mult}:
            if width % self.num_groups:
                raise ValueError(
                    f"num_groups {self.num_groups} does not divide width {width} "
                    f"(ch {self.ch} x ch_mult {self.ch_mult})"
                )

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map size at each level, e.g. (32, 16, 8, 4) for CIFAR-10."""
        return tuple(self.image_size // 2**i for i in range(len(self.ch_mult)))

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(**_known_fields(cls, d))


@dataclass(frozen=True)
class TrainConfig:
    """The paper's training recipe; the defaults are its CIFAR-10 run."""

    lr: float = 2e-4  # Adam step size after warmup (the paper's CIFAR-10 value)
    warmup: int = 5000  # steps of linear learning-rate warmup from 0
    lr_decay: str = "none"  # after warmup: "none" (the paper's constant lr) or "cosine" to 0
    batch_size: int = 128  # global batch; split evenly over DDP ranks
    steps: int = 800_000  # total optimizer steps of the run (the paper's CIFAR-10 length)
    grad_clip: float = 1.0  # clip the global gradient norm to this
    ema_decay: float = 0.9999  # EMA of the weights used for sampling
    ema_warmup: bool = True  # decay_n = min(ema_decay, (1 + n) / (10 + n)): useful EMA early
    hflip: bool = False  # random horizontal flips (only for mirror-symmetric data)
    sample_every: int = 10_000  # steps between PNG grids of EMA samples (0: only at the end)
    save_every: int = 5000  # steps between checkpoints (always one at the end)
    log_every: int = 100  # steps between log.jsonl records
    seed: int = 0  # seeds data order, noise, t and dropout; rank r uses its own stream
    schedule_kind: str = "linear"  # beta schedule: "linear" (the paper's) or "cosine"
    num_timesteps: int = 1000  # T
    beta_start: float = 1e-4  # beta_1 of the linear schedule
    beta_end: float = 0.02  # beta_T of the linear schedule
    preview_count: int = 64  # images per preview grid
    preview_steps: int = 100  # respaced ancestral steps for previews (speed, not quality)

    def __post_init__(self):
        for name in ("warmup", "sample_every", "save_every", "seed"):
            if _bad_int(getattr(self, name), minimum=0):
                raise ValueError(f"TrainConfig.{name} must be an integer >= 0, "
                                 f"got {getattr(self, name)!r}")
        for name in ("batch_size", "steps", "log_every", "num_timesteps", "preview_count",
                     "preview_steps"):
            if _bad_int(getattr(self, name), minimum=1):
                raise ValueError(f"TrainConfig.{name} must be a positive integer, "
                                 f"got {getattr(self, name)!r}")
        if self.seed > MAX_SEED:
            raise ValueError(f"TrainConfig.seed must be at most 2**63 - 1 (torch's seed range), "
                             f"got {self.seed}")
        for name in ("lr", "grad_clip", "ema_decay", "beta_start", "beta_end"):
            value = getattr(self, name)
            if _bad_number(value):
                raise ValueError(f"TrainConfig.{name} must be a finite number, got {value!r}")
        if not 0 < self.lr <= MAX_LR:
            raise ValueError(f"TrainConfig.lr must lie in (0, {MAX_LR}], got {self.lr}")
        if not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0, got {self.grad_clip}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig.ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"TrainConfig.lr_decay must be one of {LR_DECAYS}, "
                             f"got {self.lr_decay!r}")
        if self.schedule_kind not in SCHEDULE_KINDS:
            raise ValueError(f"TrainConfig.schedule_kind must be one of {SCHEDULE_KINDS}, "
                             f"got {self.schedule_kind!r}")
        if self.preview_steps > self.num_timesteps:
            raise ValueError("TrainConfig.preview_steps cannot exceed num_timesteps")
        # The runtime's bounds (T, betas that sample in float32), before any training: a
        # schedule the exporter would refuse is refused here.
        try:
            check_schedule(self.schedule_config())
        except ValueError as err:
            raise ValueError(f"TrainConfig: {err}") from None

    def schedule_config(self) -> dict[str, Any]:
        """The schedule's config (``Schedule.config``) without building its tables."""
        config = {"kind": self.schedule_kind, "num_timesteps": self.num_timesteps}
        if self.schedule_kind == "linear":
            config.update(beta_start=self.beta_start, beta_end=self.beta_end)
        return config

    def schedule(self) -> Schedule:
        """The runtime's numpy schedule: the one source of the diffusion math."""
        if self.schedule_kind == "linear":
            return Schedule.linear(self.num_timesteps, beta_start=self.beta_start,
                                   beta_end=self.beta_end)
        return Schedule.cosine(self.num_timesteps)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls(**_known_fields(cls, d))


# What progressive distillation's grids can be: "trailing" keeps T-1, T-1-T/n, ..., and the
# grid of n steps is then exactly every other point of the grid of 2n (T - j T/n with the
# same rounding), so a student's step spans two of its teacher's. Every other spacing
# (linspace, leading, quadratic) rounds the halved grid off its parent's.
DISTILL_SPACINGS = ("trailing",)


@dataclass(frozen=True)
class DistillConfig:
    """Progressive distillation's plan (Salimans & Ho 2022): the teacher's deterministic
    sampler (DDIM, eta 0) at ``teacher_steps`` network calls, halved each round down to the
    student's ``steps``, with ``round_steps`` optimizer steps per round; then, when
    ``match_steps`` > 0, that many steps of distribution matching (training/distiller.py)
    at Adam's ``match_lr``. The optimizer's recipe (lr, batch, EMA, seed) is a TrainConfig,
    as for training."""

    teacher_steps: int = 32  # the first round's teacher: DDIM with this many calls
    steps: int = 4  # the last round's student: teacher_steps / 2**rounds calls
    round_steps: int = 1500  # optimizer steps per round
    spacing: str = "trailing"  # which timesteps each grid keeps (DISTILL_SPACINGS)
    match_steps: int = 0  # distribution matching after the rounds (0: none)
    match_lr: float = 5e-5

    def __post_init__(self):
        for name in ("teacher_steps", "steps", "round_steps"):
            if _bad_int(getattr(self, name), minimum=1):
                raise ValueError(f"DistillConfig.{name} must be a positive integer, "
                                 f"got {getattr(self, name)!r}")
        if _bad_int(self.match_steps, minimum=0):
            raise ValueError(f"DistillConfig.match_steps must be an integer >= 0, got "
                             f"{self.match_steps!r}")
        lr = self.match_lr
        if _bad_number(lr) or not 0 < lr <= MAX_LR:
            raise ValueError(f"DistillConfig.match_lr must be a number in (0, {MAX_LR}], got "
                             f"{lr!r}")
        ratio = self.teacher_steps // self.steps
        if self.teacher_steps % self.steps or ratio < 2 or ratio & (ratio - 1):
            halves, n = [], self.teacher_steps
            while n % 2 == 0:
                n //= 2
                halves.append(str(n))
            fix = (f"choose one of {', '.join(halves)}" if halves else
                   "choose teacher steps that are the student's times a power of two")
            raise ValueError(f"the student's {self.steps} steps are not the teacher's "
                             f"{self.teacher_steps} halved one or more times (each round halves "
                             f"them); {fix}")
        if self.spacing not in DISTILL_SPACINGS:
            raise ValueError(f"DistillConfig.spacing must be one of {DISTILL_SPACINGS}, got "
                             f"{self.spacing!r}")

    @property
    def rounds(self) -> int:
        return (self.teacher_steps // self.steps).bit_length() - 1

    def student_steps(self, round_index: int) -> int:
        """The network calls of round ``round_index``'s student (0-based)."""
        return self.teacher_steps >> (round_index + 1)

    @property
    def rounds_end(self) -> int:
        """The step at which the last progressive round ends (matching, if any, follows)."""
        return self.rounds * self.round_steps

    @property
    def total_steps(self) -> int:
        return self.rounds_end + self.match_steps

    def matching(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) is one of distribution matching."""
        return step >= self.rounds_end

    def with_matching(self, done: int, **matching) -> DistillConfig:
        """The plan a run ``done`` steps in continues with: ``matching`` (match_steps,
        match_lr) replace its own until its matching begins, and are ignored after."""
        return self.replace(**matching) if done <= self.rounds_end else self

    def train_config(self, base: TrainConfig, **recipe) -> TrainConfig:
        """The optimizer's recipe: ``base`` (the teacher's, for its schedule and data
        augmentation) with DISTILL_RECIPE, then ``recipe``, for all rounds together."""
        return base.replace(**{**DISTILL_RECIPE, **recipe, "steps": self.total_steps})

    def replace(self, **changes) -> DistillConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillConfig:
        return cls(**_known_fields(cls, d))


# Distillation's optimizer recipe for every round (each a fresh Adam; the lr warms up and
# decays to 0 along a cosine within each round, and the EMA restarts with it).
DISTILL_RECIPE = {"lr": 3e-4, "warmup": 50, "lr_decay": "cosine", "batch_size": 128,
                  "ema_decay": 0.999, "sample_every": 0, "save_every": 500, "log_every": 50}


def _bad_int(value, *, minimum: int) -> bool:
    return isinstance(value, bool) or not isinstance(value, int) or value < minimum


def _bad_number(value) -> bool:
    """Not a finite int or float (a bool is not a number here)."""
    return isinstance(value, bool) or not isinstance(value, (int, float)) \
        or not math.isfinite(value)


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _known_fields(cls, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    return dict(d)


# === Presets ===

PRESETS: dict[str, tuple[ModelConfig, TrainConfig]] = {
    # scikit-learn's 8x8 digits, sized for `python training/train.py` on a 2-core CPU.
    # Measured there (batch 128, fwd+bwd+Adam): ch 32 with two levels (8x8, 4x4) runs
    # ~7 steps/s on one idle AVX-512 core and ~10 on two (tools/train_bench.py): twice as
    # fast as three levels (8, 4, 2) and 3-4x ch 64; a 4x4 map with attention already sees
    # the whole digit. Dropout cost ~8% of a step and the short run does not overfit, so it
    # is off.
    # lr 1e-3: 5x the paper's, fine for a 1M-parameter net with clipping. The EMA's warmup
    # rule (1 + n) / (10 + n) stays below 0.999 until step ~9000, so in this run the EMA
    # always averages about the last tenth of the steps; longer averages sampled worse.
    # Sampled with the full 1000-step chain, the Frechet distance (MLP digit-classifier
    # features, N=500) was ~1.0-1.1x the real-vs-real floor at both 3000 and 6000 steps,
    # so 4000 steps keeps a margin in quality. Every cheaper recipe measured (fewer steps,
    # cosine decay, batch 64, one residual block per level, a narrower 4x4 level) kept FD
    # but lowered digit-IS (README, Training speed).
    "digits": (
        ModelConfig(image_size=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=2,
                    attn_resolutions=(4,), dropout=0.0, num_groups=8),
        TrainConfig(lr=1e-3, warmup=200, batch_size=128, steps=4000, ema_decay=0.999,
                    hflip=False, sample_every=1000, save_every=1000, log_every=50),
    ),
    # The paper's CIFAR-10 model: 35.7M parameters.
    "cifar10": (
        ModelConfig(image_size=32, in_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                    attn_resolutions=(16,), dropout=0.1),
        TrainConfig(hflip=True),
    ),
    # The paper's 256x256 model (CelebA-HQ, LSUN): lr 2e-5 and batch 64 per its appendix B.
    "celebahq256": (
        ModelConfig(image_size=256, in_channels=3, ch=128, ch_mult=(1, 1, 2, 2, 4, 4),
                    num_res_blocks=2, attn_resolutions=(16,), dropout=0.0),
        TrainConfig(lr=2e-5, batch_size=64, steps=500_000, hflip=True),
    ),
}


def preset(name: str) -> tuple[ModelConfig, TrainConfig]:
    """The (model, training) configuration of a named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]
