"""The variational bound in bits/dim (runtime/likelihood.py): closed forms and torch parity.

For data x0 ~ N(mu, s^2) per pixel the optimal predictor is
eps*(x_t, t) = sqrt(1-ab_t) (x_t - sqrt(ab_t) mu) / (ab_t s^2 + 1 - ab_t). Then the model's
reverse means are exact and the bound's expectation is the data entropy H plus
KL(q(x_{0:T}) || p(x_{0:T})), which for Gaussians with equal means is
sum_t 1/2 (r_t - 1 - log r_t), r_t = true reverse variance / model variance, plus the
prior's KL: a closed form, computed here from the paper's formulas alone.
"""

import math

import numpy as np
import pytest

from runtime.likelihood import (
    bits_per_dim,
    discretized_gaussian_log_likelihood,
    model_log_variance,
    normal_kl,
)
from runtime.schedule import Schedule

T = 1000
LN2 = math.log(2.0)


def _linear_schedule_arrays(num_timesteps=T):
    """Independent of Schedule: the paper's betas and the posterior quantities, float64."""
    betas = np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float64)
    ab = np.cumprod(1.0 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
    coef1 = betas * np.sqrt(ab_prev) / (1.0 - ab)
    return betas, ab, post_var, coef1


def _grid(lo, hi, levels):
    return lo + (hi - lo) / (levels - 1) * np.arange(levels)


def _quantise(x, lo, hi, levels):
    width = (hi - lo) / (levels - 1)
    return np.clip(lo + np.round((x - lo) / width) * width, lo, hi)


def _normal_cdf(z):
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


# === Closed forms ===


class TestGaussianData:
    MU, S = 0.1, 0.5
    # A range wide enough that the data never reach its ends, and bins ~7x narrower than
    # the decoder's std (~0.0074), so the discrete bound tracks the continuous closed form.
    LO, HI, LEVELS = -4.0, 4.0, 8001
    N = 512

    def _eps_fn(self, ab):
        mu, s = self.MU, self.S

        def eps_fn(x, t):
            a = ab[t.astype(np.int64)].reshape(-1, 1, 1, 1)
            return (np.sqrt(1 - a) * (x - np.sqrt(a) * mu) / (a * s * s + 1 - a)).astype(
                np.float32)

        return eps_fn

    def _entropy_bits(self):
        """Entropy of the discretised data, summed over the grid's bins."""
        grid = _grid(self.LO, self.HI, self.LEVELS)
        half = (self.HI - self.LO) / (self.LEVELS - 1) / 2
        p = np.array([_normal_cdf((g + half - self.MU) / self.S)
                      - _normal_cdf((g - half - self.MU) / self.S) for g in grid])
        p = p[p > 0]
        return float(-(p * np.log(p)).sum() / LN2)

    def _gap_bits(self, variance):
        betas, ab, post_var, coef1 = _linear_schedule_arrays()
        s2 = self.S**2
        var_x0 = s2 * (1 - ab) / (ab * s2 + 1 - ab)    # Var(x_0 | x_t), Gaussian data
        true_var = post_var + coef1**2 * var_x0        # Var(x_{t-1} | x_t); at t=0, var_x0
        model = betas.copy() if variance == "fixedlarge" else post_var.copy()
        model[0] = post_var[1]
        r = true_var / model
        v_T = ab[-1] * s2 + 1 - ab[-1]                 # q(x_T) = N(sqrt(ab_T) mu, v_T)
        prior = 0.5 * (v_T - 1 - math.log(v_T) + ab[-1] * self.MU**2)
        return float((0.5 * (r - 1 - np.log(r)).sum() + prior) / LN2)

    @pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
    def test_bound_is_entropy_plus_closed_form_gap(self, variance):
        _, ab, _, _ = _linear_schedule_arrays()
        rng = np.random.default_rng(0)
        x0 = _quantise(rng.normal(self.MU, self.S, (self.N, 1, 8, 8)), self.LO, self.HI,
                       self.LEVELS)
        out = bits_per_dim(self._eps_fn(ab), Schedule.linear(T), x0, np.random.default_rng(1),
                           data_range=(self.LO, self.HI), num_levels=self.LEVELS,
                           variance=variance)
        total = out["total_bpd"]
        stderr = total.std() / math.sqrt(self.N)
        entropy, gap = self._entropy_bits(), self._gap_bits(variance)
        # The parts add up, and the bound is H + gap within Monte Carlo error (~0.013 here).
        np.testing.assert_allclose(
            total, out["prior_bpd"] + out["kl_bpd"] + out["decoder_bpd"], rtol=1e-12)
        assert abs(total.mean() - (entropy + gap)) < 5 * stderr + 1e-3, (
            total.mean(), entropy, gap, stderr)
        if variance == "fixedlarge":
            # The paper's choice: within 0.2 bits/dim (~2%) of the entropy, and not below it.
            assert -5 * stderr < total.mean() - entropy < 0.2

    def test_terms_match_their_expectations(self):
        """Decoder and KL sum separately, at sigma^2 = beta (fixedlarge)."""
        betas, ab, post_var, coef1 = _linear_schedule_arrays()
        s2 = self.S**2
        var_x0 = s2 * (1 - ab) / (ab * s2 + 1 - ab)
        width = (self.HI - self.LO) / (self.LEVELS - 1)
        m0 = post_var[1]
        decoder = (0.5 * math.log(2 * math.pi * m0) + var_x0[0] / (2 * m0)
                   - math.log(width)) / LN2
        m = betas[1:]
        kl = (0.5 * (np.log(m / post_var[1:]) - 1 + post_var[1:] / m
                     + coef1[1:] ** 2 * var_x0[1:] / m)).sum() / LN2
        x0 = _quantise(np.random.default_rng(2).normal(self.MU, self.S, (self.N, 1, 8, 8)),
                       self.LO, self.HI, self.LEVELS)
        out = bits_per_dim(self._eps_fn(ab), Schedule.linear(T), x0, np.random.default_rng(3),
                           data_range=(self.LO, self.HI), num_levels=self.LEVELS)
        for name, want in [("decoder_bpd", decoder), ("kl_bpd", kl)]:
            got = out[name]
            assert abs(got.mean() - want) < 5 * got.std() / math.sqrt(self.N) + 1e-3, (name,
                                                                                       got.mean(),
                                                                                       want)


def test_decoder_is_a_distribution_over_the_levels():
    """The bins, outer ones to +-inf, partition the line: probabilities sum to 1."""
    rng = np.random.default_rng(0)
    for lo, hi, levels in [(-1.0, 1.0, 17), (-1.0, 1.0, 256), (0.0, 3.0, 4)]:
        grid = _grid(lo, hi, levels)
        means = rng.uniform(lo - 0.5, hi + 0.5, size=(5, 1))
        log_scales = rng.uniform(-5, 0.5, size=(5, 1))
        x = np.broadcast_to(grid, (5, levels))
        log_p = discretized_gaussian_log_likelihood(
            x, np.broadcast_to(means, x.shape), np.broadcast_to(log_scales, x.shape),
            (hi - lo) / (levels - 1), data_range=(lo, hi))
        assert np.all(log_p <= 0)
        np.testing.assert_allclose(np.exp(log_p).sum(axis=1), 1.0, atol=levels * 1e-12 + 1e-9)


def test_decoder_upper_tail_is_accurate():
    """Both edges far above the mean: Phi(b) - Phi(a) would cancel to 0; the mirror does not."""
    log_p = discretized_gaussian_log_likelihood(np.array([0.5]), np.array([0.0]),
                                                np.array([math.log(0.08)]), 2 / 16)
    want = math.log(_normal_cdf(-(0.5 - 1 / 16) / 0.08) - _normal_cdf(-(0.5 + 1 / 16) / 0.08))
    assert want > math.log(1e-12)
    np.testing.assert_allclose(log_p, want, rtol=1e-9)


def test_normal_kl_properties():
    rng = np.random.default_rng(0)
    m1, m2, l1, l2 = rng.normal(size=(4, 100))
    kl = normal_kl(m1, l1, m2, l2)
    assert np.all(kl >= 0)
    np.testing.assert_allclose(normal_kl(m1, l1, m1, l1), 0.0, atol=1e-15)
    # Monte Carlo against E_1[log N1 - log N2].
    x = m1[0] + np.exp(0.5 * l1[0]) * rng.standard_normal(400_000)

    def log_n(v, m, lv):
        return -0.5 * (math.log(2 * math.pi) + lv + (v - m) ** 2 / math.exp(lv))

    mc = np.mean(log_n(x, m1[0], l1[0]) - log_n(x, m2[0], l2[0]))
    assert abs(mc - kl[0]) < 0.02 + 0.02 * kl[0]


def test_fixedlarge_decoder_variance_is_finite_and_improved_ddpm_s():
    s = Schedule.linear(T)
    large = model_log_variance(s, "fixedlarge")
    small = model_log_variance(s, "fixedsmall")
    assert np.all(np.isfinite(large)) and np.all(np.isfinite(small))
    assert large[0] == small[0] == math.log(s.posterior_variance[1])
    np.testing.assert_allclose(large[1:], np.log(s.betas[1:]))
    with pytest.raises(ValueError, match="variance"):
        model_log_variance(s, "learned")


def test_network_gets_original_timesteps_on_a_respaced_chain():
    s = Schedule.linear(T).respaced(10)
    seen = []

    def eps_fn(x, t):
        assert x.dtype == np.float32 and t.dtype == np.float32 and t.shape == (x.shape[0],)
        seen.append(float(t[0]))
        return np.zeros_like(x)

    x0 = _quantise(np.random.default_rng(0).uniform(-1, 1, (3, 1, 4, 4)), -1, 1, 17)
    out = bits_per_dim(eps_fn, s, x0, np.random.default_rng(0), num_levels=17)
    assert seen == [float(t) for t in s.timesteps[::-1]]
    assert out["vb_bpd"].shape == (3, 10) and np.all(np.isfinite(out["total_bpd"]))


def test_rejects_data_outside_the_range():
    with pytest.raises(ValueError, match="data range"):
        bits_per_dim(lambda x, t: x, Schedule.linear(5), np.full((1, 1, 2, 2), 1.5),
                     np.random.default_rng(0), num_levels=17)


# === Parity with an independent torch computation ===


def test_terms_match_a_direct_torch_computation():
    torch = pytest.importorskip("torch")
    num_t, levels, lo, hi = 40, 17, -1.0, 1.0
    x0 = _quantise(np.random.default_rng(0).uniform(-1.2, 1.2, (4, 1, 4, 4)), lo, hi, levels)

    def eps_np(x, t):
        # Nonlinear in x and t, and large enough that x_0 gets clipped at some steps.
        return (np.tanh(1.5 * x) * (1 + t.reshape(-1, 1, 1, 1) / num_t)).astype(np.float32)

    out = bits_per_dim(eps_np, Schedule.linear(num_t), x0, np.random.default_rng(7),
                       data_range=(lo, hi), num_levels=levels, variance="fixedlarge")

    # The same terms, straight from the papers' formulas, in torch float64.
    f64 = torch.float64
    betas = torch.linspace(1e-4, 0.02, num_t, dtype=f64)
    ab = torch.cumprod(1 - betas, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=f64), ab[:-1]])
    post_var = betas * (1 - ab_prev) / (1 - ab)
    model_logvar = torch.log(torch.cat([post_var[1:2], betas[1:]]))
    x0_t = torch.from_numpy(x0)
    noise_rng = np.random.default_rng(7)  # the documented order: one draw per step, T-1..0
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=f64), torch.tensor(1.0, dtype=f64))
    width = (hi - lo) / (levels - 1)
    want = torch.zeros(4, num_t, dtype=f64)
    for i in reversed(range(num_t)):
        noise = torch.from_numpy(noise_rng.standard_normal(x0.shape))
        x_t = (ab[i].sqrt() * x0_t + (1 - ab[i]).sqrt() * noise).float().double()
        t_in = torch.full((4, 1, 1, 1), float(i), dtype=f64)
        eps = (torch.tanh(1.5 * x_t.float()) * (1 + t_in.float() / num_t)).double()
        pred_x0 = ((x_t - (1 - ab[i]).sqrt() * eps) / ab[i].sqrt()).clamp(lo, hi)

        def post_mean(start, x_t=x_t, i=i):
            return (betas[i] * ab_prev[i].sqrt() * start
                    + (1 - ab_prev[i]) * (1 - betas[i]).sqrt() * x_t) / (1 - ab[i])

        mean = post_mean(pred_x0)
        if i == 0:
            std = torch.exp(0.5 * model_logvar[0])
            upper = torch.where(x0_t > hi - width / 2, torch.tensor(math.inf, dtype=f64),
                                (x0_t + width / 2 - mean) / std)
            lower = torch.where(x0_t < lo + width / 2, torch.tensor(-math.inf, dtype=f64),
                                (x0_t - width / 2 - mean) / std)
            prob = normal.cdf(upper) - normal.cdf(lower)
            term = -torch.log(prob.clamp(min=1e-12))
        else:
            true_logvar = torch.log(post_var[i])
            term = 0.5 * (-1 + model_logvar[i] - true_logvar
                          + torch.exp(true_logvar - model_logvar[i])
                          + (post_mean(x0_t) - mean) ** 2 * torch.exp(-model_logvar[i]))
        want[:, i] = term.flatten(1).mean(1) / LN2
    prior = 0.5 * (-1 - torch.log(1 - ab[-1]) + (1 - ab[-1]) + ab[-1] * x0_t**2)
    prior = prior.flatten(1).mean(1) / LN2

    np.testing.assert_allclose(out["vb_bpd"], want.numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(out["prior_bpd"], prior.numpy(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(out["total_bpd"], (want.sum(1) + prior).numpy(), rtol=1e-6)
