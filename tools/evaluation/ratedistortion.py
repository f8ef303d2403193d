"""The paper's progressive lossy compression (Ho et al. 2020, sec. 4.3, fig. 5).

A sender who has x_0 transmits x_T, then x_{T-1}, ..., x_1 (each coded with the model's
p(x_{t-1} | x_t)), then x_0. After x_t has arrived the receiver's best guess is the x_0
the network predicts from it. Over t:

    rate(t)       = L_T + sum_{s=t}^{T-1} L_s   bits/dim received so far: the prior term,
                                                then the KL term that codes each x_s
    rate(0)       = the whole bound (+ L_0, the decoder: x_0 itself, lossless)
    distortion(t) = RMSE of x_0 predicted from x_t ~ q(x_t | x_0), on the [0, 255] scale

The terms and the predictions come from one pass of ``runtime.likelihood.bits_per_dim``
(each step's x_t drawn afresh, as the bound's terms are expectations); x_0 is predicted
as the samplers do, clipped to the data range.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .reports import new_figure, save_figure

TABLE_T = (1000, 900, 750, 500, 250, 100, 50, 20, 10, 5, 2, 1, 0)


def curve(terms: dict, data_range) -> dict:
    """Rate and distortion over t = T .. 0 (the paper's t: state x_t after T - t reverse
    steps) from ``bits_per_dim``'s per-image terms on the full chain."""
    vb = np.asarray(terms["vb_bpd"], np.float64).mean(axis=0)  # [T]: column i codes x_i
    prior = float(np.mean(terms["prior_bpd"]))
    mse = np.asarray(terms["x0_mse"], np.float64).mean(axis=0)  # [T]: column i from x_{i+1}
    T = len(vb)
    lo, hi = data_range
    # Column i (network t = i) holds x_{i+1}'s prediction and the term that codes x_i from
    # x_{i+1} (i = 0: the decoder, x_0). Having x_t costs L_T plus the terms of columns >= t.
    sent = np.concatenate([np.cumsum(vb[::-1])[::-1], [0.0]])  # sent[t] = sum of columns >= t
    t = np.arange(T, -1, -1)
    rate = prior + sent[t]
    distortion = np.append(np.sqrt(mse[::-1]) * (255.0 / (hi - lo)), 0.0)
    return {"t": t.tolist(), "rate_bpd": rate.tolist(), "distortion_rmse": distortion.tolist(),
            "total_bpd": prior + float(vb.sum()), "prior_bpd": prior,
            "decoder_bpd": float(vb[0]), "T": T}


def summarize(c: dict, num_levels: int) -> dict:
    """Where the bits go. The data's levels are 255 / (levels - 1) apart on the [0, 255]
    scale (16 on the 17-level digits): an RMSE under half of that is the digits' analogue of
    the paper's imperceptible distortion, and the bits spent after it are counted."""
    t = np.asarray(c["t"])
    rate, dist = np.asarray(c["rate_bpd"]), np.asarray(c["distortion_rmse"])
    total = c["total_bpd"]
    half_level = 0.5 * 255.0 / (num_levels - 1)
    out = {"half_level_rmse": half_level,
           # The paper's split: L_1 + ... + L_T as rate, L_0 as distortion (bits/dim).
           "rate_without_decoder_bpd": total - c["decoder_bpd"],
           "rmse_at_t1": float(dist[t == 1][0])}
    below = np.flatnonzero(dist <= half_level)
    first = below[0] if len(below) else len(t) - 1  # the largest t already under it
    out["half_level_t"] = int(t[first])
    out["half_level_rate_bpd"] = float(rate[first])
    out["share_after_half_level"] = float((total - rate[first]) / total)
    return out


