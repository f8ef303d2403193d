"""Measure a DDPM model file the way the paper does: sample quality and likelihood.

    python tools/evaluate.py baselines [-n 500]              # real-vs-real floor, Gaussian
    python tools/evaluate.py quality MODEL.onnx [-n 500]     # FD, baselines, digit-IS, classes
    python tools/evaluate.py nll MODEL.onnx --nll-images 300 # bits/dim, the variational bound
    python tools/evaluate.py steps MODEL.onnx --out DIR      # FD and images/s vs steps
    python tools/evaluate.py all MODEL.onnx --out DIR        # all of the above, one report

Digits (1x8x8, 17 levels): the Fréchet distance (FD) uses the hidden features of a
small MLP trained here on scikit-learn's digits (deterministic, cached as .npz data
under $XDG_CACHE_HOME/ddpm-deploy, never downloaded). The 1,797 digits are split once:
797 (stratified by class) train the classifier; the other 1,000 are the FD pool, which
the classifier never saw. The pool is cut at random into two disjoint halves X, Y of
N images, ``--refs`` times over (fixed seeds). Every FD is against Y, at equal N:
  generated N vs Y        the model
  X vs Y                  the floor: two disjoint halves of the data
  N draws vs Y            of a Gaussian fitted to X's pixels: the trivial generator
and each figure is the mean over the splits (± their spread: what one reference set
alone would leave to chance). Random, not class-stratified, halves: a generator draws
its classes at random, and stratified halves would give a floor no generator can reach.
Generated and Gaussian images are quantised to the data's levels first, as the data are.

RGB (or any other shape): FID with the standard Inception features, if the user has
the TorchScript weights file (``inception-2015-12-05.pt``, as StyleGAN2-ADA and
clean-fid use) and passes ``--inception-weights PATH`` and ``--real IMAGES.npz``
(uint8 [N, H, W, C] or [N, C, H, W] under key ``images``). Nothing is downloaded;
without them FID is skipped.

Sampling and bits/dim run through the runtime (numpy + ONNX Runtime); torch is
imported only for the Inception network.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402
import numpy as np  # noqa: E402

from runtime.cpus import cpu_count  # noqa: E402

DIGITS_SHAPE = (1, 8, 8)
DIGITS_LEVELS = 17
FD_SET_SIZE = 500        # at most N images in each of the two disjoint real halves
SPLIT_SEED = 0
DEFAULT_REFS = 50        # random half-splits of the pool each FD is averaged over
DEFAULT_DDPM_STEPS = (1000, 250, 100, 50, 20)
DEFAULT_DDIM_STEPS = (100, 50, 20, 10)
WITHIN = 1.2             # "as good as the full chain": FD within 1.2x of it

# What the feature classifier is; its hash (with the data and scikit-learn version) keys the cache.
CLASSIFIER_RECIPE = {
    "model": "sklearn.neural_network.MLPClassifier",
    "hidden_layer_sizes": [256, 64],  # FD features: the 64 ReLU units of the last hidden layer
    "activation": "relu",
    "solver": "adam",
    "alpha": 1e-4,
    "learning_rate_init": 1e-3,
    "batch_size": 64,
    "max_iter": 300,
    "random_state": 0,
    "input": "pixels / 8 - 1, flattened",
    "split": {"seed": SPLIT_SEED, "pool_size": 2 * FD_SET_SIZE, "stratified": True},
    "blas_threads": 1,
    "version": 1,
}


# === Fréchet distance ===

def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of [N, D] features, float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians.

    tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2): a symmetric PSD matrix, so
    eigh gives it without scipy's sqrtm and its complex round-off.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    middle = root1 @ s2 @ root1
    ev = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_cross = float(np.sqrt(np.clip(ev, 0.0, None)).sum())
    fd = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * tr_cross)
    return max(fd, 0.0)


def fd_features(a: np.ndarray, b: np.ndarray) -> float:
    """FD between two feature sets [N, D]."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


# === Digits data ===

def quantise(x: np.ndarray, data_range, num_levels: int) -> np.ndarray:
    """Round float images to the data's levels (and clip to its range), float32."""
    lo, hi = (float(v) for v in data_range)
    width = (hi - lo) / (num_levels - 1)
    q = lo + np.round((np.clip(x, lo, hi) - lo) / width) * width
    return q.astype(np.float32)


@dataclass(frozen=True)
class DigitsData:
    images: np.ndarray       # float32 [1797, 1, 8, 8] in [-1, 1]: pixels / 8 - 1
    labels: np.ndarray       # int [1797]
    classifier: np.ndarray   # indices that train the feature classifier (797)
    pool: np.ndarray         # the other 1,000, in a fixed random order: the real FD sets
    digest: str              # sha256 of the raw pixels and labels


