"""DDPM's ancestral sampler (Ho et al. 2020, Algorithm 2), through the posterior."""

from __future__ import annotations

import numpy as np

from ..schedule import Schedule
from .base import Sampler, predict_x0, register


def ancestral_update(x, eps, noise, recip, recipm1, c1, c2, sigma, clip, out, tmp):
    """One ancestral step into ``out`` (float64); the coefficients are scalars or per row.

    1. x_0 from eps, eq. (15) solved for x_0, clipped to the data range if ``clip``;
    2. the posterior mean, eq. (7): c1 x_0 + c2 x_t;
    3. + sigma z where ``noise`` is given.
    :meth:`Schedule.step` and :class:`DDPM` both call this: one copy of the math.
    """
    predict_x0(x, eps, recip, recipm1, clip, out, tmp)
    np.multiply(out, c1, out=out)
    np.multiply(x, c2, out=tmp, dtype=np.float64)
    np.add(out, tmp, out=out)
    if noise is not None:
        np.multiply(noise, sigma, out=tmp, dtype=np.float64)
        np.add(out, tmp, out=out)
    return out


@register
class DDPM(Sampler):
    """``variance``: "fixedlarge" (sigma^2 = beta) or "fixedsmall" (the posterior's)."""

    name = "ddpm"
    summary = "the paper's ancestral sampler; needs all T steps for its best quality"
    options = ("variance",)

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
