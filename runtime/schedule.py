"""The DDPM noise schedule and its step math, in numpy (Ho et al. 2020).

Every array is float64 and computed once in ``__init__``: the coefficients near
t = T reach ~1e2 (``sqrt_recipm1_alphas_cumprod``), so float32 schedules add
visible error to each of the thousand steps. The sampler state may be float32;
the step math upcasts, applies float64 coefficients, and rounds once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import check_int
from .stepmath import ancestral_update, ddim_update, posterior_mean, predict_x0

VARIANCES = ("fixedlarge", "fixedsmall")
SPACINGS = ("linspace", "leading", "trailing", "quadratic")
SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine", "explicit")


class Schedule:
    """Precomputed forward-process and posterior quantities for one chain of betas.

    ``timesteps[i]`` is the index in the original T-step chain that step ``i``
    of this schedule stands for; it is what the network is given. For a full
    schedule it is ``arange(T)``; :meth:`respaced` keeps a subset.
    """

    def __init__(self, betas, *, timesteps=None, config: Mapping[str, Any] | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not np.all(np.isfinite(betas)):
            raise ValueError("betas contain NaN or inf; every beta must lie in (0, 1)")
        if not (np.all(betas > 0) and np.all(betas < 1)):
            raise ValueError(
                f"betas must lie in (0, 1), got min {betas.min():.3g} and max {betas.max():.3g}"
            )
        if timesteps is None:
            timesteps = np.arange(betas.size)
        timesteps = np.asarray(timesteps, dtype=np.int64)
        if timesteps.shape != betas.shape or np.any(np.diff(timesteps) <= 0):
            raise ValueError("timesteps must be strictly increasing and match betas in length")
        self.betas = betas
        self.timesteps = timesteps
        self.num_timesteps = int(betas.size)
        # What rebuilds this schedule in another process (checkpoint, ONNX metadata).
        self.config = dict(config) if config is not None else {
            "kind": "explicit", "num_timesteps": int(betas.size), "betas": betas.tolist()}

        # === Forward process q(x_t | x_0) ===
        self.alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(self.alphas)
        if not self.alphas_cumprod[-1] >= np.finfo(np.float64).tiny:
            # The tables below divide by it: past float64's smallest normal number 1/ab is
            # inf, sampling gives NaN, and the network would be blamed.
            raise ValueError(f"alphas_cumprod falls below float64's range by step "
                             f"{self._first_tiny()} of {betas.size}: use fewer timesteps or "
                             "smaller betas")
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # === Posterior q(x_{t-1} | x_t, x_0), eqs. (6) and (7) ===
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # The variance is 0 at t = 0; clip the log to the t = 1 value so it stays finite.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
            if self.num_timesteps > 1
            else np.maximum(self.posterior_variance, np.finfo(np.float64).tiny)
        )
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)
        )

    # === Constructors ===

    @classmethod
    def linear(cls, num_timesteps: int = 1000, *, beta_start: float = 1e-4,
               beta_end: float = 0.02) -> Schedule:
        """The paper's schedule: betas linear from 1e-4 to 0.02 over T = 1000."""
        check_int(num_timesteps, "num_timesteps")
        betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
        config = {"kind": "linear", "num_timesteps": int(num_timesteps),
                  "beta_start": float(beta_start), "beta_end": float(beta_end)}
        return cls(betas, config=config)

    @classmethod
    def scaled_linear(cls, num_timesteps: int = 1000, *, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> Schedule:
        """sqrt(beta) linear from sqrt(beta_start) to sqrt(beta_end) (diffusers'
        "scaled_linear", the latent-diffusion schedule)."""
        check_int(num_timesteps, "num_timesteps")
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
        config = {"kind": "scaled_linear", "num_timesteps": int(num_timesteps),
                  "beta_start": float(beta_start), "beta_end": float(beta_end)}
        return cls(betas, config=config)

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, *, s: float = 0.008,
               max_beta: float = 0.999) -> Schedule:
        """Improved DDPM's cosine schedule: ab(t) = f(t) / f(0),
        f(t) = cos^2((t/T + s) / (1 + s) * pi/2), betas capped at ``max_beta``."""
        check_int(num_timesteps, "num_timesteps")
        steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = np.minimum(1.0 - f[1:] / f[:-1], max_beta)
        config = {"kind": "cosine", "num_timesteps": int(num_timesteps),
                  "s": float(s), "max_beta": float(max_beta)}
        return cls(betas, config=config)

    def _first_tiny(self) -> int:
        return int(np.argmax(self.alphas_cumprod < np.finfo(np.float64).tiny))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Schedule:
        """Rebuild a schedule from ``schedule.config`` (as stored in files)."""
        kind = config.get("kind")
        params = {k: v for k, v in config.items() if k not in ("kind", "respaced", "spacing")}
        if kind == "linear":
            schedule = cls.linear(**params)
        elif kind == "scaled_linear":
            schedule = cls.scaled_linear(**params)
        elif kind == "cosine":
            schedule = cls.cosine(**params)
        elif kind == "explicit":  # betas listed (a trained or imported schedule)
            betas = params.get("betas")
            if betas is None or len(betas) != params.get("num_timesteps"):
                raise ValueError("an explicit schedule lists num_timesteps betas")
            schedule = cls(betas, config={"kind": "explicit", "num_timesteps": len(betas),
                                          "betas": [float(b) for b in betas]})
        else:
            raise ValueError(f"unknown schedule kind {kind!r}; expected one of {SCHEDULE_KINDS}")
        if "respaced" in config:
            schedule = schedule.respaced(int(config["respaced"]),
                                         config.get("spacing", "linspace"))
        return schedule

    def respaced(self, num_steps: int, spacing: str = "linspace") -> Schedule:
        """A schedule over ``num_steps`` of the original timesteps, chosen by ``spacing``.

        Betas are rebuilt from the kept ``alphas_cumprod`` (Improved DDPM, sec. 4),
        so ``q(x_t | x_0)`` at every kept step is exactly the original one. Keeping all
        steps returns this schedule itself: ``respaced(T)`` changes nothing.
        """
        check_int(num_steps, "num_steps")
        if num_steps > self.num_timesteps:
            raise ValueError(
                f"cannot respace {self.num_timesteps} steps to {num_steps}; "
                f"choose 1 <= steps <= {self.num_timesteps}"
            )
        keep = spaced_timesteps(self.num_timesteps, num_steps, spacing)
        if keep.size == self.num_timesteps:
            return self
        kept_ab = self.alphas_cumprod[keep]
        betas = 1.0 - kept_ab / np.append(1.0, kept_ab[:-1])
        config = dict(self.config, respaced=int(num_steps), spacing=spacing)
        return Schedule(betas, timesteps=self.timesteps[keep], config=config)

    def first(self, num_steps: int) -> Schedule:
        """The first ``num_steps`` steps of this schedule (those nearest the data): the
        chain an edit runs when it starts from a noised image instead of pure noise. The
        kept steps' ``alphas_cumprod`` are this schedule's, so q(x_t | x_0) is unchanged."""
        check_int(num_steps, "num_steps", maximum=self.num_timesteps)
        if num_steps == self.num_timesteps:
            return self
        config = dict(self.config, first=int(num_steps))
        return Schedule(self.betas[:num_steps], timesteps=self.timesteps[:num_steps],
                        config=config)

    # === Math on arrays ===

    def q_sample(self, x0, t, noise):
        """Sample x_t ~ q(x_t | x_0), eq. (4): sqrt(ab_t) x0 + sqrt(1 - ab_t) noise."""
        x0 = _check_array(x0, "x0")
        idx = self._index(t, x0)
        noise = _check_like(noise, x0, "noise")
        out = (_coef(self.sqrt_alphas_cumprod, idx, x0) * x0
               + _coef(self.sqrt_one_minus_alphas_cumprod, idx, x0) * noise)
        return out.astype(x0.dtype, copy=False)

    def predict_x0(self, x_t, t, eps):
        """x_0 from x_t and predicted noise, eq. (15) solved for x_0."""
        x_t = _check_array(x_t, "x_t")
        idx = self._index(t, x_t)
        eps = _check_like(eps, x_t, "eps")
        out = predict_x0(x_t, eps, _coef(self.sqrt_recip_alphas_cumprod, idx, x_t),
                         _coef(self.sqrt_recipm1_alphas_cumprod, idx, x_t), None,
                         np.empty(x_t.shape), np.empty(x_t.shape))
        return out.astype(x_t.dtype, copy=False)

    def q_posterior(self, x0, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0), eqs. (6)-(7)."""
        x_t = _check_array(x_t, "x_t")
        idx = self._index(t, x_t)
        x0 = _check_like(x0, x_t, "x0")
        mean = posterior_mean(x0, x_t, _coef(self.posterior_mean_coef1, idx, x_t),
                              _coef(self.posterior_mean_coef2, idx, x_t),
                              np.empty(x_t.shape), np.empty(x_t.shape))
        variance = _coef(self.posterior_variance, idx, x_t)
        log_variance = _coef(self.posterior_log_variance_clipped, idx, x_t)
        return mean.astype(x_t.dtype, copy=False), variance, log_variance

    def sigma(self, variance: str = "fixedlarge") -> np.ndarray:
        """Per-step noise scale of the reverse process: sqrt(beta_t) or the posterior's.

        Entry 0 is 0: the last step (t = 0) adds no noise (Algorithm 2, line 4).
        """
        if variance == "fixedlarge":
            sigma = np.sqrt(self.betas)
        elif variance == "fixedsmall":
            sigma = np.sqrt(self.posterior_variance)
        else:
            raise ValueError(f"unknown variance {variance!r}; expected one of {VARIANCES}")
        sigma[0] = 0.0
        return sigma

    def step(self, x_t, t, eps, noise=None, *, variance: str = "fixedlarge",
             clip_x0: bool = True, clip_range=(-1.0, 1.0)):
        """One ancestral step x_t -> x_{t-1} (Algorithm 2, through the posterior).

        1. predict x_0 from eps, eq. (15) solved for x_0; clip it to the data range if asked;
        2. take the posterior mean, eq. (7);
        3. add sigma_t * noise, except at t = 0 where the mean is returned.
        ``noise`` may be None only when every t is 0. Math in float64, result in x_t's dtype.
        """
        sigma = self.sigma(variance)
        x_t = _check_array(x_t, "x_t")
        idx = self._index(t, x_t)
        eps = _check_like(eps, x_t, "eps")
        if np.any(idx > 0):
            if noise is None:
                raise ValueError("noise is required for steps with t > 0")
            noise = _check_like(noise, x_t, "noise")
        else:
            noise = None
        coefs = [_coef(a, idx, x_t) for a in (
            self.sqrt_recip_alphas_cumprod, self.sqrt_recipm1_alphas_cumprod,
            self.posterior_mean_coef1, self.posterior_mean_coef2, sigma)]
        out = ancestral_update(x_t, eps, noise, *coefs, _clip(clip_x0, clip_range),
                               np.empty(x_t.shape), np.empty(x_t.shape))
        return out.astype(x_t.dtype, copy=False)

    def ddim_sigma(self, eta: float) -> np.ndarray:
        """DDIM's noise scale, eq. (16) of Song et al.: eta = 1 is the ancestral variance."""
        if not (np.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        ab, ab_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        return eta * np.sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev))

    def ddim_coefficients(self, eta: float) -> np.ndarray:
        """Per step: sqrt(ab_prev), sqrt(1 - ab_prev - sigma^2), sigma (eq. 16 of Song et al.)."""
        sigma = self.ddim_sigma(eta)
        ab_prev = self.alphas_cumprod_prev
        return np.stack([np.sqrt(ab_prev), np.sqrt(np.maximum(1.0 - ab_prev - sigma**2, 0.0)),
                         sigma], axis=1)

    def ddim_step(self, x_t, t, eps, noise=None, *, eta: float = 0.0, clip_x0: bool = True,
                  clip_range=(-1.0, 1.0)):
        """One DDIM step x_t -> x_{t-1}, eq. (12) of Song et al. (eta = 0: deterministic).

        1. predict x_0 and clip it; 2. re-derive eps from the clipped x_0 so the two agree;
        3. x_{t-1} = sqrt(ab_prev) x_0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z.
        """
        table = self.ddim_coefficients(eta)
        x_t = _check_array(x_t, "x_t")
        idx = self._index(t, x_t)
        eps = _check_like(eps, x_t, "eps")
        if eta > 0 and np.any(idx > 0):
            if noise is None:
                raise ValueError("noise is required for DDIM steps with eta > 0 and t > 0")
            noise = _check_like(noise, x_t, "noise")
        else:
            noise = None
        coefs = [_coef(a, idx, x_t) for a in (
            self.sqrt_recip_alphas_cumprod, self.sqrt_recipm1_alphas_cumprod, *table.T)]
        out = ddim_update(x_t, eps, noise, *coefs, _clip(clip_x0, clip_range),
                          np.empty(x_t.shape), np.empty(x_t.shape))
        return out.astype(x_t.dtype, copy=False)

    def _index(self, t, x):
        """Validate t (a scalar or one integer per sample) against this schedule."""
        t_arr = np.asarray(t)
        if t_arr.dtype.kind not in "iu":
            whole = t_arr.dtype.kind == "f" and np.all(np.isfinite(t_arr))
            if whole and np.all(t_arr == np.round(t_arr)):
                t_arr = t_arr.astype(np.int64)
            else:
                raise ValueError(f"t must be integer step indices, got dtype {t_arr.dtype}")
        if t_arr.ndim > 1 or (t_arr.ndim == 1 and t_arr.shape[0] != x.shape[0]):
            raise ValueError(
                f"t must be a scalar or have one entry per sample ({x.shape[0]}), "
                f"got shape {t_arr.shape}"
            )
        if t_arr.size and (t_arr.min() < 0 or t_arr.max() >= self.num_timesteps):
            raise ValueError(
                f"t out of range: got values in [{t_arr.min()}, {t_arr.max()}], "
                f"expected 0 <= t < {self.num_timesteps}"
            )
        return t_arr


