"""tools/loadtest.py and tools/loadtest_edits.py end to end: seconds-long smoke runs against
real localhost servers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


needs_server = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("starlette", "uvicorn", "prometheus_client")),
    reason="the server extra is not installed (pip install .[serve])")


def _tool(name: str, *args) -> None:
    run = subprocess.run([sys.executable, str(REPO / "tools" / name), *map(str, args)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr


@needs_server
def test_loadtest_smoke_run_writes_a_report(tiny_onnx, tmp_path):
    out = tmp_path / "lt"
    _tool("loadtest.py", tiny_onnx, "--saturation", "12", "--duration", "1.5", "--steps-scale",
          "0.02", "--clients", "4", "--cancel", "0.3", "--threads", "1", "--max-batch", "16",
          "--drain", "60", "--out", out)
    report = json.loads((out / "loadtest.json").read_text())
    assert set(report["summary"]) == {"batching", "serial"}
    for mode, s in report["summary"].items():
        assert s["saturation_images_per_s"] > 0, mode
        assert s["errors"] == 0 and s["lost"] == 0, report["runs"]
        # Served rows against the network alone at full batch: positive and bounded.
        assert 0 < s["efficiency"] < 3 and s["network_best_rows_per_s"] > 0
        assert 0 < s["efficiency_with_drain"] < 3
        # The same requests through the scheduler alone, in-process.
        assert 0 < s["scheduler_efficiency"] < 3
    for run_ in report["runs"]:
        sat = run_["saturation"]
        # The window before the drain is part of the phase, its rows part of the phase's.
        assert 0 < sat["steady_seconds"] <= sat["seconds"]
        # (Counted in rows: rate times seconds can round past the count it came from.)
        assert 0 < sat["steady_rows"] <= sat["rows"]
        assert sat["steady_rows_per_s"] == pytest.approx(sat["steady_rows"] / sat["steady_seconds"])
        if sys.platform.startswith("linux"):  # process_* series: the server's CPU, in cores
            # (at least 0: a window of a few clock ticks may show none)
            assert 0 <= sat["steady_cores"] <= (os.cpu_count() or 1) + 0.5
        load = run_["load"]
        assert load["exit_code"] == 0 and load["server_agrees"]
        # Every request ended one known way; the server counted the same successes (but
        # for replies finished just as their client hung up).
        assert sum(load["outcomes"].values()) == load["requests"]
        done, ok = load["server_outcomes"]["done"], load["outcomes"]["ok"]
        assert ok <= done <= ok + load["hung_up"]
        assert 0 < load["batch_fill"] <= 1
    # Request at a time never puts two requests in one call: its fill stays below batching's
    # at saturation, where both have work waiting.
    sat = {r["mode"]: r["saturation"]["batch_fill"] for r in report["runs"]}
    assert sat["serial"] < sat["batching"]
    table = (out / "loadtest.md").read_text()
    assert "| batching |" in table and "| serial |" in table
    # Refuses to write onto its input.
    again = subprocess.run([sys.executable, str(REPO / "tools" / "loadtest.py"), str(tiny_onnx),
                            "--out", str(tiny_onnx)], capture_output=True, text=True, cwd=REPO)
    assert again.returncode != 0 and "Traceback" not in again.stderr


@needs_server
def test_edits_mixed_with_sampling_count_their_network_calls(tiny_onnx, tmp_path):
    out = tmp_path / "lte"
    _tool("loadtest_edits.py", tiny_onnx, "--count", "12", "--clients", "4", "--threads", "1",
          "--max-batch", "16", "--steps-scale", "0.2", "--out", out)
    report = json.loads((out / "loadtest-edits.json").read_text())
    rows = {(r["kind"], r["mode"]): r for r in report["rows"]}
    assert len(rows) == 4 and report["errors"] == 0
    for r in rows.values():
        assert r["exit_code"] == 0 and r["requests"] == r["count"]
    # One request at a time, each request's images in one call: the server makes exactly
    # the calls the runtime counts per request, edits included.
    serial = rows["mixed", "serial"]
    assert serial["network_calls"] == serial["calls_if_alone"] > 0
    assert rows["mixed", "batching"]["calls_if_alone"] == serial["calls_if_alone"]
    assert rows["mixed", "batching"]["network_calls"] <= serial["network_calls"]
    assert "| mixed | serial |" in (out / "loadtest-edits.md").read_text()
