"""Edits measured on held-out digits: inpainting (RePaint) and image-to-image (SDEdit).

The inputs are X, N digits of the FD pool (the classifier never saw them; the default
DDPM run trains on all 1,797 digits, these included), fixed for the whole run; every FD
is against reference halves Y_k of the rest of the pool (``Evaluator(fixed_inputs=True)``),
so no edited image is scored against its own original. Each edit runs through
``Pipeline.edit_float`` on the inputs as uint8 pixels, as a user's images arrive.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import click
import numpy as np

from .metrics import quantise
from .reports import new_figure, save_figure

MASKS = ("lower-half", "random-40")
RANDOM_UNKNOWN = 0.4     # share of pixels the random mask leaves to be filled
WITHIN_SE = 1.0          # "stopped improving": nothing later better by this many standard errors
WITHIN_FD = 1.1          # ... or by this factor in FD


def held_out_inputs(ev) -> tuple[np.ndarray, np.ndarray]:
    """The fixed inputs X (float32 [N, 1, 8, 8] in [-1, 1]) and their labels."""
    x = ev.splits[0][0]
    return ev.pool[x], ev.pool_labels[x]


def make_mask(kind: str, n: int, shape, seed: int) -> np.ndarray:
    """bool [N, H, W, C]: True where the image is kept (the runtime's convention)."""
    c, h, w = shape
    keep = np.ones((n, h, w, c), bool)
    if kind == "lower-half":
        keep[:, h // 2:] = False
    elif kind == "random-40":
        unknown = round(RANDOM_UNKNOWN * h * w)
        rng = np.random.default_rng([seed, 40])
        for k in range(n):  # exactly `unknown` pixels per image, every channel alike
            keep[k].reshape(h * w, c)[rng.permutation(h * w)[:unknown]] = False
    else:
        raise ValueError(f"unknown mask {kind!r}; expected one of {MASKS}")
    return keep


def noise_filled(images: np.ndarray, keep_nhwc: np.ndarray, data_range, seed: int) -> np.ndarray:
    """The masked input with its unknown pixels uniform noise over the data range."""
    lo, hi = data_range
    noise = np.random.default_rng([seed, 7]).uniform(lo, hi, images.shape).astype(np.float32)
    return np.where(keep_nhwc.transpose(0, 3, 1, 2), images, noise)


def rmse_255(a: np.ndarray, b: np.ndarray, data_range, where: np.ndarray | None = None) -> float:
    """Root mean squared difference on the [0, 255] scale (over ``where`` if given)."""
    lo, hi = data_range
    d2 = ((np.asarray(a, np.float64) - b) * (255.0 / (hi - lo))) ** 2
    return float(math.sqrt(d2[where].mean() if where is not None else d2.mean()))


def scores(ev, images: np.ndarray, labels: np.ndarray, original: np.ndarray | None = None,
           unknown: np.ndarray | None = None) -> dict:
    """The classifier's view (share keeping the original label with its standard error, mean
    probability of that label, mean top probability), FD against the references, digit-IS,
    and the RMSE to ``original`` (over the ``unknown`` pixels if given). Images are quantised
    to the data's levels first, as real digits are."""
    q = quantise(images, ev.data_range, ev.num_levels)
    probs = ev.classifier.probs(q)
    kept = probs.argmax(axis=1) == labels
    share = float(kept.mean())
    out = {"label_share": share, "label_share_se": math.sqrt(share * (1 - share) / len(q)),
           "label_prob": float(probs[np.arange(len(q)), labels].mean()),
           "confidence": float(probs.max(axis=1).mean()),
           "digit_is": ev.digit_stats(q)["digit_is"]}
    out["fd"], out["fd_refs_std"] = ev.fd(q)
    if original is not None:
        out["rmse_255"] = rmse_255(q, original, ev.data_range, unknown)
    return out


def _timed_edit(pipe, kind, pixels, seed, batch_size, progress, **kwargs):
    start = time.perf_counter()
    images = pipe.edit_float(kind, pixels, seed, batch_size=batch_size, progress=progress,
                             **kwargs)
    return images, time.perf_counter() - start


def _uint8(pipe, images):
    from runtime.images import to_uint8

    return to_uint8(images, pipe.record.data_range)


def inpaint_sweep(pipe, ev, *, masks, resamples, jump_length: int, steps: int, sampler: str,
                  seed: int, batch_size: int, progress: bool = True,
                  examples: Path | None = None) -> dict:
    """Per mask: the baselines (real digits, noise-filled input) and RePaint at each number
    of resamples, with its network calls per image and wall time."""
    from runtime.edits import forward_steps, repaint_plan
    from runtime.images import save_grid
    from runtime.options import SampleOptions

    inputs, labels = held_out_inputs(ev)
    pixels = _uint8(pipe, inputs)
    n, shape = len(inputs), pipe.image_shape
    options = SampleOptions.make(sampler, steps)
    for r in resamples:  # refuse what the runtime would refuse before anything runs
        pipe.make_edit("inpaint", pixels[:1], mask=make_mask(masks[0], 1, shape, seed),
                       options={"jump_length": jump_length, "resamples": r}).check(options)
    result = {"n": n, "steps": steps, "jump_length": jump_length, "sampler": sampler,
              "seed": seed, "real": scores(ev, inputs, labels), "masks": {}}
    for kind in masks:
        keep = make_mask(kind, n, shape, seed)
        unknown = ~keep.transpose(0, 3, 1, 2)
        filled = noise_filled(inputs, keep, ev.data_range, seed)
        rows = []
        grid = [pixels, _uint8(pipe, filled)]
        for r in resamples:
            calls = len(forward_steps(repaint_plan(steps, jump_length, r)))
            images, seconds = _timed_edit(pipe, "inpaint", pixels, seed, batch_size, progress,
                                          mask=keep, sampler=sampler, steps=steps,
                                          jump_length=jump_length, resamples=r)
            row = {"resamples": r, "calls_per_image": calls, "seconds": seconds,
                   "images_per_s": n / seconds,
                   **scores(ev, images, labels, inputs, unknown)}
            rows.append(row)
            grid.append(_uint8(pipe, images))
            click.echo(f"  {kind} resamples {r}: {calls} calls/image, label share "
                       f"{row['label_share']:.3f}, FD {row['fd']:.3f}, {seconds:.0f} s", err=True)
        result["masks"][kind] = {
            "unknown_share": float(unknown.mean()),
            "noise_filled": scores(ev, filled, labels, inputs, unknown),
            "rows": rows, "plateau": plateau(rows)}
        if examples is not None:  # rows: input, noise-filled, then each resample count
            save_grid(np.concatenate([g[:12] for g in grid]),
                      examples / f"inpaint-examples-{kind}.png", ncol=12)
    return result


def plateau(rows: list[dict]) -> dict:
    """Where it stops improving: the fewest resamples that no larger count beats by more
    than WITHIN_SE of its label share's standard errors, nor by more than a factor WITHIN_FD
    in FD. The sweep's largest count always qualifies (nothing beats it), so a sweep that
    never settles says so with ``at_largest``."""
    rows = sorted(rows, key=lambda r: r["calls_per_image"])

    def settled(k):
        r = rows[k]
        return all(later["label_share"] <= r["label_share"] + WITHIN_SE * r["label_share_se"]
                   and later["fd"] * WITHIN_FD >= r["fd"] for later in rows[k + 1:])

    first = rows[next(k for k in range(len(rows)) if settled(k))]
    return {"resamples": first["resamples"], "calls_per_image": first["calls_per_image"],
            "at_largest": first is rows[-1],
            "rule": f"fewest resamples that no larger count beats by more than {WITHIN_SE:g} "
                    f"standard error in label share or by a factor {WITHIN_FD:g} in FD"}


def img2img_sweep(pipe, ev, *, strengths, steps: int, sampler: str, seed: int,
                  batch_size: int, progress: bool = True, examples: Path | None = None) -> dict:
    """SDEdit at each strength: how far the images move and whether they stay the digit."""
    from runtime.edits import Img2Img
    from runtime.images import save_grid
    from runtime.options import SampleOptions

    inputs, labels = held_out_inputs(ev)
    pixels = _uint8(pipe, inputs)
    schedule = SampleOptions.make(sampler, steps).respace(pipe.schedule)
    rows, grid = [], [pixels]
    for s in strengths:
        calls = Img2Img(inputs[:1], strength=s).calls(schedule, pipe.record)
        images, seconds = _timed_edit(pipe, "img2img", pixels, seed, batch_size, progress,
                                      strength=s, sampler=sampler, steps=steps)
        row = {"strength": s, "calls_per_image": calls, "seconds": seconds,
               **scores(ev, images, labels, inputs)}
        rows.append(row)
        grid.append(_uint8(pipe, images))
        click.echo(f"  strength {s:g}: {calls} calls/image, RMSE {row['rmse_255']:.1f}, label "
                   f"share {row['label_share']:.3f}, confidence {row['confidence']:.3f}",
                   err=True)
    if examples is not None:  # rows: the input, then each strength
        save_grid(np.concatenate([g[:12] for g in grid]), examples / "img2img-examples.png",
                  ncol=12)
    # Where "moved all the way" lies: each input against an unrelated real digit.
    unrelated = rmse_255(inputs, ev.pool[ev.splits[0][1]], ev.data_range)
    return {"n": len(inputs), "steps": steps, "sampler": sampler, "seed": seed,
            "real": scores(ev, inputs, labels), "rows": rows, "unrelated_rmse_255": unrelated}


# === Reports ===

def _pct(d: dict) -> str:
    return f"{100 * d['label_share']:.1f} ± {100 * d['label_share_se']:.1f}"


def inpaint_markdown(r: dict, baselines: dict) -> str:
    real = r["real"]
    lines = [f"RePaint, {r['sampler']} {r['steps']} steps, jump length {r['jump_length']}; "
             f"N = {r['n']} held-out digits, seed {r['seed']}.", ""]
    head = ["mask", "input", "resamples", "network calls / image", "original label kept %",
            "p(label)", "FD", "RMSE of the filled pixels (0-255)", "s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append(f"| none | real digits | - | - | {_pct(real)} | {real['label_prob']:.3f} | "
                 f"{real['fd']:.3f} | - | - |")
    for kind, m in r["masks"].items():
        nf = m["noise_filled"]
        lines.append(f"| {kind} | noise-filled | - | - | {_pct(nf)} | {nf['label_prob']:.3f} | "
                     f"{nf['fd']:.3f} | {nf['rmse_255']:.1f} | - |")
        for row in m["rows"]:
            lines.append(f"| {kind} | inpainted | {row['resamples']} | {row['calls_per_image']} "
                         f"| {_pct(row)} | {row['label_prob']:.3f} | {row['fd']:.3f} | "
                         f"{row['rmse_255']:.1f} | {row['seconds']:.0f} |")
    lines.append("")
    for kind, m in r["masks"].items():
        p = m["plateau"]
        where = (f"not settled within the sweep: a larger count beats each smaller one, up to "
                 f"the largest swept, {p['resamples']} resamples ({p['calls_per_image']} network "
                 "calls per image)" if p["at_largest"] else
                 f"stops improving at {p['resamples']} resample(s), {p['calls_per_image']} "
                 "network calls per image")
        lines.append(f"{kind} ({100 * m['unknown_share']:.0f}% of the pixels filled): {where} "
                     f"({p['rule']}).")
    lines.append(_fd_note(baselines))
    return "\n".join(lines) + "\n"


def img2img_markdown(r: dict, baselines: dict) -> str:
    real = r["real"]
    lines = [f"SDEdit, {r['sampler']} {r['steps']} steps; N = {r['n']} held-out digits, "
             f"seed {r['seed']}.", ""]
    head = ["strength", "network calls / image", "RMSE to the input (0-255)",
            "original label kept %", "p(label)", "confidence (top p)", "FD", "s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append(f"| 0 (the input) | 0 | 0.0 | {_pct(real)} | {real['label_prob']:.3f} | "
                 f"{real['confidence']:.3f} | {real['fd']:.3f} | - |")
    for row in r["rows"]:
        lines.append(f"| {row['strength']:g} | {row['calls_per_image']} | {row['rmse_255']:.1f} | "
                     f"{_pct(row)} | {row['label_prob']:.3f} | {row['confidence']:.3f} | "
                     f"{row['fd']:.3f} | {row['seconds']:.0f} |")
    lines += ["", f"RMSE of each input to an unrelated real digit (the first reference set, "
              f"paired in order): {r['unrelated_rmse_255']:.1f}. " + _fd_note(baselines)]
    return "\n".join(lines) + "\n"


def _fd_note(b: dict) -> str:
    return (f"FD: digits-classifier features against {b['refs']} reference sets of N drawn from "
            f"the pool without the inputs; the real inputs themselves score "
            f"{b['real_vs_real']:.3f} ± {b['real_vs_real_std']:.3f} (the floor), a Gaussian "
            f"fitted to them {b['gaussian']:.3f}. Label share ± its standard error; the "
            f"classifier is {100 * b['classifier']['accuracy_on_pool']:.1f}% accurate on the "
            "whole pool.")


def plot_inpaint(r: dict, path: Path) -> Path:
    """Label share (± its standard error) and FD against network calls per image, one line
    per mask, with the real digits and each mask's noise-filled input as horizontal lines."""
    fig, axes = new_figure(2, "inpaint")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    colours = dict(zip(r["masks"], ("C0", "C1", "C2", "C3"), strict=False))
    for ax, key, title in ((axes[0], "label_share", "original label kept"),
                           (axes[1], "fd", "FD vs real digits")):
        ax.axhline(r["real"][key], color="0.3", linestyle="--", linewidth=1,
                   label="real digits")
        for kind, m in r["masks"].items():
            rows = m["rows"]
            spread = [x["label_share_se"] for x in rows] if key == "label_share" else None
            ax.errorbar([x["calls_per_image"] for x in rows], [x[key] for x in rows],
                        yerr=spread, marker="o", capsize=3, color=colours[kind],
                        label=f"{kind}: RePaint")
            for x in rows:
                ax.annotate(f"r={x['resamples']}", (x["calls_per_image"], x[key]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
            ax.axhline(m["noise_filled"][key], color=colours[kind], linestyle=":",
                       linewidth=1, label=f"{kind}: noise-filled input")
        ax.set(xscale="log", title=title, xlabel="network calls per image")
        ax.set_xticks(sorted({x["calls_per_image"] for m in r["masks"].values()
                              for x in m["rows"]}))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylim(0, 1.02)
    axes[1].set_yscale("log")  # the noise-filled inputs' FD is 10-20x the rest
    return save_figure(fig, path)


def plot_img2img(r: dict, path: Path) -> Path:
    """RMSE to the input, and the classifier's view, against strength."""
    fig, axes = new_figure(2, "img2img")
    s = [0.0] + [x["strength"] for x in r["rows"]]
    real = r["real"]
    axes[0].plot(s, [0.0] + [x["rmse_255"] for x in r["rows"]], marker="o")
    axes[0].axhline(r["unrelated_rmse_255"], color="0.5", linestyle=":", linewidth=1,
                    label="an unrelated real digit")
    axes[0].legend(fontsize=7)
    axes[0].set(title="how far the images move", xlabel="strength",
                ylabel="RMSE to the input (0-255)")
    for key, label in (("label_share", "share keeping the original label"),
                       ("label_prob", "mean p(original label)"),
                       ("confidence", "mean top probability (any digit)")):
        axes[1].plot(s, [real[key]] + [x[key] for x in r["rows"]], marker="o", label=label)
    axes[1].axhline(0.1, color="0.5", linestyle=":", linewidth=1, label="chance (1/10)")
    axes[1].set(title="whether they stay the digit (classifier)", xlabel="strength",
                ylim=(0, 1.02))
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7)
    return save_figure(fig, path)