def spaced_timesteps(num_timesteps: int, num_steps: int, spacing: str = "linspace") -> np.ndarray:
    """The ``num_steps`` original timesteps (ascending) a respaced chain keeps.

    "linspace": both ends, evenly between (rounded); "leading": 0, k, 2k, ... with
    k = T // n; "trailing": T-1, T-1-T/n, ... (rounded), so the chain starts at T-1 but
    stops short of 0; "quadratic" (DDIM paper): floor(0.8 T (j / (n-1))^2),
    dense near the data, made strictly increasing where rounding would repeat a step.
    """
    T, n = num_timesteps, num_steps
    if spacing == "linspace":
        keep = np.round(np.linspace(0, T - 1, n)).astype(np.int64)
    elif spacing == "leading":
        keep = np.arange(n, dtype=np.int64) * (T // n)
    elif spacing == "trailing":
        keep = np.round(T - np.arange(n)[::-1] * (T / n)).astype(np.int64) - 1
    elif spacing == "quadratic":
        keep = np.floor(np.linspace(0.0, np.sqrt(0.8 * T), n) ** 2).astype(np.int64)
        ramp = np.arange(n)
        keep = np.maximum.accumulate(keep - ramp) + ramp
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
    keep = np.unique(keep)
    if keep.size != n or keep[0] < 0 or keep[-1] >= T:
        raise ValueError(f"{spacing} spacing cannot keep {n} distinct steps of {T}")
    return keep


def _clip(clip_x0: bool, clip_range):
    return (float(clip_range[0]), float(clip_range[1])) if clip_x0 else None


def _coef(arr: np.ndarray, idx: np.ndarray, x: np.ndarray) -> np.ndarray:
    """arr[idx] shaped to broadcast against x: a scalar, or [B, 1, 1, ...]."""
    values = arr[idx]
    if np.ndim(values) == 0:
        return values
    return values.reshape((-1,) + (1,) * (x.ndim - 1))


def _check_array(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"{name} must have a batch axis, got a scalar")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _check_like(y, x: np.ndarray, name: str) -> np.ndarray:
    y = _check_array(y, name)
    if y.shape != x.shape:
        raise ValueError(f"{name} has shape {y.shape}, expected {x.shape}")
    return y
