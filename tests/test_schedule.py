"""The numpy schedule against closed forms computed independently here."""

import math

import numpy as np
import pytest

from runtime.schedule import Schedule


def _linear_reference(T, start, end):
    """Plain-Python float64 loop over the paper's definitions."""
    betas = [start + (end - start) * i / (T - 1) for i in range(T)]
    ab, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        ab.append(prod)
    return np.array(betas), np.array(ab)


def test_linear_schedule_matches_closed_form():
    s = Schedule.linear(1000, beta_start=1e-4, beta_end=0.02)
    betas, ab = _linear_reference(1000, 1e-4, 0.02)
    np.testing.assert_allclose(s.betas, betas, rtol=1e-12, atol=0)
    np.testing.assert_allclose(s.alphas_cumprod, ab, rtol=1e-12)
    np.testing.assert_allclose(s.alphas_cumprod_prev[1:], ab[:-1], rtol=1e-12)
    assert s.alphas_cumprod_prev[0] == 1.0
    np.testing.assert_allclose(s.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / ab - 1), rtol=1e-12)
    assert s.betas.dtype == np.float64 and s.alphas_cumprod.dtype == np.float64
    # The paper's schedule leaves almost no signal at T: ab_T ~ 4e-5.
    assert 1e-5 < s.alphas_cumprod[-1] < 1e-4


