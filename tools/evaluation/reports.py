"""Reports: markdown table, PNG plot, JSON, the environment."""

from __future__ import annotations

import io
import json
import platform
import sys
from pathlib import Path

import numpy as np

from runtime.util.cpus import cpu_count


def steps_markdown(table: dict, baselines: dict, n: int) -> str:
    rows, T = table["rows"], table["full_steps"]
    has_fd = "fd" in rows[0]
    seeds = table.get("seeds", [0])
    head = ["sampler", "NFE"] + ([f"FD (± over {len(seeds)} seeds)", f"FD / FD({T})",
                                  "digit-IS"] if has_fd else []) + ["images/s", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["sampler"].upper(), str(r["steps"]), *_measured(r, has_fd)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"N = {n} per seed, seeds {', '.join(map(str, seeds))}; timesteps spaced "
                 f"{table.get('spacing', 'linspace')}.")
    lines += _notes(table, baselines, has_fd)
    rec = table.get("recommended")
    if rec:
        lines.append(f"Recommended ({table['rule']}): {rec['sampler'].upper()} with "
                     f"{rec['steps']} network calls, FD {rec['fd']:.3f} ({rec['fd_ratio']:.2f}x "
                     f"the {T}-step FD), {rec['speedup']:.1f}x faster measured "
                     f"({rec['nominal_speedup']:.0f}x fewer network calls).")
    return "\n".join(lines) + "\n"


def students_markdown(table: dict, baselines: dict, n: int) -> str:
    """Students and their teacher: one row per model, sampler, timesteps and NFE."""
    rows, T = table["rows"], table["full_steps"]
    has_fd = "fd" in rows[0]
    seeds = table["seeds"]
    head = ["model", "sampler", "timesteps", "NFE"] + (
        [f"FD (± over {len(seeds)} seeds)", f"FD / FD({T})", "digit-IS"] if has_fd else []
    ) + ["images/s", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["sampler"].upper(), r["spacing"] if r["steps"] < T else "all",
                 str(r["steps"]), *_measured(r, has_fd, is_spread=True)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"N = {n} per seed, seeds {', '.join(map(str, seeds))}.")
    lines += _notes(table, baselines, has_fd)
    lines += [f"Target at {t}" for t in table.get("targets", ())]
    return "\n".join(lines) + "\n"


def _measured(r: dict, has_fd: bool, is_spread: bool = False) -> list[str]:
    """A row's measured cells: FD ± its spread over seeds, FD ratio, digit-IS (± its
    spread with ``is_spread``), images/s and speed-up."""
    cells = []
    if has_fd:
        spread = f" ± {r['digit_is_std']:.2f}" if is_spread and "digit_is_std" in r else ""
        cells += [f"{r['fd']:.2f} ± {r['fd_std']:.2f}", f"{r['fd_ratio']:.2f}",
                  f"{r['digit_is']:.2f}{spread}" if "digit_is" in r else "-"]
    return cells + [f"{r['images_per_s']:.3g}", f"{r['speedup']:.1f}x"]


def _notes(table: dict, baselines: dict, has_fd: bool) -> list[str]:
    lines = []
    if has_fd and "real_vs_real" in baselines:
        lines.append(f"Each FD is the mean over the seeds of the mean over {baselines['refs']} "
                     "random reference halves of the real pool. Baselines at the same N: real "
                     f"vs real (floor) {baselines['real_vs_real']:.2f} ± "
                     f"{baselines['real_vs_real_std']:.2f}, Gaussian fitted to the pixels "
                     f"{baselines['gaussian']:.2f} ± {baselines['gaussian_std']:.2f}.")
    lines.append(f"images/s: {table['timing']}, on {cpu_count()} CPU cores (ONNX Runtime).")
    return lines


def plot_steps(table: dict, baselines: dict, path: Path) -> Path:
    """Two panels against network calls (both axes log): FD with the seeds' spread, the full
    chain's FD and the real-vs-real floor; and images/s. One line per sampler."""
    rows, T = table["rows"], table["full_steps"]
    full = rows[0]
    samplers = list(dict.fromkeys(r["sampler"] for r in rows[1:]))
    panels = [p for p in (("fd", "FD vs network calls") if "fd" in full else None,
                          ("images_per_s", "images/s vs network calls")) if p]
    fig, axes = new_figure(len(panels), "steps")
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    for ax, (key, title) in zip(axes, panels, strict=True):
        refs = {f"DDPM {T} steps": full[key]}
        if key == "fd" and baselines.get("real_vs_real"):
            refs["real vs real (floor)"] = baselines["real_vs_real"]
        for (label, value), style in zip(refs.items(), ("--", ":"), strict=False):
            ax.axhline(value, color="0.4", linestyle=style, linewidth=1, label=label)
        for sampler in samplers:
            mine = sorted((r for r in rows[1:] if r["sampler"] == sampler),
                          key=lambda r: r["steps"])
            spread = [r.get("fd_std", 0.0) for r in mine] if key == "fd" else None
            ax.errorbar([r["steps"] for r in mine], [r[key] for r in mine], yerr=spread,
                        marker="o", capsize=3, label=sampler.upper())
        ax.set(xscale="log", yscale="log", title=title, xlabel="network calls (NFE)")
        ax.set_xticks(sorted({r["steps"] for r in rows[1:]} or {T}))
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        for axis in (ax.xaxis, ax.yaxis):  # plain numbers, not powers of ten
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def new_figure(panels: int, command: str, *, width: float = 5.6, height: float = 4.0):
    """A matplotlib Figure (no GUI backend) of ``panels`` side by side, and its axes."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(f"tools/evaluate.py {command}: the plot needs matplotlib; "
                         "pip install -e '.[eval]'") from None
    matplotlib.use("Agg")  # files only, never a window
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * panels, height), layout="constrained")
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def save_figure(fig, path: Path) -> Path:
    """The figure as PNG, written atomically."""
    from runtime.util.fileio import write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return write_bytes(path, buffer.getvalue())


def write_json(data: dict, path: Path) -> Path:
    from runtime.util.fileio import write_text

    return write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def environment() -> dict:
    import onnxruntime

    from tools.loadtesting.report import cpu_name

    return {"python": platform.python_version(), "numpy": np.__version__,
            "onnxruntime": onnxruntime.__version__, "cpu_count": cpu_count(),
            "cpu": cpu_name(), "machine": platform.machine(), "command": " ".join(sys.argv)}


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