def load_digits_data() -> DigitsData:
    """scikit-learn's digits (shipped with it, no download), split once by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    raw, labels = bunch.images.astype(np.int64), bunch.target.astype(np.int64)
    digest = hashlib.sha256(raw.tobytes() + labels.tobytes()).hexdigest()
    idx = np.arange(len(labels))
    clf_idx, pool = train_test_split(idx, test_size=2 * FD_SET_SIZE, stratify=labels,
                                     random_state=SPLIT_SEED)
    images = (raw / 8.0 - 1.0).astype(np.float32)[:, None]
    return DigitsData(images, labels, np.sort(clf_idx), pool, digest)


def half_splits(pool_size: int, n: int, refs: int, seed: int = SPLIT_SEED):
    """``refs`` random pairs (X, Y) of disjoint index sets of n each, from range(pool_size)."""
    if 2 * n > pool_size:
        raise ValueError(f"two disjoint sets of {n} need {2 * n} images, the pool has "
                         f"{pool_size}")
    out = []
    for k in range(refs):
        perm = np.random.default_rng([seed, k]).permutation(pool_size)
        out.append((perm[:n], perm[n:2 * n]))
    return out


# === Feature classifier (numpy forward pass; scikit-learn only to train it) ===

class DigitClassifier:
    """An MLP on [-1, 1] digits: ``features`` (last hidden layer) and class ``probs``."""

    def __init__(self, coefs, intercepts, recipe_hash: str):
        self.coefs = [np.asarray(c, np.float64) for c in coefs]
        self.intercepts = [np.asarray(b, np.float64) for b in intercepts]
        self.recipe_hash = recipe_hash

    def _hidden(self, images: np.ndarray) -> np.ndarray:
        h = np.asarray(images, np.float64).reshape(len(images), -1)
        for w, b in zip(self.coefs[:-1], self.intercepts[:-1], strict=True):
            h = np.maximum(h @ w + b, 0.0)
        return h

    def features(self, images: np.ndarray) -> np.ndarray:
        return self._hidden(images)

    def probs(self, images: np.ndarray) -> np.ndarray:
        logits = self._hidden(images) @ self.coefs[-1] + self.intercepts[-1]
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def save(self, path: Path) -> Path:
        """As .npz data (no pickle), written atomically."""
        arrays = {f"coef_{i}": c for i, c in enumerate(self.coefs)}
        arrays.update({f"intercept_{i}": b for i, b in enumerate(self.intercepts)})
        buffer = io.BytesIO()
        np.savez(buffer, recipe_hash=np.array(self.recipe_hash), **arrays)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path) -> DigitClassifier:
        with np.load(path, allow_pickle=False) as z:
            layers = sum(1 for k in z.files if k.startswith("coef_"))
            return cls([z[f"coef_{i}"] for i in range(layers)],
                       [z[f"intercept_{i}"] for i in range(layers)], str(z["recipe_hash"]))


def recipe_hash(data: DigitsData) -> str:
    import sklearn

    key = {"recipe": CLASSIFIER_RECIPE, "data_sha256": data.digest,
           "sklearn": sklearn.__version__}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def fit_mlp(data: DigitsData):
    """The scikit-learn MLP of CLASSIFIER_RECIPE, trained on the classifier split."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    r = CLASSIFIER_RECIPE
    clf = MLPClassifier(hidden_layer_sizes=tuple(r["hidden_layer_sizes"]),
                        activation=r["activation"], solver=r["solver"], alpha=r["alpha"],
                        learning_rate_init=r["learning_rate_init"], batch_size=r["batch_size"],
                        max_iter=r["max_iter"], random_state=r["random_state"])
    x = data.images[data.classifier].reshape(len(data.classifier), -1).astype(np.float64)
    # One BLAS thread: the matrices are small, and on a busy 2-core machine threads that
    # wait on each other made this 20x slower. A fixed summation order also helps determinism.
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, data.labels[data.classifier])
    return clf


def train_classifier(data: DigitsData) -> DigitClassifier:
    clf = fit_mlp(data)
    if list(clf.classes_) != list(range(10)):
        raise RuntimeError(f"digits classifier learned classes {list(clf.classes_)}, not 0..9")
    return DigitClassifier(clf.coefs_, clf.intercepts_, recipe_hash(data))


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "ddpm-deploy"


def load_classifier(data: DigitsData, directory: Path | None = None) -> DigitClassifier:
    """The cached classifier for this recipe, trained (a few seconds) and cached if absent."""
    key = recipe_hash(data)
    path = (directory or cache_dir()) / f"digits-classifier-{key}.npz"
    if path.is_file():
        try:
            clf = DigitClassifier.load(path)
        except (OSError, ValueError, KeyError) as err:
            click.echo(f"{path}: unreadable cache ({err}); retraining", err=True)
        else:
            if clf.recipe_hash == key:
                return clf
    clf = train_classifier(data)
    clf.save(path)
    return clf


# === Sample statistics ===

def digit_inception_score(probs: np.ndarray) -> float:
    """exp E_x KL(p(y|x) || p(y)), with the digits classifier in place of Inception."""
    p = np.clip(probs, 1e-12, 1.0)
    marginal = p.mean(axis=0, keepdims=True)
    return float(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(marginal)), axis=1))))


def class_shares(probs: np.ndarray) -> list[float]:
    counts = np.bincount(probs.argmax(axis=1), minlength=probs.shape[1])
    return [round(float(c) / len(probs), 4) for c in counts]


