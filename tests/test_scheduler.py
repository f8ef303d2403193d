"""The step-level batch scheduler: bit-exact images, fairness, limits, cancel and failure."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

import runtime
from runtime.errors import Cancelled, NonFiniteError, Overloaded
from runtime.metadata import ModelRecord
from runtime.options import SampleOptions
from runtime.pipeline import Pipeline
from runtime.schedule import Schedule
from runtime.serving.scheduler import BatchScheduler as Engine

RECORD = ModelRecord(schedule=Schedule.linear(1000).config, image_shape=(1, 4, 4),
                     data_range=(-1.0, 1.0), num_levels=17, model_config={},
                     checkpoint_sha256="0" * 64, weights="ema")


class ClosedForm:
    """A network in closed form whose output for a row depends on that row only; it
    records the rows and t of every call. ``nan_at``: t values that yield NaN."""

    def __init__(self, nan_at=(), fail_call=None):
        self.calls: list[np.ndarray] = []
        self.nan_at, self.fail_call = set(nan_at), fail_call

    def __call__(self, x, t):
        self.calls.append(t.copy())
        if self.fail_call is not None and len(self.calls) == self.fail_call:
            raise RuntimeError("the device went away")
        eps = np.tanh(x * 0.7 + (t / 1000.0)[:, None, None, None]).astype(np.float32)
        for value in self.nan_at:
            eps[t == value] = np.nan
        return eps


def Options(sampler="ddpm", steps=None, variance=None, eta=None, spacing="linspace"):
    """Checked options, positional in the order this file's cases list them."""
    return SampleOptions.make(sampler, steps, spacing, variance=variance, eta=eta)


def solo(n, seed, options: SampleOptions, eps_fn=None) -> np.ndarray:
    """The same request from Pipeline.sample_float: the reference."""
    pipe = Pipeline(eps_fn or ClosedForm(), RECORD, source="closed form", backend_name="numpy")
    return pipe.sample_float(n, seed, **options.to_dict(), progress=False)


def drain(engine, limit: int = 10_000) -> int:
    ticks = 0
    while engine.tick():
        ticks += 1
        assert ticks < limit
    return ticks


MIXED = [(3, 11, Options("ddpm", 5)), (2, 12, Options("ddim", 7)),
         (4, 13, Options("ddim", 4, eta=1.0)), (5, 14, Options("ddpm", 6, "fixedsmall")),
         (1, 15, Options("ddim", 3, eta=0.5, spacing="trailing")), (6, 16, Options("ddpm", 2)),
         (3, 17, Options("dpmpp_2m", 6)), (2, 18, Options("unipc", 5, spacing="quadratic")),
         (3, 19, Options("dpmpp_3m", 8))]