def markdown(r: dict) -> str:
    c = r["curve"]
    t, rate, dist = (np.asarray(c[k]) for k in ("t", "rate_bpd", "distortion_rmse"))
    lines = [f"Rate-distortion over t on {r['n_images']} held-out digits ({r['images']}), "
             f"T = {c['T']}, variance {r['variance']}, seed {r['seed']}.", "",
             "| t | reverse steps T - t | rate (bits/dim) | share of the bound | distortion "
             "(RMSE, 0-255) |", "|---|---|---|---|---|"]
    for want in TABLE_T:
        if want > c["T"]:
            continue
        k = int(np.flatnonzero(t == want)[0])
        lines.append(f"| {want} | {c['T'] - want} | {_bits(rate[k])} | "
                     f"{100 * rate[k] / c['total_bpd']:.1f}% | {dist[k]:.2f} |")
    lines += ["", caption(r)]
    return "\n".join(lines) + "\n"


def caption(r: dict) -> str:
    c, s = r["curve"], r["summary"]
    return (f"The whole bound is {_bits(c['total_bpd'])} bits/dim (prior "
            f"{_bits(c['prior_bpd'])}, decoder L_0 {_bits(c['decoder_bpd'])}); the paper's split "
            f"is rate L_1..L_T = {_bits(s['rate_without_decoder_bpd'])} bits/dim and distortion "
            f"L_0 = {_bits(c['decoder_bpd'])} bits/dim, RMSE {s['rmse_at_t1']:.2f} at t = 1 (the "
            f"paper's CIFAR-10 model: 1.78 and 1.97 bits/dim, RMSE 0.95). The distortion "
            f"falls below half a level ({s['half_level_rmse']:.1f} on 0-255) at t = "
            f"{s['half_level_t']}, after {s['half_level_rate_bpd']:.3f} bits/dim: "
            f"{100 * s['share_after_half_level']:.0f}% of the bound is spent after that, on "
            "errors smaller than half the step between the data's levels. The paper (fig. 5): "
            "the distortion falls steeply in the low-rate region, so most of the bits go to "
            "imperceptible distortions.")


def _bits(v: float) -> str:
    """Three decimals, or two significant digits for the tiny terms (prior, decoder)."""
    return f"{v:.3f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def plot(r: dict, path: Path) -> Path:
    """The paper's fig. 5: distortion and rate against reverse steps, distortion against
    rate."""
    c = r["curve"]
    T = c["T"]
    steps = T - np.asarray(c["t"])
    rate, dist = np.asarray(c["rate_bpd"]), np.asarray(c["distortion_rmse"])
    fig, axes = new_figure(3, "ratedistortion", width=4.2, height=3.6)
    axes[0].plot(steps, dist)
    axes[0].set(xlabel="reverse process steps (T - t)", ylabel="distortion (RMSE, 0-255)",
                title="distortion")
    axes[1].plot(steps, rate)
    axes[1].set(xlabel="reverse process steps (T - t)", ylabel="rate (bits/dim)",
                title="rate")
    axes[2].plot(rate, dist)
    axes[2].axhline(r["summary"]["half_level_rmse"], color="0.5", linestyle=":", linewidth=1,
                    label="half a level")
    axes[2].set(xlabel="rate (bits/dim)", ylabel="distortion (RMSE, 0-255)",
                title="rate-distortion")
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.suptitle(_wrap(caption(r), 150), fontsize=7)
    return save_figure(fig, path)


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def run_ratedistortion(pipe, ev, n_images: int, *, seed: int, batch_size: int, variance: str,
                       progress: bool = True) -> dict:
    """Rate and distortion over t on ``n_images`` digits of the FD pool (the classifier's
    held-out digits; the default DDPM run trains on all 1,797)."""
    from .nll import bound_terms

    data = ev.data
    x0 = data.images[data.pool[:n_images]]
    terms = bound_terms(pipe, x0, seed=seed, batch_size=batch_size, variance=variance,
                        progress=progress, desc="rate-distortion")
    c = curve(terms, pipe.record.data_range)
    return {"n_images": n_images, "images": f"digits FD pool[:{n_images}]", "seed": seed,
            "variance": variance, "curve": c, "summary": summarize(c, pipe.record.num_levels),
            "data_range": list(pipe.record.data_range)}

