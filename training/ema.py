"""Exponential moving average of the weights: the network the paper samples from."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """ema <- decay_n * ema + (1 - decay_n) * weights after every optimizer step.

    With ``warmup`` the decay ramps as min(decay, (1 + n) / (10 + n)) (TensorFlow's
    num_updates rule), so a short run's EMA is not dominated by the random init. The
    caller counts n: a distillation restarts it with each round (Trainer.ema_updates), whose
    new student's average must not reach back into the previous round.
    """

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, num_updates: int) -> float:
        if self.warmup:
            return min(self.decay, (1.0 + num_updates) / (10.0 + num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, num_updates: int) -> None:
        weight = 1.0 - self.decay_at(num_updates)
        # One call for all tensors (a tensor-count mismatch raises): a per-tensor Python loop
        # costs several percent of a small CPU step.
        torch._foreach_lerp_(list(self.model.parameters()),
                             [p.detach() for p in model.parameters()], weight)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