def test_ort_rows_do_not_depend_on_the_batch(tiny_onnx):
    """The premise of bit-exact batching: a row's eps is the same alone, in any batch, on
    the shard path and on the multi-thread path."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 1, 8, 8), dtype=np.float32)
    t = rng.integers(0, 1000, 9).astype(np.float32)
    with runtime.load(tiny_onnx, threads=2) as pipe:
        whole = pipe.eps_fn(x, t)
        for lo, hi in [(0, 1), (3, 4), (2, 5), (1, 9), (4, 6)]:
            np.testing.assert_array_equal(pipe.eps_fn(x[lo:hi], t[lo:hi]), whole[lo:hi])
        mixed = np.concatenate([x[5:], x[:5]]), np.concatenate([t[5:], t[:5]])
        np.testing.assert_array_equal(pipe.eps_fn(*mixed), np.concatenate([whole[5:],
                                                                           whole[:5]]))


def test_engine_images_equal_pipeline_images_on_onnx_runtime(tiny_onnx):
    """Mixed samplers, step counts and arrival times; a small max_batch so requests are
    split over several groups and the batch composition changes every few ticks."""
    with runtime.load(tiny_onnx, threads=2) as pipe:
        engine = Engine(pipe.eps_fn, pipe.record, max_batch=7)
        jobs = []
        for k, (n, seed, options) in enumerate(MIXED):
            jobs.append(engine.submit(n, seed, options))
            for _ in range(k % 3):  # arrivals between ticks
                engine.tick()
        drain(engine)
        for job, (n, seed, o) in zip(jobs, MIXED, strict=True):
            want = pipe.sample_float(n, seed, **o.to_dict(), progress=False)
            np.testing.assert_array_equal(job.result(), want)


def test_one_call_per_tick_over_all_rows_with_per_row_t():
    net = ClosedForm()
    engine = Engine(net, RECORD, max_batch=64)
    a = engine.submit(2, 0, Options("ddim", 3))
    b = engine.submit(3, 1, Options("ddpm", 2))
    drain(engine)
    # Tick 1: both at t = 999; tick 2: a at 500, b at 0; tick 3: a alone at 0.
    assert [c.tolist() for c in net.calls] == [[999.0] * 5, [500.0] * 2 + [0.0] * 3,
                                               [0.0] * 2]
    assert a.status == b.status == "done"
    snap = engine.snapshot()
    assert snap["ticks"] == 3 and snap["rows_run"] == 12 and snap["images_done"] == 5
    assert snap["batch_fill"] == pytest.approx(12 / (3 * 64))


def test_batching_off_serves_each_request_alone_in_order():
    net = ClosedForm()
    engine = Engine(net, RECORD, max_batch=4, batching=False)
    a = engine.submit(2, 0, Options("ddim", 3))
    b = engine.submit(6, 1, Options("ddpm", 2))  # more than max_batch: 4 then 2
    drain(engine)
    assert [len(c) for c in net.calls] == [2, 2, 2, 4, 4, 2, 2]
    np.testing.assert_array_equal(a.result(), solo(2, 0, Options("ddim", 3)))
    np.testing.assert_array_equal(b.result(), solo(6, 1, Options("ddpm", 2)))


def test_cap_fifo_and_partial_admission():
    net = ClosedForm()
    engine = Engine(net, RECORD, max_batch=4)
    a = engine.submit(3, 0, Options("ddim", 2))
    b = engine.submit(3, 1, Options("ddim", 5))
    c = engine.submit(1, 2, Options("ddim", 1))
    engine.tick()
    # a takes 3 rows, b the one left; c waits behind b although it would fit later.
    assert (a.status, b.status, c.status) == ("running", "running", "queued")
    assert engine.snapshot()["queue_requests"] == 2  # b still has images waiting
    drain(engine)
    assert max(len(call) for call in net.calls) <= 4
    for job, (n, seed, o) in zip([a, b, c], [(3, 0, Options("ddim", 2)),
                                             (3, 1, Options("ddim", 5)),
                                             (1, 2, Options("ddim", 1))], strict=True):
        np.testing.assert_array_equal(job.result(), solo(n, seed, o))


def test_full_queue_and_limits_are_refused_at_once():
    T = RECORD.build_schedule().num_timesteps
    with pytest.raises(ValueError, match=f"max_steps must be .* no larger than {T}"):
        Engine(ClosedForm(), RECORD, max_steps=T + 1)  # a limit no request could reach
    engine = Engine(ClosedForm(), RECORD, max_batch=2, max_queue=2, max_n=8, max_steps=50)
    engine.submit(1, 0, Options("ddim", 5))
    engine.submit(1, 1, Options("ddim", 5))
    with pytest.raises(Overloaded, match="queue is full"):
        engine.submit(1, 2, Options("ddim", 5))
    assert engine.snapshot()["refused"] == 1
    bad = [({"n": 9}, "n must be at most 8"), ({"n": 0}, "n must be"),
           ({"n": True}, "n must be"), ({"seed": -1}, "seed must be"),
           ({"seed": 2**63}, "seed must be an integer in"),
           ({"steps": 51}, "steps must be at most 50"), ({"steps": None}, "at most 50"),
           ({"sampler": "euler"}, "unknown sampler"), ({"variance": "big"}, "unknown variance"),
           ({"eta": float("nan")}, "eta must be"), ({"eta": -1.0}, "eta must be"),
           ({"eta": 1.5}, "eta must be"), ({"sampler": "dpmpp_2m", "eta": 0.5}, "does not apply"),
           ({"spacing": "random"}, "unknown spacing")]
    for fields, match in bad:
        args = {"n": 1, "seed": 0, "sampler": "ddim", "steps": 5} | fields
        with pytest.raises(ValueError, match=match):  # the options' own checks, or submit's
            options = Options(args["sampler"], args["steps"], args.get("variance"),
                              args.get("eta"), args.get("spacing", "linspace"))
            engine.submit(args["n"], args["seed"], options)
    assert engine.snapshot()["queue_requests"] == 2


def test_cancel_frees_rows_at_the_next_tick_and_spares_the_others():
    net = ClosedForm()
    engine = Engine(net, RECORD, max_batch=8)
    a = engine.submit(3, 0, Options("ddpm", 10))
    b = engine.submit(2, 1, Options("ddim", 10))
    queued = engine.submit(4, 2, Options("ddim", 3))
    later = engine.submit(8, 3, Options("ddim", 3))  # waits for rows
    engine.tick()
    assert len(net.calls[-1]) == 8 and later.status == "queued"
    a.cancel()
    later.cancel()
    engine.tick()
    assert len(net.calls[-1]) == 6  # a's 3 rows gone, nothing admitted for `later`
    assert engine.snapshot()["images_in_flight"] == 6
    drain(engine)
    for job in (a, later):
        assert job.status == "cancelled"
        with pytest.raises(Cancelled):
            job.result()
    np.testing.assert_array_equal(b.result(), solo(2, 1, Options("ddim", 10)))
    np.testing.assert_array_equal(queued.result(), solo(4, 2, Options("ddim", 3)))
    assert engine.snapshot()["requests"] == {"done": 2, "cancelled": 2, "failed": 0}
    assert engine.snapshot()["images_in_flight"] == 0


def test_failures_fail_their_requests_only():
    # t = 333 occurs only in a 4-step chain: NaN there fails that request alone.
    net = ClosedForm(nan_at=[333.0])
    engine = Engine(net, RECORD, max_batch=16)
    bad = engine.submit(2, 0, Options("ddim", 4))
    good = engine.submit(3, 1, Options("ddim", 5))
    drain(engine)
    with pytest.raises(NonFiniteError, match="t=333"):
        bad.result()
    np.testing.assert_array_equal(good.result(), solo(3, 1, Options("ddim", 5)))
    # A network call that raises fails the requests in it; the engine goes on.
    net = ClosedForm(fail_call=2)
    engine = Engine(net, RECORD, max_batch=16)
    first = engine.submit(2, 0, Options("ddim", 3))
    engine.tick()
    engine.tick()
    after = engine.submit(2, 0, Options("ddim", 3))
    drain(engine)
    with pytest.raises(RuntimeError, match="went away"):
        first.result()
    np.testing.assert_array_equal(after.result(), solo(2, 0, Options("ddim", 3)))


def test_progress_counts_steps_and_false_cancels():
    engine = Engine(ClosedForm(), RECORD, max_batch=2)
    seen = []
    job = engine.submit(3, 0, Options("ddim", 4),
                        on_progress=lambda done, total: seen.append((done, total)))
    drain(engine)
    # Two images for 4 ticks, then the third alone: per-image steps, up to 3 * 4.
    assert seen == [(2, 12), (4, 12), (6, 12), (8, 12), (9, 12), (10, 12), (11, 12),
                    (12, 12)]
    job = engine.submit(3, 0, Options("ddim", 4), on_progress=lambda done, total: done < 4)
    drain(engine)
    assert job.status == "cancelled" and job.steps_done == 4


def test_random_arrivals_and_cancels_lose_and_duplicate_nothing():
    rng = random.Random(5)
    engine = Engine(ClosedForm(), RECORD, max_batch=10, max_queue=1000)
    jobs = []
    for tick in range(120):
        if rng.random() < 0.5:
            n, steps = rng.randint(1, 7), rng.choice([1, 2, 5, 9])
            sampler = rng.choice(["ddpm", "ddim"])
            jobs.append((engine.submit(n, tick, Options(sampler, steps)), n, tick,
                         Options(sampler, steps)))
        live = [job for job, *_ in jobs if not job.done()]
        if live and rng.random() < 0.15:
            rng.choice(live).cancel()
        engine.tick()
    drain(engine)
    outcomes = {"done": 0, "cancelled": 0, "failed": 0}
    for job, n, seed, options in jobs:
        outcomes[job.status] += 1
        if job.status == "done":
            assert job.finished == n
            np.testing.assert_array_equal(job.result(), solo(n, seed, options))
    assert outcomes["failed"] == 0 and outcomes["done"] > 10 and outcomes["cancelled"] > 3
    snap = engine.snapshot()
    assert snap["requests"] == outcomes
    assert snap["images_in_flight"] == snap["queue_requests"] == 0


def test_engine_thread_serves_many_threads_and_closes():
    engine = Engine(ClosedForm(), RECORD, max_batch=6).start()
    requests = [(k % 4 + 1, k, Options(["ddpm", "ddim"][k % 2], 3 + k % 5)) for k in range(12)]
    results = [None] * len(requests)

    def client(k):
        results[k] = engine.submit(*requests[k]).result(timeout=60)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for got, (n, seed, options) in zip(results, requests, strict=True):
        np.testing.assert_array_equal(got, solo(n, seed, options))
    # Closing without draining cancels what is held; new requests are refused.
    long = engine.submit(2, 0, Options("ddpm", 1000))
    engine.close(drain=False, timeout=30)
    assert long.status == "cancelled"
    with pytest.raises(Overloaded, match="shutting down"):
        engine.submit(1, 0, Options("ddim", 2))
