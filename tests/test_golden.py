"""Every sampler's images equal those the runtime drew before its options schema and
stepping core were rebuilt (tests/data/golden_samples.npz, written by make_golden.py on the
old code): through the library and through the batch scheduler, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runtime.options import SampleOptions
from runtime.serving.scheduler import BatchScheduler

DATA = Path(__file__).with_name("data")
GOLDEN = np.load(DATA / "golden_samples.npz")
META = json.loads(str(GOLDEN["meta"]))


def _make_golden():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_golden", DATA / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKE = _make_golden()


def _same_isa() -> bool:
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("flags"))
    return ("avx512f" in flags.split()) == META["avx512f"]


def _check(got: np.ndarray, want: np.ndarray) -> None:
    if _same_isa():
        np.testing.assert_array_equal(got, want)
    else:
        # numpy's float64 log/exp (the multistep solvers' coefficient tables) may round
        # differently in the last bit with and without AVX-512; the rest is exact IEEE math.
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", MAKE.CASES, ids=[c[0] for c in MAKE.CASES])
def test_library_images_equal_the_old_codes(case):
    name, data_range, n, seed, first, options = case
    pipe = MAKE.Pipeline(MAKE.eps_fn, MAKE.record(data_range), source="golden",
                         backend_name="numpy")
    got = pipe.sample_float(n, seed, first_index=first, progress=False, **options)
    _check(got, GOLDEN[name])


def test_served_images_equal_the_old_codes():
    """All cases at once in one shared batch (first_index 0 only: a request starts at 0)."""
    cases = [c for c in MAKE.CASES if c[4] == 0 and c[1] == (-1.0, 1.0)]
    scheduler = BatchScheduler(MAKE.eps_fn, MAKE.record((-1.0, 1.0)), max_batch=8, max_n=8)
    jobs = [scheduler.submit(n, seed, SampleOptions.make(**options))
            for _, _, n, seed, _, options in cases]
    while scheduler.tick():
        pass
    assert len(cases) >= 5
    for (name, *_), job in zip(cases, jobs, strict=True):
        _check(job.result(timeout=0), GOLDEN[name])
