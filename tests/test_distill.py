"""Progressive distillation (training/distiller.py, training/distill.py) and its students.

The distillation's step math is checked against the runtime's own sampler (an independent
path in numpy): the torch DDIM step walks the runtime's trajectory, and one DDIM step with
the target v lands where the teacher's two land. The whole method runs on Gaussian data,
whose optimal network is known in closed form and held exactly by a per-timestep affine
family, as are all its students: each round's student, sampled by the runtime at its own
steps, must reproduce its teacher's DDIM chain of twice (and four times) the steps far
closer than the teacher's own chain at the student's steps does. Distribution matching's
gradient drives a Gaussian generator to the data's Gaussian (closed-form denoisers). Rounds,
matching, exact resume and the CLI's one-line refusals run on the tiny U-Net.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import runtime
from export.to_onnx import main as to_onnx_main
from runtime.cli import main as runtime_main
from runtime.errors import ModelFileError, StudentSamplingWarning
from runtime.metadata import ModelRecord
from runtime.pipeline import Pipeline
from runtime.samplers import ImageNoise, draw_noise, sample
from runtime.schedule import Schedule, spaced_timesteps
from runtime.stepmath import eps_from_output
from tests.conftest import randomized_unet, tiny_model_config
from training.checkpoint import load_checkpoint, student_steps
from training.config import DistillConfig, ModelConfig, TrainConfig
from training.data import Dataset, load_dataset
from training.distill import main
from training.distiller import Distiller, ddim_step, distill, matching_gradient, v_target
from training.reference import reference_sample, torch_eps_fn
from training.train import main as train_main
from training.trainer import Trainer

T = 1000
FULL = Schedule.linear(T)
AB = torch.as_tensor(FULL.alphas_cumprod)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rms(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - b) ** 2)))


# === Grids and plans ===

@pytest.mark.parametrize("num_timesteps", [1000, 37])
def test_trailing_grids_nest_when_halved(num_timesteps):
    for n in range(1, num_timesteps // 2 + 1):
        np.testing.assert_array_equal(spaced_timesteps(num_timesteps, 2 * n, "trailing")[1::2],
                                      spaced_timesteps(num_timesteps, n, "trailing"))


def test_rounds_halve_the_teacher_steps_down_to_the_target():
    plan = DistillConfig(teacher_steps=64, steps=4)
    assert [plan.student_steps(r) for r in range(plan.rounds)] == [32, 16, 8, 4]
    assert DistillConfig(teacher_steps=2, steps=1).rounds == 1


@pytest.mark.parametrize("teacher,steps", [(64, 3), (64, 64), (64, 128), (48, 5), (63, 21)])
def test_a_target_must_be_the_teacher_steps_halved(teacher, steps):
    with pytest.raises(ValueError, match="halved"):
        DistillConfig(teacher_steps=teacher, steps=steps)


# === The step math against the runtime ===

class PerStep(torch.nn.Module):
    """out = a[t] x + b[t]: a slope and a per-pixel intercept per timestep. It holds the
    optimal eps of Gaussian data exactly, and the v of every DDIM chain on it."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.a = torch.nn.Parameter(a.clone().float())
        self.b = torch.nn.Parameter(b.clone().float())

    def forward(self, x, t):
        i = t.long()
        return self.a[i].view(-1, 1, 1, 1) * x + self.b[i]


MU = torch.linspace(-0.3, 0.3, 16).reshape(1, 4, 4)
SIGMA = 0.15


def gaussian_teacher() -> PerStep:
    """E[eps | x_t] for x_0 ~ N(MU, SIGMA^2 I): sqrt(1 - ab) (x_t - sqrt(ab) MU) /
    (ab SIGMA^2 + 1 - ab), the network training converges to."""
    a = (1 - AB).sqrt() / (AB * SIGMA**2 + 1 - AB)
    return PerStep(a, -(a * AB.sqrt()).view(-1, 1, 1, 1) * MU)


