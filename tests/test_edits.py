"""Editing with the unconditional model: RePaint against diffusers' RePaintScheduler,
SDEdit's ends, DDIM inversion's round trip, the paper's interpolation, previews, bad input.

The network is the exact eps of Gaussian data (every pixel N(MU, SD^2)): in closed form,
so the samplers' and the edits' properties hold to float precision, not to a trained
network's accuracy.
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime.edits import EDITS, mask_from_array, repaint_plan
from runtime.errors import OptionError
from runtime.metadata import ModelRecord
from runtime.pipeline import Pipeline
from runtime.samplers import ImageNoise
from runtime.schedule import Schedule

MU, SD = 0.2, 0.5


def gaussian_eps(schedule: Schedule):
    def eps_fn(x, t):
        ab = schedule.alphas_cumprod[t.astype(np.int64)].reshape(-1, 1, 1, 1)
        return ((x - np.sqrt(ab) * MU) * np.sqrt(1 - ab) / (ab * SD**2 + 1 - ab)).astype(
            np.float32)
    return eps_fn


def pipeline(T: int = 1000, *, clip_x0: bool = False, calls: list | None = None) -> Pipeline:
    schedule = Schedule.linear(T)
    eps = gaussian_eps(schedule)

    def counted(x, t):
        if calls is not None:
            calls.append(len(x))
        return eps(x, t)

    record = ModelRecord(schedule=schedule.config, image_shape=(1, 8, 8),
                         data_range=(-1.0, 1.0), num_levels=17, model_config={},
                         checkpoint_sha256="0" * 64, weights="ema", clip_x0=clip_x0)
    return Pipeline(counted, record, source="gaussian", backend_name="numpy")


def digits(n: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)


def lower_half_unknown() -> np.ndarray:
    mask = np.full((8, 8), 255, np.uint8)
    mask[4:] = 0
    return mask


# === Inpainting ===

@pytest.mark.parametrize("steps,jump,resamples", [(40, 40, 1), (40, 5, 3), (20, 10, 1)])
def test_repaint_plan_is_diffusers_walk(steps, jump, resamples):
    diffusers = pytest.importorskip("diffusers")
    T = 40
    sched = diffusers.RePaintScheduler(num_train_timesteps=T)
    sched.set_timesteps(steps, jump_length=jump, jump_n_sample=resamples)
    assert (np.asarray(sched.timesteps) // (T // steps)).tolist() == repaint_plan(steps, jump,
                                                                                 resamples)


@pytest.mark.parametrize("sampler,eta,steps,jump,resamples", [
    ("ddim", 0.0, 40, 5, 3),   # every step of the chain, with resampling
    ("ddim", 1.0, 40, 5, 3),   # eta 1: RePaint's stochastic reverse step
    ("ddpm", None, 40, 4, 2),  # DDPM's posterior step is eta 1's
    ("ddim", 0.0, 10, 10, 1),  # a respaced chain (leading: diffusers' spacing), no jumps
])
def test_inpainting_matches_diffusers_repaint(monkeypatch, sampler, eta, steps, jump, resamples):
    """Same network, same noise draws: our RePaint equals diffusers' RePaintScheduler driven
    by its pipeline's loop. (diffusers steps its jumps with the full chain's betas from the
    jump's top, so with jumps the two agree where every step of the chain is run.)"""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    repaint_module = pytest.importorskip("diffusers.schedulers.scheduling_repaint")
    T, n, seed = 40, 3, 5
    pipe = pipeline(T)
    images, mask = digits(n), lower_half_unknown()
    options = {"variance": "fixedsmall"} if sampler == "ddpm" else {"eta": eta}
    ours = pipe.edit_float("inpaint", images, seed, mask=mask, sampler=sampler, steps=steps,
                           spacing="leading", jump_length=jump, resamples=resamples,
                           progress=False, **options)

    stream = ImageNoise(seed, range(n))

    def same_noise(shape, generator=None, device=None, dtype=None):
        return torch.from_numpy(stream.standard_normal(tuple(shape)[1:]).copy())

    monkeypatch.setattr(repaint_module, "randn_tensor", same_noise)
    sched = diffusers.RePaintScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02,
                                       eta=1.0 if sampler == "ddpm" else eta, clip_sample=False)
    sched.set_timesteps(steps, jump_length=jump, jump_n_sample=resamples)
    eps = gaussian_eps(Schedule.linear(T))
    original = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
    keep = torch.from_numpy((mask > 0).astype(np.float32))[None, None]
    x = same_noise((n, 1, 8, 8))
    t_last = int(sched.timesteps[0]) + 1
    for t in (int(v) for v in sched.timesteps):
        if t < t_last:
            out = torch.from_numpy(eps(x.numpy(), np.full(n, t, np.float32)))
            x = sched.step(out, t, x, original, keep).prev_sample
        else:
            x = sched.undo_step(x, t_last)
        t_last = t
    np.testing.assert_allclose(ours, x.numpy(), rtol=0, atol=2e-5)


