"""DPM-Solver++ multistep (Lu et al. 2022), data prediction, orders 2 and 3.

Step k from point k to point k+1 with h = lambda_{k+1} - lambda_k and
phi = alpha_{k+1} (exp(-h) - 1):
  order 1: x <- sigma_{k+1} / sigma_k x - phi D0
  order 2: ... - phi/2 D1            (the "midpoint" form, their eq. 18 family)
  order 3: ... + alpha_{k+1} ((exp(-h) - 1)/h + 1) D1 - alpha_{k+1} ((exp(-h) - 1 + h)/h^2 - 1/2) D2
with D0 = m_k and D1, D2 the divided differences of the past x_0 predictions over
lambda. The first steps warm up at lower order (there is no history yet); the final
step, to the data (sigma = 0), is first order and returns the last clipped x_0
exactly; with fewer than 15 steps the one before it is at most second order, which
keeps very short chains stable.
"""

from __future__ import annotations

import numpy as np

from ..schedule import Schedule
from .base import register
from .multistep import MultistepSampler

LOWER_ORDER_BELOW = 15  # chains shorter than this lower the order of their last two steps


class DPMSolverPP(MultistepSampler):
    order: int

    def __init__(self, schedule: Schedule, shape, **kwargs):
        self.history = self.order
        super().__init__(schedule, shape, **kwargs)

    def step_order(self, k: int) -> int:
        n = self.num_steps
        p = min(self.order, k + 1)
        if k == n - 1:
            return 1
        if k == n - 2 and n < LOWER_ORDER_BELOW:
            return min(p, 2)
        return p

    def _coefficients(self):
        alpha, sigma, lam = self.alpha, self.sigma, self.lam
        m = np.eye(self.history)  # m[j] stands for m_{k-j}
        for k in range(self.num_steps):
            p = self.step_order(k)
            if sigma[k + 1] == 0.0:  # to the data: x_0 itself
                self.pred[k, 1] = 1.0
                continue
            h = lam[k + 1] - lam[k]
            phi = alpha[k + 1] * np.expm1(-h)
            c = -phi * m[0]
            if p == 2:
                r0 = (lam[k] - lam[k - 1]) / h
                c = c - 0.5 * phi * (m[0] - m[1]) / r0
            elif p == 3:
                r0, r1 = (lam[k] - lam[k - 1]) / h, (lam[k - 1] - lam[k - 2]) / h
                d10, d11 = (m[0] - m[1]) / r0, (m[1] - m[2]) / r1
                d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
                d2 = (d10 - d11) / (r0 + r1)
                c = (c + alpha[k + 1] * (np.expm1(-h) / h + 1.0) * d1
                     - alpha[k + 1] * ((np.expm1(-h) + h) / h**2 - 0.5) * d2)
            self.pred[k, 0] = sigma[k + 1] / sigma[k]
            self.pred[k, 1:] = c


@register
class DPMSolverPP2M(DPMSolverPP):
    name = "dpmpp_2m"
    summary = "DPM-Solver++ 2M: second-order multistep; good from about 10 steps"
    order = 2


@register
class DPMSolverPP3M(DPMSolverPP):
    name = "dpmpp_3m"
    summary = "DPM-Solver++ 3M: third-order multistep"
    order = 3
