"""DDIM (Song et al. 2021): deterministic at eta = 0, ancestral at eta = 1."""

from __future__ import annotations

import numpy as np

from ..schedule import Schedule
from .base import Sampler, predict_x0, register


def ddim_update(x, eps, noise, recip, recipm1, c1, c2, sigma, clip, out, tmp):
    """One DDIM step into ``out`` (float64); the coefficients are scalars or per row.

    1. x_0 from eps, clipped if ``clip``; 2. eps re-derived from the clipped x_0 so the
    two agree; 3. eq. (12): c1 x_0 + c2 eps + sigma z with c1 = sqrt(ab_prev) and
    c2 = sqrt(1 - ab_prev - sigma^2). :meth:`Schedule.ddim_step` and :class:`DDIM` both
    call this: one copy of the math.
    """
    predict_x0(x, eps, recip, recipm1, clip, out, tmp)
    if clip is not None:
        np.subtract(tmp, out, out=tmp)
        np.divide(tmp, recipm1, out=tmp)
        np.multiply(tmp, c2, out=tmp)
    else:
        np.multiply(eps, c2, out=tmp, dtype=np.float64)
    np.multiply(out, c1, out=out)
    np.add(out, tmp, out=out)
    if noise is not None:
        np.multiply(noise, sigma, out=tmp, dtype=np.float64)
        np.add(out, tmp, out=out)
    return out


def ddim_coefficients(schedule: Schedule, eta: float) -> np.ndarray:
    """Per step: sqrt(ab_prev), sqrt(1 - ab_prev - sigma^2), sigma (eq. 16 of Song et al.)."""
    sigma = schedule.ddim_sigma(eta)
    ab_prev = schedule.alphas_cumprod_prev
    return np.stack([np.sqrt(ab_prev), np.sqrt(np.maximum(1.0 - ab_prev - sigma**2, 0.0)),
                     sigma], axis=1)


@register
class DDIM(Sampler):
    """``eta``: the noise scale, 0 (deterministic) to 1 (the ancestral variance)."""

    name = "ddim"
    summary = "deterministic at eta = 0; good from about 20 steps"
    options = ("eta",)

    def __init__(self, schedule: Schedule, shape, *, eta: float = 0.0, **kwargs):
        super().__init__(schedule, shape, **kwargs)
        s = schedule
        self.eta = float(eta)
        # Row i: sqrt(1/ab), sqrt(1/ab - 1), then the three of ddim_coefficients.
        self.table = np.concatenate([
            np.stack([s.sqrt_recip_alphas_cumprod, s.sqrt_recipm1_alphas_cumprod], axis=1),
            ddim_coefficients(s, eta)], axis=1)
        self.out = np.empty(self.shape, np.float64)
        self.tmp = np.empty(self.shape, np.float64)

    @property
    def needs_noise(self) -> bool:
        return self.eta > 0 and self.index > 0

    def _step(self, x, eps, noise):
        ddim_update(x, eps, noise if self.needs_noise else None, *self.table[self.index],
                    self.clip, self.out, self.tmp)
        np.copyto(x, self.out, casting="same_kind")
