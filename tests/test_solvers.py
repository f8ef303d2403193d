"""Every registered sampler against diffusers' schedulers, an implementation written
elsewhere, driven by the same ε-function and noise; and the solvers' order of
convergence on Gaussian data, where the exact ε and the exact answer are known."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.samplers import REGISTRY, SAMPLERS, ImageNoise, draw_noise, make_sampler, sample
from runtime.schedule import SPACINGS, Schedule, spaced_timesteps

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers", reason="diffusers is a dev dependency (parity only)")

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              # diffusers' own code under numpy 2 (not ours)
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

T = 1000
FULL = Schedule.linear(T)
MU, S = 0.3, 0.8  # wide enough data that x_0 predictions leave [-1, 1] and get clipped
W = np.random.default_rng(0).standard_normal((12, 12)) / np.sqrt(12)
SHAPE = (16, 3, 2, 2)


def eps_fn(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The optimal ε of N(MU, S^2) data plus a nonlinear term, so history matters."""
    ab = FULL.alphas_cumprod[t.astype(np.int64)].reshape(-1, 1, 1, 1)
    gauss = np.sqrt(1 - ab) * (x - np.sqrt(ab) * MU) / (ab * S * S + 1 - ab)
    h = (x.reshape(len(x), -1) @ W).reshape(x.shape)
    return (gauss + 0.2 * np.tanh(h)).astype(np.float32)


def ours(name, schedule, x, *, clip_x0=True, noise=None, **options):
    """The trajectory: the state after each step."""
    solver = make_sampler(name, schedule, x.shape, clip_x0=clip_x0, **options)
    x, path = x.copy(), []
    while not solver.done:
        eps = eps_fn(x, np.full(len(x), solver.t, np.float32))
        solver.step(x, eps, draw_noise(noise, x.shape) if solver.needs_noise else None)
        path.append(x.copy())
    return np.array(path)


def _diffusers_common(spacing):
    # diffusers has no quadratic spacing; those timesteps are handed over below.
    return dict(num_train_timesteps=T, trained_betas=FULL.betas.tolist(),
                prediction_type="epsilon",
                timestep_spacing="linspace" if spacing == "quadratic" else spacing)


def _solver_scheduler(name, schedule, spacing):
    """diffusers' multistep scheduler for ``name``, on ``schedule``'s timesteps."""
    # Thresholding with sample_max_value 1 is plain clipping of x_0 to [-1, 1].
    common = dict(_diffusers_common(spacing), thresholding=True, sample_max_value=1.0,
                  lower_order_final=True, final_sigmas_type="zero")
    if name == "unipc":
        sched = diffusers.UniPCMultistepScheduler(
            solver_order=REGISTRY["unipc"].order, solver_type="bh2", predict_x0=True, **common)
    else:
        sched = diffusers.DPMSolverMultistepScheduler(
            algorithm_type="dpmsolver++", solver_order=REGISTRY[name].order,
            solver_type="midpoint", **common)
    n = schedule.num_timesteps
    sched.set_timesteps(n)
    want = schedule.timesteps[::-1].copy()
    if spacing == "trailing":  # the same rule on both sides
        assert sched.timesteps.tolist() == want.tolist()
    else:
        # diffusers spaces n + 1 points and drops the last for these; give it ours (its own
        # sigma rule at each timestep, and the final sigma 0).
        ab = FULL.alphas_cumprod[want]
        sched.timesteps = torch.from_numpy(want)
        sched.sigmas = torch.from_numpy(
            np.append(np.sqrt((1 - ab) / ab), 0.0).astype(np.float32))
    return sched


def theirs(sched, x, noise=None, **step_kwargs):
    xt, path = torch.from_numpy(x.copy()), []
    for t in sched.timesteps:
        eps = eps_fn(xt.numpy(), np.full(len(x), float(t), np.float32))
        xt = sched.step(torch.from_numpy(eps), t, xt, **step_kwargs).prev_sample
        path.append(xt.numpy().copy())
    return np.array(path)


def x_T():
    return np.random.default_rng(1).standard_normal(SHAPE, dtype=np.float32)


@pytest.mark.parametrize("steps", [8, 20])  # below and above diffusers' lower-order-final cut
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing", "quadratic"])
@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "unipc"])
def test_solver_trajectory_matches_diffusers(name, spacing, steps):
    schedule = FULL.respaced(steps, spacing)
    x = x_T()
    got = ours(name, schedule, x)
    want = theirs(_solver_scheduler(name, schedule, spacing), x)
    assert got.shape == want.shape == (steps, *SHAPE)
    # diffusers computes in float32 (its sigmas too); the runtime in float64 tables.
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    # The final state is the clipped x_0, and clipping was in play along the way.
    assert np.abs(got[-1]).max() <= 1.0
    assert np.abs(ours(name, schedule, x, clip_x0=False)[-1] - got[-1]).max() > 1e-2