def test_inpainting_keeps_the_known_pixels_and_counts_its_calls():
    calls: list[int] = []
    pipe = pipeline(calls=calls)
    images, mask = digits(), lower_half_unknown()
    steps, jump, resamples = 50, 5, 3
    out = pipe.inpaint(images, mask, 1, steps=steps, jump_length=jump, resamples=resamples,
                       progress=False)
    np.testing.assert_array_equal(out[:, :4], images[:, :4])
    assert not np.array_equal(out[:, 4:], images[:, 4:])
    jumps = len(range(0, steps - jump, jump))
    assert len(calls) == steps + (resamples - 1) * jump * jumps
    edit = pipe.make_edit("inpaint", images, mask=mask,
                          options={"jump_length": jump, "resamples": resamples})
    assert edit.calls(pipe.schedule.respaced(steps), pipe.record) == len(calls)


def test_inpainting_refuses_a_sampler_that_cannot_jump_back():
    pipe = pipeline()
    with pytest.raises(OptionError, match="dpmpp_2m sampler cannot") as err:
        pipe.inpaint(digits(1), lower_half_unknown(), sampler="dpmpp_2m", steps=10,
                     resamples=2, progress=False)
    assert err.value.field == "sampler"
    out = pipe.inpaint(digits(1), lower_half_unknown(), sampler="dpmpp_2m", steps=10,
                       resamples=1, progress=False)
    np.testing.assert_array_equal(out[:, :4], digits(1)[:, :4])


# === Image-to-image ===

def test_img2img_ends_are_the_image_and_plain_sampling():
    pipe = pipeline()
    images = digits()
    kept = pipe.img2img(images, 3, strength=0.0, steps=20, progress=False)
    np.testing.assert_array_equal(kept, images)
    for sampler in ("ddpm", "dpmpp_2m"):
        anew = pipe.img2img(images, 3, strength=1.0, steps=20, sampler=sampler, progress=False)
        np.testing.assert_array_equal(anew, pipe.sample(4, 3, steps=20, sampler=sampler,
                                                        progress=False))


def test_img2img_runs_the_steps_below_its_strength_and_moves_further_with_it():
    calls: list[int] = []
    pipe = pipeline(calls=calls)
    images = digits(64)
    moved = []
    for strength in (0.2, 0.5, 0.8):
        calls.clear()
        out = pipe.img2img(images, 0, strength=strength, steps=50, sampler="ddim",
                           progress=False)
        timesteps = pipe.schedule.respaced(50).timesteps
        assert len(calls) == int(np.count_nonzero(timesteps < strength * 1000))
        moved.append(np.sqrt(np.mean((out.astype(float) - images) ** 2)))
    assert moved[0] < moved[1] < moved[2]


