"""What a production app does: install the base wheel without torch, load a model, sample."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, **kwargs):
    out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    command = " ".join(map(str, cmd))
    assert out.returncode == 0, f"{command}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def test_base_wheel_samples_without_torch(tiny_onnx, tmp_path):
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)])
    (wheel,) = dist.glob("*.whl")
    venv = tmp_path / "venv"
    # No pip of its own (ensurepip is half this test's time): this pip installs into it.
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(py)]
    # The base requirements only: numpy, onnxruntime, click, pillow, tqdm.
    _run([*pip, "install", "-q", str(wheel)])
    listing = _run([*pip, "list", "--format=freeze"]).stdout.lower()
    assert "torch" not in listing and "onnxruntime" in listing
    code = (
        "import sys, runtime\n"
        "assert 'site-packages' in runtime.__file__, runtime.__file__\n"
        f"images = runtime.load({str(tiny_onnx)!r}).sample(3, seed=0, steps=4, progress=False)\n"
        "assert images.shape == (3, 8, 8, 1) and images.dtype.name == 'uint8'\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    # Run from an empty folder so the checkout's runtime/ cannot shadow the installed one.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    assert _run([str(py), "-c", code], cwd=tmp_path, env=env).stdout.strip() == "ok"
    cli = _run([str(venv / "bin" / "ddpm-sample"), "sample", str(tiny_onnx), "-n", "2",
                "--steps", "3", "--no-progress", "-o", str(tmp_path / "grid.png")],
               cwd=tmp_path, env=env)
    assert "2 images" in cli.stdout and (tmp_path / "grid.png").stat().st_size > 0