@pytest.mark.parametrize("steps", [20, 250])
@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
def test_ddpm_trajectory_matches_diffusers(steps, variance, monkeypatch):
    schedule = FULL.respaced(steps)
    sched = diffusers.DDPMScheduler(
        **_diffusers_common("linspace"), clip_sample=True, clip_sample_range=1.0,
        variance_type="fixed_large" if variance == "fixedlarge" else "fixed_small")
    sched.set_timesteps(timesteps=schedule.timesteps[::-1].tolist())
    # diffusers draws its own noise inside step(); hand it the runtime's stream instead.
    stream = ImageNoise(5, SHAPE[0])
    monkeypatch.setattr("diffusers.schedulers.scheduling_ddpm.randn_tensor",
                        lambda shape, **_: torch.from_numpy(draw_noise(stream, shape).copy()))
    x = x_T()
    want = theirs(sched, x)
    got = ours("ddpm", schedule, x, noise=ImageNoise(5, SHAPE[0]), variance=variance)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_trajectory_matches_diffusers(eta):
    # DDIMScheduler steps by a fixed stride T // n: the "leading" spacing.
    schedule = FULL.respaced(25, "leading")
    sched = diffusers.DDIMScheduler(**_diffusers_common("leading"), clip_sample=True,
                                    clip_sample_range=1.0, set_alpha_to_one=True)
    sched.set_timesteps(25)
    assert sched.timesteps.tolist() == schedule.timesteps[::-1].tolist()
    x, stream = x_T(), ImageNoise(9, SHAPE[0])

    def step_noise():
        return torch.from_numpy(draw_noise(stream, SHAPE).copy()) if eta > 0 else None

    xt, want = torch.from_numpy(x.copy()), []
    for t in sched.timesteps:
        eps = eps_fn(xt.numpy(), np.full(len(x), float(t), np.float32))
        noise = step_noise() if int(t) > 0 else None
        xt = sched.step(torch.from_numpy(eps), t, xt, eta=eta, use_clipped_model_output=True,
                        variance_noise=noise).prev_sample
        want.append(xt.numpy().copy())
    got = ours("ddim", schedule, x, noise=ImageNoise(9, SHAPE[0]), eta=eta)
    np.testing.assert_allclose(got, np.array(want), rtol=0, atol=2e-5)


# === Order of convergence ===

# A schedule uniform in lambda = log(alpha / sigma), from 4 (index 0) to -4: a respaced
# chain with n - 1 dividing T - 1 takes equal steps in lambda, and its first and last
# points do not depend on n, so the exact answer is the same for every n.
LAM = np.linspace(4.0, -4.0, 1281)
AB = 1 / (1 + np.exp(-2 * LAM))
UNIFORM = Schedule(1 - AB / np.append(1.0, AB[:-1]))
GMU, GS = 0.3, 0.5


def _gaussian_eps(x, t):
    ab = AB[t.astype(np.int64)].reshape(-1, *([1] * (x.ndim - 1)))
    return (np.sqrt(1 - ab) * (x - np.sqrt(ab) * GMU) / (ab * GS**2 + 1 - ab)).astype(np.float32)


def _exact_x0(x_start):
    """The probability-flow ODE keeps z = (x - sqrt(ab) mu) / sqrt(ab s^2 + 1 - ab); the last
    step returns the posterior mean of x_0 at the least noisy point."""
    ab_hi, ab_lo = AB[-1], AB[0]
    z = (x_start.astype(np.float64) - np.sqrt(ab_hi) * GMU) / np.sqrt(ab_hi * GS**2 + 1 - ab_hi)
    return GMU + np.sqrt(ab_lo) * GS**2 * z / np.sqrt(ab_lo * GS**2 + 1 - ab_lo)


# Measured slopes are about 1.0, 2.0, 2.0-2.3 and 3.0-3.4: DPM-Solver++ 3M's first,
# first-order step caps its global order at 2, as in diffusers; UniPC's corrector lifts
# its warm-up, so it shows its predictor's order 3.
ORDERS = {"ddim": 0.9, "dpmpp_2m": 1.8, "dpmpp_3m": 1.8, "unipc": 2.7}


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_error_falls_at_the_solver_order(name):
    shape = (64, 1, 1, 1)
    errors = []
    for n in (21, 41, 81):
        x = sample(_gaussian_eps, UNIFORM.respaced(n), shape, np.random.default_rng(0),
                   sampler=name, clip_x0=False)
        start = draw_noise(np.random.default_rng(0), shape)
        errors.append(np.abs(x - _exact_x0(start)).max())
    slopes = -np.diff(np.log2(errors))
    assert np.all(slopes >= ORDERS[name]), (name, errors, slopes)
    assert errors[-1] < 5e-2


