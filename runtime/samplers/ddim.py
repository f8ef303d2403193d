"""DDIM (Song et al. 2021): deterministic at eta = 0, ancestral at eta = 1."""

from __future__ import annotations

import numpy as np

from ..options import Option
from ..schedule import Schedule
from ..stepmath import ddim_update
from .base import Sampler, register


@register
class DDIM(Sampler):
    """``eta``: the noise scale, 0 (deterministic) to 1 (the ancestral variance)."""

    name = "ddim"
    summary = "deterministic at eta = 0; good from about 20 steps"
    # eta = 1 is DDPM's posterior variance. Above it a step adds more noise than the
    # posterior has, and near t = 0 sigma_t^2 exceeds 1 - alpha_bar_{t-1}: the direction
    # term takes the root of a negative number (eta > ~1.35 on the paper's schedule).
    options = (Option("eta", float, 0.0, "noise scale: 0 is deterministic, 1 has DDPM's "
                      "posterior variance", low=0.0, high=1.0),)

    def __init__(self, schedule: Schedule, shape, *, eta: float = 0.0, **kwargs):
        super().__init__(schedule, shape, **kwargs)
        s = schedule
        self.eta = float(eta)
        # Row i: sqrt(1/ab), sqrt(1/ab - 1), then the three of ddim_coefficients.
        self.table = np.concatenate([
            np.stack([s.sqrt_recip_alphas_cumprod, s.sqrt_recipm1_alphas_cumprod], axis=1),
            s.ddim_coefficients(eta)], axis=1)
        self.out = np.empty(self.shape, np.float64)
        self.tmp = np.empty(self.shape, np.float64)

    @property
    def needs_noise(self) -> bool:
        return self.eta > 0 and self.index > 0

    def _step(self, x, eps, noise):
        ddim_update(x, eps, noise if self.needs_noise else None, *self.table[self.index],
                    self.clip, self.out, self.tmp)
        np.copyto(x, self.out, casting="same_kind")
