"""scikit-learn's digits, split once, and the MLP whose hidden features the FD uses
(trained here, deterministic, cached as .npz under $XDG_CACHE_HOME/ddpm-deploy)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from .metrics import SPLIT_SEED

DIGITS_SHAPE = (1, 8, 8)
DIGITS_LEVELS = 17
FD_SET_SIZE = 500        # at most N images in each of the two disjoint real halves

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
        from runtime.util.fileio import write_bytes

        return write_bytes(path, buffer.getvalue())

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
