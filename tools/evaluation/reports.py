"""Reports: markdown table, PNG plot, JSON, the environment."""

from __future__ import annotations

import io
import json
import math
import platform
import sys
from pathlib import Path

import numpy as np

from runtime.cpus import cpu_count


def steps_markdown(table: dict, baselines: dict, n: int) -> str:
    rows, T = table["rows"], table["full_steps"]
    has_fd = "fd" in rows[0]
    seeds = table.get("seeds", [0])
    head = ["sampler", "NFE"] + ([f"FD (± over {len(seeds)} seeds)", f"FD / FD({T})",
                                  "digit-IS"] if has_fd else []) + ["images/s", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["sampler"].upper(), str(r["steps"])]
        if has_fd:
            cells += [f"{r['fd']:.2f} ± {r['fd_std']:.2f}", f"{r['fd_ratio']:.2f}",
                      f"{r['digit_is']:.2f}" if "digit_is" in r else "-"]
        cells += [f"{r['images_per_s']:.3g}", f"{r['speedup']:.1f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"N = {n} per seed, seeds {', '.join(map(str, seeds))}; timesteps spaced "
                 f"{table.get('spacing', 'linspace')}.")
    if has_fd and "real_vs_real" in baselines:
        lines.append(f"Each FD is the mean over the seeds of the mean over {baselines['refs']} "
                     "random reference halves of the real pool. Baselines at the same N: real "
                     f"vs real (floor) {baselines['real_vs_real']:.2f} ± "
                     f"{baselines['real_vs_real_std']:.2f}, Gaussian fitted to the pixels "
                     f"{baselines['gaussian']:.2f} ± {baselines['gaussian_std']:.2f}.")
    lines.append(f"images/s: {table['timing']}, on {cpu_count()} CPU cores (ONNX Runtime).")
    rec = table.get("recommended")
    if rec:
        lines.append(f"Recommended ({table['rule']}): {rec['sampler'].upper()} with "
                     f"{rec['steps']} network calls, FD {rec['fd']:.3f} ({rec['fd_ratio']:.2f}x "
                     f"the {T}-step FD), {rec['speedup']:.1f}x faster measured "
                     f"({rec['nominal_speedup']:.0f}x fewer network calls).")
    return "\n".join(lines) + "\n"


PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
           (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def plot_steps(table: dict, baselines: dict, path: Path) -> Path:
    """Two panels against NFE (log): FD with the seeds' spread, the full chain's FD and the
    floor; and images/s. One line per sampler. Pillow only."""
    from PIL import Image, ImageDraw, ImageFont

    rows, T = table["rows"], table["full_steps"]
    full = rows[0]
    samplers = list(dict.fromkeys(r["sampler"] for r in rows[1:]))
    colors = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(samplers)}
    panels = [p for p in (("fd", "FD vs network calls") if "fd" in full else None,
                          ("images_per_s", "images/s")) if p]
    # Both panels log-scaled: FDs span from the floor to ~20x it at 5 calls.
    pw, ph, m = 560, 400, 64
    img = Image.new("RGB", (pw * len(panels), ph), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    xs = sorted({r["steps"] for r in rows[1:]} or {T})
    lx0, lx1 = math.log10(min(xs)) - 0.1, math.log10(max(xs)) + 0.1
    for k, (key, title) in enumerate(panels):
        ox = k * pw
        spread = [r.get(f"{key}_std", 0.0) for r in rows] if key == "fd" else [0.0] * len(rows)
        refs = {"real vs real (floor)": baselines.get("real_vs_real"),
                f"DDPM {T} steps": full[key] if key == "fd" else None}
        refs = {label: v for label, v in refs.items() if v}
        values = ([r[key] + s for r, s in zip(rows, spread, strict=True)]
                  + [max(r[key] - s, r[key] / 2) for r, s in zip(rows, spread, strict=True)]
                  + list(refs.values()))
        values = [math.log10(v) for v in values]
        y0, y1 = min(values) - 0.1, max(values) + 0.1

        def to_px(x, y, ox=ox, y0=y0, y1=y1):
            px = ox + m + (math.log10(x) - lx0) / (lx1 - lx0) * (pw - 2 * m)
            yy = math.log10(y)
            return px, ph - m - (yy - y0) / (y1 - y0) * (ph - 2 * m)

        draw.rectangle([ox + m, m, ox + pw - m, ph - m], outline="black")
        draw.text((ox + m, m - 35), title + " (log)", fill="black", font=font)
        draw.text((ox + pw // 2 - 60, ph - m + 22), "network calls (log)", fill="black",
                  font=font)
        for s in xs:
            px, _ = to_px(s, 10 ** y0)
            draw.line([px, ph - m, px, ph - m + 5], fill="black")
            draw.text((px - 8, ph - m + 7), str(s), fill="black", font=font)
        for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
            yy = y0 + frac * (y1 - y0)
            val = 10 ** yy
            _, py = to_px(10 ** lx0, val)
            draw.line([ox + m - 5, py, ox + m, py], fill="black")
            draw.text((ox + 4, py - 7), f"{val:.3g}", fill="black", font=font)
        if key != "fd":
            refs = {f"DDPM {T} steps": full[key]}
        for j, (label, value) in enumerate(refs.items()):
            _, py = to_px(10 ** lx0, value)
            for x in range(ox + m, ox + pw - m, 12):
                draw.line([x, py, x + 6, py], fill=(110, 110, 110))
            draw.text((ox + m + 5 + 200 * j, py - 16), label, fill=(80, 80, 80), font=font)
        for j, sampler in enumerate(samplers):
            mine = sorted((r for r in rows[1:] if r["sampler"] == sampler),
                          key=lambda r: r["steps"])
            pts = [to_px(r["steps"], r[key]) for r in mine]
            if len(pts) > 1:
                draw.line(pts, fill=colors[sampler], width=2)
            for r, (px, py) in zip(mine, pts, strict=True):
                draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colors[sampler])
                if key == "fd" and r.get("fd_std"):
                    _, lo = to_px(r["steps"], max(r["fd"] - r["fd_std"], r["fd"] / 2))
                    _, hi = to_px(r["steps"], r["fd"] + r["fd_std"])
                    draw.line([px, lo, px, hi], fill=colors[sampler], width=1)
            draw.text((ox + pw - m - 90, m + 8 + 16 * j), sampler.upper(),
                      fill=colors[sampler], font=font)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    from runtime.fileio import write_bytes

    return write_bytes(path, buffer.getvalue())


def write_json(data: dict, path: Path) -> Path:
    from runtime.fileio import write_text

    return write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def environment() -> dict:
    import onnxruntime

    return {"python": platform.python_version(), "numpy": np.__version__,
            "onnxruntime": onnxruntime.__version__, "cpu_count": cpu_count(),
            "machine": platform.machine(), "command": " ".join(sys.argv)}


def summary(title: str, d: dict) -> str:
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
