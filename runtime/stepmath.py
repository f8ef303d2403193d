"""The step math of the reverse process, on arrays: the leaf every sampler and the schedule use.

Nothing here imports the rest of the runtime, so imports only point down: samplers and
:class:`~runtime.schedule.Schedule` call these functions, never each other. Every function
writes float64 into ``out`` (``tmp`` is scratch of the same shape) and takes its
coefficients as scalars or as arrays broadcasting against ``x`` (one per row).
"""

from __future__ import annotations

import numpy as np


def predict_x0(x: np.ndarray, eps: np.ndarray, recip, recipm1, clip, out: np.ndarray,
               tmp: np.ndarray) -> np.ndarray:
    """x_0 = sqrt(1/ab) x - sqrt(1/ab - 1) eps (eq. 15 solved for x_0), clipped, into ``out``.

    ``tmp`` is left holding sqrt(1/ab) x (DDIM re-derives eps from it).
    """
    np.multiply(x, recip, out=tmp, dtype=np.float64)
    np.multiply(eps, recipm1, out=out, dtype=np.float64)
    np.subtract(tmp, out, out=out)
    if clip is not None:  # np.clip's own arithmetic, without its Python dispatch (~1 us)
        np.maximum(out, clip[0], out=out)
        np.minimum(out, clip[1], out=out)
    return out


def ancestral_update(x, eps, noise, recip, recipm1, c1, c2, sigma, clip, out, tmp):
    """One ancestral step of DDPM (Algorithm 2, through the posterior) into ``out``.

    1. x_0 from eps, clipped to the data range if ``clip``;
    2. the posterior mean, eq. (7): c1 x_0 + c2 x_t;
    3. + sigma z where ``noise`` is given.
    """
    predict_x0(x, eps, recip, recipm1, clip, out, tmp)
    posterior_mean(out, x, c1, c2, out, tmp)
    if noise is not None:
        np.multiply(noise, sigma, out=tmp, dtype=np.float64)
        np.add(out, tmp, out=out)
    return out


def posterior_mean(x0, x, c1, c2, out, tmp):
    """The mean of q(x_{t-1} | x_t, x_0), eq. (7): c1 x_0 + c2 x_t (``x0`` may be ``out``)."""
    np.multiply(x0, c1, out=out, dtype=np.float64)
    np.multiply(x, c2, out=tmp, dtype=np.float64)
    np.add(out, tmp, out=out)
    return out


def ddim_update(x, eps, noise, recip, recipm1, c1, c2, sigma, clip, out, tmp):
    """One DDIM step (Song et al. 2021) into ``out``.

    1. x_0 from eps, clipped if ``clip``; 2. eps re-derived from the clipped x_0 so the
    two agree; 3. eq. (12): c1 x_0 + c2 eps + sigma z with c1 = sqrt(ab_prev) and
    c2 = sqrt(1 - ab_prev - sigma^2) (:meth:`Schedule.ddim_coefficients`).
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


# What a network may predict (the model record's ``prediction``): the noise, the velocity
# v = sqrt(ab) eps - sqrt(1 - ab) x_0 (Salimans & Ho 2022), or x_0 itself.
PREDICTIONS = ("eps", "v", "x0")


def eps_from_output(prediction: str, x, output, sqrt_ab, sqrt_1m_ab, out):
    """The eps that ``output`` of a ``prediction`` network implies at x_t, into ``out``
    (float64; coefficients scalars or per row). With x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps:
      v:  eps = sqrt(ab) v + sqrt(1 - ab) x_t
      x0: eps = (x_t - sqrt(ab) x_0) / sqrt(1 - ab)
    """
    if prediction == "v":  # as sqrt(1 - ab) (x_t + v sqrt(ab) / sqrt(1 - ab)): no temporary
        np.multiply(output, sqrt_ab / sqrt_1m_ab, out=out, dtype=np.float64)
        np.add(out, x, out=out, dtype=np.float64)
        np.multiply(out, sqrt_1m_ab, out=out)
    elif prediction == "x0":
        np.multiply(output, sqrt_ab, out=out, dtype=np.float64)
        np.subtract(x, out, out=out, dtype=np.float64)
        np.divide(out, sqrt_1m_ab, out=out)
    elif prediction == "eps":
        np.copyto(out, output, casting="same_kind")
    else:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
    return out
