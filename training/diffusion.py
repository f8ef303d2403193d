"""The training objective: q(x_t | x_0) and L_simple, on schedule tensors from the bridge."""

from __future__ import annotations

import torch
from torch import nn

from .bridge import ScheduleTensors


def extract(arr: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """arr[t] as float32 [B, 1, 1, 1]: gathered in float64, rounded once for x's math."""
    return arr[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def q_sample(st: ScheduleTensors, x0: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, eq. (4)."""
    return (extract(st.sqrt_alphas_cumprod, t, x0) * x0
            + extract(st.sqrt_one_minus_alphas_cumprod, t, x0) * noise)


def loss_simple(model: nn.Module, st: ScheduleTensors, x0: torch.Tensor, t: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
    """L_simple = E || eps - eps_theta(sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, t) ||^2, eq. (14).

    The network gets t as float32 (the ONNX contract); the loss is taken in float32 even
    when the forward pass runs under bf16 autocast.
    """
    x_t = q_sample(st, x0, t, noise)
    eps = model(x_t, t.to(torch.float32))
    return torch.mean((noise - eps.float()) ** 2)
