"""DDPM's ancestral sampler (Ho et al. 2020, Algorithm 2), through the posterior."""

from __future__ import annotations

import numpy as np

from ..options import Option
from ..schedule import VARIANCES, Schedule
from ..stepmath import ancestral_update
from .base import Sampler, register


@register
class DDPM(Sampler):
    """``variance``: "fixedlarge" (sigma^2 = beta) or "fixedsmall" (the posterior's)."""

    name = "ddpm"
    summary = "the paper's ancestral sampler; needs all T steps for its best quality"
    options = (Option("variance", str, "fixedlarge", "the reverse step's variance: sigma^2 = "
                      "beta (fixedlarge) or the posterior's (fixedsmall)", choices=VARIANCES),)

    def __init__(self, schedule: Schedule, shape, *, variance: str = "fixedlarge", **kwargs):
        super().__init__(schedule, shape, **kwargs)
        s = schedule
        # Row i: sqrt(1/ab), sqrt(1/ab - 1), coef1, coef2, sigma.
        self.table = np.stack([s.sqrt_recip_alphas_cumprod, s.sqrt_recipm1_alphas_cumprod,
                               s.posterior_mean_coef1, s.posterior_mean_coef2,
                               s.sigma(variance)], axis=1)
        self.out = np.empty(self.shape, np.float64)
        self.tmp = np.empty(self.shape, np.float64)

    @property
    def needs_noise(self) -> bool:
        return self.index > 0

    def _step(self, x, eps, noise):
        ancestral_update(x, eps, noise if self.index > 0 else None, *self.table[self.index],
                         self.clip, self.out, self.tmp)
        np.copyto(x, self.out, casting="same_kind")
