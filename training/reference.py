"""The torch model driven by the runtime's samplers: previews, benchmarks and parity tests.

The step math lives once, in ``runtime.samplers`` (numpy, float64 coefficients); here a
torch model (or any torch ε-function) supplies ε, on any device, and every registered
sampler is available. The noise stream is the runtime's (``draw_noise``, same order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from runtime.samplers import Noise, sample
from runtime.schedule import Schedule

TorchEpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def torch_eps_fn(model_or_eps_fn: nn.Module | TorchEpsFn, device: torch.device | str = "cpu"):
    """A numpy ``eps_fn(x, t)`` over a torch model or function (float32 in and out)."""
    device = torch.device(device)

    def eps_fn(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        eps = model_or_eps_fn(torch.from_numpy(x).to(device), torch.from_numpy(t).to(device))
        return eps.float().cpu().numpy()

    return eps_fn


def reference_sample(model_or_eps_fn: nn.Module | TorchEpsFn, schedule: Schedule,
                     shape: Sequence[int], rng: Noise, *, sampler: str = "ddpm",
                     clip_x0: bool = True, clip_range=(-1.0, 1.0),
                     device: torch.device | str = "cpu", **options) -> np.ndarray:
    """Sample x_0 of ``shape`` with ``schedule`` (full or respaced); returns float32 numpy.

    A module runs in eval mode under ``torch.inference_mode`` and gets its mode back.
    ``options`` are the sampler's own, as for :func:`runtime.samplers.sample`.
    """
    model = model_or_eps_fn if isinstance(model_or_eps_fn, nn.Module) else None
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    try:
        with torch.inference_mode():
            return sample(torch_eps_fn(model_or_eps_fn, device), schedule, shape, rng,
                          sampler=sampler, clip_x0=clip_x0, clip_range=clip_range, **options)
    finally:
        if model is not None:
            model.train(was_training)
