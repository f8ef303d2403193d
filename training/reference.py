"""The torch reference sampler: an independent torch implementation of runtime.samplers.sample.

The runtime's numpy sampler is tested against this file, so it shares only the inputs
with it: the schedule's arrays (through the bridge) and the noise stream
(``runtime.samplers.draw_noise``, drawn in the same order). The step math is written
again here, in torch: float64 coefficients, float32 state rounded once per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from runtime.samplers import Noise, draw_noise
from runtime.schedule import Schedule

from .bridge import ScheduleTensors, schedule_tensors

TorchEpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _at(arr: torch.Tensor, i, x: torch.Tensor) -> torch.Tensor:
    """arr[i] for a step index (int) or one index per sample (tensor [B]), broadcastable to x."""
    if isinstance(i, torch.Tensor) and i.ndim == 1:
        return arr[i.to(arr.device)].reshape(-1, *([1] * (x.ndim - 1)))
    return arr[int(i)]


def _is_first(i) -> torch.Tensor | bool:
    return (i == 0) if not isinstance(i, torch.Tensor) else (i.to(torch.int64) == 0)


def _predict_x0(st: ScheduleTensors, x64: torch.Tensor, i, eps64: torch.Tensor) -> torch.Tensor:
    # eq. (4) solved for x_0: x_0 = sqrt(1 / ab_t) x_t - sqrt(1 / ab_t - 1) eps
    return (_at(st.sqrt_recip_alphas_cumprod, i, x64) * x64
            - _at(st.sqrt_recipm1_alphas_cumprod, i, x64) * eps64)


def reference_step(st: ScheduleTensors, x_t: torch.Tensor, i, eps: torch.Tensor,
                   noise: torch.Tensor | None, variance: str = "fixedlarge",
                   clip_x0: bool = True, clip_range=(-1.0, 1.0)) -> torch.Tensor:
    """One ancestral step x_t -> x_{t-1} (Algorithm 2), ``i`` the step index (int or [B]).

    1. x_0 = sqrt(1/ab_t) x_t - sqrt(1/ab_t - 1) eps, clipped to the data range if asked;
    2. posterior mean, eq. (7): coef1 x_0 + coef2 x_t;
    3. + sigma_t z with sigma_t^2 = beta_t ("fixedlarge") or the posterior variance
       ("fixedsmall"); no noise where i = 0.
    """
    if variance == "fixedlarge":
        var = st.betas
    elif variance == "fixedsmall":
        var = st.posterior_variance
    else:
        raise ValueError(f"unknown variance {variance!r}; expected 'fixedlarge' or 'fixedsmall'")
    x64 = x_t.to(torch.float64)
    x0 = _predict_x0(st, x64, i, eps.to(torch.float64))
    if clip_x0:
        x0 = x0.clamp(clip_range[0], clip_range[1])
    mean = _at(st.posterior_mean_coef1, i, x64) * x0 + _at(st.posterior_mean_coef2, i, x64) * x64
    first = _is_first(i)
    all_first = bool(first.all()) if isinstance(first, torch.Tensor) else first
    if not all_first and noise is None:
        raise ValueError("noise is required for steps with t > 0")
    if isinstance(first, torch.Tensor):
        sigma = torch.where(first.to(var.device), 0.0, var[i.to(var.device)].sqrt())
        if not all_first:
            mean = mean + sigma.reshape(-1, *([1] * (x64.ndim - 1))) * noise.to(torch.float64)
    elif not first:
        mean = mean + var[int(i)].sqrt() * noise.to(torch.float64)
    return mean.to(torch.float32)


def reference_ddim_step(st: ScheduleTensors, x_t: torch.Tensor, i, eps: torch.Tensor,
                        noise: torch.Tensor | None, eta: float = 0.0, clip_x0: bool = True,
                        clip_range=(-1.0, 1.0)) -> torch.Tensor:
    """One DDIM step (Song et al. 2021, eq. 12); eta = 0 is deterministic.

    1. predict x_0 (clipped if asked) and re-derive eps from it so the two agree;
    2. sigma = eta sqrt((1 - ab_prev) / (1 - ab) (1 - ab / ab_prev)), their eq. (16);
    3. x_{t-1} = sqrt(ab_prev) x_0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z.
    """
    x64 = x_t.to(torch.float64)
    eps64 = eps.to(torch.float64)
    x0 = _predict_x0(st, x64, i, eps64)
    if clip_x0:
        x0 = x0.clamp(clip_range[0], clip_range[1])
        eps64 = ((_at(st.sqrt_recip_alphas_cumprod, i, x64) * x64 - x0)
                 / _at(st.sqrt_recipm1_alphas_cumprod, i, x64))
    ab = _at(st.alphas_cumprod, i, x64)
    ab_prev = _at(st.alphas_cumprod_prev, i, x64)
    sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    out = (torch.sqrt(ab_prev) * x0
           + torch.sqrt(torch.clamp(1 - ab_prev - sigma**2, min=0.0)) * eps64)
    first = _is_first(i)
    needs_noise = eta > 0 and (not bool(first.all()) if isinstance(first, torch.Tensor)
                               else not first)
    if needs_noise:
        if noise is None:
            raise ValueError("noise is required for DDIM steps with eta > 0 and t > 0")
        out = out + sigma * noise.to(torch.float64)
    return out.to(torch.float32)


def reference_sample(model_or_eps_fn: nn.Module | TorchEpsFn, schedule: Schedule,
                     shape: Sequence[int], rng: Noise, *, sampler: str = "ddpm",
                     variance: str = "fixedlarge", eta: float = 0.0, clip_x0: bool = True,
                     clip_range=(-1.0, 1.0), device: torch.device | str = "cpu") -> np.ndarray:
    """Sample x_0 of ``shape`` with ``schedule`` (full or respaced); returns float32 numpy.

    Noise comes from ``runtime.samplers.draw_noise(rng, shape)`` in the runtime's order:
    x_T first, then one draw per step with t > 0 (for DDIM only when eta > 0). The model
    gets t = float32 [B] of ``schedule.timesteps[i]``, the original chain's index.
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sampler {sampler!r}; expected 'ddpm' or 'ddim'")
    if variance not in ("fixedlarge", "fixedsmall"):
        raise ValueError(f"unknown variance {variance!r}; expected 'fixedlarge' or 'fixedsmall'")
    if not (np.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    shape = tuple(int(s) for s in shape)
    st = schedule_tensors(schedule, device)
    model = model_or_eps_fn if isinstance(model_or_eps_fn, nn.Module) else None
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    try:
        with torch.inference_mode():
            x = torch.from_numpy(draw_noise(rng, shape)).to(device)
            for i in range(schedule.num_timesteps - 1, -1, -1):
                t = torch.full((shape[0],), float(schedule.timesteps[i]), dtype=torch.float32,
                               device=device)
                eps = model_or_eps_fn(x, t).float()
                if sampler == "ddpm":
                    noise = _next_noise(rng, shape, device) if i > 0 else None
                    x = reference_step(st, x, i, eps, noise, variance, clip_x0, clip_range)
                else:
                    noise = _next_noise(rng, shape, device) if (eta > 0 and i > 0) else None
                    x = reference_ddim_step(st, x, i, eps, noise, eta, clip_x0, clip_range)
    finally:
        if model is not None:
            model.train(was_training)
    return x.cpu().numpy()


def _next_noise(rng: Noise, shape, device) -> torch.Tensor:
    return torch.from_numpy(draw_noise(rng, shape)).to(device)
