"""Sample statistics: the Fréchet distance, digit-IS, class shares, quantising,
the real pool's half splits and the fitted-Gaussian baseline."""

from __future__ import annotations

import math

import numpy as np

SPLIT_SEED = 0


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


def quantise(x: np.ndarray, data_range, num_levels: int) -> np.ndarray:
    """Round float images to the data's levels (and clip to its range), float32."""
    lo, hi = (float(v) for v in data_range)
    width = (hi - lo) / (num_levels - 1)
    q = lo + np.round((np.clip(x, lo, hi) - lo) / width) * width
    return q.astype(np.float32)


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


def held_out_splits(pool_size: int, n: int, refs: int, seed: int = SPLIT_SEED):
    """``refs`` pairs (X, Y_k) of disjoint index sets of n each, from range(pool_size), with
    one fixed X: the images an edit works on, scored against references it never saw."""
    if 2 * n > pool_size:
        raise ValueError(f"two disjoint sets of {n} need {2 * n} images, the pool has "
                         f"{pool_size}")
    perm = np.random.default_rng([seed, 0]).permutation(pool_size)
    x, rest = perm[:n], perm[n:]
    return [(x, np.random.default_rng([seed, k]).choice(rest, n, replace=False))
            for k in range(refs)]


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
