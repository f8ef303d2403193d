"""tools/evaluate.py inpaint, img2img, ratedistortion: the properties their figures rest on.

The network is the exact eps of Gaussian data (every pixel N(MU, SD^2)), so the predicted
x_0 is the posterior mean and its error has a closed form.
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime.metadata import ModelRecord
from runtime.pipeline import Pipeline
from runtime.schedule import Schedule
from tools.evaluation import edits, ratedistortion
from tools.evaluation.fid import Evaluator
from tools.evaluation.nll import bound_terms

MU, SD = 0.0, 0.25  # 4 SD inside [-1, 1]: clipping x_0 to the range changes ~nothing


def gaussian_pipeline(T: int = 1000, calls: list | None = None) -> Pipeline:
    schedule = Schedule.linear(T)

    def eps_fn(x, t):
        if calls is not None:
            calls.append(len(x))
        ab = schedule.alphas_cumprod[t.astype(np.int64)].reshape(-1, 1, 1, 1)
        return ((x - np.sqrt(ab) * MU) * np.sqrt(1 - ab) / (ab * SD**2 + 1 - ab)).astype(
            np.float32)

    record = ModelRecord(schedule=schedule.config, image_shape=(1, 8, 8),
                         data_range=(-1.0, 1.0), num_levels=17, model_config={},
                         checkpoint_sha256="0" * 64, weights="ema")
    return Pipeline(eps_fn, record, source="gaussian", backend_name="numpy")


@pytest.fixture(scope="module")
def rd():
    pipe = gaussian_pipeline()
    x0 = np.clip(np.random.default_rng(1).normal(MU, SD, (100, 1, 8, 8)), -1, 1)
    terms = bound_terms(pipe, x0, seed=0, batch_size=50, variance="fixedlarge", progress=False)
    return pipe, terms, ratedistortion.curve(terms, (-1.0, 1.0))


def test_rate_grows_from_the_prior_to_the_whole_bound(rd):
    _, terms, c = rd
    t, rate = np.asarray(c["t"]), np.asarray(c["rate_bpd"])
    assert t[0] == 1000 and t[-1] == 0 and np.all(np.diff(t) == -1)
    assert rate[0] == pytest.approx(terms["prior_bpd"].mean(), abs=1e-12)
    assert np.all(np.diff(rate) >= 0)  # every term is a KL or -log p: never negative
    assert rate[-1] == pytest.approx(terms["total_bpd"].mean(), rel=1e-12)
    # At t = 1 only the decoder, L_0, is still to come.
    assert rate[-2] == pytest.approx(rate[-1] - terms["decoder_bpd"].mean(), rel=1e-12)


def test_distortion_is_the_posterior_means_error_and_falls_to_zero(rd):
    pipe, _, c = rd
    t, dist = np.asarray(c["t"]), np.asarray(c["distortion_rmse"])
    ab = pipe.schedule.alphas_cumprod[t[:-1] - 1]  # state x_t is the chain's index t - 1
    mmse = SD**2 * (1 - ab) / (ab * SD**2 + 1 - ab)
    np.testing.assert_allclose(dist[:-1], 127.5 * np.sqrt(mmse), rtol=0.06)
    assert dist[0] == pytest.approx(127.5 * SD, rel=0.06)  # x_T says nothing: the prior's SD
    assert dist[-2] < 0.05 * dist[0] and dist[-1] == 0.0  # x_1: sqrt(beta_1) of 255 / 2


@pytest.fixture(scope="module")
def evaluator():
    return Evaluator((1, 8, 8), (-1.0, 1.0), 17, 16, refs=2, fixed_inputs=True)


def test_inpaint_reports_the_network_calls_it_makes(evaluator):
    calls: list[int] = []
    pipe = gaussian_pipeline(40, calls)
    r = edits.inpaint_sweep(pipe, evaluator, masks=edits.MASKS, resamples=(1, 3),
                            jump_length=4, steps=20, sampler="ddpm", seed=0, batch_size=16,
                            progress=False)
    n = r["n"]
    made = sum(calls) / n
    assert made == sum(row["calls_per_image"] for m in r["masks"].values() for row in m["rows"])
    assert [row["calls_per_image"] for row in r["masks"]["lower-half"]["rows"]] == [20, 20 + 2 * 16]
    assert r["masks"]["lower-half"]["unknown_share"] == 0.5
    assert r["masks"]["random-40"]["unknown_share"] == round(0.4 * 64) / 64


def test_masks_and_the_noise_filled_input():
    keep = edits.make_mask("random-40", 5, (1, 8, 8), seed=3)
    assert (~keep).reshape(5, -1).sum(axis=1).tolist() == [26] * 5
    assert not np.array_equal(keep[0], keep[1])  # a mask per image
    images = np.random.default_rng(0).uniform(-1, 1, (5, 1, 8, 8)).astype(np.float32)
    filled = edits.noise_filled(images, keep, (-1.0, 1.0), seed=0)
    known = keep.transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(filled[known], images[known])
    assert not np.any(filled[~known] == images[~known])


def test_img2img_moves_nothing_at_strength_zero_and_more_with_strength(evaluator):
    pipe = gaussian_pipeline(100)
    r = edits.img2img_sweep(pipe, evaluator, strengths=(0.0, 0.3, 0.9), steps=100,
                            sampler="ddpm", seed=0, batch_size=16, progress=False)
    first, mid, last = r["rows"]
    # The image comes back through uint8 and the data's levels exactly as it was given.
    assert first["rmse_255"] == 0.0 and first["calls_per_image"] == 0
    assert first["label_share"] == r["real"]["label_share"]
    assert 0 < mid["rmse_255"] < last["rmse_255"]
    assert (mid["calls_per_image"], last["calls_per_image"]) == (30, 90)


def test_the_plateau_is_where_no_larger_count_does_better():
    def row(r, share, fd):
        return {"resamples": r, "calls_per_image": 10 * r, "label_share": share,
                "label_share_se": 0.02, "fd": fd}

    # Within noise after 5 resamples, though 10 has the best share and 5 the best FD.
    assert edits.plateau([row(1, 0.60, 3.3), row(2, 0.64, 3.2), row(5, 0.73, 2.75),
                          row(10, 0.745, 3.09)])["resamples"] == 5
    still = edits.plateau([row(1, 0.80, 5.0), row(5, 0.85, 5.0), row(10, 0.90, 5.0)])
    assert still["resamples"] == 10 and still["at_largest"]
    assert not edits.plateau([row(1, 0.9, 5.0), row(2, 0.9, 5.0)])["at_largest"]
