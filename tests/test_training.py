"""The trainer: learning, checkpoints, exact resume, safe loading, and the CLI's errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from runtime.schedule import Schedule
from runtime.util.cpus import busy_cores, cpu_count
from runtime.util.fileio import OutputError
from training.bridge import schedule_tensors
from training.checkpoint import (
    CheckpointError,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from training.config import ModelConfig, TrainConfig
from training.data import load_dataset
from training.diffusion import loss_simple, q_sample
from training.distributed import DistInfo, set_cpu_threads
from training.train import main
from training.trainer import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(image_size=8, in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(4,), dropout=0.1, num_groups=4)
# hflip and dropout on, so exact resume covers every random stream.
TINY_TRAIN = TrainConfig(lr=2e-3, warmup=5, batch_size=32, steps=6, ema_decay=0.99, hflip=True,
                         sample_every=0, save_every=0, log_every=1, preview_count=4,
                         preview_steps=5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", 8, 1)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# === The objective ===

def test_q_sample_uses_the_runtime_schedule():
    schedule = Schedule.linear(1000)
    st = schedule_tensors(schedule)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((4, 1, 2, 2), dtype=np.float32)
    noise = rng.standard_normal((4, 1, 2, 2), dtype=np.float32)
    t = np.array([0, 10, 500, 999])
    got = q_sample(st, torch.from_numpy(x0), torch.from_numpy(t), torch.from_numpy(noise))
    np.testing.assert_allclose(got.numpy(), schedule.q_sample(x0, t, noise), rtol=1e-6,
                               atol=1e-6)


def test_loss_decreases_over_a_few_dozen_steps(digits, tmp_path):
    trainer = Trainer(TINY, TINY_TRAIN.replace(steps=40), digits, tmp_path, progress=False)
    x0, t, noise = trainer.batch(1000)  # a fixed batch the run does not train on first

    def eval_loss():
        trainer.model.eval()
        with torch.no_grad():
            return loss_simple(trainer.model, trainer.st, x0, t, noise).item()

    before = eval_loss()
    assert 0.8 < before < 1.2  # eps_theta starts at 0, so the loss is E[eps^2] = 1
    trainer.model.train()
    losses = [trainer.train_step(trainer.model)[0].item() for _ in range(40)]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])
    assert eval_loss() < 0.5 * before


def test_learning_rate_warms_up_then_stays_or_decays_to_zero(digits, tmp_path):
    cfg = TrainConfig(lr=1e-3, warmup=10, steps=110, batch_size=32)
    const = Trainer(TINY, cfg, digits, tmp_path, progress=False)
    cos = Trainer(TINY, cfg.replace(lr_decay="cosine"), digits, tmp_path, progress=False)
    for trainer in (const, cos):  # the same linear warmup
        assert [trainer.lr_at(s) for s in range(10)] == pytest.approx(
            [1e-3 * (s + 1) / 10 for s in range(10)])
    assert {const.lr_at(s) for s in range(10, 200)} == {1e-3}
    lrs = [cos.lr_at(s) for s in range(10, 111)]
    assert lrs[0] == 1e-3 and lrs[-1] == pytest.approx(0.0, abs=1e-18)
    assert lrs[50] == pytest.approx(0.5e-3)  # half way: cos(pi / 2) = 0
    assert all(a > b for a, b in zip(lrs[:-1], lrs[1:], strict=True))
    with pytest.raises(ValueError, match="lr_decay"):
        TrainConfig(lr_decay="step")


# === Checkpoints ===

def test_checkpoint_round_trip(digits, tmp_path):
    trainer = train(TINY, TINY_TRAIN, digits, tmp_path, device="cpu", progress=False)
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["format_version"] == 1 and ckpt["step"] == 6
    assert ModelConfig.from_dict(ckpt["model_config"]) == TINY
    assert TrainConfig.from_dict(ckpt["train_config"]) == TINY_TRAIN
    assert ckpt["schedule"] == {"kind": "linear", "num_timesteps": 1000, "beta_start": 1e-4,
                                "beta_end": 0.02}
    np.testing.assert_array_equal(Schedule.from_config(ckpt["schedule"]).betas,
                                  TINY_TRAIN.schedule().betas)
    assert ckpt["data"] == {"name": "digits", "spec": "digits", "image_shape": [1, 8, 8],
                            "data_range": [-1.0, 1.0], "num_levels": 17}
    assert {"torch", "cuda", "numpy"} <= set(ckpt["rng"])
    for weights, source in (("ema", trainer.ema.model), ("raw", trainer.model)):
        model = build_model(ckpt, weights)
        assert not model.training
        for (name, a), b in zip(model.state_dict().items(), source.state_dict().values(),
                                strict=True):
            assert torch.equal(a, b), name
    # The EMA is a distinct average, not a copy of the raw weights.
    assert not all(torch.equal(a, b) for a, b in zip(trainer.ema.model.parameters(),
                                                      trainer.model.parameters(), strict=True))
    assert (tmp_path / "samples_0000006.png").is_file()
    assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="weights"):
        build_model(ckpt, "best")


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(digits, tmp_path):
    # One thread in every part: the automatic count follows how busy the machine is, and
    # results depend on the count in the last bits.
    whole = train(TINY, TINY_TRAIN, digits, tmp_path / "whole", device="cpu", progress=False,
                  threads=1)
    # The same run, stopped after 3 steps and continued from its checkpoint in a new call.
    train(TINY, TINY_TRAIN.replace(steps=3), digits, tmp_path / "split", device="cpu",
          progress=False, threads=1)
    # What a crash after the checkpoint leaves: a record past it and a line cut short.
    with open(tmp_path / "split" / "log.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 9.0}\n{"step": 5, "lo')
    torch.manual_seed(12345)  # a different global RNG state must not matter
    resumed = train(TINY, TINY_TRAIN, digits, tmp_path / "split", device="cpu", progress=False,
                    threads=1, resume_from=load_checkpoint(tmp_path / "split" / "ckpt.pt"))
    assert resumed.step == whole.step == 6
    for part in ("model", "ema"):
        a, b = whole.state_dict()[part], resumed.state_dict()[part]
        for name in a:
            assert torch.equal(a[name], b[name]), f"{part}.{name}"
    opt_a, opt_b = whole.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for k in opt_a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a[k][name], opt_b[k][name])
    # Identical per-step losses, and the resumed log continues without repeats.
    def losses(out):
        return [(r["step"], r["loss"]) for r in _records(out)]

    assert losses(tmp_path / "split") == losses(tmp_path / "whole")


@pytest.mark.parametrize("bad", [b'{"step": "x"}', b'{"step": null}', b"\xff", b"[1, 2]"])
def test_malformed_log_lines_neither_block_a_resume_nor_get_lost(digits, tmp_path, capsys, bad):
    train(TINY, TINY_TRAIN.replace(steps=2), digits, tmp_path, device="cpu", progress=False)
    log = tmp_path / "log.jsonl"
    before = log.read_bytes() + bad + b"\n" + b'{"step": 1, "loss": 7.0}\n{"step": 3, "lo'
    log.write_bytes(before)
    train(TINY, TINY_TRAIN.replace(steps=3), digits, tmp_path, device="cpu", progress=False,
          resume_from=load_checkpoint(tmp_path / "ckpt.pt"))
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "log.jsonl" in warning[0] and "log.jsonl.corrupt" in warning[0]
    assert (tmp_path / "log.jsonl.corrupt").read_bytes() == before
    # The good records up to the checkpoint stay, in order; the resumed session appends.
    assert [r["step"] for r in _records(tmp_path)] == [1, 2, 1, 3]


def test_an_interrupted_cosine_run_resumes_exactly(digits, tmp_path, monkeypatch):
    # The decay depends on the run's length, so this run is cut short by an interrupt
    # after its step-3 checkpoint, as Ctrl-C cuts `make demo`, not by a shorter --steps.
    cfg = TINY_TRAIN.replace(lr_decay="cosine", warmup=2, save_every=3)
    whole = train(TINY, cfg, digits, tmp_path / "whole", device="cpu", progress=False,
                  threads=1)  # one thread in every part, as above
    real_step = Trainer.train_step

    def interrupted(self, net):
        if self.step == 4:
            raise KeyboardInterrupt
        return real_step(self, net)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(TINY, cfg, digits, tmp_path / "cut", device="cpu", progress=False, threads=1)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    ckpt = load_checkpoint(tmp_path / "cut" / "ckpt.pt")
    assert ckpt["step"] == 3
    resumed = train(TINY, cfg, digits, tmp_path / "cut", device="cpu", progress=False,
                    threads=1, resume_from=ckpt)
    for part in ("model", "ema"):
        a, b = whole.state_dict()[part], resumed.state_dict()[part]
        assert all(torch.equal(a[k], b[k]) for k in a), part
    assert [r["lr"] for r in _records(tmp_path / "cut")] == \
        [r["lr"] for r in _records(tmp_path / "whole")]


@pytest.mark.slow
def test_resume_keeps_the_runs_threads_and_is_exact(digits, tmp_path, monkeypatch):
    # Results depend on the thread count in the last bits, so a resume without --threads
    # takes the checkpoint's count. The interrupted part is the same 6-step run, stopped by
    # hand after its checkpoint at step 3.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cfg = TINY_TRAIN
    try:
        whole = train(TINY, cfg, digits, tmp_path / "whole", device="cpu", progress=False,
                      threads=2)
        part = Trainer(TINY, cfg, digits, tmp_path / "split", progress=False)
        for _ in range(3):
            part.train_step(part.model)
        part.out_dir.mkdir()
        part.save()
        ckpt = load_checkpoint(tmp_path / "split" / "ckpt.pt")
        assert ckpt["threads"] == 2
        torch.set_num_threads(1)
        resumed = train(TINY, cfg, digits, tmp_path / "split", device="cpu", progress=False,
                        resume_from=ckpt)
        assert torch.get_num_threads() == 2
        assert {r["threads"] for r in _records(tmp_path / "split")} == {2}
        for bad in (0, "2", True, 10**6):  # a malformed count falls back to automatic
            train(TINY, cfg.replace(steps=4), digits, tmp_path / f"bad{bad}", device="cpu",
                  progress=False, resume_from=dict(ckpt, threads=bad))
            assert 1 <= torch.get_num_threads() <= cpu_count()
    finally:
        torch.set_num_threads(1)
    assert resumed.step == whole.step == 6
    for part_name in ("model", "ema"):
        a, b = whole.state_dict()[part_name], resumed.state_dict()[part_name]
        for name in a:
            assert torch.equal(a[name], b[name]), f"{part_name}.{name}"


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc/stat")
def test_automatic_threads_leave_a_busy_core_alone(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start spinning
        busy = busy_cores(0.5)
        threads = set_cpu_threads(DistInfo())
    finally:
        spinner.kill()
        spinner.wait()
        torch.set_num_threads(1)
    assert 0.7 <= busy <= os.cpu_count()  # at least the spinner's core
    assert 1 <= threads <= max(1, cpu_count() - 1)
    assert set_cpu_threads(DistInfo(), 3) == 3 == torch.get_num_threads()  # explicit wins
    torch.set_num_threads(1)


class _Evil:
    def __reduce__(self):
        return (os.makedirs, ("PWNED_BY_CHECKPOINT",))


def test_pickled_objects_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "model": _Evil()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "pickled Python objects" in message and "\n" not in message
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_bad_checkpoint_files_get_one_line_errors(tmp_path):
    torch.save({"format_version": 1, "model": {"w": torch.zeros(3)}}, tmp_path / "other.pt")
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"format_version": 1, "w": torch.arange(1000.0)})
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[:300])
    (tmp_path / "text.pt").write_text("hello\n")
    cases = {"missing.pt": "no such checkpoint", "other.pt": "not a DDPM training checkpoint",
             "trunc.pt": "truncated or corrupt", "text.pt": "", "good.pt": "expected keys"}
    for name, match in cases.items():
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(tmp_path / name)
        assert name in str(info.value) and match in str(info.value)
        assert "\n" not in str(info.value)


def test_save_is_atomic_and_refuses_non_plain_data(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(2)})
    with pytest.raises(TypeError, match="ndarray"):
        save_checkpoint(path, {"step": 2, "w": np.ones(2)})

    def crash(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OutputError, match="disk full"):
        save_checkpoint(path, {"step": 3})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1  # the old file survived intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temp files left


# === The CLI ===

@pytest.fixture
def short_previews(monkeypatch):
    """The digits preset with 5-step preview grids (64 images still) in place of 100-step
    ones: each CLI run ends with a preview, which is most of a short run's time."""
    import training.config

    model_config, train_config = training.config.PRESETS["digits"]
    monkeypatch.setitem(training.config.PRESETS, "digits",
                        (model_config, train_config.replace(preview_steps=5)))