def fitted_gaussian_samples(images: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n draws from N(mean, covariance) of ``images``' pixels, without forming the covariance."""
    x = images.reshape(len(images), -1).astype(np.float64)
    mean = x.mean(axis=0)
    z = np.random.default_rng(seed).standard_normal((n, len(x)))
    draws = mean + z @ (x - mean) / math.sqrt(len(x) - 1)  # covariance exactly x's
    return draws.reshape(n, *images.shape[1:]).astype(np.float32)


# === Inception FID (RGB; torch only here) ===

class InceptionFeatures:
    """2048-d pool features from the TorchScript Inception file; uint8 [N, H, W, C] in.

    The file is loaded (and checked) once, when the evaluation starts, not after sampling.
    """

    def __init__(self, weights: Path, *, batch: int = 100):
        try:
            import torch
        except ImportError:
            raise click.ClickException("FID needs torch to run the Inception network: "
                                       "pip install torch==2.13.0") from None
        self._torch, self.batch = torch, batch
        try:
            with warnings.catch_warnings():
                # The published FID network is TorchScript; torch now flags jit as deprecated.
                warnings.simplefilter("ignore", DeprecationWarning)
                self.detector = torch.jit.load(str(weights), map_location="cpu").eval()
        except (RuntimeError, ValueError) as err:
            raise click.ClickException(
                f"{weights}: not a TorchScript Inception file ({str(err).splitlines()[0]}); "
                "expected inception-2015-12-05.pt as StyleGAN2-ADA and clean-fid use") from None

    def __call__(self, images_uint8: np.ndarray) -> np.ndarray:
        torch, out = self._torch, []
        with torch.inference_mode():
            for start in range(0, len(images_uint8), self.batch):
                x = torch.from_numpy(np.ascontiguousarray(
                    images_uint8[start:start + self.batch].transpose(0, 3, 1, 2)))
                if x.shape[1] == 1:
                    x = x.repeat(1, 3, 1, 1)
                # It resizes to 299x299 itself and takes uint8-valued input.
                out.append(self.detector(x, return_features=True).double().numpy())
        return np.concatenate(out)


def load_real_npz(path: Path, shape, data_range) -> np.ndarray:
    """uint8 images (NHWC or NCHW) under key 'images' -> float32 [N, C, H, W] in the data range."""
    with np.load(path, allow_pickle=False) as z:
        if "images" not in z.files:
            raise click.ClickException(f"{path}: no 'images' array; expected uint8 images")
        images = z["images"]
    c, h, w = shape
    if images.dtype == np.uint8 and images.ndim == 4 and images.shape[1:] == (h, w, c):
        images = images.transpose(0, 3, 1, 2)  # NHWC, as runtime's --npz writes
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (c, h, w):
        raise click.ClickException(f"{path}: images are {images.dtype} {list(images.shape)}; the "
                                   f"model needs uint8 [N, {h}, {w}, {c}] or [N, {c}, {h}, {w}]")
    lo, hi = data_range
    return (lo + images / 255.0 * (hi - lo)).astype(np.float32)


# === Evaluations ===

class Evaluator:
    """Scores float32 images [N, C, H, W] against the real data at a fixed N.

    Each FD is the mean over ``refs`` reference halves Y_k of the real pool, with the
    floor X_k vs Y_k and the Gaussian fitted to X_k computed on the same splits.
    """

    def __init__(self, shape, data_range, num_levels, n: int, *, real_npz: Path | None = None,
                 inception_weights: Path | None = None, refs: int = DEFAULT_REFS):
        self.shape, self.data_range, self.num_levels, self.n = (tuple(shape), data_range,
                                                                num_levels, n)
        self.digits = (self.shape == DIGITS_SHAPE and num_levels == DIGITS_LEVELS
                       and real_npz is None)
        self.note = None
        self.metric = None
        if self.digits:
            if n > FD_SET_SIZE:
                raise click.ClickException(
                    f"digits FD takes at most {FD_SET_SIZE} images per set (1,797 digits: 797 "
                    f"train the feature classifier, the other 1,000 give two disjoint real "
                    f"sets of up to {FD_SET_SIZE}); got -n {n}")
            self.data = load_digits_data()
            self.classifier = load_classifier(self.data)
            self.pool = self.data.images[self.data.pool]
            self.pool_labels = self.data.labels[self.data.pool]
            self.metric = "FD (digits MLP features, 64-d)"
            self.pool_note = ("the 1,000 digits the feature classifier did not train on "
                              "(the default DDPM run trains on all 1,797)")
            self._feat = self.classifier.features
        elif real_npz is not None and inception_weights is not None:
            self.pool = load_real_npz(real_npz, self.shape, data_range)
            if len(self.pool) < 2 * n:
                raise click.ClickException(f"{real_npz}: {len(self.pool)} images; FID at N={n} "
                                           f"needs {2 * n} (two disjoint sets)")
            self.metric = "FID (Inception pool3, 2048-d)"
            self.pool_note = str(real_npz)
            inception = InceptionFeatures(inception_weights)
            self._feat = lambda x: inception(self._uint8(x))
        else:
            self.note = ("FID skipped: no --inception-weights PATH (and --real IMAGES.npz) given; "
                         "the Inception weights are never downloaded")
            return
        self.splits = half_splits(len(self.pool), n, refs)
        self._pool_features = None
        self._ref_stats = None

    def _uint8(self, x):
        from runtime.images import to_uint8

        return to_uint8(x, self.data_range)

    @property
    def available(self) -> bool:
        return self.metric is not None

    def _stats(self):
        if self._ref_stats is None:
            self._pool_features = self._feat(self.pool)
            self._ref_stats = [gaussian_stats(self._pool_features[y]) for _, y in self.splits]
        return self._ref_stats

    def fd(self, images: np.ndarray) -> tuple[float, float]:
        """Mean and standard deviation over the reference halves of FD(images, Y_k)."""
        stats = gaussian_stats(self._feat(quantise(images, self.data_range, self.num_levels)))
        values = [frechet_distance(*stats, *ref) for ref in self._stats()]
        return float(np.mean(values)), float(np.std(values))

    def digit_stats(self, images: np.ndarray) -> dict:
        if not self.digits:
            return {}
        probs = self.classifier.probs(quantise(images, self.data_range, self.num_levels))
        return {"digit_is": digit_inception_score(probs), "class_shares": class_shares(probs)}

    def baselines(self, seed: int = 0) -> dict:
        if not self.available:
            return {"note": self.note}
        refs = self._stats()
        floor, gauss_fd, real_is, gauss_is = [], [], [], []
        for k, (x, _) in enumerate(self.splits):
            real_x = self.pool[x]
            floor.append(frechet_distance(*gaussian_stats(self._pool_features[x]), *refs[k]))
            gauss = quantise(fitted_gaussian_samples(real_x, self.n, seed + k), self.data_range,
                             self.num_levels)
            gauss_fd.append(frechet_distance(*gaussian_stats(self._feat(gauss)), *refs[k]))
            if self.digits:
                real_is.append(self.digit_stats(real_x)["digit_is"])
                gauss_is.append(self.digit_stats(gauss)["digit_is"])
        out = {"metric": self.metric, "n": self.n, "refs": len(self.splits),
               "pool": self.pool_note,
               "real_vs_real": float(np.mean(floor)), "real_vs_real_std": float(np.std(floor)),
               "gaussian": float(np.mean(gauss_fd)), "gaussian_std": float(np.std(gauss_fd)),
               "protocol": f"FD against Y_k, mean over {len(self.splits)} random disjoint "
                           f"halves (X_k, Y_k) of N = {self.n} from the pool; floor X_k vs Y_k; "
                           "Gaussian: N draws of a full-covariance Gaussian fitted to X_k's "
                           "pixels, clipped and quantised"}
        if self.digits:
            out["real_digit_is"] = float(np.mean(real_is))
            out["gaussian_digit_is"] = float(np.mean(gauss_is))
            out["classifier"] = {
                "accuracy_on_pool": float((self.classifier.probs(self.pool).argmax(1)
                                           == self.pool_labels).mean()),
                "recipe_hash": self.classifier.recipe_hash}
        return out


def sample_timed(pipe, n, seed, sampler, steps, batch_size, cache: Path | None, progress=True,
                 variance="fixedlarge"):
    """Images and wall time; reuses ``cache`` (.npz) from an identical earlier run."""
    from runtime.metadata import sha256_file

    key = {"model_sha256": sha256_file(pipe.source), "n": n, "seed": seed,
           "sampler": sampler, "steps": steps}
    if sampler == "ddpm" and variance != "fixedlarge":
        key["variance"] = variance
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if json.loads(str(z["key"])) == key:
                return z["images"], float(z["seconds"])
    full = steps is None or steps == pipe.record.num_timesteps
    start = time.perf_counter()
    images = pipe.sample_float(n, seed, sampler=sampler, steps=None if full else steps,
                               variance=variance, batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - start
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, images=images, seconds=seconds, key=json.dumps(key))
        cache.write_bytes(buffer.getvalue())
    return images, seconds


def run_nll(pipe, evaluator_or_images, n_images: int, *, seed: int, batch_size: int,
            variance: str, progress: bool = True) -> dict:
    """Bits/dim by the variational bound over ``n_images`` held-out images."""
    from runtime.likelihood import bits_per_dim

    rec = pipe.record
    if isinstance(evaluator_or_images, Evaluator) and evaluator_or_images.digits:
        data = evaluator_or_images.data
        if n_images > len(data.pool):
            raise click.ClickException(f"--nll-images at most {len(data.pool)} for digits")
        # training/data.py trains on all 1,797 digits: no digit is held out from the DDPM.
        x0, source = (data.images[data.pool[:n_images]],
                      f"digits FD pool[:{n_images}] (in the default run's training data)")
    else:
        x0, source = evaluator_or_images[:n_images], "--real images"
    rng = np.random.default_rng(seed)
    T = pipe.schedule.num_timesteps
    parts = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=T * math.ceil(len(x0) / batch_size), desc="bits/dim", unit="step",
                   leave=False)
    start = time.perf_counter()
    try:
        for s in range(0, len(x0), batch_size):
            parts.append(bits_per_dim(pipe.eps_fn, pipe.schedule, x0[s:s + batch_size], rng,
                                      data_range=rec.data_range, num_levels=rec.num_levels,
                                      variance=variance,
                                      callback=(lambda *_: bar.update(1)) if bar else None))
    finally:
        if bar:
            bar.close()
    out = {"n_images": int(len(x0)), "images": source, "variance": variance, "seed": seed,
           "num_levels": rec.num_levels, "data_range": list(rec.data_range), "T": T,
           "seconds": time.perf_counter() - start,
           "uniform_bpd": math.log2(rec.num_levels)}
    for key in ("total_bpd", "prior_bpd", "kl_bpd", "decoder_bpd"):
        v = np.concatenate([p[key] for p in parts])
        out[key] = float(v.mean())
        out[key.replace("_bpd", "_stderr")] = float(v.std(ddof=1) / math.sqrt(len(v))) \
            if len(v) > 1 else None
    # Where the bits go: the KL terms summed over ranges of the original t.
    vb = np.concatenate([p["vb_bpd"] for p in parts]).mean(axis=0)
    t = pipe.schedule.timesteps
    edges = [1, 10, 100, T]
    out["kl_bpd_by_t"] = {f"{a}..{b - 1}": float(vb[(t >= a) & (t < b)].sum())
                          for a, b in zip(edges[:-1], edges[1:], strict=True) if a < b}
    return out


