"""tools/evaluate.py: the Fréchet distance, the digits classifier and its cache, the CLI."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_tool():
    spec = importlib.util.spec_from_file_location("ddpm_tools_evaluate",
                                                  ROOT / "tools" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


ev = _load_tool()


@pytest.fixture(scope="module")
def digits():
    return ev.load_digits_data()


@pytest.fixture(scope="module")
def classifier(digits, tmp_path_factory):
    return ev.load_classifier(digits, tmp_path_factory.mktemp("cache"))


# === Fréchet distance ===


def _rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


def test_frechet_distance_closed_form_for_commuting_covariances():
    """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T: FD = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2."""
    rng = np.random.default_rng(0)
    d = 12
    q = _rotation(d, 1)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    got = ev.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert got == pytest.approx(want, rel=1e-9)


def test_frechet_distance_symmetric_and_zero_for_identical_sets(digits, classifier):
    fa = classifier.features(digits.images[digits.pool[:200]])
    fb = classifier.features(digits.images[digits.pool[200:400]])
    assert ev.fd_features(fa, fa) == pytest.approx(0.0, abs=1e-8)
    # Dead ReLU units make the covariances singular; the square roots of their ~1e-16
    # eigenvalues leave ~1e-7 of round-off, far below anything the FD is read at.
    assert ev.fd_features(fa, fb) == pytest.approx(ev.fd_features(fb, fa), rel=1e-6)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 5)), rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5))
    assert ev.fd_features(x, y) == pytest.approx(ev.fd_features(y, x), rel=1e-7)


def test_real_vs_real_is_small_and_noise_is_large(digits, classifier):
    n = 400
    x, y = ev.half_splits(len(digits.pool), n, refs=1)[0]
    real_x = digits.images[digits.pool[x]]
    real_y = classifier.features(digits.images[digits.pool[y]])
    noise = np.random.default_rng(0).uniform(-1, 1, (n, 1, 8, 8)).astype(np.float32)
    noise = classifier.features(ev.quantise(noise, (-1, 1), 17))
    gauss = ev.fitted_gaussian_samples(real_x, n, seed=0)
    gauss = classifier.features(ev.quantise(gauss, (-1, 1), 17))
    floor = ev.fd_features(classifier.features(real_x), real_y)
    fd_noise, fd_gauss = ev.fd_features(noise, real_y), ev.fd_features(gauss, real_y)
    assert floor < fd_gauss / 3 < fd_noise / 3
    assert floor < fd_noise / 20


# === Digits data and the feature classifier ===


def test_splits_are_disjoint_and_fixed(digits):
    sets = [set(digits.classifier), set(digits.pool)]
    assert sum(map(len, sets)) == len(digits.labels) == len(set().union(*sets))
    assert len(digits.pool) == 2 * ev.FD_SET_SIZE
    counts = np.bincount(digits.labels[digits.classifier], minlength=10)
    assert counts.min() >= 75 and counts.max() <= 85  # stratified: ~79.7 a class
    splits = ev.half_splits(len(digits.pool), 300, refs=4)
    assert len({tuple(x[:5]) for x, _ in splits}) == 4  # different splits...
    for (x, y), (x2, y2) in zip(splits, ev.half_splits(len(digits.pool), 300, refs=4),
                                strict=True):
        assert len(x) == len(y) == 300 and not set(x) & set(y)
        np.testing.assert_array_equal(x, x2)  # ...and the same ones every time
        np.testing.assert_array_equal(y, y2)
    with pytest.raises(ValueError, match="disjoint"):
        ev.half_splits(len(digits.pool), 501, refs=1)
    assert digits.images.min() == -1 and digits.images.max() == 1
    # 17 levels: every pixel is already on the grid quantise() rounds to.
    np.testing.assert_array_equal(ev.quantise(digits.images, (-1, 1), 17), digits.images)


def test_classifier_is_deterministic_and_the_numpy_forward_matches_sklearn(digits, classifier):
    clf = ev.fit_mlp(digits)  # trained again, from scratch
    again = ev.DigitClassifier(clf.coefs_, clf.intercepts_, classifier.recipe_hash)
    for a, b in zip(classifier.coefs + classifier.intercepts, again.coefs + again.intercepts,
                    strict=True):
        np.testing.assert_array_equal(a, b)
    x = digits.images[digits.pool]
    np.testing.assert_allclose(classifier.probs(x), clf.predict_proba(x.reshape(len(x), -1)),
                               rtol=1e-9, atol=1e-12)
    accuracy = (classifier.probs(x).argmax(1) == digits.labels[digits.pool]).mean()
    assert accuracy > 0.9


@pytest.mark.slow
def test_classifier_cache_round_trips(digits, classifier, tmp_path, monkeypatch):
    path = classifier.save(tmp_path / "clf.npz")
    loaded = ev.DigitClassifier.load(path)
    assert loaded.recipe_hash == classifier.recipe_hash
    x = digits.images[:50]
    np.testing.assert_array_equal(loaded.features(x), classifier.features(x))
    np.testing.assert_array_equal(loaded.probs(x), classifier.probs(x))
    np.load(path, allow_pickle=False).close()  # data, not pickle

    # A second load_classifier finds the cache and does not train.
    first = ev.load_classifier(digits, tmp_path / "cache")

    def no_training(_):
        raise AssertionError("retrained despite a cached classifier")

    monkeypatch.setattr(ev, "train_classifier", no_training)
    second = ev.load_classifier(digits, tmp_path / "cache")
    np.testing.assert_array_equal(first.features(x), second.features(x))
    assert len(list((tmp_path / "cache").glob("digits-classifier-*.npz"))) == 1


def test_digit_inception_score_bounds():
    one_hot = np.eye(10)[np.arange(100) % 10]
    assert ev.digit_inception_score(one_hot) == pytest.approx(10.0, rel=1e-6)
    assert ev.digit_inception_score(np.full((100, 10), 0.1)) == pytest.approx(1.0)
    assert ev.digit_inception_score(np.eye(10)[np.zeros(100, int)]) == pytest.approx(1.0)
    assert ev.class_shares(one_hot) == [0.1] * 10


def test_fitted_gaussian_has_the_data_moments():
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 2).reshape(200, 1, 2, 3)
    draws = ev.fitted_gaussian_samples(data, 40_000, seed=1).reshape(40_000, -1)
    flat = data.reshape(200, -1)
    cov = np.cov(flat.T)
    scale = np.abs(cov).max()  # sampling error of the 40k-draw moments: ~1% of this
    np.testing.assert_allclose(draws.mean(0), flat.mean(0), atol=0.03 * math.sqrt(scale))
    np.testing.assert_allclose(np.cov(draws.T), cov, atol=0.04 * scale)


def test_rgb_without_inception_weights_says_so_and_skips():
    e = ev.Evaluator((3, 8, 8), (-1.0, 1.0), 256, 10)
    assert not e.available
    assert "--inception-weights" in e.note and "never downloaded" in e.note
    assert e.baselines() == {"note": e.note}


# === The tool end to end ===


@pytest.mark.slow
def test_all_command_writes_a_well_formed_report(tiny_onnx, tmp_path):
    out = tmp_path / "eval"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    cmd = [sys.executable, str(ROOT / "tools" / "evaluate.py"), "all", str(tiny_onnx),
           "-n", "8", "--refs", "3", "--nll-images", "3", "--batch-size", "8",
           "--samplers", "ddpm,dpmpp_2m", "--nfe", "5,2", "--seeds", "0,1",
           "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert list((tmp_path / "xdg" / "ddpm-deploy").glob("digits-classifier-*.npz"))

    report = json.loads((out / "report.json").read_text())
    base = report["baselines"]
    assert base["n"] == 8 and base["refs"] == 3
    assert base["real_vs_real"] > 0 and base["gaussian"] > 0 and base["real_vs_real_std"] >= 0
    quality = report["quality"]
    assert quality["steps"] == 1000 and math.isfinite(quality["fd"]) and quality["fd"] >= 0
    assert quality["fd_over_floor"] == pytest.approx(quality["fd"] / base["real_vs_real"])
    assert len(quality["class_shares"]) == 10 and sum(quality["class_shares"]) == pytest.approx(1)
    assert 1.0 <= quality["digit_is"] <= 10.0

    nll = report["nll"]
    assert nll["n_images"] == 3 and nll["num_levels"] == 17
    assert nll["total_bpd"] == pytest.approx(nll["prior_bpd"] + nll["kl_bpd"]
                                             + nll["decoder_bpd"], rel=1e-9)
    assert nll["total_bpd"] > 0

    table = report["steps"]
    rows = [(r["sampler"], r["steps"]) for r in table["rows"]]
    assert rows == [("ddpm", 1000), ("ddpm", 2), ("ddpm", 5), ("dpmpp_2m", 2), ("dpmpp_2m", 5)]
    full = table["rows"][0]
    # The full chain of seed 0 is sampled once and reused; each row averages both seeds.
    assert full["fd_by_seed"][0] == pytest.approx(quality["fd"])
    for r in table["rows"]:
        assert r["seeds"] == [0, 1] and len(r["fd_by_seed"]) == 2
        assert r["fd"] == pytest.approx(np.mean(r["fd_by_seed"]))
        assert r["fd_std"] == pytest.approx(np.std(r["fd_by_seed"], ddof=1))
        assert r["images_per_s"] > 0 and r["fd_ratio"] == pytest.approx(r["fd"] / full["fd"])
    # Seeds differ, so their FDs do.
    assert full["fd_by_seed"][0] != full["fd_by_seed"][1]
    rec = table["recommended"]
    assert rec["fd"] <= 1.1 * full["fd"] and (rec["sampler"], rec["steps"]) in rows
    assert len(list((out / "samples").glob("*.npz"))) == 2 * len(rows)

    markdown = (out / "steps.md").read_text()
    assert markdown.count("\n| DDPM |") == 3 and markdown.count("\n| DPMPP_2M |") == 2
    assert "real vs real" in markdown
    from PIL import Image

    with Image.open(out / "steps.png") as png:
        assert png.format == "PNG" and png.size[0] > 500


def _as_student(onnx_path: Path, path: Path, steps: int) -> Path:
    """The tiny network's file with a distilled student's record (its weights do not
    matter to the report's shape)."""
    import onnx

    proto = onnx.load(onnx_path)
    entry = next(e for e in proto.metadata_props if e.key == "ddpm")
    record = json.loads(entry.value)
    record.update(prediction="v", defaults={"sampler": "ddim", "steps": steps,
                                            "spacing": "trailing", "eta": 0.0},
                  distilled={"method": "progressive", "from_steps": 8, "steps": steps,
                             "teacher_sha256": "0" * 64})
    entry.value = json.dumps(record)
    onnx.save(proto, path)
    return path


@pytest.mark.slow  # a subprocess of the evaluation tool
def test_students_command_sets_each_student_beside_its_teacher(tiny_onnx, tmp_path):
    out = tmp_path / "eval"
    student = _as_student(tiny_onnx, tmp_path / "student-2.onnx", 2)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    cmd = [sys.executable, str(ROOT / "tools" / "evaluate.py"), "students", str(tiny_onnx),
           str(student), "-n", "8", "--refs", "3", "--seeds", "0,1", "--batch-size", "8",
           "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    table = json.loads((out / "students.json").read_text())["table"]
    rows = [(r["model"], r["sampler"], r["spacing"], r["steps"]) for r in table["rows"]]
    assert rows == [("teacher", "ddpm", "linspace", 1000), ("teacher", "ddim", "trailing", 8),
                    ("student (student-2.onnx)", "ddim", "trailing", 2),
                    ("teacher", "dpmpp_2m", "quadratic", 2),
                    ("teacher", "dpmpp_2m", "trailing", 2), ("teacher", "ddim", "trailing", 2)]
    full = table["rows"][0]
    for r in table["rows"]:
        assert r["fd"] == pytest.approx(np.mean(r["fd_by_seed"]))
        assert r["fd_ratio"] == pytest.approx(r["fd"] / full["fd"])
        assert r["digit_is_diff"] == pytest.approx(r["digit_is"] - full["digit_is"])
        assert r["speedup"] == pytest.approx(r["images_per_s"] / full["images_per_s"])
    assert len(table["targets"]) == 1 and table["targets"][0].startswith("2 calls: FD")
    markdown = (out / "students.md").read_text()
    assert markdown.count("\n| teacher |") == 5 and "\n| student (student-2.onnx) |" in markdown
    # The student's own sampler: no warning; a model file that is no student is refused.
    assert "warning" not in proc.stderr.lower()
    proc = subprocess.run(cmd[:3] + [str(tiny_onnx), str(tiny_onnx)] + cmd[5:],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "not a distilled student" in errors[0]


def test_fid_path_runs_a_local_torchscript_network(tiny_onnx, tmp_path):
    """The --inception-weights plumbing, with a small TorchScript stand-in for Inception:
    it must get uint8 RGB [N, 3, H, W] and be asked for features."""
    torch = pytest.importorskip("torch")
    from click.testing import CliRunner

    class StandIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3 * 8 * 8, 16)

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            if x.dtype != torch.uint8 or x.shape[1] != 3:
                raise ValueError("expected uint8 RGB")
            if not return_features:
                raise ValueError("expected return_features=True")
            return self.proj(x.float().flatten(1) / 255.0)

    torch.manual_seed(0)
    weights = tmp_path / "standin.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch flags jit as deprecated
        torch.jit.script(StandIn()).save(str(weights))
    real = tmp_path / "real.npz"
    np.savez(real, images=np.random.default_rng(0).integers(0, 256, (30, 8, 8, 1), np.uint8))
    result = CliRunner().invoke(ev.main, [
        "quality", str(tiny_onnx), "-n", "10", "--refs", "2", "--steps", "3", "--real", str(real),
        "--inception-weights", str(weights), "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "quality.json").read_text())["quality"]
    assert report["metric"].startswith("FID") and math.isfinite(report["fd"])
    assert report["baselines"]["real_vs_real"] >= 0 and "digit_is" not in report
