"""The torch bridge: the runtime's numpy Schedule as float64 tensors on a device.

The schedule is computed once, in numpy (runtime/schedule.py); training and the torch
reference sampler only index these tensors, so the two sides cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from runtime.schedule import Schedule


@dataclass(frozen=True)
class ScheduleTensors:
    """float64 copies of a Schedule's arrays (``timesteps`` is int64), all on one device."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    timesteps: torch.Tensor


def schedule_tensors(schedule: Schedule, device: torch.device | str = "cpu") -> ScheduleTensors:
    """Copy every array of ``schedule`` to ``device`` without changing a bit of it."""
    return ScheduleTensors(**{
        f.name: torch.as_tensor(getattr(schedule, f.name), device=device,
                                dtype=torch.int64 if f.name == "timesteps" else torch.float64)
        for f in dataclasses.fields(ScheduleTensors)
    })
