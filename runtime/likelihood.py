"""Negative log-likelihood by the variational bound, in bits/dim (Ho et al. 2020, eq. (5)).

    L = KL(q(x_T | x_0) || p(x_T))                                    prior
      + sum_{t>1} KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))  T - 1 KL terms
      - log p_theta(x_0 | x_1)                                        decoder

each term averaged over the data dimensions and divided by log 2, as in the paper's
Table 2 and Improved DDPM's ``calc_bpd_loop``. The decoder is a Gaussian discretised
to the data's ``num_levels`` bins over ``data_range``; the outer bins extend to
+-inf, so every bin has positive mass and the decoder is a proper distribution over
the levels (the reference does this for 8-bit data, 256 levels over [-1, 1]).

Numpy only, like the rest of the runtime: the network is ``eps_fn(x, t)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .errors import check_int
from .schedule import VARIANCES, Schedule

EpsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
# Improved DDPM clamps bin probabilities at 1e-12 (27.6 nats); we keep its floor so the
# numbers stay comparable with published ones. It caps a pixel the decoder puts ~7 sigma away.
MIN_PROB = 1e-12

_erfc = np.frompyfunc(math.erfc, 1, 1)


def normal_kl(mean1, logvar1, mean2, logvar2) -> np.ndarray:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) per element, in nats."""
    mean1, logvar1, mean2, logvar2 = (np.asarray(a, dtype=np.float64)
                                      for a in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + np.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * np.exp(-logvar2))


def standard_normal_cdf(z) -> np.ndarray:
    """Phi(z) to double precision (math.erfc, exact in the tails; ±inf allowed).

    The reference uses a tanh approximation; an exact CDF costs little here since
    the decoder is evaluated once per image.
    """
    z = np.asarray(z, dtype=np.float64)
    return 0.5 * _erfc(-z / math.sqrt(2.0)).astype(np.float64)


