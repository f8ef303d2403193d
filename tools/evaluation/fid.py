"""The evaluator: FD of digits (classifier features) or FID (local Inception weights),
with the floor and the Gaussian baseline on the same reference halves."""

from __future__ import annotations

import warnings
from pathlib import Path

import click
import numpy as np

from .digits import DIGITS_LEVELS, DIGITS_SHAPE, FD_SET_SIZE, load_classifier, load_digits_data
from .metrics import (
    class_shares,
    digit_inception_score,
    fitted_gaussian_samples,
    frechet_distance,
    gaussian_stats,
    half_splits,
    held_out_splits,
    quantise,
)

DEFAULT_REFS = 50        # random half-splits of the pool each FD is averaged over


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
    ``fixed_inputs``: one X for every split (:func:`held_out_splits`), for measuring edits
    of the images X against references disjoint from them.
    """

    def __init__(self, shape, data_range, num_levels, n: int, *, real_npz: Path | None = None,
                 inception_weights: Path | None = None, refs: int = DEFAULT_REFS,
                 fixed_inputs: bool = False):
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
        self.splits = (held_out_splits if fixed_inputs else half_splits)(len(self.pool), n,
                                                                          refs)
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
