"""Bits/dim by the variational bound, through the runtime."""

from __future__ import annotations

import math
import time

import click
import numpy as np

from .fid import Evaluator


def run_nll(pipe, evaluator_or_images, n_images: int, *, seed: int, batch_size: int,
            variance: str, progress: bool = True) -> dict:
    """Bits/dim by the variational bound over ``n_images`` held-out images."""
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
    start = time.perf_counter()
    terms = bound_terms(pipe, x0, seed=seed, batch_size=batch_size, variance=variance,
                        progress=progress)
    T = pipe.schedule.num_timesteps
    out = {"n_images": int(len(x0)), "images": source, "variance": variance, "seed": seed,
           "num_levels": rec.num_levels, "data_range": list(rec.data_range), "T": T,
           "seconds": time.perf_counter() - start,
           "uniform_bpd": math.log2(rec.num_levels)}
    for key in ("total_bpd", "prior_bpd", "kl_bpd", "decoder_bpd"):
        v = terms[key]
        out[key] = float(v.mean())
        out[key.replace("_bpd", "_stderr")] = float(v.std(ddof=1) / math.sqrt(len(v))) \
            if len(v) > 1 else None
    # Where the bits go: the KL terms summed over ranges of the original t.
    vb = terms["vb_bpd"].mean(axis=0)
    t = pipe.schedule.timesteps
    edges = [1, 10, 100, T]
    out["kl_bpd_by_t"] = {f"{a}..{b - 1}": float(vb[(t >= a) & (t < b)].sum())
                          for a, b in zip(edges[:-1], edges[1:], strict=True) if a < b}
    return out


def bound_terms(pipe, x0: np.ndarray, *, seed: int, batch_size: int, variance: str,
                progress: bool = True, desc: str = "bits/dim") -> dict[str, np.ndarray]:
    """:func:`runtime.likelihood.bits_per_dim` over ``x0`` in batches, per image arrays
    joined (one noise stream from ``seed`` across the batches)."""
    from runtime.likelihood import bits_per_dim

    rec = pipe.record
    rng = np.random.default_rng(seed)
    T = pipe.schedule.num_timesteps
    parts = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=T * math.ceil(len(x0) / batch_size), desc=desc, unit="step",
                   leave=False)
    try:
        for s in range(0, len(x0), batch_size):
            parts.append(bits_per_dim(pipe.predict_eps, pipe.schedule, x0[s:s + batch_size], rng,
                                      data_range=rec.data_range, num_levels=rec.num_levels,
                                      variance=variance,
                                      callback=(lambda *_: bar.update(1)) if bar else None))
    finally:
        if bar:
            bar.close()
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def nll_text(r: dict) -> str:
    def num(v):
        return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"

    def pm(key):
        err = r.get(key.replace("_bpd", "_stderr"))
        return num(r[key]) + (f" +- {num(err)}" if err is not None else "")

    return (f"bits/dim over {r['n_images']} images ({r['images']}, {r['num_levels']} levels): "
            f"{pm('total_bpd')}  [prior {pm('prior_bpd')}, KL t>1 {pm('kl_bpd')}, decoder "
            f"{pm('decoder_bpd')}]; uniform over the levels: {r['uniform_bpd']:.3f}; KL by t: "
            + ", ".join(f"{k}: {v:.3f}" for k, v in r["kl_bpd_by_t"].items()))

