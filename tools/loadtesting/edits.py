"""Edit requests mixed with sampling requests under the server's batching.

One list of requests, half sampling and half editing (img2img, inpaint) by count, is
served at saturation by closed-loop clients four ways, each by a fresh server:

    mixed, batching      what ``serve`` does: edit rows share network calls with sampling
    mixed, --no-batching each request alone (its own images share its calls)
    sampling only, batching   } the two halves served apart, one after the other:
    edits only, batching      } what mixing the two kinds in one batch saves over that

Network calls are the server's own count (``ddpm_ticks_total``). Served alone, a request
costs its network calls per image (its images fit one call); the tool computes that sum
from the runtime's own ``Edit.calls`` and reports it beside the count.
"""

from __future__ import annotations

import base64
import random

import numpy as np

from .phases import saturate
from .server import ServerProcess, load_test_args
from .workload import RequestClass, draw_list

MIX = (RequestClass("sample-ddim", 0.25, "ddim", 20, (1, 4)),
       RequestClass("sample-ddpm", 0.25, "ddpm", 100, (4, 4)),
       RequestClass("img2img", 0.25, "ddpm", 100, (4, 4), path="/v1/edits/img2img"),
       RequestClass("inpaint", 0.25, "ddpm", 100, (2, 2), path="/v1/edits/inpaint"))
EDIT_OPTIONS = {"img2img": {"strength": 0.5}, "inpaint": {"jump_length": 10, "resamples": 2}}
CONFIGS = (("mixed", "batching", None), ("mixed", "serial", None),
           ("sampling only", "batching", "/v1/samples"), ("edits only", "batching", "/v1/edits"))


def source_images(shape, count: int, seed: int) -> np.ndarray:
    """uint8 [count, H, W, C]: held-out digits (the FD pool) for a digits model, else
    uniform noise images (the server's cost does not depend on what the pixels show)."""
    from tools.evaluation.digits import DIGITS_SHAPE, load_digits_data

    rng = np.random.default_rng(seed)
    c, h, w = shape
    if tuple(shape) == DIGITS_SHAPE:
        data = load_digits_data()
        pick = data.images[rng.choice(data.pool, count, replace=False)]
        from runtime.images import to_uint8

        return to_uint8(pick)
    return rng.integers(0, 256, (count, h, w, c), dtype=np.uint8)


def _png(image: np.ndarray) -> str:
    from runtime.images import png_bytes

    return base64.b64encode(png_bytes(image)).decode()


