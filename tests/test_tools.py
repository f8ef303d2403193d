"""The benchmark runs end to end on a tiny configuration and writes a well-formed report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_writes_report(trained_run, tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench.py"), "--checkpoint",
         str(trained_run / "ckpt.pt"), "--batch", "2", "--steps", "3", "--repeats", "1",
         "--threads", "1", "--only", "torch", "--only", "ort_cpu", "--only", "trt_fp16",
         "--out", str(out)],
        capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "bench.json").read_text())
    rows = report["rows"]
    assert set(rows) == {"torch", "ort_cpu"}
    assert "trt_fp16" in report["skipped"] or "trt_fp16" in rows
    for row in rows.values():
        assert row["images_per_s"] > 0 and len(row["seconds_all"]) == 1
        assert 0.0 <= row["overhead_share"] < 1.0 and row["peak_rss_mb"] > 0
        assert row["network_gflops"] > 0
    assert rows["torch"]["speedup_vs_torch"] == 1.0
    # The exported graph's upsampling does less work than the paper's network.
    assert 0 < report["meta"]["exported_flops_per_image"] < report["meta"]["flops_per_image"]
    table = (out / "bench.md").read_text()
    assert "| ort_cpu |" in table and "| torch |" in table


def test_train_bench_reports_steps_per_second_and_phases(tmp_path):
    out = tmp_path / "tb"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train_bench.py"), "--threads", "1",
         "--steps", "1", "--rounds", "2", "--profile", "--variant", "ch=16,ch_mult=1:1",
         "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "train_bench.json").read_text())
    row = report["threads"]["1"]
    assert len(row["rounds"]) == 2 and row["steps_per_s"] > 0 and row["ratio"] == 1.0
    phases = row["phase_ms"]
    assert set(phases) == {"data", "forward", "backward", "clip", "optimizer", "ema"}
    assert phases["backward"] > 0 and phases["forward"] > 0  # the labels reach the profiler
    variant = report["variants"]["ch=16,ch_mult=1:1"]["1"]
    assert len(variant["rounds"]) == 2 and variant["steps_per_s"] > 0
    ratios = [a / b for a, b in zip(variant["rounds"], row["rounds"], strict=True)]
    assert (variant["ratio_min"], variant["ratio_max"]) == (min(ratios), max(ratios))
    for args, hint in ((["--threads", "two"], "--threads"),
                       (["--variant", "width=3"], "--variant"),
                       (["--variant", "num_groups=7"], "--variant")):
        bad = subprocess.run([sys.executable, str(REPO / "tools" / "train_bench.py"), *args],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
        assert bad.returncode == 2 and hint in bad.stderr, bad.stderr
