"""The torch reference sampler against the numpy runtime: one step, and whole chains.

The two are independent implementations of the same math, sharing only the schedule's
arrays and the noise stream; agreement to float32 rounding is the test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from runtime.samplers import ImageNoise, sample
from runtime.schedule import Schedule
from training.bridge import schedule_tensors
from training.reference import reference_ddim_step, reference_sample, reference_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


T = 1000
FULL = Schedule.linear(T)
RESPACED = FULL.respaced(50)
SCHEDULES = {"full": FULL, "respaced50": RESPACED}


def _arrays(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (n, 1, 3, 3)
    x_t = rng.standard_normal(shape, dtype=np.float32) * 1.5
    eps = rng.standard_normal(shape, dtype=np.float32)
    noise = rng.standard_normal(shape, dtype=np.float32)
    return x_t, eps, noise


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)


@pytest.mark.parametrize("which", sorted(SCHEDULES))
@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
@pytest.mark.parametrize("clip_x0", [True, False])
def test_step_matches_runtime_at_every_t(which, variance, clip_x0):
    schedule = SCHEDULES[which]
    st = schedule_tensors(schedule)
    n = schedule.num_timesteps
    x_t, eps, noise = _arrays(n)
    # One sample per step index: every t in a single call (the per-sample path) ...
    idx = np.arange(n)
    expected = schedule.step(x_t, idx, eps, noise, variance=variance, clip_x0=clip_x0)
    got = reference_step(st, _t(x_t), torch.from_numpy(idx), _t(eps), _t(noise), variance,
                         clip_x0, (-1.0, 1.0))
    assert got.dtype == torch.float32
    np.testing.assert_array_max_ulp(got.numpy(), expected, maxulp=2)
    # ... and every t as a scalar index (the sampler's path).
    for i in range(n):
        expected = schedule.step(x_t[i:i + 1], i, eps[i:i + 1], noise[i:i + 1],
                                 variance=variance, clip_x0=clip_x0)
        got = reference_step(st, _t(x_t[i:i + 1]), i, _t(eps[i:i + 1]), _t(noise[i:i + 1]),
                             variance, clip_x0, (-1.0, 1.0))
        np.testing.assert_array_max_ulp(got.numpy(), expected, maxulp=2)


def test_last_step_adds_no_noise():
    st = schedule_tensors(FULL)
    x_t, eps, noise = _arrays(4)
    with_noise = reference_step(st, _t(x_t), 0, _t(eps), _t(noise * 100))
    without = reference_step(st, _t(x_t), 0, _t(eps), None)
    assert torch.equal(with_noise, without)
    with pytest.raises(ValueError, match="noise is required"):
        reference_step(st, _t(x_t), 5, _t(eps), None)
    with pytest.raises(ValueError, match="noise is required"):
        reference_ddim_step(st, _t(x_t), 5, _t(eps), None, eta=0.5)


@pytest.mark.parametrize("which", sorted(SCHEDULES))
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip_x0", [True, False])
def test_ddim_step_matches_runtime_at_every_t(which, eta, clip_x0):
    schedule = SCHEDULES[which]
    st = schedule_tensors(schedule)
    n = schedule.num_timesteps
    x_t, eps, noise = _arrays(n, seed=1)
    idx = np.arange(n)
    expected = schedule.ddim_step(x_t, idx, eps, noise, eta=eta, clip_x0=clip_x0)
    got = reference_ddim_step(st, _t(x_t), torch.from_numpy(idx), _t(eps), _t(noise), eta,
                              clip_x0)
    np.testing.assert_array_max_ulp(got.numpy(), expected, maxulp=2)
    for i in (0, 1, n // 2, n - 1):
        expected = schedule.ddim_step(x_t[:2], i, eps[:2], noise[:2], eta=eta, clip_x0=clip_x0)
        got = reference_ddim_step(st, _t(x_t[:2]), i, _t(eps[:2]), _t(noise[:2]), eta, clip_x0)
        np.testing.assert_array_max_ulp(got.numpy(), expected, maxulp=2)


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
]


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
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
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