def run(net, steps: int, prediction: str, n: int = 64, seed: int = 0) -> np.ndarray:
    """The runtime's DDIM (eta 0, clipped x_0) over a torch network, on trailing steps."""
    return reference_sample(net, FULL.respaced(steps, "trailing"), (n, 1, 4, 4),
                            ImageNoise(seed, n), sampler="ddim", prediction=prediction)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_the_torch_ddim_step_walks_the_runtimes_trajectory(prediction):
    # A nonlinear network, so clipping and every coefficient matter.
    def net(x, t):
        ab = AB[t.long()].float().view(-1, 1, 1, 1)
        return torch.tanh(3 * x) * (1 - ab) + ab.sqrt() * x.flip(3)

    steps = 6
    grid = torch.as_tensor(spaced_timesteps(T, steps, "trailing"))
    x = torch.from_numpy(draw_noise(ImageNoise(1, 5), (5, 1, 4, 4)).copy())
    with torch.no_grad():
        for i in reversed(range(steps)):
            t = grid[i].repeat(5)
            ab_next = AB[grid[i - 1]] if i else torch.tensor(1.0, dtype=torch.float64)
            x = ddim_step(net, prediction, x, t, AB[t], ab_next.repeat(5))
    want = sample(torch_eps_fn(net), FULL.respaced(steps, "trailing"), (5, 1, 4, 4),
                  ImageNoise(1, 5), sampler="ddim", prediction=prediction)
    np.testing.assert_allclose(x.numpy(), want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("end", [2, None])
def test_one_runtime_ddim_step_of_the_target_v_lands_on_the_teachers_point(end):
    # The student's step from grid point 3 to grid point `end` (None: to x_0 itself).
    grid = spaced_timesteps(T, 4, "trailing")
    respaced = FULL.respaced(4, "trailing")
    rng = np.random.default_rng(0)
    x_t = torch.from_numpy(rng.standard_normal((6, 1, 4, 4)).astype(np.float32))
    x0 = torch.from_numpy(rng.uniform(-0.9, 0.9, (6, 1, 4, 4)).astype(np.float32))
    ab = AB[grid[3]].repeat(6)
    ab_end = (AB.new_ones(()) if end is None else AB[grid[end]]).repeat(6)
    # Where a DDIM step predicting x0 from x_t lands (any x_end reached by such a step).
    eps = (x_t - ab[0].sqrt() * x0) / (1 - ab[0]).sqrt()
    x_end = (ab_end[0].sqrt() * x0 + (1 - ab_end[0]).sqrt() * eps).float()
    v = v_target(x_t, x_end, ab, ab_end).numpy()
    eps = eps_from_output("v", x_t.numpy(), v, respaced.sqrt_alphas_cumprod[3],
                          respaced.sqrt_one_minus_alphas_cumprod[3], np.empty(v.shape))
    # The runtime's step from grid point 3 lands on grid point 2; only a chain's last step
    # lands on x_0, so that case is a one-step chain at grid point 3's alphas_cumprod.
    schedule = respaced if end else Schedule(1 - np.array([respaced.alphas_cumprod[3]]))
    got = schedule.ddim_step(x_t.numpy(), 3 if end else 0, eps, eta=0.0)
    np.testing.assert_allclose(got, x_end.numpy(), rtol=0, atol=2e-5)


# === The method on a closed form ===

def gaussian_data(n: int = 4096) -> Dataset:
    x = np.random.default_rng(0).normal(MU.numpy(), SIGMA, (n, 1, 4, 4))
    levels = np.clip(np.round((x + 1) / 2 * 255), 0, 255).astype(np.uint8)
    return Dataset(name="gaussian", spec="gaussian", levels=levels, num_levels=256)


# A config only for shapes and the checkpoint: the network is PerStep.
SHAPES_4 = ModelConfig(image_size=4, in_channels=1, ch=8, ch_mult=(1,), num_res_blocks=1,
                       attn_resolutions=(), dropout=0.0, num_groups=8)


def test_each_student_reproduces_its_teachers_chain_of_more_steps(tmp_path):
    teacher = gaussian_teacher()
    plan = DistillConfig(teacher_steps=8, steps=2, round_steps=250)
    config = plan.train_config(TrainConfig(batch_size=64, preview_count=4), lr=3e-2,
                               warmup=10, ema_decay=0.99, log_every=100, save_every=0)
    distiller = Distiller(teacher, SHAPES_4, config, plan, gaussian_data(), tmp_path,
                          teacher_sha256="0" * 64, progress=False)
    distiller.fit()
    chain = {n: run(teacher, n, "eps") for n in (2, 4, 8)}
    for n in (4, 2):
        student = PerStep(teacher.a, teacher.b)
        student.load_state_dict(torch.load(tmp_path / f"student-{n}.pt",
                                           weights_only=True)["ema"])
        got = run(student, n, "v")
        # Far closer to the 8-step chain than the teacher's own chain at n steps (measured:
        # 3e-6 against 0.03-0.04; 1e-7, float32's rounding, with 400 steps a round).
        assert rms(got, chain[8]) < 0.01 * rms(chain[n], chain[8]), n
        assert rms(chain[n], chain[8]) > 0.02  # the steps saved were worth saving
    # Not any network of the family would do: the teacher read as a v-network is far off.
    assert rms(run(teacher, 2, "v"), chain[8]) > 0.5 * rms(chain[2], chain[8])


# === Distribution matching's gradient ===

def gaussian_denoiser(mean, std):
    """E[x_0 | x_t] when every pixel of x_0 is N(mean, std^2): the exact denoiser."""
    def x0(x_t, ab):
        ab = ab.view(-1, 1, 1, 1)
        return mean + ab.sqrt() * std**2 / (ab * std**2 + 1 - ab) * (x_t - ab.sqrt() * mean)
    return x0


def test_matching_moves_a_generator_to_the_datas_distribution():
    """A generator x_0 = m + s z stepped along the matching gradient, with the exact
    denoisers of the data (N(0.3, 0.5^2)) and of its own samples, ends at the data's mean
    and spread; there the gradient is 0."""
    data = gaussian_denoiser(0.3, 0.5)
    m = torch.tensor(-0.4, requires_grad=True)
    log_s = torch.tensor(math.log(0.15), requires_grad=True)
    opt = torch.optim.Adam([m, log_s], lr=0.01, betas=(0.0, 0.99))
    gen = torch.Generator().manual_seed(0)
    for _ in range(600):
        x0 = m + log_s.exp() * torch.randn(256, 1, 2, 2, generator=gen)
        t = torch.randint(20, 980, (256,), generator=gen)
        ab = AB[t].float()
        x_t = (ab.sqrt().view(-1, 1, 1, 1) * x0.detach()
               + (1 - ab).sqrt().view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen))
        own = gaussian_denoiser(m.detach(), log_s.exp().detach())
        grad = matching_gradient(x0.detach(), data(x_t, ab), own(x_t, ab))
        loss = 0.5 * torch.mean((x0 - (x0 - grad).detach()) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(m.item() - 0.3) < 0.03 and abs(log_s.exp().item() - 0.5) < 0.03, \
        (m.item(), log_s.exp().item())
    assert torch.equal(matching_gradient(x0, data(x_t, ab), data(x_t, ab)),
                       torch.zeros_like(x0))


# === Rounds, resume and the CLI on the tiny U-Net ===

@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", 8, 1)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory, digits) -> Path:
    """A checkpoint of the tiny U-Net with random weights everywhere (eps is not 0)."""
    folder = tmp_path_factory.mktemp("teacher")
    cfg = tiny_model_config()
    trainer = Trainer(cfg, TrainConfig(batch_size=8, steps=1, warmup=1), digits, folder,
                      model=randomized_unet(cfg), progress=False)
    return trainer.save()


TINY_PLAN = DistillConfig(teacher_steps=8, steps=2, round_steps=3, match_steps=2)


def _distill(teacher_path, digits, out, plan=TINY_PLAN):
    ckpt = load_checkpoint(teacher_path)
    config = plan.train_config(TrainConfig.from_dict(ckpt["train_config"]), batch_size=8,
                               save_every=1, log_every=1, preview_count=4)
    resume = out / "student.pt"
    return distill(ckpt, plan, config, digits, out, device="cpu", progress=False, threads=1,
                   teacher_sha256=hashlib.sha256(teacher_path.read_bytes()).hexdigest(),
                   resume_from=load_checkpoint(resume, resume=True) if resume.exists() else None)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def whole_run(teacher_path, digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    return _distill(teacher_path, digits, out), out


def test_rounds_halve_the_steps_and_keep_each_student(whole_run):
    run_, out = whole_run
    records = _records(out)
    steps = [(r["round"], r["student_steps"], r.get("matching", False)) for r in records
             if "round_done" not in r and "matching_done" not in r]
    assert steps == [(1, 4, False)] * 3 + [(2, 2, False)] * 3 + [(2, 2, True)] * 2
    done = [(r["step"], r["teacher_steps"], r["student_steps"])
            for r in records if "round_done" in r]
    assert done == [(3, 8, 4), (6, 4, 2)]
    assert [(r["step"], r["match_steps"]) for r in records if "matching_done" in r] == [(8, 2)]
    for n in (4, 2):
        assert student_steps(load_checkpoint(out / f"student-{n}.pt")) == (n, True)
    assert student_steps(load_checkpoint(out / "student-2-matched.pt")) == (2, True)
    assert student_steps(load_checkpoint(out / "student.pt")) == (2, True)
    assert {f"samples_{n:04d}steps.png" for n in (4, 2)} | {"samples_0002steps_matched.png"} \
        <= {p.name for p in out.iterdir()}
    # Each round's teacher is the round before's student, and the matching moves the last.
    final = load_checkpoint(out / "student.pt")
    last = load_checkpoint(out / "student-2.pt")["ema"]
    assert all(torch.equal(final["teacher"][k], last[k]) for k in last)
    assert not all(torch.equal(final["ema"][k], last[k]) for k in last)
    assert all(torch.equal(final["ema"][k], v)
               for k, v in load_checkpoint(out / "student-2-matched.pt")["ema"].items())


# At a round's end, inside the next round, at the matching's start and inside it.
@pytest.mark.parametrize("stop", [3, 4, 6, 7])
def test_an_interrupted_distillation_resumes_exactly(teacher_path, digits, whole_run, tmp_path,
                                                     monkeypatch, stop):
    whole, whole_out = whole_run
    real_step = Distiller.train_step

    def interrupted(self, net):
        if self.step == stop:
            raise KeyboardInterrupt
        return real_step(self, net)

    monkeypatch.setattr(Distiller, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _distill(teacher_path, digits, tmp_path)
    monkeypatch.setattr(Distiller, "train_step", real_step)
    assert load_checkpoint(tmp_path / "student.pt")["step"] == stop
    torch.manual_seed(12345)  # a different global RNG state must not matter
    resumed = _distill(teacher_path, digits, tmp_path)
    a, b = whole.state_dict(), resumed.state_dict()
    for part in ("model", "ema", "teacher", "fake"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for opt in ("optimizer", "fake_optimizer"):
        for k, state in a[opt]["state"].items():
            assert all(torch.equal(state[name], b[opt]["state"][k][name]) for name in state)

    def losses(out):
        return [(r["step"], r.get("loss")) for r in _records(out)]

    assert losses(tmp_path) == losses(whole_out)


def _cli(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _one_line_error(result, match: str) -> None:
    """Refused as every CLI here refuses: one "Error:" line naming the problem, no
    traceback, an exit code of a user's mistake (1, or click's 2), not a bug's (70)."""
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code in (1, 2), result.output
    assert len(errors) == 1 and match in errors[0] and "Traceback" not in result.output, \
        result.output


def test_the_cli_distils_resumes_and_refuses_another_teacher(teacher_path, tmp_path):
    out = tmp_path / "run"
    quick = ["--out", out, "--teacher-steps", 4, "--steps", 2, "--round-steps", 1,
             "--batch-size", 8, "--threads", 1, "--no-progress"]
    result = _cli([teacher_path, *quick, "--match-steps", 0])
    assert result.exit_code == 0, result.output
    assert "round 1/1: 4 -> 2 DDIM steps" in result.output and "matching" not in result.output
    assert "is finished" in _cli([teacher_path, *quick, "--resume"]).output
    # A finished run takes matching on resume, once begun its plan is fixed.
    result = _cli([teacher_path, *quick, "--resume", "--match-steps", 1])
    assert result.exit_code == 0 and "distribution matching at 2 DDIM steps" in result.output
    assert student_steps(load_checkpoint(out / "student.pt")) == (2, True)
    assert (out / "student-2-matched.pt").exists()
    _one_line_error(_cli([teacher_path, *quick, "--resume", "--match-steps", 3]), "differs")
    # A student is not a score of the data: its students are not matched.
    _one_line_error(_cli([out / "student-2.pt", "--out", tmp_path / "s", "--steps", 1,
                          "--match-steps", 1]), "not a score")
    _one_line_error(_cli([teacher_path, *quick]), "exists")
    _one_line_error(_cli([teacher_path, *quick, "--resume", "--lr", "0.5"]), "differs")
    # The same network saved again is another file: a student names its teacher's digest.
    other = tmp_path / "other.pt"
    ckpt = torch.load(teacher_path, weights_only=True)
    torch.save({**ckpt, "elapsed_s": 1.0}, other)
    _one_line_error(_cli([other, *quick, "--resume"]), "another teacher")


@pytest.mark.parametrize("args,match", [
    (["--steps", 3], "halved"),
    (["--teacher-steps", 12, "--steps", 5], "halved"),
    (["--teacher-steps", 2048, "--steps", 4], "timesteps"),
    (["--resume"], "no such checkpoint"),
    (["--resume", "--overwrite"], "contradict"),
])
def test_the_cli_refuses_bad_plans_in_one_line(teacher_path, tmp_path, args, match):
    _one_line_error(_cli([teacher_path, "--out", tmp_path / "run", *args]), match)
    assert not (tmp_path / "run" / "student.pt").exists()


def test_training_refuses_to_resume_a_student(whole_run, tmp_path):
    (tmp_path / "ckpt.pt").write_bytes((whole_run[1] / "student.pt").read_bytes())
    result = CliRunner().invoke(train_main, ["--out", str(tmp_path), "--resume",
                                             "--no-progress"], catch_exceptions=False)
    _one_line_error(result, "distilled student")


@pytest.mark.parametrize("content,match", [
    (None, "no such checkpoint"),
    (b"not a checkpoint", "not a torch checkpoint"),
    (b"PK\x03\x04" + b"\0" * 60, "truncated or corrupt"),
])
def test_the_cli_refuses_missing_and_corrupt_teachers_in_one_line(tmp_path, content, match):
    path = tmp_path / "ckpt.pt"
    if content is not None:
        path.write_bytes(content)
    _one_line_error(_cli([path, "--out", tmp_path / "run"]), match)


# === The student's record, in the runtime ===

DISTILLED = {"method": "progressive", "from_steps": 8, "steps": 2, "teacher_sha256": "ab" * 32}
OWN = {"sampler": "ddim", "steps": 2, "spacing": "trailing", "eta": 0.0}


def _record(**fields) -> ModelRecord:
    return ModelRecord(schedule=FULL.config, image_shape=(1, 4, 4), data_range=(-1.0, 1.0),
                       num_levels=256, model_config={}, checkpoint_sha256="0" * 64,
                       weights="ema", **fields)


def test_a_students_record_round_trips_and_other_records_stay_as_they_were():
    student = _record(prediction="v", defaults=OWN, distilled=DISTILLED)
    assert ModelRecord.from_json(student.to_json(), "s.onnx") == student
    plain = _record()
    assert "distilled" not in json.loads(plain.to_json())  # other files keep their bytes
    assert ModelRecord.from_json(plain.to_json(), "p.onnx").distilled is None


@pytest.mark.parametrize("edit,match", [
    (lambda d: "4", "distilled must be an object"),
    (lambda d: {**d, "steps": 0}, "distilled.steps"),
    (lambda d: {**d, "steps": 1.5}, "distilled.steps"),
    (lambda d: {**d, "from_steps": 2}, "distilled.from_steps"),
    (lambda d: {**d, "from_steps": 5000}, "distilled.from_steps"),
    (lambda d: {k: v for k, v in d.items() if k != "teacher_sha256"}, "teacher_sha256"),
])
def test_a_malformed_distilled_entry_is_one_line(edit, match):
    data = json.loads(_record(prediction="v", defaults=OWN, distilled=DISTILLED).to_json())
    data["distilled"] = edit(DISTILLED)
    with pytest.raises(ModelFileError, match=match) as caught:
        ModelRecord.from_dict(data, "s.onnx")
    assert "\n" not in str(caught.value) and "s.onnx" in str(caught.value)


def test_a_student_warns_once_in_one_line_when_asked_for_other_steps():
    record = _record(prediction="v", defaults=OWN, distilled=DISTILLED)
    pipe = Pipeline(lambda x, t: np.zeros_like(x), record, source="s.onnx",
                    backend_name="numpy")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        own = pipe.sample_float(2, 0, progress=False)
        also_own = pipe.sample_float(2, 0, sampler="ddim", steps=2, progress=False)
    assert caught == [] and np.array_equal(own, also_own)
    for asked, named in [({"steps": 4}, "steps 4"), ({"sampler": "dpmpp_2m"}, "dpmpp_2m"),
                         ({"spacing": "linspace"}, "linspace"), ({"eta": 0.5}, "eta 0.5")]:
        with pytest.warns(StudentSamplingWarning) as caught:
            pipe.sample_float(2, 0, progress=False, **asked)
        assert len(caught) == 1
        message = str(caught[0].message)
        assert "\n" not in message and named in message and "steps 2" in message


@pytest.mark.slow
def test_a_student_exports_and_samples_with_its_own_steps_by_default(whole_run, tmp_path):
    run_, out = whole_run
    onnx = tmp_path / "student.onnx"
    result = CliRunner().invoke(to_onnx_main, [str(out / "student.pt"), "-o", str(onnx)],
                                catch_exceptions=False)
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    with runtime.load(onnx) as pipe:
        record = pipe.record
        assert record.prediction == "v" and record.defaults == OWN
        assert record.distilled == {**DISTILLED, "teacher_sha256": record.distilled[
            "teacher_sha256"], "matching_steps": 2} and record.distilled["from_steps"] == 8
        got = pipe.sample_float(6, 3, progress=False)
    # The runtime draws what the torch student (its EMA) draws with its own sampler.
    want = reference_sample(run_.ema.model, FULL.respaced(2, "trailing"), (6, 1, 8, 8),
                            ImageNoise(3, 6), sampler="ddim", prediction="v")
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    sample = CliRunner().invoke(runtime_main, ["sample", str(onnx), "-n", "4", "-o",
                                               str(tmp_path / "own.png"), "--no-progress"])
    assert sample.exit_code == 0 and "ddim 2 steps" in sample.output
    assert "warning" not in sample.output
    sample = CliRunner().invoke(runtime_main, ["sample", str(onnx), "-n", "4", "--steps", "4",
                                               "-o", str(tmp_path / "off.png"),
                                               "--no-progress"])
    warned = [line for line in sample.output.splitlines() if "warning" in line]
    assert sample.exit_code == 0 and "ddim 4 steps" in sample.output
    assert len(warned) == 1 and warned[0].startswith("warning: ") and "steps 4" in warned[0]
    # A student in the middle of a round exports too, with a warning that it is unfinished.
    middle = torch.load(out / "student.pt", weights_only=True)
    torch.save({**middle, "step": 4}, tmp_path / "middle.pt")
    result = CliRunner().invoke(to_onnx_main, [str(tmp_path / "middle.pt"), "-o",
                                               str(tmp_path / "middle.onnx"), "--exporter",
                                               "torchscript"])  # the shorter trace
    assert result.exit_code == 0 and "middle of its 2-step round" in result.output
