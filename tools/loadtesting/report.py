"""The report: medians over repeats per mode, and the markdown table."""

from __future__ import annotations

import math
import platform
from pathlib import Path

import numpy as np

from .workload import WORKLOAD


def cpu_name() -> str:
    """The CPU's model name and its widest vector extension, e.g. 'AMD EPYC (avx512f)': our
    machines of one size differ mostly by AVX-512 against AVX2, so every figure names it."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    lines = info.splitlines()
    name = next((line.split(":", 1)[1].strip() for line in lines
                 if line.startswith("model name")), "unknown CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in lines
                      if line.startswith("flags")), []))
    widest = next((f for f in ("avx512f", "avx2", "avx") if f in flags), "no avx")
    return f"{name} ({widest})"


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [f"Load test: {meta['model']}, {meta['cpu']} ({meta['cores']} cores, shared), "
             f"ORT threads {meta['threads']}, max batch {meta['max_batch']}, "
             f"steps scale {meta['steps_scale']}.", "",
             "| mode | saturation images/s | vs serial | load req/s | short p50 / p95 / p99 s"
             " | medium p95 s | long p95 s | images/s | busy | errors | lost | refused"
             " | cancelled | batch fill | efficiency | scheduler alone |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = report["summary"].get("serial", {}).get("saturation_images_per_s", math.nan)

    def p(c: dict, q: str) -> str:
        return f"{c[q]:.2f}" if c.get("count") else "-"

    for mode, s in report["summary"].items():
        short = s["latency"]["short"]
        lines.append(
            f"| {mode} | {s['saturation_images_per_s']:.1f} | "
            f"{s['saturation_images_per_s'] / base:.2f}x | {s['rate']:.2f} | "
            f"{p(short, 'p50')} / {p(short, 'p95')} / {p(short, 'p99')} | "
            f"{p(s['latency']['medium'], 'p95')} | {p(s['latency']['long'], 'p95')} | "
            f"{s['images_per_s']:.1f} | {s['busy']:.2f} | {s['errors']} | {s['lost']} | "
            f"{s['refused']} | "
            f"{s['cancelled']} | {s['batch_fill']:.2f} | {s.get('efficiency', math.nan):.2f} | "
            f"{s.get('scheduler_efficiency', math.nan):.2f} |")
    t = report["targets"]
    lines += ["", f"Saturation throughput, batching / serial: {t['throughput_ratio']:.2f}x "
              f"(target >= 1.3x). Short-request p95 at {meta['rate']:.2f} requests/s, "
              f"batching / serial: {t['short_p95_ratio']:.3f} (target <= 0.2). "
              f"Errors {t['errors']}, lost images {t['lost']} (target 0). Load columns are "
              "the open-loop phase; busy = share of its wall time spent in network calls; "
              "batch fill = mean rows per call / max batch; efficiency = rows served per "
              "second at saturation, until the first client finds no request left (then "
              "the last requests drain alone), / rows per second of the network alone at "
              "full batch (target >= 0.9); loadtest.json also has it over the whole phase "
              "(efficiency_with_drain) and the cores the server process used over the same "
              "window (steady_cores); scheduler alone = the same over the same requests "
              "through the batch scheduler in one process, without HTTP or clients."]
    return "\n".join(lines) + "\n"


def summarize(runs: list[dict], modes) -> dict:
    """Medians over repeats per mode; counts are summed."""
    summary = {}
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        load = [r["load"] for r in mine]
        latency = {}
        for cls in WORKLOAD:
            per = [x["latency"][cls.name] for x in load if x["latency"][cls.name]["count"]]
            latency[cls.name] = ({"count": sum(c["count"] for c in per),
                                  **{q: float(np.median([c[q] for c in per]))
                                     for q in ("p50", "p95", "p99")}} if per else {"count": 0})
        summary[mode] = {
            "saturation_images_per_s": float(np.median(
                [r["saturation"]["images_per_s"] for r in mine])),
            "rate": load[0]["rate"], "latency": latency,
            "images_per_s": float(np.median([x["images_per_s"] for x in load])),
            "errors": sum(x["outcomes"]["error"] + x["outcomes"]["unfinished"] for x in load)
            + sum(r["saturation"]["errors"] for r in mine),
            "lost": sum(x["outcomes"]["lost"] + (not x["server_agrees"]) for x in load),
            "refused": sum(x["outcomes"]["refused"] for x in load),
            "cancelled": sum(x["outcomes"]["cancelled"] for x in load),
            "batch_fill": float(np.median([x["batch_fill"] for x in load])),
            "busy": float(np.median([x["busy"] for x in load])),
            "saturation_busy": float(np.median([r["saturation"]["busy"] for r in mine])),
            "saturation_rows_per_s": float(np.median(
                [r["saturation"]["rows_per_s"] for r in mine])),
            "steady_rows_per_s": float(np.median(
                [r["saturation"]["steady_rows_per_s"] for r in mine])),
            "steady_fill": float(np.median([r["saturation"]["steady_fill"] for r in mine])),
            "steady_busy": float(np.median([r["saturation"]["steady_busy"] for r in mine])),
            "steady_cores": float(np.median([r["saturation"]["steady_cores"] for r in mine])),
            "scheduler_alone_rows_per_s": float(np.median(
                [r["saturation"]["scheduler_alone_rows_per_s"] for r in mine])),
        }
    return summary
