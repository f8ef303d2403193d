"""Whole sampling loops against a closed-form ε-model for Gaussian data.

For data x0 ~ N(mu, s^2) per pixel the optimal predictor is
eps*(x_t, t) = sqrt(1-ab_t) (x_t - sqrt(ab_t) mu) / (ab_t s^2 + 1 - ab_t), so every
sampler step is an affine map of x_t and the output's moments follow in closed form.
"""

import math
import subprocess
import sys

import numpy as np
import pytest

from runtime.errors import NonFiniteError
from runtime.samplers import ImageNoise, draw_noise, sample
from runtime.schedule import Schedule

MU, S = 0.3, 0.5
T = 1000


def _alphas_cumprod(timesteps):
    """Independent of Schedule: the paper's linear betas, cumulative product, kept steps."""
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    return np.cumprod(1 - betas)[np.asarray(timesteps)]


def optimal_eps(mu=MU, s=S):
    ab_all = _alphas_cumprod(np.arange(T))

    def eps_fn(x, t):
        assert t.dtype == np.float32 and t.shape == (x.shape[0],)
        ab = ab_all[t.astype(np.int64)].reshape(-1, *([1] * (x.ndim - 1)))
        return (np.sqrt(1 - ab) * (x - np.sqrt(ab) * mu) / (ab * s * s + 1 - ab)).astype(np.float32)

    return eps_fn


def _step_map(ab, ab_prev, sampler, variance, eta):
    """The affine step x -> a x + b and its noise scale, from the papers' formulas."""

    def apply(x):
        eps = math.sqrt(1 - ab) * (x - math.sqrt(ab) * MU) / (ab * S * S + 1 - ab)
        x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        if sampler == "ddpm":
            beta = 1 - ab / ab_prev
            c1 = beta * math.sqrt(ab_prev) / (1 - ab)
            c2 = (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab)
            return c1 * x0 + c2 * x
        sig = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        return math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - sig * sig) * eps

    b = apply(0.0)
    a = apply(1.0) - b
    if sampler == "ddpm":
        beta = 1 - ab / ab_prev
        sigma2 = beta if variance == "fixedlarge" else beta * (1 - ab_prev) / (1 - ab)
    else:
        sigma2 = eta**2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
    return a, b, sigma2


def _chain(steps, sampler, variance="fixedlarge", eta=0.0):
    kept = np.arange(T) if steps == T else np.round(np.linspace(0, T - 1, steps)).astype(int)
    ab = _alphas_cumprod(kept)
    ab_prev = np.append(1.0, ab[:-1])
    return [(i, *_step_map(ab[i], ab_prev[i], sampler, variance, eta))
            for i in range(len(kept) - 1, -1, -1)]


def analytic_moments(steps, sampler, variance="fixedlarge", eta=0.0):
    m, v = 0.0, 1.0
    for i, a, b, sigma2 in _chain(steps, sampler, variance, eta):
        m, v = a * m + b, a * a * v + (sigma2 if i > 0 else 0.0)
    return m, math.sqrt(v)


CASES = [
    # (sampler, steps, variance, eta, tolerance on std vs s)
    ("ddpm", 1000, "fixedlarge", 0.0, 0.02),
    ("ddpm", 1000, "fixedsmall", 0.0, 0.02),
    ("ddpm", 100, "fixedlarge", 0.0, 0.10),
    ("ddim", 50, "fixedlarge", 0.0, 0.10),
    ("ddim", 50, "fixedlarge", 1.0, 0.12),
]


