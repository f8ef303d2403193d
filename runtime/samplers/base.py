"""The sampler interface and its registry.

A sampler walks one (respaced) schedule from x_T to x_0 over its own rows of a batch.
The caller owns the network and the loop: it feeds the network ``sampler.t`` (the
original T-step index of the current step), draws noise when ``sampler.needs_noise``,
and calls ``sampler.step(x, eps, noise)``, which updates the float32 state ``x`` in
place. Everything a step needs (coefficient tables, a multistep solver's history) is
built in ``__init__``, so a step allocates nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from ..options import Option, check_schema
from ..schedule import Schedule

REGISTRY: dict[str, type[Sampler]] = {}


def register(cls: type[Sampler]) -> type[Sampler]:
    """Class decorator: make ``cls`` available under ``cls.name`` everywhere samplers are
    listed, with its ``options`` as flags, JSON fields and manifest entries."""
    if cls.name in REGISTRY:
        raise ValueError(f"sampler {cls.name!r} is registered twice")
    check_schema(cls.name, tuple(cls.options), {n: tuple(c.options) for n, c in REGISTRY.items()})
    REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a sampler (tests that register their own call this when done)."""
    REGISTRY.pop(name, None)


class Sampler:
    """One sampling run of ``schedule`` over a batch of ``shape`` ([B, ...]).

    Subclasses set ``name`` and ``summary``, declare the keyword options their ``__init__``
    takes in ``options`` (:class:`~runtime.options.Option`: name, type, default, bounds),
    and implement :meth:`_step`. Step ``k`` (0-based, in calling
    order) stands for schedule index ``num_steps - 1 - k``.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    # A step depends on the current state only, so the run may be set back to an earlier
    # step (inpainting's resampling jumps): True unless a step reads earlier steps' outputs.
    restartable: ClassVar[bool] = True

    def __init__(self, schedule: Schedule, shape: Sequence[int], *, clip_x0: bool = True,
                 clip_range=(-1.0, 1.0)):
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"shape must be [B, ...] with positive sizes, got {shape}")
        lo, hi = float(clip_range[0]), float(clip_range[1])
        if not lo < hi:
            raise ValueError(f"clip_range must be (low, high) with low < high, got {clip_range}")
        self.schedule = schedule
        self.shape = shape
        self.clip = (lo, hi) if clip_x0 else None
        self.num_steps = schedule.num_timesteps
        # The network's t for each step, in calling order (original T-step indices).
        self.timesteps = schedule.timesteps[::-1].astype(np.float32)
        self.k = 0

    @property
    def done(self) -> bool:
        return self.k >= self.num_steps

    @property
    def index(self) -> int:
        """The schedule index of the current step."""
        return self.num_steps - 1 - self.k

    @property
    def t(self) -> float:
        """The network's t for the current step."""
        if self.done:
            raise IndexError(f"the sampler has taken all {self.num_steps} steps")
        return float(self.timesteps[self.k])

    @property
    def needs_noise(self) -> bool:
        """Whether the current step takes fresh N(0, I) noise."""
        return False

    def step(self, x: np.ndarray, eps: np.ndarray, noise: np.ndarray | None = None) -> None:
        """Advance ``x`` (float32, this sampler's rows, updated in place) by one step."""
        if self.done:
            raise IndexError(f"the sampler has taken all {self.num_steps} steps")
        if x.shape != self.shape or eps.shape != self.shape or x.dtype != np.float32:
            raise ValueError(f"{self.name} steps float32 x and eps of shape {self.shape}, got "
                             f"x {x.dtype} {x.shape} and eps {eps.shape}")
        if noise is None and self.needs_noise:
            raise ValueError(f"step {self.k} of {self.name} needs noise")
        self._step(x, eps, noise)
        self.k += 1

    def _step(self, x: np.ndarray, eps: np.ndarray, noise: np.ndarray | None) -> None:
        raise NotImplementedError


def make_sampler(name: str, schedule: Schedule, shape: Sequence[int], *, clip_x0: bool = True,
                 clip_range=(-1.0, 1.0), **options) -> Sampler:
    """Build the registered sampler ``name`` with ``options`` checked against its schema
    (:meth:`runtime.options.SampleOptions.make`: None or another sampler's default is left
    out, anything else it does not take is an error)."""
    from ..options import SampleOptions

    checked = SampleOptions.make(sampler_class(name).name, **options)
    return REGISTRY[name](schedule, shape, clip_x0=clip_x0, clip_range=clip_range,
                          **checked.kwargs)


def sampler_class(name: str) -> type[Sampler]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown sampler {name!r}; expected one of {tuple(REGISTRY)}") from None
