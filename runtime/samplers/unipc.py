"""UniPC multistep (Zhao et al. 2023), data prediction, B(h) = expm1(-h) ("bh2").

Each step k first corrects the state it was handed (UniC: the step from point k-1 to k
is redone with the new prediction m_k, which raises its order by one at no extra
network call), then predicts the next point (UniP) from m_k and the past predictions.
For a step of order p from s to t, with h = lambda_t - lambda_s, hh = -h and r_i the
past points' lambda offsets over h:
  x_t = sigma_t / sigma_s x_s - alpha_t expm1(hh) m_s - alpha_t B(h) sum_i rho_i D_i,
  D_i = (m_i - m_s) / r_i, and the rho solve sum_i rho_i r_i^(q-1) = b_q, the b_q from
  the phi-functions of hh (their Algorithms 2 and 3).
The order warms up over the first steps and falls over the last ones (the last step,
to the data, returns its clipped x_0); the final state is not corrected (that would
take another network call).
"""

from __future__ import annotations

import numpy as np

from ..schedule import Schedule
from .base import register
from .multistep import MultistepSampler


def _rhos_and_b(rks: np.ndarray, hh: float, order: int) -> tuple[np.ndarray, np.ndarray]:
    """The Vandermonde-like system of UniPC: R[q, i] = rks[i]^q and b[q] from phi_{q+1}(hh)."""
    h_phi_k = np.expm1(hh) / hh - 1.0
    b_h = np.expm1(hh)
    R, b = [], []
    factorial = 1
    for q in range(1, order + 1):
        R.append(rks ** (q - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= q + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return np.array(R), np.array(b)


@register
class UniPC(MultistepSampler):
    """``order`` of the predictor (the corrector adds one); 3 suits unconditional models."""

    name = "unipc"
    summary = "UniPC bh2, predictor-corrector multistep; good from about 5-10 steps"
    order = 3

    def __init__(self, schedule: Schedule, shape, **kwargs):
        self.history = self.order + 1  # the corrector reads one prediction more
        super().__init__(schedule, shape, **kwargs)

    def step_order(self, k: int) -> int:
        """Predictor order of step k: warm-up at the start, lower order at the end."""
        return min(self.order, self.num_steps - k, k + 1)

    def _update(self, s: int, t: int, order: int, m_s: int, new: int | None) -> np.ndarray:
        """[a, c_0, ...] of one UniP (``new`` None) or UniC (``new`` the index of m_t) update
        from point s to t; ``m_s`` indexes m_s in the basis, m_{s-i} is at m_s + i."""
        alpha, sigma, lam = self.alpha, self.sigma, self.lam
        m = np.eye(self.history)
        row = np.zeros(1 + self.history)
        if sigma[t] == 0.0:  # to the data: x_0 itself
            row[1 + m_s] = 1.0
            return row
        h = lam[t] - lam[s]
        hh = -h
        b_h = np.expm1(hh)
        past = range(1, order)
        rks = np.array([(lam[s - i] - lam[s]) / h for i in past] + [1.0])
        diffs = [(m[m_s + i] - m[m_s]) / rks[i - 1] for i in past]
        R, b = _rhos_and_b(rks, hh, order)
        if new is None:
            rhos = ([0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
                    if order > 2 else [])
            res = sum((rho * d for rho, d in zip(rhos, diffs, strict=True)),
                      np.zeros(self.history))
        else:
            rhos = [0.5] if order == 1 else np.linalg.solve(R, b)
            res = sum((rho * d for rho, d in zip(rhos[:-1], diffs, strict=True)),
                      np.zeros(self.history))
            res = res + rhos[-1] * (m[new] - m[m_s])
        row[0] = sigma[t] / sigma[s]
        # bh2: B(h) = expm1(hh) = h phi_1(hh), so one factor serves both terms.
        row[1:] = -alpha[t] * b_h * (m[m_s] + res)
        return row

    def _coefficients(self):
        self.corr = np.zeros_like(self.pred)
        for k in range(self.num_steps):
            if k > 0:  # UniC: redo point k-1 -> k at the previous step's order, m_k now known
                self.corr[k] = self._update(k - 1, k, self.step_order(k - 1), 1, 0)
            self.pred[k] = self._update(k, k + 1, self.step_order(k), 0, None)