def discretized_gaussian_log_likelihood(x, means, log_scales, bin_width: float, *,
                                        data_range=(-1.0, 1.0)) -> np.ndarray:
    """log P(bin of x) under N(means, exp(log_scales)^2), per element, in nats.

    ``x`` lies on the data's grid of levels, ``bin_width`` apart over ``data_range``;
    its bin is [x - w/2, x + w/2], except that the lowest bin starts at -inf and the
    highest ends at +inf.
    """
    x = np.asarray(x, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    log_scales = np.asarray(log_scales, dtype=np.float64)
    if not bin_width > 0:
        raise ValueError(f"bin_width must be > 0, got {bin_width}")
    lo, hi = (float(v) for v in data_range)
    if not lo < hi:
        raise ValueError(f"data_range must be (low, high) with low < high, got {data_range}")
    half = 0.5 * bin_width
    inv_std = np.exp(-log_scales)
    lower = np.where(x < lo + half, -np.inf, (x - half - means) * inv_std)
    upper = np.where(x > hi - half, np.inf, (x + half - means) * inv_std)
    # Phi(b) - Phi(a) cancels badly when both edges sit in the upper tail; there use the
    # mirror image Phi(-a) - Phi(-b), so the difference is always of two lower-tail values.
    flip = lower > 0
    a = np.where(flip, -upper, lower)
    b = np.where(flip, -lower, upper)
    prob = standard_normal_cdf(b) - standard_normal_cdf(a)
    return np.log(np.maximum(prob, MIN_PROB))


def model_log_variance(schedule: Schedule, variance: str = "fixedlarge") -> np.ndarray:
    """log sigma_t^2 of p_theta(x_{t-1} | x_t) at each step, as Improved DDPM evaluates it.

    "fixedlarge" is beta_t, except at t = 0 where it takes the t = 1 posterior variance
    so the decoder is not wider than the chain's own last step; "fixedsmall" is the
    posterior variance, clipped the same way at t = 0 (it is 0 there).
    """
    if variance == "fixedlarge":
        if schedule.num_timesteps == 1:
            return np.log(schedule.betas.copy())
        return np.log(np.append(schedule.posterior_variance[1], schedule.betas[1:]))
    if variance == "fixedsmall":
        return schedule.posterior_log_variance_clipped.copy()
    raise ValueError(f"unknown variance {variance!r}; expected one of {VARIANCES}")


def prior_bpd(schedule: Schedule, x0) -> np.ndarray:
    """KL(q(x_T | x_0) || N(0, I)) per image, in bits/dim: no network needed."""
    x0 = np.asarray(x0, dtype=np.float64)
    ab_T = schedule.alphas_cumprod[-1]
    kl = normal_kl(math.sqrt(ab_T) * x0, math.log(1.0 - ab_T), 0.0, 0.0)
    return _mean_flat(kl) / math.log(2.0)


def bits_per_dim(eps_fn: EpsFn, schedule: Schedule, x0, rng: np.random.Generator, *,
                 data_range=(-1.0, 1.0), num_levels: int = 256, variance: str = "fixedlarge",
                 clip_x0: bool = True,
                 callback: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """The variational bound on -log p(x_0), per image, in bits/dim (Ho et al., eq. (5)).

    For each step i = T-1 .. 0 of ``schedule`` (full or respaced): draw x_t ~ q(x_t | x_0)
    with fresh float64 noise from ``rng`` (one draw of x0's shape per step, in that order),
    give the network float32 x_t and t = ``schedule.timesteps[i]``, form the model's mean
    as the sampler does (x_0 from eps, eq. (15), clipped to ``data_range`` if ``clip_x0``,
    then the posterior mean, eq. (7)), and score it: the KL to q(x_{t-1} | x_t, x_0) for
    i > 0, the discretised-Gaussian decoder at i = 0. ``callback(done, total)`` reports
    progress after each step.

    Returns per-image arrays [N]: ``total_bpd``, ``prior_bpd``, ``kl_bpd`` (the T-1 KL
    terms summed), ``decoder_bpd``; and [N, T] ``vb_bpd`` (column i is step i's term,
    column 0 the decoder) and ``x0_mse`` (the x_0 prediction's mean squared error).
    """
    x0 = np.asarray(x0, dtype=np.float64)
    if x0.ndim < 2 or x0.shape[0] < 1:
        raise ValueError(f"x0 must be [N, ...] with N >= 1, got shape {x0.shape}")
    lo, hi = (float(v) for v in data_range)
    if not lo < hi:
        raise ValueError(f"data_range must be (low, high) with low < high, got {data_range}")
    check_int(num_levels, "num_levels", minimum=2)
    if not np.all(np.isfinite(x0)) or x0.min() < lo or x0.max() > hi:
        raise ValueError(f"x0 must be finite and lie in the data range [{lo}, {hi}], got "
                         f"values in [{x0.min():.4g}, {x0.max():.4g}]")
    model_logvar = model_log_variance(schedule, variance)
    bin_width = (hi - lo) / (num_levels - 1)
    n, T = x0.shape[0], schedule.num_timesteps
    vb = np.zeros((n, T))
    x0_mse = np.zeros((n, T))
    for done, i in enumerate(range(T - 1, -1, -1), start=1):
        noise = rng.standard_normal(x0.shape)
        # The network sees float32; score exactly the x_t it saw.
        x_t = schedule.q_sample(x0, i, noise).astype(np.float32)
        t_model = np.full(n, schedule.timesteps[i], dtype=np.float32)
        eps = np.asarray(eps_fn(x_t, t_model))
        if eps.shape != x_t.shape:
            raise ValueError(f"eps_fn returned shape {eps.shape}, expected {x_t.shape}")
        x_t = x_t.astype(np.float64)
        pred_x0 = schedule.predict_x0(x_t, i, eps.astype(np.float64))
        if clip_x0:
            np.clip(pred_x0, lo, hi, out=pred_x0)
        model_mean, _, _ = schedule.q_posterior(pred_x0, x_t, i)
        x0_mse[:, i] = _mean_flat((pred_x0 - x0) ** 2)
        if i == 0:
            log_p = discretized_gaussian_log_likelihood(
                x0, model_mean, 0.5 * model_logvar[0], bin_width, data_range=(lo, hi))
            vb[:, 0] = -_mean_flat(log_p) / math.log(2.0)
        else:
            true_mean, _, true_logvar = schedule.q_posterior(x0, x_t, i)
            kl = normal_kl(true_mean, true_logvar, model_mean, model_logvar[i])
            vb[:, i] = _mean_flat(kl) / math.log(2.0)
        if callback is not None:
            callback(done, T)
    prior = prior_bpd(schedule, x0)
    return {
        "total_bpd": prior + vb.sum(axis=1),
        "prior_bpd": prior,
        "kl_bpd": vb[:, 1:].sum(axis=1),
        "decoder_bpd": vb[:, 0].copy(),
        "vb_bpd": vb,
        "x0_mse": x0_mse,
    }


def _mean_flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1).mean(axis=1)
