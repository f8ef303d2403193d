"""The samplers through the pipeline and the CLI: every registered one, each spacing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime.samplers import SAMPLERS
from runtime.schedule import SPACINGS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_through_the_pipeline(tiny_onnx, sampler):
    with runtime.load(tiny_onnx) as pipe:
        common = dict(seed=3, sampler=sampler, steps=5, spacing="trailing", progress=False)
        whole = pipe.sample_float(4, batch_size=4, **common)
        split = pipe.sample_float(4, batch_size=3, **common)
        other = pipe.sample_float(4, **dict(common, spacing="linspace"))
    np.testing.assert_array_equal(whole, split)  # image k depends on (seed, k) only
    assert whole.min() >= -1.0 and whole.max() <= 1.0  # every sampler ends on clipped x_0
    assert not np.array_equal(whole, other)  # the spacing reaches the schedule


def test_pipeline_refuses_bad_sampler_options(tiny_onnx):
    with runtime.load(tiny_onnx) as pipe:
        with pytest.raises(ValueError, match="eta does not apply to the dpmpp_2m sampler"):
            pipe.sample_float(2, sampler="dpmpp_2m", steps=3, eta=0.3, progress=False)
        with pytest.raises(ValueError, match="unknown spacing"):
            pipe.sample_float(2, sampler="ddim", steps=3, spacing="cubic", progress=False)
        with pytest.raises(ValueError, match="unknown sampler"):
            pipe.sample_float(2, sampler="euler", steps=3, progress=False)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "runtime", *args], capture_output=True,
                          text=True, cwd=REPO)


def test_cli_offers_every_sampler_and_spacing(tiny_onnx, tmp_path):
    help_text = _cli("sample", "--help").stdout
    for name in (*SAMPLERS, *SPACINGS):
        assert name in help_text
    out = tmp_path / "grid.png"
    run = _cli("sample", str(tiny_onnx), "-n", "2", "--steps", "3", "--sampler", "unipc",
               "--spacing", "quadratic", "-o", str(out), "--no-progress")
    assert run.returncode == 0, run.stderr
    assert out.is_file() and "unipc 3 steps" in run.stdout
    bad = _cli("sample", str(tiny_onnx), "--sampler", "dpmpp_3m", "--eta", "0.5",
               "-o", str(tmp_path / "bad.png"), "--no-progress")
    assert bad.returncode == 1 and "eta does not apply" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad.png").exists()