def timed_images_per_s(pipe, images: int, sampler: str, steps: int, repeats: int = 2) -> float:
    """Best of ``repeats`` timings of ``images`` images in one batch: on a shared machine the
    fastest run is the one least disturbed by other jobs."""
    full = steps == pipe.record.num_timesteps
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        pipe.sample_float(images, 0, sampler=sampler, steps=None if full else steps,
                          batch_size=images, progress=False)
        best = min(best, time.perf_counter() - start)
    return images / best


def steps_table(pipe, ev: Evaluator, n, seed, ddpm_steps, ddim_steps, batch_size, samples_dir,
                progress=True, timing_images: int = 0) -> dict:
    """FD (and digit-IS) of N samples per sampler and step count, and images/s: from the
    sampling run itself, or with ``timing_images`` from a separate best-of-2 timing run."""
    T = pipe.record.num_timesteps
    ddpm_steps = sorted({min(s, T) for s in ddpm_steps} | {T}, reverse=True)
    configs = [("ddpm", s) for s in ddpm_steps] + [("ddim", s) for s in
                                                   sorted(set(ddim_steps), reverse=True)]
    rows = []
    for sampler, steps in configs:
        cache = samples_dir / f"{sampler}-{steps}-n{n}-seed{seed}.npz" if samples_dir else None
        images, seconds = sample_timed(pipe, n, seed, sampler, steps, batch_size, cache,
                                       progress)
        row = {"sampler": sampler, "steps": steps, "seconds": seconds,
               "images_per_s": n / seconds}
        if timing_images:
            row["images_per_s_sampling_run"] = row["images_per_s"]
            row["images_per_s"] = timed_images_per_s(pipe, timing_images, sampler, steps)
        if ev.available:
            row["fd"], row["fd_std"] = ev.fd(images)
        row.update(ev.digit_stats(images))
        rows.append(row)
        click.echo(f"  {sampler:4s} {steps:5d} steps: " + (f"FD {row['fd']:.3f}, "
                   if "fd" in row else "") + f"{row['images_per_s']:.1f} images/s", err=True)
    full = rows[0]
    for row in rows:
        row["speedup"] = row["images_per_s"] / full["images_per_s"]
        if "fd" in row:
            row["fd_ratio"] = row["fd"] / full["fd"]
    recommended = None
    if "fd" in full:
        ok = [r for r in rows if r["fd"] <= WITHIN * full["fd"]]
        best = min(ok, key=lambda r: (r["steps"], r["fd"]))
        recommended = {"sampler": best["sampler"], "steps": best["steps"], "fd": best["fd"],
                       "fd_ratio": best["fd_ratio"], "speedup": best["speedup"],
                       "nominal_speedup": T / best["steps"]}
    timing = (f"best of 2 runs of {timing_images} images in one batch" if timing_images
              else f"the sampling run itself ({n} images, batches of {batch_size})")
    return {"rows": rows, "full_steps": T, "recommended": recommended, "timing": timing,
            "rule": f"fewest steps with FD <= {WITHIN} x the {T}-step DDPM FD"}


