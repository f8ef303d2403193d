"""Networks that predict v or x_0 instead of eps (the model record's ``prediction``).

The stepping core turns their output into the eps it implies, so every sampler serves
them: checked against the same network written as an eps-predictor (a closed-form
identity), and against diffusers' DDPM and DDIM schedulers with prediction_type
"v_prediction" and "sample", driven by the same network and noise.
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import ModelFileError
from runtime.metadata import ModelRecord
from runtime.options import SampleOptions
from runtime.pipeline import Pipeline
from runtime.samplers import SAMPLERS, ImageNoise, draw_noise, sample
from runtime.schedule import Schedule
from runtime.serving.scheduler import BatchScheduler

T = 1000
FULL = Schedule.linear(T)
SHAPE = (6, 1, 4, 4)
W = np.random.default_rng(1).standard_normal((16, 16)) / 4


def eps_net(x, t):
    """A nonlinear eps-network (float64), so histories and clipping matter."""
    ab = FULL.alphas_cumprod[t.astype(np.int64)].reshape(-1, 1, 1, 1)
    h = (x.reshape(len(x), -1) @ W).reshape(x.shape)
    return np.sqrt(1 - ab) * (x - np.sqrt(ab) * 0.3) / (ab * 0.64 + 1 - ab) + 0.2 * np.tanh(h)


def as_prediction(prediction):
    """The same network answering with v or x_0 (eq. 4 solved for them)."""
    def net(x, t):
        ab = FULL.alphas_cumprod[t.astype(np.int64)].reshape(-1, 1, 1, 1)
        eps = eps_net(x, t)
        x0 = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
        return {"eps": eps, "v": np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0, "x0": x0}[prediction]
    return net


@pytest.mark.parametrize("prediction", ["v", "x0"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_serves_v_and_x0_networks(sampler, prediction):
    schedule = FULL.respaced(12, "trailing")
    want = sample(eps_net, schedule, SHAPE, ImageNoise(3, SHAPE[0]), sampler=sampler)
    got = sample(as_prediction(prediction), schedule, SHAPE, ImageNoise(3, SHAPE[0]),
                 sampler=sampler, prediction=prediction)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # Not the eps reading of the same outputs: the record's prediction matters.
    wrong = sample(as_prediction(prediction), schedule, SHAPE, ImageNoise(3, SHAPE[0]),
                   sampler=sampler)
    assert np.abs(wrong - want).max() > 1e-2


def _record(prediction):
    return ModelRecord(schedule=FULL.config, image_shape=SHAPE[1:], data_range=(-1.0, 1.0),
                       num_levels=17, model_config={}, checkpoint_sha256="0" * 64,
                       weights="ema", prediction=prediction)


def test_served_v_images_equal_the_librarys():
    net = lambda x, t: as_prediction("v")(x, t).astype(np.float32)  # noqa: E731
    pipe = Pipeline(net, _record("v"), source="v", backend_name="numpy")
    scheduler = BatchScheduler(net, _record("v"), max_batch=5, max_n=8)
    cases = [(4, 1, SampleOptions.make("dpmpp_2m", 8)), (3, 2, SampleOptions.make("ddpm", 6))]
    jobs = [scheduler.submit(n, seed, o) for n, seed, o in cases]
    while scheduler.tick():
        pass
    for (n, seed, o), job in zip(cases, jobs, strict=True):
        np.testing.assert_array_equal(job.result(timeout=0),
                                      pipe.sample_float(n, seed, **o.to_dict(), progress=False))


def test_pipeline_predict_eps_is_eps_for_any_prediction():
    x = draw_noise(ImageNoise(2, SHAPE[0]), SHAPE).copy()
    t = np.array([0, 10, 200, 500, 900, 999], np.float32)
    want = eps_net(x, t)
    for prediction in ("eps", "v", "x0"):
        pipe = Pipeline(as_prediction(prediction), _record(prediction), source=prediction,
                        backend_name="numpy")
        np.testing.assert_allclose(pipe.predict_eps(x, t), want, rtol=0, atol=1e-5)


def test_record_prediction_is_validated():
    data = {**_record("v").__dict__, "prediction": "score"}
    with pytest.raises(ModelFileError, match="prediction 'score' is not supported"):
        ModelRecord.from_dict(data, "m.onnx")
    assert ModelRecord.from_dict({**data, "prediction": "x0"}, "m.onnx").prediction == "x0"


torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers", reason="diffusers is a dev dependency (parity only)")


def _theirs(scheduler, x, net, noise_stream=None, **step_kwargs):
    xt, path = torch.from_numpy(x.copy()), []
    for t in scheduler.timesteps:
        out = net(xt.numpy().astype(np.float32), np.full(len(x), float(t), np.float32))
        kwargs = dict(step_kwargs)
        if noise_stream is not None and int(t) > 0 and step_kwargs.get("eta", 0) > 0:
            kwargs["variance_noise"] = torch.from_numpy(draw_noise(noise_stream, x.shape).copy())
        xt = scheduler.step(torch.from_numpy(out.astype(np.float32)), t, xt,
                            **kwargs).prev_sample
        path.append(xt.numpy().copy())
    return np.array(path)


def _ours(sampler, schedule, seed, net, prediction, **options):
    """The runtime's trajectory; x_T is the first draw of ImageNoise(seed), as in _start."""
    path = []
    sample(net, schedule, SHAPE, ImageNoise(seed, SHAPE[0]), sampler=sampler,
           prediction=prediction, callback=lambda _i, state: path.append(state.copy()),
           **options)
    return np.array(path)


def _start(seed):
    """x_T and the stream diffusers draws its step noise from: the runtime's order."""
    stream = ImageNoise(seed, SHAPE[0])
    return draw_noise(stream, SHAPE).copy(), stream


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize(("prediction", "theirs"), [("v", "v_prediction"), ("x0", "sample")])
def test_ddpm_and_ddim_match_diffusers_for_v_and_x0(prediction, theirs, monkeypatch):
    net = lambda x, t: as_prediction(prediction)(x, t).astype(np.float32)  # noqa: E731
    common = dict(num_train_timesteps=T, trained_betas=FULL.betas.tolist(),
                  prediction_type=theirs, clip_sample=True, clip_sample_range=1.0)
    # DDPM, 20 steps, noise from the runtime's streams (diffusers draws inside step()).
    schedule = FULL.respaced(20)
    ddpm = diffusers.DDPMScheduler(**common, timestep_spacing="linspace",
                                   variance_type="fixed_large")
    ddpm.set_timesteps(timesteps=schedule.timesteps[::-1].tolist())
    x, stream = _start(5)
    monkeypatch.setattr("diffusers.schedulers.scheduling_ddpm.randn_tensor",
                        lambda shape, **_: torch.from_numpy(draw_noise(stream, shape).copy()))
    want = _theirs(ddpm, x, net)
    got = _ours("ddpm", schedule, 5, net, prediction)
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-5)
    # DDIM, 25 leading steps, eta 0 and 0.5.
    schedule = FULL.respaced(25, "leading")
    for eta in (0.0, 0.5):
        ddim = diffusers.DDIMScheduler(**common, timestep_spacing="leading",
                                       set_alpha_to_one=True)
        ddim.set_timesteps(25)
        x, stream = _start(9)
        want = _theirs(ddim, x, net, stream, eta=eta, use_clipped_model_output=True)
        got = _ours("ddim", schedule, 9, net, prediction, eta=eta)
        np.testing.assert_allclose(got, want, rtol=0, atol=5e-5)