def _cli(args, **kwargs):
    return CliRunner().invoke(main, args, catch_exceptions=False, **kwargs)


@pytest.mark.parametrize("args,match", [
    (["--steps", "0"], "--steps"),
    (["--lr", "-1"], "--lr"),
    (["--batch-size", "many"], "--batch-size"),
    (["--preset", "imagenet"], "--preset"),
    (["--device", "tpu"], "--device"),
    (["--preset", "cifar10"], "--data"),
])
def test_cli_rejects_bad_values(tmp_path, args, match):
    result = _cli([*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and match in result.output


def test_cli_names_missing_data_and_checkpoints(tmp_path):
    result = _cli(["--data", str(tmp_path / "nowhere.npz"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and str(tmp_path / "nowhere.npz") in result.output
    result = _cli(["--resume", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "no such checkpoint" in result.output


@pytest.mark.slow
def test_cli_trains_resumes_and_protects_a_run(tmp_path, short_previews):
    out = tmp_path / "run"
    base = ["--out", str(out), "--batch-size", "32", "--sample-every", "0", "--save-every", "0",
            "--no-progress"]
    result = _cli([*base, "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(out / "ckpt.pt")["step"] == 2
    grid = Image.open(out / "samples_0000002.png")
    # 64 digits, 8 x 8 cells of 64 px (8x zoom) parted by 4 px gaps.
    assert grid.mode == "L" and grid.size == (8 * 68 + 4, 8 * 68 + 4)
    assert _cli([*base, "--steps", "3"]).exit_code == 2  # would clobber the run
    assert "differs" in _cli([*base, "--resume", "--steps", "3", "--lr", "0.5"]).output
    result = _cli([*base, "--resume", "--steps", "3"])
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in _records(out)] == [2, 3]
    assert set(_records(out)[0]) >= {"step", "loss", "lr", "grad_norm", "steps_per_s"}


@pytest.mark.slow
def test_a_run_resumes_from_any_folder(tmp_path, monkeypatch, short_previews):
    data = tmp_path / "data" / "ok.npz"
    data.parent.mkdir()
    np.savez(data, images=np.random.default_rng(0).integers(0, 256, (16, 8, 8), np.uint8))
    (tmp_path / "other").mkdir()
    np.savez(tmp_path / "other" / "ok.npz", images=np.zeros((16, 8, 8), np.uint8))
    out = tmp_path / "run"
    quick = ["--out", str(out), "--sample-every", "0", "--save-every", "0", "--no-progress"]
    monkeypatch.chdir(tmp_path)
    result = _cli([*quick, "--data", "data/ok.npz", "--batch-size", "8", "--steps", "1"])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(out / "ckpt.pt")["data"]["spec"] == str(data.resolve())
    monkeypatch.chdir("/")
    result = _cli([*quick, "--resume", "--steps", "2"])
    assert result.exit_code == 0, result.output
    result = _cli([*quick, "--resume", "--steps", "3", "--data", str(data)])
    assert result.exit_code == 0, result.output
    # A checkpoint of an older version recorded the path as typed, relative to its folder.
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["data"]["spec"] = "data/ok.npz"
    torch.save(ckpt, out / "ckpt.pt")
    result = _cli([*quick, "--resume", "--steps", "4"])
    assert result.exit_code == 1 and "--data" in result.output and "data/ok.npz" in result.output
    result = _cli([*quick, "--resume", "--steps", "4", "--data", str(tmp_path / "other/ok.npz")])
    assert result.exit_code == 2 and "--data" in result.output
    result = _cli([*quick, "--resume", "--steps", "4", "--data", str(data)])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(out / "ckpt.pt")["data"]["spec"] == str(data.resolve())
    assert [r["step"] for r in _records(out)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_train_py_runs_as_a_file_from_the_repository_root():
    result = subprocess.run([sys.executable, "training/train.py", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--preset" in result.stdout and "--resume" in result.stdout


@pytest.mark.slow  # three training processes
def test_a_second_training_into_a_running_runs_folder_is_refused(tmp_path):
    """Two real processes: the second is refused in one line naming the folder, before it
    writes anything; a lock file left by a killed run blocks nothing."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "training" / "train.py"), "--out", str(out),
           "--batch-size", "32", "--sample-every", "0", "--save-every", "0", "--threads", "1",
           "--no-progress"]
    first = subprocess.Popen([*cmd, "--steps", "100000"], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / ".lock").exists():  # it owns the folder now
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # Stopped, it still holds the lock, and leaves the cores to the rest of the test.
        first.send_signal(signal.SIGSTOP)
        before = sorted(p.name for p in out.iterdir())
        second = subprocess.run([*cmd, "--steps", "5"], cwd=tmp_path, capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 1, second.stderr
        (line,) = second.stderr.strip().splitlines()
        assert str(out) in line and f"pid {first.pid}" in line and "--out" in line
        assert first.poll() is None  # the owner runs on, its folder as it was
        assert sorted(p.name for p in out.iterdir()) == before
    finally:
        first.kill()
        first.wait()
    assert (out / ".lock").exists()  # kill -9 left it; the kernel dropped the lock
    third = subprocess.run([*cmd, "--steps", "2", "--overwrite"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr
    assert load_checkpoint(out / "ckpt.pt")["step"] == 2
    assert [r["step"] for r in _records(out)] == [2]
    assert not (out / ".lock").exists()  # a clean exit removes it


def test_an_empty_out_is_refused_not_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _cli(["--out", "", "--steps", "1", "--batch-size", "32", "--sample-every", "0",
                   "--no-progress"])
    assert result.exit_code == 2 and "--out" in result.output and "empty" in result.output
    assert list(tmp_path.iterdir()) == []