@pytest.mark.parametrize("sampler, steps, variance, eta, tol", CASES)
def test_sampler_recovers_gaussian_data(sampler, steps, variance, eta, tol):
    schedule = Schedule.linear(T)
    if steps < T:
        schedule = schedule.respaced(steps)
    n = 100_000  # pixels; standard error of the std ~0.2%
    x = sample(optimal_eps(), schedule, (n // 4, 1, 2, 2), np.random.default_rng(0),
               sampler=sampler, variance=variance, eta=eta, clip_x0=False)
    assert x.dtype == np.float32
    mean, std = float(x.mean()), float(x.std())
    # The data's own moments: exact up to the chain's discretisation, which shrinks the
    # variance for coarse chains (DDIM with 50 steps: ~5%); the analytic moments below
    # account for it exactly.
    assert mean == pytest.approx(MU, abs=0.02)
    assert std == pytest.approx(S, rel=tol)
    m, sd = analytic_moments(steps, sampler, variance, eta)
    assert mean == pytest.approx(m, abs=4 * sd / math.sqrt(n))
    assert std == pytest.approx(sd, rel=4 * math.sqrt(0.5 / n))


@pytest.mark.parametrize("sampler, steps, variance, eta, tol", CASES + [
    ("ddpm", 100, "fixedsmall", 0.0, 0.0), ("ddim", 20, "fixedlarge", 0.5, 0.0)])
def test_sampler_path_matches_independent_recursion(sampler, steps, variance, eta, tol):
    """Same noise, same draws: the sampler equals the affine recursion to float32 precision."""
    schedule = Schedule.linear(T)
    if steps < T:
        schedule = schedule.respaced(steps)
    shape = (6, 1, 2, 2)
    x = sample(optimal_eps(), schedule, shape, np.random.default_rng(7), sampler=sampler,
               variance=variance, eta=eta, clip_x0=False)
    rng = np.random.default_rng(7)
    ref = draw_noise(rng, shape).astype(np.float64)
    for i, a, b, sigma2 in _chain(steps, sampler, variance, eta):
        ref = a * ref + b
        if i > 0 and (sampler == "ddpm" or eta > 0):
            ref = ref + math.sqrt(sigma2) * draw_noise(rng, shape)
    np.testing.assert_allclose(x, ref, atol=2e-5, rtol=1e-5)


def test_seed_stability_across_batch_sizes():
    schedule = Schedule.linear(T).respaced(30)
    eps_fn = optimal_eps()
    whole = sample(eps_fn, schedule, (8, 1, 3, 3), ImageNoise(123, range(8)))
    parts = [sample(eps_fn, schedule, (len(r), 1, 3, 3), ImageNoise(123, r))
             for r in (range(0, 3), range(3, 8))]
    np.testing.assert_array_equal(whole, np.concatenate(parts))
    other_seed = sample(eps_fn, schedule, (8, 1, 3, 3), ImageNoise(124, range(8)))
    assert not np.allclose(whole, other_seed)


def test_image_noise_buffering_is_invisible():
    a, b = ImageNoise(5, [2, 9], chunk=3), ImageNoise(5, [2, 9], chunk=64)
    # A byte cap below one step's noise still draws one step at a time, same values.
    c = ImageNoise(5, [2, 9], max_bytes=1)
    for _ in range(7):
        draw = a.standard_normal((1, 2))
        np.testing.assert_array_equal(draw, b.standard_normal((1, 2)))
        np.testing.assert_array_equal(draw, c.standard_normal((1, 2)))
    assert c._buffer.shape[1] == 1 and b._buffer.shape[1] == 64
    # Stream k equals the k-th child of SeedSequence(seed).spawn.
    child = np.random.default_rng(np.random.SeedSequence(5).spawn(10)[9])
    np.testing.assert_array_equal(
        ImageNoise(5, [9]).standard_normal((4,))[0], child.standard_normal((4,), dtype=np.float32))


def _checked_loop(eps_fn, schedule, shape, rng, *, sampler, variance="fixedlarge", eta=0.0,
                  clip_x0=True):
    """The loop written with the checked public steps: the fast path must equal it."""
    x = draw_noise(rng, shape)
    for i in range(schedule.num_timesteps - 1, -1, -1):
        eps = eps_fn(x, np.full(shape[0], schedule.timesteps[i], dtype=np.float32))
        noise = draw_noise(rng, shape) if i > 0 and (sampler == "ddpm" or eta > 0) else None
        if sampler == "ddpm":
            x = schedule.step(x, i, eps, noise, variance=variance, clip_x0=clip_x0)
        else:
            x = schedule.ddim_step(x, i, eps, noise, eta=eta, clip_x0=clip_x0)
    return x


@pytest.mark.parametrize("schedule", [Schedule.linear(T), Schedule.linear(T).respaced(37),
                                      Schedule.cosine(200)], ids=["full", "respaced", "cosine"])
@pytest.mark.parametrize("kwargs", [
    dict(sampler="ddpm"), dict(sampler="ddpm", variance="fixedsmall"),
    dict(sampler="ddpm", clip_x0=False), dict(sampler="ddim"), dict(sampler="ddim", eta=1.0),
    dict(sampler="ddim", eta=0.5, clip_x0=False), dict(sampler="ddim", clip_x0=False),
], ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_in_place_loop_equals_checked_steps_bit_for_bit(schedule, kwargs):
    """sample() steps in place from a coefficient table; Schedule.step allocates and checks.
    Same float64 operations in the same order, so the results must be identical. The
    network is nonlinear and pushes x_0 past the clip range, so every branch runs."""
    w = np.random.default_rng(0).standard_normal((12, 12)).astype(np.float32)

    def eps_fn(x, t):
        h = (x.reshape(len(x), -1) @ w).reshape(x.shape)
        return np.tanh(h * (1 + t[:, None, None, None] / T)).astype(np.float32) * 3

    got = sample(eps_fn, schedule, (5, 3, 2, 2), ImageNoise(3, 5), **kwargs)
    want = _checked_loop(eps_fn, schedule, (5, 3, 2, 2), ImageNoise(3, 5), **kwargs)
    np.testing.assert_array_equal(got, want)


def test_non_finite_network_output_names_the_step():
    schedule = Schedule.linear(T).respaced(10)

    def eps_fn(x, t):
        return np.full_like(x, np.nan) if t[0] < 500 else np.zeros_like(x)

    with pytest.raises(NonFiniteError, match=r"step t=444"):
        sample(eps_fn, schedule, (2, 1, 2, 2), np.random.default_rng(0))


def test_bad_sampler_arguments():
    schedule = Schedule.linear(10)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(optimal_eps(), schedule, (1, 1, 2, 2), rng, sampler="euler")
    with pytest.raises(ValueError, match="eta"):
        sample(optimal_eps(), schedule, (1, 1, 2, 2), rng, sampler="ddim", eta=-1.0)
    with pytest.raises(ValueError, match="shape"):
        sample(lambda x, t: x[:, :1], schedule, (1, 2, 2, 2), rng)
    with pytest.raises(ValueError, match="streams"):
        sample(optimal_eps(), schedule, (3, 1, 2, 2), ImageNoise(0, 2))


def test_runtime_never_imports_torch():
    """Import every module under runtime/ in a fresh interpreter: torch must stay out."""
    code = (
        "import importlib, pkgutil, sys, runtime\n"
        "for m in pkgutil.walk_packages(runtime.__path__, 'runtime.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in"
        " ('torch', 'tensorrt', 'training', 'export'))\n"
        "assert not bad, bad\n"
        "print(len([k for k in sys.modules if k.startswith('runtime')]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 4
