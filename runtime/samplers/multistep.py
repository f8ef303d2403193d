"""Multistep solvers in data prediction: each step is a fixed linear combination.

DPM-Solver++ and UniPC both update x as ``a x + sum_j c_j m_j`` where the m_j are the
clipped x_0 predictions of the last few steps, and ``a`` and the ``c_j`` depend only on
the schedule and the step. So the coefficients are worked out once per run (in
:meth:`MultistepSampler._coefficients`) into tables, and a step is a handful of in-place
multiply-adds over a ring buffer of past predictions.

Notation, after Lu et al. (2022): point k is the state after k steps; alpha_k =
sqrt(ab), sigma_k = sqrt(1 - ab) and lambda_k = log(alpha_k / sigma_k) there. The last
point is the data itself (ab = 1, sigma = 0, lambda = +inf): the final step goes to x_0.
"""

from __future__ import annotations

import numpy as np

from ..schedule import Schedule
from ..stepmath import predict_x0
from .base import Sampler


class MultistepSampler(Sampler):
    """Base for solvers whose step is ``x <- a x + sum_j c_j m_{k-j}`` (and, with a
    corrector, first ``x <- a' x_prev + sum_j c'_j m_{k-j}`` once m_k is known).

    Subclasses set ``history`` (how many predictions a step reads) and implement
    :meth:`_coefficients`, which fills ``self.pred`` and optionally ``self.corr``.
    """

    history: int = 1
    restartable = False  # a step reads the predictions of the steps before it

    def __init__(self, schedule: Schedule, shape, **kwargs):
        super().__init__(schedule, shape, **kwargs)
        n = self.num_steps
        ab = np.append(schedule.alphas_cumprod[::-1], 1.0)  # point k = after k steps
        self.alpha = np.sqrt(ab)
        self.sigma = np.sqrt(1.0 - ab)
        with np.errstate(divide="ignore"):
            self.lam = np.log(self.alpha) - np.log(self.sigma)
        self.recip = schedule.sqrt_recip_alphas_cumprod[::-1].copy()
        self.recipm1 = schedule.sqrt_recipm1_alphas_cumprod[::-1].copy()
        # Row k: [a, c_0, ..., c_{history-1}], c_j multiplying m_{k-j}.
        self.pred = np.zeros((n, 1 + self.history))
        self.corr: np.ndarray | None = None
        self._coefficients()
        self.m = np.empty((self.history, *self.shape), np.float64)
        self.acc = np.empty(self.shape, np.float64)
        self.tmp = np.empty(self.shape, np.float64)
        self.x_prev = np.empty(self.shape, np.float32) if self.corr is not None else None

    def _coefficients(self) -> None:
        raise NotImplementedError

    def _combine(self, row: np.ndarray, base: np.ndarray, x: np.ndarray) -> None:
        """x <- row[0] base + sum_j row[1 + j] m_{k-j}, in float64, rounded once."""
        k, acc, tmp = self.k, self.acc, self.tmp
        np.multiply(base, row[0], out=acc, dtype=np.float64)
        for j, c in enumerate(row[1:]):
            if c != 0.0:
                np.multiply(self.m[(k - j) % self.history], c, out=tmp)
                np.add(acc, tmp, out=acc)
        np.copyto(x, acc, casting="same_kind")

    def _step(self, x, eps, noise):
        k = self.k
        predict_x0(x, eps, self.recip[k], self.recipm1[k], self.clip,
                   self.m[k % self.history], self.tmp)
        if self.corr is not None:
            if k > 0:
                self._combine(self.corr[k], self.x_prev, x)
            np.copyto(self.x_prev, x)
        self._combine(self.pred[k], x, x)