def test_cosine_schedule_matches_closed_form():
    T, off = 1000, 0.008
    s = Schedule.cosine(T, s=off)

    def f(t):
        return math.cos((t / T + off) / (1 + off) * math.pi / 2) ** 2

    for t in [0, 1, 10, 500, 900, 998]:
        assert s.alphas_cumprod[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert s.betas.max() <= 0.999 and s.betas.min() > 0


def test_posterior_is_the_product_of_gaussians():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): precision and mean add up."""
    s = Schedule.linear()
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 1, 2, 2))
    xt = rng.standard_normal((3, 1, 2, 2))
    for t in [1, 2, 50, 500, 999]:
        ab_prev, a, b = s.alphas_cumprod[t - 1], 1 - s.betas[t], s.betas[t]
        precision = 1 / (1 - ab_prev) + a / b
        mean = (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(a) * xt / b) / precision
        got_mean, got_var, got_logvar = s.q_posterior(x0, xt, t)
        np.testing.assert_allclose(got_mean, mean, rtol=1e-9, atol=1e-12)
        assert float(got_var) == pytest.approx(1 / precision, rel=1e-9)
        assert float(got_logvar) == pytest.approx(math.log(1 / precision), rel=1e-9)
    # At t = 0 the posterior collapses onto x0 and the log variance stays finite.
    mean0, var0, logvar0 = s.q_posterior(x0, xt, 0)
    np.testing.assert_allclose(mean0, x0, atol=1e-12)
    assert float(var0) == 0 and np.isfinite(logvar0)


def test_q_sample_statistics():
    s = Schedule.linear()
    rng = np.random.default_rng(1)
    x0 = np.full((200_000, 1), 0.7)
    for t in [0, 100, 999]:
        xt = s.q_sample(x0, t, rng.standard_normal(x0.shape))
        ab = s.alphas_cumprod[t]
        assert xt.mean() == pytest.approx(math.sqrt(ab) * 0.7, abs=5e-3)
        assert xt.var() == pytest.approx(1 - ab, rel=2e-2, abs=2e-4)


def test_predict_x0_and_eps_invert_q_sample():
    s = Schedule.linear()
    rng = np.random.default_rng(2)
    x0 = rng.uniform(-1, 1, (4, 3, 4, 4))
    eps = rng.standard_normal(x0.shape)
    t = np.array([0, 10, 500, 999])
    xt = s.q_sample(x0, t, eps)
    np.testing.assert_allclose(s.predict_x0(xt, t, eps), x0, atol=1e-9)
    # eps from x_t and x0: eq. (4) solved for the noise, from the schedule's own tables.
    b = (slice(None), None, None, None)
    eps_back = ((s.sqrt_recip_alphas_cumprod[t][b] * xt - x0)
                / s.sqrt_recipm1_alphas_cumprod[t][b])
    np.testing.assert_allclose(eps_back, eps, atol=1e-7)


def test_step_is_posterior_mean_plus_scaled_noise():
    s = Schedule.linear()
    rng = np.random.default_rng(3)
    x0 = rng.uniform(-0.5, 0.5, (2, 1, 3, 3))
    eps = rng.standard_normal(x0.shape)
    z = rng.standard_normal(x0.shape)
    for t in [0, 1, 400, 999]:
        xt = s.q_sample(x0, t, eps)
        mean, var, _ = s.q_posterior(x0, xt, t)
        for variance, sigma2 in [("fixedlarge", s.betas[t]), ("fixedsmall", float(var))]:
            got = s.step(xt, t, eps, z, variance=variance, clip_x0=False)
            expected = mean + (math.sqrt(sigma2) * z if t > 0 else 0)
            np.testing.assert_allclose(got, expected, atol=1e-9)
    # Clipping bounds the predicted x0: a huge eps cannot push the mean outside the data range.
    xt = np.zeros((1, 1, 2, 2))
    out = s.step(xt, 0, np.full_like(xt, -1e3), variance="fixedsmall", clip_x0=True)
    assert np.all(out <= 1.0 + 1e-12)


def test_step_keeps_float32_state():
    s = Schedule.linear()
    x = np.ones((2, 1, 2, 2), np.float32)
    out = s.step(x, 5, np.zeros_like(x), np.zeros_like(x))
    assert out.dtype == np.float32


def test_per_sample_timesteps_match_scalar_steps():
    s = Schedule.linear()
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 2, 2, 2))
    eps, z = rng.standard_normal(x.shape), rng.standard_normal(x.shape)
    t = np.array([0, 7, 999])
    batched = s.step(x, t, eps, z)
    for k in range(3):
        single = s.step(x[k:k + 1], int(t[k]), eps[k:k + 1], z[k:k + 1])
        np.testing.assert_allclose(batched[k:k + 1], single, atol=1e-12)


def test_respaced_keeps_alphas_cumprod_and_both_ends():
    s = Schedule.linear()
    r = s.respaced(100)
    assert r.num_timesteps == 100
    assert r.timesteps[0] == 0 and r.timesteps[-1] == 999
    assert np.all(np.diff(r.timesteps) > 0)
    np.testing.assert_allclose(r.alphas_cumprod, s.alphas_cumprod[r.timesteps], rtol=1e-12)
    assert np.all((r.betas > 0) & (r.betas < 1))
    full = s.respaced(1000)
    np.testing.assert_allclose(full.betas, s.betas, rtol=1e-9)
    assert Schedule.from_config(r.config).timesteps.tolist() == r.timesteps.tolist()


def test_config_round_trip():
    for s in [Schedule.linear(500, beta_start=2e-4, beta_end=0.03), Schedule.cosine(200)]:
        np.testing.assert_array_equal(Schedule.from_config(s.config).betas, s.betas)


@pytest.mark.parametrize(
    "betas, match",
    [
        ([0.1, 0.0, 0.2], r"\(0, 1\)"),
        ([0.1, 1.0], r"\(0, 1\)"),
        ([0.1, float("nan")], "NaN"),
        ([[0.1, 0.2]], "1-D"),
        ([], "non-empty"),
        # Each beta lies in (0, 1); the product of the alphas leaves float64's normal range
        # at step 21 ((1.1e-15)**21 / 2 < 2.2e-308).
        ([0.5] + [1 - 1e-15] * 22, "by step 21 of 23"),
    ],
)
def test_invalid_betas_raise(betas, match):
    with pytest.raises(ValueError, match=match):
        Schedule(np.array(betas, dtype=np.float64))


def test_the_longest_sane_linear_schedule_builds_and_its_tables_are_finite():
    """T = 70,000 keeps alphas_cumprod a normal float64 (~2.6e-308); 100,000 (the record's
    upper bound on T) does not and is refused rather than sampling NaN."""
    s = Schedule.linear(70_000)
    for table in (s.sqrt_recip_alphas_cumprod, s.sqrt_recipm1_alphas_cumprod, s.posterior_variance):
        assert np.all(np.isfinite(table))
    with pytest.raises(ValueError, match="falls below float64's range"):
        Schedule.linear(100_000)


def test_bad_inputs_raise_clear_errors():
    s = Schedule.linear(10)
    x = np.zeros((2, 1, 2, 2), np.float32)
    with pytest.raises(ValueError, match="out of range"):
        s.q_sample(x, 10, x)
    with pytest.raises(ValueError, match="out of range"):
        s.step(x, -1, x, x)
    with pytest.raises(ValueError, match="one entry per sample"):
        s.step(x, np.array([1, 2, 3]), x, x)
    with pytest.raises(ValueError, match="shape"):
        s.predict_x0(x, 1, np.zeros((2, 1, 2, 3), np.float32))
    with pytest.raises(ValueError, match="NaN or inf"):
        s.step(x, 1, np.full_like(x, np.nan), x)
    with pytest.raises(ValueError, match="integer"):
        s.q_sample(x, 1.5, x)
    with pytest.raises(ValueError, match="noise is required"):
        s.step(x, 3, x)
    with pytest.raises(ValueError, match="unknown variance"):
        s.step(x, 3, x, x, variance="learned")
    with pytest.raises(ValueError, match="respace"):
        s.respaced(11)
    with pytest.raises(ValueError, match="positive integer"):
        Schedule.linear(0)
    with pytest.raises(ValueError, match="unknown schedule kind"):
        Schedule.from_config({"kind": "quadratic"})