def test_higher_order_solvers_beat_ddim_at_equal_calls():
    shape = (64, 1, 1, 1)
    start = draw_noise(np.random.default_rng(0), shape)
    errors = {name: np.abs(sample(_gaussian_eps, UNIFORM.respaced(11), shape,
                                  np.random.default_rng(0), sampler=name, clip_x0=False)
                           - _exact_x0(start)).max() for name in ORDERS}
    assert errors["unipc"] < errors["dpmpp_3m"] < errors["ddim"]
    assert errors["dpmpp_2m"] < errors["ddim"] / 4


# === Spacing and the registry ===

@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("n", [1, 2, 7, 50, 999])
def test_spacings_keep_n_distinct_steps(spacing, n):
    keep = spaced_timesteps(T, n, spacing)
    assert keep.shape == (n,) and np.all(np.diff(keep) > 0) and 0 <= keep[0] and keep[-1] < T
    r = FULL.respaced(n, spacing)
    assert r.timesteps.tolist() == keep.tolist() and r.config["spacing"] == spacing
    np.testing.assert_allclose(r.alphas_cumprod, FULL.alphas_cumprod[keep], rtol=1e-10)
    again = Schedule.from_config(r.config)
    assert again.timesteps.tolist() == keep.tolist()


def test_spacing_rules():
    assert spaced_timesteps(T, 5, "leading").tolist() == [0, 200, 400, 600, 800]
    assert spaced_timesteps(T, 5, "trailing").tolist() == [199, 399, 599, 799, 999]
    assert spaced_timesteps(T, 5, "linspace").tolist() == [0, 250, 500, 749, 999]
    quad = spaced_timesteps(T, 5, "quadratic")
    assert quad.tolist() == [0, 50, 200, 450, 800]  # 0.8 T (j / 4)^2
    with pytest.raises(ValueError, match="spacing"):
        FULL.respaced(10, "cosine")


@pytest.mark.parametrize("spacing", SPACINGS)
def test_respacing_to_all_steps_is_the_identity(spacing):
    for s in (FULL, Schedule.cosine(200)):
        r = s.respaced(s.num_timesteps, spacing)
        np.testing.assert_array_equal(r.betas, s.betas)
        np.testing.assert_array_equal(r.timesteps, s.timesteps)
        assert r.config == s.config


def test_full_respaced_chain_samples_bit_for_bit_like_the_full_chain():
    a = sample(eps_fn, FULL, (2, 3, 2, 2), ImageNoise(0, 2), sampler="ddim")
    b = sample(eps_fn, FULL.respaced(T), (2, 3, 2, 2), ImageNoise(0, 2), sampler="ddim")
    np.testing.assert_array_equal(a, b)


def test_every_sampler_is_stepwise_drivable_on_its_own_rows():
    """What a step-level batching server does: one sampler per request over its rows, one
    network call over all rows, each sampler stepping its slice. It must equal sampling
    each request alone, bit for bit."""
    schedule = FULL.respaced(12)
    for name in SAMPLERS:
        rows = [(0, 3), (3, 5)]
        noise = [ImageNoise(4, range(a, b)) for a, b in rows]
        solvers = [make_sampler(name, schedule, (b - a, 3, 2, 2)) for a, b in rows]
        x = np.concatenate([draw_noise(z, (b - a, 3, 2, 2))
                            for z, (a, b) in zip(noise, rows, strict=True)])
        while not solvers[0].done:
            t = np.concatenate([np.full(b - a, s.t, np.float32)
                                for s, (a, b) in zip(solvers, rows, strict=True)])
            eps = eps_fn(x, t)
            for s, z, (a, b) in zip(solvers, noise, rows, strict=True):
                s.step(x[a:b], eps[a:b],
                       draw_noise(z, (b - a, 3, 2, 2)) if s.needs_noise else None)
        alone = np.concatenate([sample(eps_fn, schedule, (b - a, 3, 2, 2),
                                       ImageNoise(4, range(a, b)), sampler=name)
                                for a, b in rows])
        np.testing.assert_array_equal(x, alone, err_msg=name)
        with pytest.raises(IndexError):
            solvers[0].step(x[:3], eps[:3])
    fresh = make_sampler("ddpm", schedule, (3, 3, 2, 2))
    with pytest.raises(ValueError, match="needs noise"):
        fresh.step(x[:3], eps[:3])
    with pytest.raises(ValueError, match="shape"):
        fresh.step(x[:2], eps[:2], x[:2])


def test_options_are_checked_per_sampler():
    with pytest.raises(ValueError, match="eta does not apply"):
        sample(eps_fn, FULL.respaced(4), SHAPE, np.random.default_rng(0), sampler="unipc",
               eta=0.5)
    with pytest.raises(ValueError, match="variance does not apply to the dpmpp_2m sampler"):
        make_sampler("dpmpp_2m", FULL, SHAPE, variance="fixedsmall")
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("euler", FULL, SHAPE)
    # Defaults of options a sampler does not take are accepted (the loop's signature).
    sample(eps_fn, FULL.respaced(3), SHAPE, np.random.default_rng(0), sampler="dpmpp_3m",
           variance="fixedlarge", eta=0.0)
