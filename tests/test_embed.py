"""One Pipeline shared by many threads; per-step callbacks and cancellation."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import runtime
from runtime.errors import Cancelled
from runtime.pipeline import Pipeline

# (n, seed, options): n = 1 runs on the multi-thread session, n >= 2 on the shards, so
# concurrent first calls open both kinds of session at once.
CALLS = [(1, 0, {"sampler": "ddim", "steps": 6}), (3, 1, {"sampler": "ddpm", "steps": 5}),
         (2, 2, {"sampler": "ddim", "steps": 4, "eta": 1.0}),
         (5, 3, {"sampler": "ddpm", "steps": 3, "variance": "fixedsmall"}),
         (1, 4, {"sampler": "ddpm", "steps": 7})]


def test_threads_sharing_a_pipeline_get_their_serial_images(tiny_onnx):
    with runtime.load(tiny_onnx, threads=2) as pipe:
        serial = [pipe.sample_float(n, s, progress=False, **kw) for n, s, kw in CALLS]
    for _ in range(3):  # a fresh pipeline each round: the lazy session opening races too
        with runtime.load(tiny_onnx, threads=2) as pipe, ThreadPoolExecutor(len(CALLS) * 2) as pool:
            barrier = threading.Barrier(len(CALLS) * 2)

            def run(call, barrier=barrier, pipe=pipe):
                n, seed, kw = call
                barrier.wait(timeout=30)
                return pipe.sample_float(n, seed, progress=False, **kw)

            results = list(pool.map(run, CALLS * 2))
        for got, want in zip(results, serial * 2, strict=True):
            np.testing.assert_array_equal(got, want)


def _counting(pipe: Pipeline) -> tuple[Pipeline, list[int]]:
    """The same network behind a pipeline that counts its calls."""
    calls = []

    def eps_fn(x, t):
        calls.append(x.shape[0])
        return pipe.eps_fn(x, t)

    return Pipeline(eps_fn, pipe.record, source=pipe.source,
                    backend_name=pipe.backend_name), calls


def test_callback_sees_every_step_and_returning_false_cancels(tiny_onnx):
    with runtime.load(tiny_onnx, threads=1) as base:
        pipe, calls = _counting(base)
        seen = []
        want = pipe.sample_float(5, 7, steps=4, batch_size=2, progress=False,
                                 callback=lambda step, total: seen.append((step, total)))
        # Three batches of four steps: the total counts every batch.
        assert seen == [(k, 12) for k in range(1, 13)] and len(calls) == 12

        calls.clear()
        with pytest.raises(Cancelled, match="5 of 12"):
            pipe.sample_float(5, 7, steps=4, batch_size=2, progress=False,
                              callback=lambda step, total: step < 5)
        assert len(calls) == 5  # stopped right after the step whose callback said no
        # Still usable, and the same images as before the cancel.
        np.testing.assert_array_equal(pipe.sample_float(5, 7, steps=4, batch_size=2,
                                                        progress=False), want)


def test_cancel_token_stops_within_one_step(tiny_onnx):
    with runtime.load(tiny_onnx, threads=1) as base:
        pipe, calls = _counting(base)
        token = threading.Event()
        token.set()
        with pytest.raises(Cancelled):
            pipe.sample_float(2, 0, steps=50, progress=False, cancel=token)
        assert calls == []  # set before the call: no network call at all

        # Set from another thread while the chain runs: at most one more step after it.
        token = threading.Event()
        at_set = []

        def watch(step, total):
            if step == 3:
                at_set.append(len(calls))
                threading.Thread(target=token.set).start()
                threading.Event().wait(0.05)  # let the setter run before the next step

        with pytest.raises(Cancelled):
            pipe.sample_float(2, 0, steps=50, progress=False, cancel=token, callback=watch)
        assert at_set == [3] and len(calls) <= 4
        with pytest.raises(TypeError, match="is_set"):
            pipe.sample_float(1, 0, steps=2, progress=False, cancel=True)
        assert pipe.sample_float(1, 0, steps=2, progress=False).shape == (1, 1, 8, 8)


def test_batches_share_no_state_between_threads_on_a_cancel(tiny_onnx):
    """A call cancelled in one thread does not disturb another thread's call."""
    with runtime.load(tiny_onnx, threads=2) as pipe:
        want = pipe.sample_float(4, 9, sampler="ddpm", steps=8, progress=False)
        token = threading.Event()
        token.set()
        with ThreadPoolExecutor(2) as pool:
            ok = pool.submit(pipe.sample_float, 4, 9, sampler="ddpm", steps=8, progress=False)
            bad = pool.submit(pipe.sample_float, 4, 9, sampler="ddpm", steps=8,
                              progress=False, cancel=token)
            np.testing.assert_array_equal(ok.result(), want)
            with pytest.raises(Cancelled):
                bad.result()