def mixed_requests(count: int, shape, seed: int, scale: float = 1.0) -> list:
    """``count`` requests of MIX in its proportions, shuffled; every edit carries its
    images (distinct held-out digits) and inpaint the lower-half mask (255 = keep)."""
    rng = random.Random(seed)
    requests = draw_list(rng, count, scale, MIX)
    pool = source_images(shape, 64, seed)
    c, h, w = shape
    mask = np.full((h, w, 1), 255, np.uint8)
    mask[h // 2:] = 0
    for cls, body in requests:
        if cls.name in EDIT_OPTIONS:
            body["image"] = [_png(pool[rng.randrange(len(pool))]) for _ in range(body["n"])]
            body.update(EDIT_OPTIONS[cls.name])
            if cls.name == "inpaint":
                body["mask"] = _png(mask)
    return requests


def calls_alone(pipe, requests) -> int:
    """Network calls the requests take served one at a time (each request's images in
    one call): its steps for sampling, ``Edit.calls`` for an edit."""
    from runtime.options import SampleOptions

    total = 0
    for cls, body in requests:
        schedule = SampleOptions.make(body["sampler"], body["steps"]).respace(pipe.schedule)
        if cls.name in EDIT_OPTIONS:
            image = np.zeros((1, *pipe.image_shape[1:], pipe.image_shape[0]), np.uint8)
            mask = np.zeros(pipe.image_shape[1:], np.uint8) if cls.name == "inpaint" else None
            edit = pipe.make_edit(cls.name, image, mask=mask, options=EDIT_OPTIONS[cls.name])
            total += edit.calls(schedule, pipe.record)
        else:
            total += schedule.num_timesteps
    return total


def run(model, *, count: int, clients: int, max_batch: int, threads: int | None, seed: int,
        scale: float, echo=print) -> dict:
    import runtime

    with runtime.load(model, threads=threads) as pipe:
        shape = pipe.image_shape
        requests = mixed_requests(count, shape, seed, scale)
        alone = {prefix: calls_alone(pipe, [r for r in requests
                                            if prefix is None or r[0].path.startswith(prefix)])
                 for _, _, prefix in CONFIGS}
    rows = []
    for name, mode, prefix in CONFIGS:
        subset = [r for r in requests if prefix is None or r[0].path.startswith(prefix)]
        server = ServerProcess(model, *load_test_args(max_batch, threads),
                               *([] if mode == "batching" else ["--no-batching"]))
        try:
            sat = saturate(server, clients, subset, seed)
        finally:
            sat_exit = server.stop()
        row = {"kind": name, "mode": mode, "count": len(subset),
               "images": sum(body["n"] for _, body in subset), "exit_code": sat_exit,
               "calls_if_alone": alone[prefix], **sat}
        rows.append(row)
        echo(f"{name}, {mode}: {row['images_per_s']:.1f} images/s, {row['network_calls']} "
             f"network calls ({row['calls_if_alone']} served alone), {row['seconds']:.1f} s, "
             f"errors {row['errors']}")
    by = {(r["kind"], r["mode"]): r for r in rows}
    mixed, serial = by["mixed", "batching"], by["mixed", "serial"]
    apart = [by["sampling only", "batching"], by["edits only", "batching"]]
    apart_calls = sum(r["network_calls"] for r in apart)
    apart_seconds = sum(r["seconds"] for r in apart)
    return {
        "rows": rows,
        "speedup_vs_serial": mixed["images_per_s"] / serial["images_per_s"],
        "calls_saved_vs_serial": 1 - mixed["network_calls"] / serial["network_calls"],
        "calls_saved_vs_apart": 1 - mixed["network_calls"] / apart_calls,
        "apart_seconds": apart_seconds,
        "errors": sum(r["errors"] for r in rows),
    }


def markdown(report: dict) -> str:
    m = report["meta"]
    by_kind = {(r["kind"], r["mode"]): r for r in report["rows"]}
    lines = [f"Edits mixed with sampling: {m['model']}, {m['cpu']} ({m['cores']} cores, "
             f"shared), ORT threads {m['threads']}, max batch {m['max_batch']}, {m['clients']} "
             f"closed-loop clients, {m['count']} requests (seed {m['seed']}, steps scale "
             f"{m['steps_scale']}).", "",
             "| requests | server | count | images | images/s | network calls | served alone "
             "| rows per call | batch fill | s | errors |", "|---|---|---|---|---|---|---|---|---|"
             "---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['kind']} | {r['mode']} | {r['count']} | {r['images']} | "
                     f"{r['images_per_s']:.1f} | {r['network_calls']} | {r['calls_if_alone']} | "
                     f"{r['rows'] / max(r['network_calls'], 1):.1f} | {r['batch_fill']:.2f} | "
                     f"{r['seconds']:.1f} | {r['errors']} |")
    lines += ["", f"Mixed, batching against each request alone (--no-batching): "
              f"{report['speedup_vs_serial']:.2f}x the images/s, "
              f"{100 * report['calls_saved_vs_serial']:.0f}% fewer network calls. Against the "
              f"sampling and the edit requests served apart, one after the other (both "
              f"batching): {100 * report['calls_saved_vs_apart']:.0f}% fewer network calls, "
              f"{by_kind['mixed', 'batching']['seconds']:.1f} s against "
              f"{report['apart_seconds']:.1f} s. 'served alone': the network calls the "
              "requests take one at a time, from the runtime's own count per request "
              "(sampling: its steps; img2img: the steps below strength x T; inpaint: RePaint's "
              "reverse steps). Mix: " + "; ".join(
                  f"{c.name} {c.sampler} {c.steps} steps n {c.n[0]}-{c.n[1]}"
                  + (f" {EDIT_OPTIONS[c.name]}" if c.name in EDIT_OPTIONS else "")
                  for c in MIX) + "."]
    return "\n".join(lines) + "\n"