def test_edited_image_k_depends_on_seed_and_k_only():
    pipe = pipeline()
    images = digits(5)
    whole = pipe.img2img(images, 9, strength=0.6, steps=20, batch_size=5, progress=False)
    split = pipe.img2img(images, 9, strength=0.6, steps=20, batch_size=2, progress=False)
    np.testing.assert_array_equal(whole, split)
    again = pipe.inpaint(images, lower_half_unknown(), 9, steps=20, batch_size=3,
                         progress=False)
    np.testing.assert_array_equal(again, pipe.inpaint(images, lower_half_unknown(), 9,
                                                      steps=20, batch_size=5, progress=False))


# === Inversion and interpolation ===

def test_ddim_inversion_round_trip_tightens_with_the_steps():
    pipe = pipeline()
    images = digits(8)
    errors = []
    for steps in (20, 100, 500):
        latents = pipe.invert(images, steps=steps, progress=False)
        back = pipe.decode_float(latents, steps=steps, progress=False)
        target = images.transpose(0, 3, 1, 2) / 127.5 - 1
        errors.append(np.abs(back - target).max())
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] < 0.05  # the stated tolerance: docs/editing.md, at 100 steps
    # For Gaussian data the probability-flow ODE is affine: x_T = sqrt(ab) MU +
    # sqrt(ab SD^2 + 1 - ab) (x_0 - MU) / SD, the exact latent the inversion approximates.
    ab = pipe.schedule.alphas_cumprod[-1]
    exact = np.sqrt(ab) * MU + np.sqrt(ab * SD**2 + 1 - ab) * (target - MU) / SD
    np.testing.assert_allclose(latents, exact, atol=0.02 * np.abs(exact).max())


def test_interpolation_ends_are_the_img2img_of_each_image():
    pipe = pipeline()
    a, b = digits(2)
    row = pipe.interpolate(a, b, num=5, strength=0.6, steps=30, seed=4, progress=False)
    assert row.shape == (5, 8, 8, 1)
    for end, image in ((row[0], a), (row[-1], b)):
        np.testing.assert_array_equal(end, pipe.img2img(image, 4, strength=0.6, steps=30,
                                                        progress=False)[0])
    latent = pipe.interpolate(a, b, num=3, latent=True, steps=200, progress=False)
    np.testing.assert_allclose(latent[0].astype(float), a, atol=3)
    np.testing.assert_allclose(latent[-1].astype(float), b, atol=3)


# === Progressive decoding ===

@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_previews_are_the_predicted_x0_and_end_at_the_image(sampler):
    pipe = pipeline()
    seen: list[tuple[int, np.ndarray | None]] = []
    out = pipe.sample_float(3, 2, sampler=sampler, steps=12, previews=4, progress=False,
                            callback=lambda step, total, x0: seen.append(
                                (step, None if x0 is None else x0.copy())))
    assert [s for s, x0 in seen if x0 is not None] == [4, 8, 12]
    # At the last step (t = 0) both samplers return the x_0 they predict.
    np.testing.assert_allclose(seen[-1][1], out, atol=1e-6)
    # Earlier previews are further from the image.
    far = [np.abs(x0 - out).mean() for _, x0 in seen if x0 is not None]
    assert far[0] > far[-1]


# === Bad input ===

@pytest.mark.parametrize("images,mask,options,match", [
    (np.zeros((8, 8, 3), np.uint8), None, {}, "3 channel"),
    (np.zeros((16, 16, 1), np.uint8), None, {}, "16x16 pixels but the model takes 8x8"),
    (np.zeros((8, 8, 1), np.float32), None, {}, "must be uint8"),
    (np.zeros((2, 8, 8, 1), np.uint8), None, {"n": 3}, "n is 3 but 2 images"),
    (np.zeros((8, 8, 1), np.uint8), None, {"n": 10**15}, "more than the"),
    (np.zeros((8, 8, 1), np.uint8), None, {"strength": 1.5}, "strength must be in"),
    (np.zeros((8, 8, 1), np.uint8), np.full((8, 8), 7), {}, "not binary"),
    (np.zeros((8, 8, 1), np.uint8), np.ones((8, 8)), {}, "nothing to inpaint"),
    (np.zeros((8, 8, 1), np.uint8), np.ones((4, 4)), {}, "must cover the model's 8x8"),
])
def test_bad_edits_are_one_line_naming_the_input(images, mask, options, match):
    pipe = pipeline()
    kind = "inpaint" if mask is not None else "img2img"
    with pytest.raises(ValueError, match=match) as err:
        pipe.edit_float(kind, images, mask=mask, steps=5, progress=False, **options)
    assert "\n" not in str(err.value)