# === Reports ===

def steps_markdown(table: dict, baselines: dict, n: int) -> str:
    rows, T = table["rows"], table["full_steps"]
    has_fd = "fd" in rows[0]
    head = ["sampler", "steps"] + (["FD (± spread)", f"FD / FD({T})", "digit-IS"] if has_fd
                                   else []) + ["images/s", "speed-up", "network calls"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["sampler"].upper(), str(r["steps"])]
        if has_fd:
            cells += [f"{r['fd']:.2f} ± {r['fd_std']:.2f}", f"{r['fd_ratio']:.2f}",
                      f"{r['digit_is']:.2f}" if "digit_is" in r else "-"]
        cells += [f"{r['images_per_s']:.1f}", f"{r['speedup']:.1f}x", f"{T // r['steps']}x fewer"
                  if r["steps"] < T else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    if has_fd and "real_vs_real" in baselines:
        lines.append("")
        lines.append(f"N = {n}; each FD is the mean over {baselines['refs']} random reference "
                     "halves of the real pool (± their spread). Baselines at the same N: real vs "
                     f"real (floor) {baselines['real_vs_real']:.2f} ± "
                     f"{baselines['real_vs_real_std']:.2f}, Gaussian fitted to the pixels "
                     f"{baselines['gaussian']:.2f} ± {baselines['gaussian_std']:.2f}.")
    lines.append(f"images/s: {table['timing']}, on {cpu_count()} CPU cores (ONNX Runtime).")
    rec = table.get("recommended")
    if rec:
        lines.append(f"Recommended: {rec['sampler'].upper()} with {rec['steps']} steps, FD "
                     f"{rec['fd']:.3f} ({rec['fd_ratio']:.2f}x the {T}-step FD), "
                     f"{rec['speedup']:.1f}x faster measured ({rec['nominal_speedup']:.0f}x "
                     "fewer network calls).")
    return "\n".join(lines) + "\n"


def plot_steps(table: dict, baselines: dict, path: Path) -> Path:
    """Two panels, log-scaled steps: FD (with the floor) and images/s. Pillow only."""
    from PIL import Image, ImageDraw, ImageFont

    rows = table["rows"]
    panels = [("fd", "FD vs steps") if "fd" in rows[0] else None, ("images_per_s", "images/s")]
    panels = [p for p in panels if p]
    pw, ph, m = 520, 380, 60
    img = Image.new("RGB", (pw * len(panels), ph), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    colors = {"ddpm": (31, 119, 180), "ddim": (214, 39, 40)}
    xs = [r["steps"] for r in rows]
    lx0, lx1 = math.log10(min(xs)) - 0.1, math.log10(max(xs)) + 0.1
    for k, (key, title) in enumerate(panels):
        ox = k * pw
        values = [r[key] for r in rows]
        floor = baselines.get("real_vs_real") if key == "fd" else None
        lines = [v for v in (floor, WITHIN * rows[0]["fd"] if key == "fd" else None) if v]
        log_y = key == "images_per_s"
        ys = [math.log10(v) if log_y else v for v in values + lines]
        y0, y1 = (min(ys) - 0.1, max(ys) + 0.1) if log_y else (0.0, max(ys) * 1.1)
        if y1 - y0 < 1e-9:
            y0, y1 = y0 - 1, y1 + 1

        def to_px(x, y, ox=ox, y0=y0, y1=y1, log_y=log_y):
            px = ox + m + (math.log10(x) - lx0) / (lx1 - lx0) * (pw - 2 * m)
            yy = math.log10(y) if log_y else y
            return px, ph - m - (yy - y0) / (y1 - y0) * (ph - 2 * m)

        draw.rectangle([ox + m, m, ox + pw - m, ph - m], outline="black")
        draw.text((ox + m, m - 35), title + (" (log)" if log_y else ""), fill="black", font=font)
        draw.text((ox + pw // 2 - 40, ph - m + 22), "steps (log)", fill="black", font=font)
        for s in sorted(set(xs)):
            px, _ = to_px(s, 10 ** y0 if log_y else y0)
            draw.line([px, ph - m, px, ph - m + 5], fill="black")
            draw.text((px - 10, ph - m + 7), str(s), fill="black", font=font)
        for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
            yy = y0 + frac * (y1 - y0)
            val = 10 ** yy if log_y else yy
            _, py = to_px(10 ** lx0, val)
            draw.line([ox + m - 5, py, ox + m, py], fill="black")
            draw.text((ox + 4, py - 7), f"{val:.3g}", fill="black", font=font)
        if floor:
            _, py = to_px(10 ** lx0, floor)
            for x in range(ox + m, ox + pw - m, 12):
                draw.line([x, py, x + 6, py], fill=(120, 120, 120))
            draw.text((ox + m + 5, py - 16), "real vs real (floor)", fill=(90, 90, 90), font=font)
        if key == "fd":
            _, py = to_px(10 ** lx0, WITHIN * rows[0]["fd"])
            for x in range(ox + m, ox + pw - m, 6):
                draw.point([(x, py)], fill=(0, 150, 0))
            draw.text((ox + pw - m - 150, py - 16), f"{WITHIN}x FD({table['full_steps']})",
                      fill=(0, 120, 0), font=font)
        for j, sampler in enumerate(("ddpm", "ddim")):
            pts = sorted(to_px(r["steps"], r[key]) for r in rows if r["sampler"] == sampler)
            if len(pts) > 1:
                draw.line(pts, fill=colors[sampler], width=2)
            for px, py in pts:
                draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colors[sampler])
            draw.text((ox + pw - m - 60, m + 8 + 16 * j), sampler.upper(),
                      fill=colors[sampler], font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def write_json(data: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def environment() -> dict:
    import onnxruntime

    return {"python": platform.python_version(), "numpy": np.__version__,
            "onnxruntime": onnxruntime.__version__, "cpu_count": cpu_count(),
            "machine": platform.machine(), "command": " ".join(sys.argv)}


def _summary(title: str, d: dict) -> str:
    lines = [title]
    if "note" in d:
        return f"{title}\n  {d['note']}"
    for key in ("fd", "fd_over_floor", "real_vs_real", "gaussian", "digit_is", "real_digit_is",
                "gaussian_digit_is", "images_per_s"):
        if key in d:
            spread = d.get(f"{key}_std")
            lines.append(f"  {key}: {d[key]:.4f}" + (f" ± {spread:.4f}" if spread else ""))
    if "class_shares" in d:
        lines.append("  class shares 0..9: " + " ".join(f"{v:.3f}" for v in d["class_shares"]))
    return "\n".join(lines)


# === CLI ===

def _open(model, threads):
    from runtime.errors import BackendUnavailableError, ModelFileError
    from runtime.pipeline import load

    try:
        return load(model, threads=threads)
    except (ModelFileError, BackendUnavailableError, ValueError) as err:
        raise click.ClickException(str(err)) from None


def _evaluator(record, n, real, inception_weights, refs):
    """For a model's record, or for the digits when ``record`` is None."""
    if record is None:
        shape, data_range, levels = DIGITS_SHAPE, (-1.0, 1.0), DIGITS_LEVELS
    else:
        shape, data_range, levels = record.image_shape, record.data_range, record.num_levels
    return Evaluator(shape, data_range, levels, n, real_npz=real,
                     inception_weights=inception_weights, refs=refs)


def _steps_list(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated step counts, got {text!r}") from None
    if any(s < 1 for s in steps):
        raise click.BadParameter("step counts must be >= 1")
    return steps


def _common(fn):
    opts = [
        click.option("-n", "--num", "n", type=click.IntRange(min=2), default=FD_SET_SIZE,
                     show_default=True, help="images per set, generated and real alike"),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--real", type=click.Path(dir_okay=False, exists=True, path_type=Path),
                     default=None,
                     help="real images (non-digit data): .npz, 'images' uint8 NHWC or NCHW"),
        click.option("--inception-weights", type=click.Path(dir_okay=False, exists=True,
                                                            path_type=Path),
                     default=None, help="local TorchScript Inception file for FID"),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="report folder (JSON, markdown, PNG)"),
        click.option("--refs", type=click.IntRange(min=1), default=DEFAULT_REFS,
                     show_default=True, help="random reference halves each FD is averaged over"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _model_opts(fn):
    for opt in reversed([
        click.argument("model", type=click.Path(dir_okay=False, path_type=Path)),
        click.option("--batch-size", type=click.IntRange(min=1), default=250, show_default=True),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="ONNX Runtime CPU threads (default: all cores)"),
        click.option("--progress/--no-progress", default=True, show_default=True),
    ]):
        fn = opt(fn)
    return fn


def _timing_opt(fn):
    return click.option(
        "--timing-images", type=click.IntRange(min=0), default=0, show_default=True,
        help="time each configuration in a separate best-of-2 run of this many images "
             "(0: time the FD sampling run itself); steadier on a shared machine")(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Sample quality (FD/FID, digit-IS) and likelihood (bits/dim) of a DDPM model file."""


@main.command("baselines")
@_common
def baselines_cmd(n, seed, real, inception_weights, out, refs):
    """Real-vs-real floor and fitted-Gaussian FD for the digits (or --real data)."""
    ev = _evaluator(None, n, real, inception_weights, refs)
    result = ev.baselines(seed)
    click.echo(_summary(f"baselines at N = {n}", result))
    if out:
        write_json({"baselines": result, "environment": environment()}, out / "baselines.json")


@main.command("quality")
@_common
@_model_opts
@click.option("--sampler", type=click.Choice(["ddpm", "ddim"]), default="ddpm",
              show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="respaced steps (default: the model's full T)")
@click.option("--variance", type=click.Choice(["fixedlarge", "fixedsmall"]), default="fixedlarge",
              show_default=True, help="ddpm only: sigma^2 = beta, or the posterior variance")
def quality_cmd(model, n, seed, real, inception_weights, out, refs, batch_size, threads, progress,
                sampler, steps, variance):
    """FD (or FID) of N samples of MODEL, with both baselines, digit-IS and class shares."""
    with _open(model, threads) as pipe:
        ev = _evaluator(pipe.record, n, real, inception_weights, refs)
        result = _quality(pipe, ev, n, seed, sampler, steps, batch_size, out, progress,
                          variance)
    click.echo(_summary(f"{model}: {sampler} {result['steps']} steps, N = {n}", result))
    click.echo(_summary("baselines", result["baselines"]))
    if out:
        write_json({"quality": result, "environment": environment()}, out / "quality.json")


def _quality(pipe, ev, n, seed, sampler, steps, batch_size, out, progress,
             variance="fixedlarge"):
    steps = steps or pipe.record.num_timesteps
    name = f"{sampler}-{steps}" + ("-small" if sampler == "ddpm" and variance == "fixedsmall"
                                   else "")
    cache = out / "samples" / f"{name}-n{n}-seed{seed}.npz" if out else None
    images, seconds = sample_timed(pipe, n, seed, sampler, steps, batch_size, cache, progress,
                                   variance)
    result = {"model": pipe.source, "sampler": sampler, "steps": steps, "n": n, "seed": seed,
              "variance": variance if sampler == "ddpm" else None,
              "seconds": seconds, "images_per_s": n / seconds, "backend": pipe.backend_name,
              "baselines": ev.baselines(seed)}
    if ev.available:
        result["metric"] = ev.metric
        result["fd"], result["fd_std"] = ev.fd(images)
        if "real_vs_real" in result["baselines"]:
            result["fd_over_floor"] = result["fd"] / result["baselines"]["real_vs_real"]
    else:
        result["note"] = ev.note
    result.update(ev.digit_stats(images))
    if out:
        from runtime.images import make_grid, save_png, to_uint8

        save_png(make_grid(to_uint8(images[:100], pipe.record.data_range)),
                 out / f"samples-{name}.png")
    return result


def _nll_source(pipe, ev, real):
    if ev.digits:
        return ev
    if real is None:
        raise click.ClickException("bits/dim on non-digit data needs --real IMAGES.npz")
    return load_real_npz(real, pipe.record.image_shape, pipe.record.data_range)


@main.command("nll")
@_common
@_model_opts
@click.option("--nll-images", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--variance", type=click.Choice(["fixedlarge", "fixedsmall"]), default="fixedlarge",
              show_default=True)
def nll_cmd(model, n, seed, real, inception_weights, out, refs, batch_size, threads, progress,
            nll_images, variance):
    """Bits/dim of MODEL by the variational bound (prior + T-1 KL terms + decoder)."""
    with _open(model, threads) as pipe:
        ev = _evaluator(pipe.record, min(n, FD_SET_SIZE), real, inception_weights, refs)
        result = run_nll(pipe, _nll_source(pipe, ev, real), nll_images, seed=seed,
                         batch_size=batch_size, variance=variance, progress=progress)
    click.echo(_nll_text(result))
    if out:
        write_json({"nll": result, "environment": environment()}, out / "nll.json")


def _nll_text(r: dict) -> str:
    def num(v):
        return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"

    def pm(key):
        err = r.get(key.replace("_bpd", "_stderr"))
        return num(r[key]) + (f" +- {num(err)}" if err is not None else "")

    return (f"bits/dim over {r['n_images']} images ({r['images']}, {r['num_levels']} levels): "
            f"{pm('total_bpd')}  [prior {pm('prior_bpd')}, KL t>1 {pm('kl_bpd')}, decoder "
            f"{pm('decoder_bpd')}]; uniform over the levels: {r['uniform_bpd']:.3f}; KL by t: "
            + ", ".join(f"{k}: {v:.3f}" for k, v in r["kl_bpd_by_t"].items()))


@main.command("steps")
@_common
@_model_opts
@click.option("--ddpm-steps", default=",".join(map(str, DEFAULT_DDPM_STEPS)),
              show_default=True, help="respaced ancestral step counts (the full T is added)")
@click.option("--ddim-steps", default=",".join(map(str, DEFAULT_DDIM_STEPS)),
              show_default=True)
@_timing_opt
def steps_cmd(model, n, seed, real, inception_weights, out, refs, batch_size, threads, progress,
              ddpm_steps, ddim_steps, timing_images):
    """FD and images/s for DDPM and DDIM at several step counts: table, PNG, JSON."""
    out = out or Path("out/eval")
    with _open(model, threads) as pipe:
        ev = _evaluator(pipe.record, n, real, inception_weights, refs)
        report = _steps_report(pipe, ev, n, seed, _steps_list(ddpm_steps),
                               _steps_list(ddim_steps), batch_size, out, progress,
                               timing_images, name="steps.json")
    click.echo(report["markdown"])
    click.echo(f"report: {out / 'steps.json'}, {out / 'steps.md'}, {out / 'steps.png'}")


def _steps_report(pipe, ev, n, seed, ddpm, ddim, batch_size, out, progress, timing_images,
                  name, extra=None):
    baselines = ev.baselines(seed)
    table = steps_table(pipe, ev, n, seed, ddpm, ddim, batch_size, out / "samples", progress,
                        timing_images)
    md = steps_markdown(table, baselines, n)
    (out / "steps.md").parent.mkdir(parents=True, exist_ok=True)
    (out / "steps.md").write_text(md)
    plot_steps(table, baselines, out / "steps.png")
    report = {"model": pipe.source, "n": n, "seed": seed, "backend": pipe.backend_name,
              "metric": ev.metric, "baselines": baselines, "steps": table,
              "environment": environment(), **(extra or {})}
    write_json(report, out / name)
    report["markdown"] = md
    return report


@main.command("all")
@_common
@_model_opts
@click.option("--nll-images", type=click.IntRange(min=0), default=100, show_default=True,
              help="0 skips bits/dim")
@click.option("--ddpm-steps", default=",".join(map(str, DEFAULT_DDPM_STEPS)), show_default=True)
@click.option("--ddim-steps", default=",".join(map(str, DEFAULT_DDIM_STEPS)), show_default=True)
@_timing_opt
def all_cmd(model, n, seed, real, inception_weights, out, refs, batch_size, threads, progress,
            nll_images, ddpm_steps, ddim_steps, timing_images):
    """Everything: the full-chain FD, baselines, digit-IS, bits/dim and the steps table."""
    out = out or Path("out/eval")
    ddpm, ddim = _steps_list(ddpm_steps), _steps_list(ddim_steps)
    with _open(model, threads) as pipe:
        ev = _evaluator(pipe.record, n, real, inception_weights, refs)
        T = pipe.record.num_timesteps
        quality = _quality(pipe, ev, n, seed, "ddpm", T, batch_size, out, progress)
        nll = None
        if nll_images:
            nll = run_nll(pipe, _nll_source(pipe, ev, real), nll_images, seed=seed,
                          batch_size=batch_size, variance="fixedlarge", progress=progress)
        report = _steps_report(pipe, ev, n, seed, ddpm, ddim, batch_size, out, progress,
                               timing_images, "report.json",
                               extra={"quality": quality, "nll": nll})
    click.echo(_summary(f"{model}: ddpm {T} steps, N = {n}", quality))
    click.echo(_summary("baselines", quality["baselines"]))
    if nll:
        click.echo(_nll_text(nll))
    click.echo(report["markdown"])
    click.echo(f"report: {out / 'report.json'}, {out / 'steps.md'}, {out / 'steps.png'}")


if __name__ == "__main__":
    sys.exit(main())
