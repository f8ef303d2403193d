"""The torch reference sampler: a torch ε-network driven by the runtime's samplers.

The step math is the runtime's (checked against diffusers in test_solvers.py); what is
tested here is the torch side: tensors in and out, t as float32 [B] of the original
timesteps, eval mode, and that every registered sampler runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from runtime.samplers import SAMPLERS, ImageNoise, sample
from runtime.schedule import Schedule
from training.reference import reference_sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")


T = 1000
FULL = Schedule.linear(T)
RESPACED = FULL.respaced(50)


# === Whole chains with a closed-form network ===

MU, STD = 0.3, 0.5  # data distribution N(MU, STD^2): its optimal eps is known exactly


def gaussian_eps_np(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """E[eps | x_t] for x_0 ~ N(MU, STD^2): sqrt(1-ab) (x_t - sqrt(ab) MU) / (ab STD^2 + 1 - ab)."""
    ab = FULL.alphas_cumprod[t.astype(np.int64)].reshape(-1, *([1] * (x.ndim - 1)))
    return (np.sqrt(1 - ab) * (x - np.sqrt(ab) * MU) / (ab * STD**2 + 1 - ab)).astype(np.float32)


def gaussian_eps_torch(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    assert x.dtype == torch.float32 and t.dtype == torch.float32 and t.shape == x.shape[:1]
    return torch.from_numpy(gaussian_eps_np(x.cpu().numpy(), t.cpu().numpy()))


CHAINS = [
    ("ddpm", "fixedlarge", 0.0, True),
    ("ddpm", "fixedsmall", 0.0, False),
    ("ddim", "fixedlarge", 0.0, True),
    ("ddim", "fixedlarge", 0.7, False),
] + [(name, "fixedlarge", 0.0, True) for name in SAMPLERS if name not in ("ddpm", "ddim")]


@pytest.mark.parametrize("sampler,variance,eta,clip_x0", CHAINS)
@pytest.mark.parametrize("steps", [1000, 20])
@pytest.mark.parametrize("noise_kind", ["generator", "image_noise"])
def test_whole_chain_matches_runtime(sampler, variance, eta, clip_x0, steps, noise_kind):
    schedule = FULL if steps == T else FULL.respaced(steps)
    shape = (3, 1, 2, 2)

    def noise():
        if noise_kind == "generator":
            return np.random.default_rng(7)
        return ImageNoise(7, shape[0])

    seen_t = []

    def eps_np(x, t):
        seen_t.append(t.copy())
        return gaussian_eps_np(x, t)

    kwargs = dict(sampler=sampler, variance=variance, eta=eta, clip_x0=clip_x0)
    expected = sample(eps_np, schedule, shape, noise(), **kwargs)
    got = reference_sample(gaussian_eps_torch, schedule, shape, noise(), **kwargs)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got, expected)
    # The runtime gave the network the original timesteps, last to first.
    assert [int(t[0]) for t in seen_t] == list(schedule.timesteps[::-1])


@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
def test_reference_recovers_the_data_distribution(variance):
    # With the exact eps of N(MU, STD^2), the full ancestral chain must return that
    # distribution (4000 samples: the mean's standard error is 0.008).
    x = reference_sample(gaussian_eps_torch, FULL, (4000, 1, 1, 1), np.random.default_rng(3),
                         variance=variance, clip_x0=False)
    assert abs(x.mean() - MU) < 0.03
    assert abs(x.std() - STD) < 0.03


class _DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x, t):
        return self.drop(torch.ones_like(x)) * 0.1


def test_module_runs_in_eval_mode_and_keeps_its_mode():
    net = _DropoutNet().train()
    a = reference_sample(net, FULL.respaced(10), (2, 1, 2, 2), ImageNoise(1, 2))
    b = reference_sample(net, FULL.respaced(10), (2, 1, 2, 2), ImageNoise(1, 2))
    np.testing.assert_array_equal(a, b)  # dropout off: deterministic
    assert net.training


@pytest.mark.parametrize("kwargs", [{"sampler": "euler"}, {"variance": "learned"},
                                    {"sampler": "ddim", "eta": -1.0}])
def test_bad_modes_are_refused(kwargs):
    with pytest.raises(ValueError):
        reference_sample(gaussian_eps_torch, RESPACED, (1, 1, 2, 2), np.random.default_rng(0),
                         **kwargs)
