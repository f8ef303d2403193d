"""The options schema: declared once on a sampler, honoured by every entry point.

A sampler registered with a new option here (``gain``, which scales its DDIM step's x_0)
must reach the library, the batch scheduler, the server's JSON parsing, bulk manifests'
dict and the CLI's generated flags without any other change: the promise that a new
option is one sampler module.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import OptionError
from runtime.metadata import ModelRecord
from runtime.options import SEED, Option, SampleOptions, option_names
from runtime.pipeline import Pipeline
from runtime.samplers import REGISTRY, register, unregister
from runtime.samplers.ddim import DDIM
from runtime.schedule import Schedule
from runtime.serving.scheduler import BatchScheduler

ROOT = Path(__file__).resolve().parents[1]
RECORD = ModelRecord(schedule=Schedule.linear(100).config, image_shape=(1, 4, 4),
                     data_range=(-1.0, 1.0), num_levels=17, model_config={},
                     checkpoint_sha256="0" * 64, weights="ema")

# Registered in this module and in the CLI subprocess below: one class, nothing else.
SCALED_SAMPLER = '''
from runtime.options import Option
from runtime.samplers import register
from runtime.samplers.ddim import DDIM


class Scaled(DDIM):
    name = "scaled"
    options = (Option("gain", float, 1.0, "scales the output", low=0.0, high=2.0),)

    def __init__(self, schedule, shape, *, gain=1.0, **kwargs):
        super().__init__(schedule, shape, **kwargs)
        self.gain = gain

    def _step(self, x, eps, noise):
        super()._step(x, eps, noise)
        if self.k == self.num_steps - 1:  # the last step: x is x_0
            x *= self.gain


register(Scaled)
'''


def eps_fn(x, t):
    return (np.float32(0.5) * x + np.float32(1e-3) * t.reshape(-1, 1, 1, 1)).astype(np.float32)


@pytest.fixture
def scaled():
    namespace: dict = {}
    exec(SCALED_SAMPLER, namespace)  # noqa: S102 - the sampler module's text, as a user writes it
    yield namespace["Scaled"]
    unregister("scaled")


def test_a_new_option_reaches_every_entry_point(scaled):
    pipe = Pipeline(eps_fn, RECORD, source="numpy", backend_name="numpy")
    plain = pipe.sample_float(3, 1, sampler="scaled", steps=5, progress=False)
    half = pipe.sample_float(3, 1, sampler="scaled", steps=5, gain=0.5, progress=False)
    np.testing.assert_allclose(half, plain * np.float32(0.5), rtol=1e-6)
    # The server's JSON and a manifest's dict carry it; the scheduler serves it bit for bit.
    options = SampleOptions.from_json({"sampler": "scaled", "steps": 5, "gain": 0.5, "n": 3})
    assert options.to_dict()["gain"] == 0.5 and "gain" in option_names()
    scheduler = BatchScheduler(eps_fn, RECORD, max_batch=4)
    job = scheduler.submit(3, 1, options)
    while scheduler.tick():
        pass
    np.testing.assert_array_equal(job.result(timeout=0), half)
    # Checked by its declaration: bounds, type, and only for the sampler that takes it.
    for bad, kind in [({"gain": 3.0}, "value"), ({"gain": "x"}, "type"),
                      ({"gain": float("nan")}, "type")]:
        with pytest.raises(OptionError) as err:
            SampleOptions.make("scaled", **bad)
        assert err.value.field == "gain" and err.value.kind == kind
    with pytest.raises(OptionError, match="gain does not apply to the ddpm sampler"):
        SampleOptions.make("ddpm", gain=0.5)
    assert SampleOptions.make("ddpm", gain=1.0).kwargs == {"variance": "fixedlarge"}


@pytest.mark.slow  # four CLI processes
def test_the_cli_generates_a_flag_for_a_new_option(tiny_onnx, tmp_path):
    script = SCALED_SAMPLER + '''
import sys
from runtime.cli import main
sys.exit(main())
'''
    def cli(*args):
        return subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                              text=True, cwd=ROOT)

    help_text = cli("sample", "--help").stdout
    assert "--gain" in help_text and "scaled only" in help_text
    out = tmp_path / "g.png"
    ok = cli("sample", str(tiny_onnx), "-n", "2", "--sampler", "scaled", "--steps", "3",
             "--gain", "0.5", "-o", str(out), "--no-progress")
    assert ok.returncode == 0 and out.is_file(), ok.stderr
    bad = cli("sample", str(tiny_onnx), "-n", "2", "--gain", "0.5", "-o",
              str(tmp_path / "b.png"), "--no-progress")
    assert bad.returncode == 1 and "gain does not apply to the ddpm sampler" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert cli("sample", str(tiny_onnx), "--sampler", "scaled", "--gain", "9").returncode == 2


def test_schema_conflicts_are_refused_at_registration():
    class Clash(DDIM):
        name = "clash"
        options = (Option("eta", str, "x", "eta as a string", choices=("x", "y")),)

    class Reserved(DDIM):
        name = "reserved"
        options = (Option("seed", int, 0, "shadows the request's seed"),)

    for cls, match in [(Clash, "differs from sampler 'ddim'"), (Reserved, "request field")]:
        with pytest.raises(ValueError, match=match):
            register(cls)
        assert cls.name not in REGISTRY


def test_request_fields_and_common_options_are_checked_once():
    assert SEED.check(2**63 - 1) == 2**63 - 1
    for value in (-1, 2**63, True, 1.0, "3"):
        with pytest.raises(OptionError, match="seed must be"):
            SEED.check(value)
    with pytest.raises(OptionError, match="unknown option 'colour'"):
        SampleOptions.make(colour="red")
    options = SampleOptions.make("ddim", 10, "quadratic", eta=1)
    assert options.kwargs == {"eta": 1.0} and isinstance(options.kwargs["eta"], float)
    with pytest.raises(OptionError, match="steps must be at most the model's 100"):
        options.with_steps(101).respace(RECORD.build_schedule())
    assert options.respace(RECORD.build_schedule()).num_timesteps == 10


def test_a_models_defaults_fill_what_a_request_leaves_out():
    record = ModelRecord(**{**RECORD.__dict__, "defaults": {"sampler": "ddim", "steps": 7,
                                                            "eta": 0.5, "variance": "fixedsmall"}})
    pipe = Pipeline(eps_fn, record, source="numpy", backend_name="numpy")
    plain = Pipeline(eps_fn, RECORD, source="numpy", backend_name="numpy")
    got = pipe.sample_float(2, 3, progress=False)
    np.testing.assert_array_equal(got, plain.sample_float(2, 3, sampler="ddim", steps=7,
                                                          eta=0.5, progress=False))
    # What the request gives wins; the model's variance applies to ddpm only.
    np.testing.assert_array_equal(
        pipe.sample_float(2, 3, sampler="ddpm", steps=4, progress=False),
        plain.sample_float(2, 3, sampler="ddpm", steps=4, variance="fixedsmall", progress=False))
    options = SampleOptions.from_json({"n": 2}, defaults=record.defaults)
    assert options.to_dict() == {"sampler": "ddim", "steps": 7, "spacing": "linspace",
                                 "variance": "fixedlarge", "eta": 0.5}
    scheduler = BatchScheduler(eps_fn, record, max_batch=4)
    job = scheduler.submit(2, 3)  # no options at all: the model's
    while scheduler.tick():
        pass
    np.testing.assert_array_equal(job.result(timeout=0), got)