def test_mask_forms():
    shape = (3, 8, 8)
    half = np.zeros((8, 8), np.uint8)
    half[:4] = 1
    for mask in (half, half.astype(bool), half * 255, np.stack([half * 255] * 3, axis=-1),
                 half[None], half[None, ..., None]):
        keep = mask_from_array(mask, shape)
        assert keep.shape[2:] == (8, 8) and keep[..., :4, :].all() and not keep[..., 4:, :].any()
    assert set(EDITS) >= {"img2img", "inpaint"}


# === The CLI: real subprocesses on a real model file ===

def _cli(*args, cwd):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "runtime", *map(str, args), "--no-progress"],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def _png(path):
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image)


@pytest.mark.slow  # subprocess CLIs
def test_cli_edits_write_what_the_library_makes(tiny_onnx, tmp_path):
    import runtime
    from runtime.images import make_grid, save_png

    with runtime.load(tiny_onnx, threads=1) as pipe:
        images = pipe.sample(2, 0, steps=5, progress=False)
        save_png(images[0], tmp_path / "a.png")
        save_png(images[1], tmp_path / "b.png")
        mask = np.full((8, 8, 1), 255, np.uint8)
        mask[:, :3] = 0
        save_png(mask, tmp_path / "mask.png")
        want_img2img = pipe.img2img(images[0], 4, n=3, strength=0.3, steps=20, progress=False)
        want_inpaint = pipe.inpaint(images[0], mask[..., 0], 0, steps=10, jump_length=3,
                                    resamples=2, progress=False)
        want_decoded = pipe.decode(pipe.invert(images[:1], steps=10, progress=False),
                                   steps=10, progress=False)
        want_row = pipe.interpolate(images[0], images[1], num=4, steps=10, progress=False)
    run = _cli("img2img", tiny_onnx, "a.png", "-n", 3, "--seed", 4, "--strength", 0.3,
               "--steps", 20, "-o", "i.png", "--npz", "i.npz", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "i.npz")["images"], want_img2img)
    np.testing.assert_array_equal(_png(tmp_path / "i.png"), make_grid(want_img2img)[..., 0])
    run = _cli("inpaint", tiny_onnx, "a.png", "--mask", "mask.png", "--steps", 10,
               "--jump-length", 3, "--resamples", 2, "--npz", "p.npz", "-o", "p.png",
               cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "p.npz")["images"], want_inpaint)
    assert _cli("invert", tiny_onnx, "a.png", "--steps", 10, "-o", "z.npz",
                cwd=tmp_path).returncode == 0
    run = _cli("decode", tiny_onnx, "z.npz", "--npz", "d.npz", "-o", "d.png",  # its 10 steps
               cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "d.npz")["images"], want_decoded)
    run = _cli("interpolate", tiny_onnx, "a.png", "b.png", "--num", 4, "--steps", 10,
               "-o", "row.png", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    np.testing.assert_array_equal(_png(tmp_path / "row.png"),
                                  make_grid(want_row, ncol=4)[..., 0])


@pytest.mark.slow  # a subprocess CLI table
def test_cli_bad_edit_inputs_are_one_line_and_write_nothing(tiny_onnx, tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(tmp_path / "tall.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    grey = np.full((8, 8), 255, np.uint8)
    grey[0, 0] = 128
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "white.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    cases = [
        (("img2img", tiny_onnx, "rgb.png"), "has PNG mode RGB"),
        (("img2img", tiny_onnx, "tall.png"), "is 8x9 pixels but the model takes 8x8"),
        (("img2img", tiny_onnx, "junk.png"), "is not a PNG image"),
        (("img2img", tiny_onnx, "none.png"), "does not exist"),
        (("img2img", tiny_onnx, "a.png", "--strength", "1.5"), "1.5 is not in the range"),
        (("img2img", tiny_onnx, "a.png", "-o", "a.png"), "is also an input"),
        (("inpaint", tiny_onnx, "a.png", "--mask", "grey.png"), "mask grey.png is not binary"),
        (("inpaint", tiny_onnx, "a.png", "--mask", "white.png"), "nothing to inpaint"),
        (("inpaint", tiny_onnx, "a.png"), "Missing option '--mask'"),
        (("inpaint", tiny_onnx, "a.png", "--mask", "a.png", "--sampler", "unipc"),
         "unipc sampler cannot"),
        (("interpolate", tiny_onnx, "a.png", "rgb.png"), "b rgb.png has PNG mode RGB"),
    ]
    for args, message in cases:
        run = _cli(*args, "-o", "out.png", cwd=tmp_path) if "-o" not in args else _cli(
            *args, cwd=tmp_path)
        assert run.returncode in (1, 2), (args, run.stderr)
        assert message in run.stderr, (args, run.stderr)
        assert "Traceback" not in run.stderr
        assert not (tmp_path / "out.png").exists()


def test_scheduled_edits_equal_the_library_and_strength_0_takes_no_call():
    from runtime.options import SampleOptions
    from runtime.serving.scheduler import BatchScheduler

    pipe = pipeline()
    images, mask = digits(3), lower_half_unknown()
    scheduler = BatchScheduler(pipe.eps_fn, pipe.record, max_batch=4, max_n=8)
    inpaint = pipe.make_edit("inpaint", images, mask=mask,
                             options={"jump_length": 4, "resamples": 2})
    img2img = pipe.make_edit("img2img", images[:1], n=5, options={"strength": 0.4})
    still = pipe.make_edit("img2img", images, options={"strength": 0.0})
    opts = SampleOptions.make("ddim", 20, eta=0.5)
    jobs = [scheduler.submit(3, 7, opts, edit=inpaint), scheduler.submit(5, 8, opts, edit=img2img),
            scheduler.submit(2, 9, opts)]
    while scheduler.tick():
        pass
    ticks = scheduler.ticks
    kept = scheduler.submit(3, 1, opts, edit=still)
    assert scheduler.tick() == 0 and scheduler.ticks == ticks
    np.testing.assert_array_equal(kept.result(timeout=0), still.images)
    want = [pipe.edit_float("inpaint", images, 7, mask=mask, jump_length=4, resamples=2,
                            sampler="ddim", steps=20, eta=0.5, progress=False),
            pipe.edit_float("img2img", images[:1], 8, n=5, strength=0.4, sampler="ddim",
                            steps=20, eta=0.5, progress=False),
            pipe.sample_float(2, 9, sampler="ddim", steps=20, eta=0.5, progress=False)]
    for job, expected in zip(jobs, want, strict=True):
        np.testing.assert_array_equal(job.result(timeout=0), expected)
    assert jobs[0].steps_total == 3 * inpaint.calls(opts.respace(pipe.schedule), pipe.record)


def test_inpainting_calls_in_closed_form_match_the_walk_and_are_bounded():
    from runtime.edits import forward_steps

    pipe = pipeline()
    for steps, jump, resamples in [(50, 5, 3), (40, 10, 1), (10, 10, 4), (7, 3, 5), (100, 1, 2)]:
        edit = pipe.make_edit("inpaint", digits(1), mask=lower_half_unknown(),
                              options={"jump_length": jump, "resamples": resamples})
        schedule = pipe.schedule.respaced(steps)
        assert edit.calls(schedule, pipe.record) == len(forward_steps(
            repaint_plan(steps, jump, resamples)))
    with pytest.raises(OptionError, match="resamples must be an integer in"):
        pipe.make_edit("inpaint", digits(1), mask=lower_half_unknown(),
                       options={"resamples": 10**9})
