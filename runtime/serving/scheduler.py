"""Step-level batching: images of many requests share each network call.

The network takes ``t`` per image ([B]), so images at different timesteps, from different
requests, samplers and step counts can run in one call. The :class:`BatchScheduler` keeps a
running batch of *groups*: a group is a slice of one request's images admitted together,
stepped by its own :class:`~runtime.run.Run` (sampler state, noise streams
``ImageNoise(seed, range(lo, hi))``: image k depends on (seed, k) only, schedule position).
Every tick it makes one network call over all rows, advances each group's run with its
rows of the result, retires finished groups and admits waiting images first come, first
served. ``Pipeline.sample`` steps the same :class:`~runtime.run.Run`, so an image served
this way is the image the library gives with the same options, bit for bit, wherever the
network's output for a row does not depend on the other rows of its batch (ONNX Runtime
on the CPU: tested).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable

import numpy as np

from ..edits import Edit
from ..errors import Cancelled, OptionError, QueueFull, RequestIdInUse, ShuttingDown, check_int
from ..metadata import ModelRecord
from ..options import SEED, N, SampleOptions, show_value
from ..run import Run, image_run
from ..samplers import ImageNoise
from ..schedule import Schedule

OUTCOMES = ("done", "cancelled", "failed")
# An edit request may take this many network calls per image per step allowed: RePaint's
# own setting (10 resamples) at the server's step limit.
EDIT_CALLS_PER_STEP = 10


class Job:
    """A submitted request: wait with :meth:`result`, stop with :meth:`cancel`.

    ``on_progress(steps_done, steps_total)`` and ``on_done(job)`` run on the scheduler's
    thread; ``on_progress`` returning False cancels. Steps count per image. ``options``
    has its ``steps`` resolved (never None).
    """

    def __init__(self, n: int, seed: int, options: SampleOptions, image_shape,
                 on_progress, on_done, job_id: str | None = None, *, edit: Edit | None = None,
                 calls: int | None = None, previews: int = 0, on_preview=None):
        self.id = job_id or uuid.uuid4().hex
        self.n, self.seed, self.options, self.steps = n, seed, options, options.steps
        self.edit = edit
        # Network calls per image: the steps, or what the edit takes on them.
        self.calls = options.steps if calls is None else calls
        self.steps_total = n * self.calls
        self.previews, self._on_preview = previews, on_preview
        self.steps_done = 0
        self.status = "queued"  # queued -> running -> done | cancelled | failed
        self.error: BaseException | None = None
        self.submitted = time.monotonic()
        self.image_shape = tuple(image_shape)
        self.admitted = 0  # images handed to groups so far (the next image index)
        self.finished = 0  # images written to the result
        self._out: np.ndarray | None = None  # allocated when the first image is admitted
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._on_progress, self._on_done = on_progress, on_done

    def cancel(self) -> None:
        """Ask for a stop; the scheduler frees this request's rows at its next tick."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> np.ndarray:
        """float32 [n, C, H, W]; raises Cancelled, the failure, or TimeoutError."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} still {self.status} after {timeout} s")
        if self.error is not None:
            raise self.error
        return self._out

    # === The scheduler's side: called on its thread (admit under its lock) ===

    @property
    def waiting(self) -> int:
        """Images not yet handed to a group."""
        return self.n - self.admitted

    def admit(self, free: int) -> tuple[int, int]:
        """Hand the next images, at most ``free``, to a group: their [lo, hi)."""
        lo = self.admitted
        self.admitted = min(self.n, lo + free)
        return lo, self.admitted

    def begin(self) -> bool:
        """Running from its first admission on (the result allocated then); False once it
        has ended (cancelled or failed meanwhile)."""
        if self.status == "queued":
            self.status = "running"
            self._out = np.empty((self.n, *self.image_shape), np.float32)
        return self.status == "running"

    def store(self, lo: int, hi: int, images: np.ndarray) -> bool:
        """Images lo..hi-1 are drawn; True when that was the last of them."""
        self._out[lo:hi] = images
        self.finished += hi - lo
        return self.finished == self.n

    def make_run(self, schedule: Schedule, lo: int, hi: int, record: ModelRecord) -> Run:
        """The run for images lo..hi-1: the sampler's, or the edit's."""
        keep_x0 = self.previews > 0
        if self.edit is not None:
            return self.edit.make_run(schedule, self.options, lo, hi,
                                      ImageNoise(self.seed, range(lo, hi)), record,
                                      keep_x0=keep_x0)
        return image_run(schedule, self.options, record, self.seed, range(lo, hi),
                         keep_x0=keep_x0)

    def report_preview(self, lo: int, run) -> None:
        """Hand ``on_preview(job, lo, x0)`` the x_0 predicted for images lo.. at this step,
        every ``previews``-th step of their run and at its last."""
        if self._on_preview is not None and (run.steps_done % self.previews == 0 or run.done):
            self._on_preview(self, lo, run.x0)

    def report_progress(self) -> bool | None:
        """Call ``on_progress``; its answer (False: cancel). Its exception propagates."""
        if self._on_progress is None:
            return None
        return self._on_progress(self.steps_done, self.steps_total)

    def end(self, outcome: str, error: BaseException | None) -> None:
        """Record the outcome, wake waiters and tell ``on_done`` (whose failure is its own)."""
        self.status, self.error = outcome, error
        if outcome != "done":
            self._out = None
        self._done.set()
        if self._on_done is not None:
            try:
                self._on_done(self)
            except Exception:  # a listener's failure must not stop the scheduler
                pass


class _Group:
    """A slice [lo, hi) of one job's images, stepped together by one :class:`Run`."""

    def __init__(self, job: Job, lo: int, hi: int, schedule: Schedule, record: ModelRecord):
        self.job, self.lo, self.hi = job, lo, hi
        self.rows = hi - lo  # read a few times per group every tick: an attribute
        self.run = job.make_run(schedule, lo, hi, record)


class BatchScheduler:
    """Batches sampling steps across requests: one network call per tick over every row.

    ``max_batch``: images in flight (rows of one network call). ``max_queue``: requests
    waiting for rows; a request beyond it is refused at once (:class:`QueueFull`).
    ``max_n``, ``max_steps``: per-request limits. ``batching=False`` serves each request
    alone, in arrival order (its images ``max_batch`` at a time), to compare against.
    Call :meth:`tick` yourself, or :meth:`start` a thread that ticks while there is work.
    """

    def __init__(self, eps_fn: Callable, record: ModelRecord, *, max_batch: int = 64,
                 max_queue: int = 256, max_n: int = 64, max_steps: int | None = None,
                 batching: bool = True):
        for value, name in [(max_batch, "max_batch"), (max_queue, "max_queue"),
                            (max_n, "max_n")]:
            check_int(value, name)
        self.eps_fn, self.record = eps_fn, record
        self.schedule = record.build_schedule()
        T = self.schedule.num_timesteps
        self.max_steps = T if max_steps is None else max_steps
        # Above T the limit would be reported but never reached: a chain has T steps at most.
        check_int(self.max_steps, "max_steps", maximum=T)
        # An edit may take more calls than steps (inpainting's resampling): bounded alike.
        self.max_calls = EDIT_CALLS_PER_STEP * self.max_steps
        self.max_batch, self.max_queue, self.max_n = max_batch, max_queue, max_n
        self.batching = batching
        self.image_shape = tuple(record.image_shape)
        self._schedules: dict[tuple[int, str], Schedule] = {}
        self._queue: deque[Job] = deque()  # jobs with images not yet admitted, FIFO
        self._groups: list[_Group] = []  # the running batch, touched by the ticking thread
        self._live: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._thread: threading.Thread | None = None
        self._x = np.empty((max_batch, *self.image_shape), np.float32)
        self._t = np.empty(max_batch, np.float32)
        # Counters for metrics: read with snapshot().
        self.ticks = 0
        self.rows_run = 0
        self.network_seconds = 0.0
        self.images_done = 0
        self.outcomes: Counter[str] = Counter()
        self.refused = 0

    # === Requests ===

    def check(self, n, seed, options: SampleOptions) -> SampleOptions:
        """Raise :class:`OptionError` naming the first bad field; return the options with
        their step count resolved."""
        N.check(n)
        if n > self.max_n:
            raise OptionError("n", f"n must be at most {self.max_n} on this server, got "
                              f"{show_value(n)}; split the request")
        SEED.check(seed)
        steps = self.schedule.num_timesteps if options.steps is None else options.steps
        if steps > self.max_steps:
            raise OptionError("steps", f"steps must be at most {self.max_steps} on this server, "
                              f"got {steps}")
        return options.with_steps(steps)

    def submit(self, n: int, seed: int, options: SampleOptions | None = None, *,
               on_progress: Callable[[int, int], bool | None] | None = None,
               on_done: Callable[[Job], None] | None = None,
               job_id: str | None = None, edit: Edit | None = None, previews: int = 0,
               on_preview: Callable[[Job, int, np.ndarray], None] | None = None) -> Job:
        """Queue a request: n images drawn, or ``edit`` (a :class:`~runtime.edits.Edit` of
        n images). ``previews`` k > 0: ``on_preview(job, lo, x0)`` gets the x_0 predicted
        for images lo.. every k-th step. Raises :class:`OptionError` for a bad field,
        :class:`RequestIdInUse`, :class:`QueueFull` or :class:`ShuttingDown`."""
        if options is None:
            options = SampleOptions.make(defaults=self.record.defaults)
        if edit is not None and n != edit.n:
            raise OptionError("n", f"n is {n} but the edit has {edit.n} images")
        check_int(previews, "previews", minimum=0)
        options = self.check(n, seed, options)
        schedule = self._schedule(options)  # built now: a bad one never reaches a tick
        calls = None
        if edit is not None:
            edit.check(options)
            calls = edit.calls(schedule, self.record)
            if calls > self.max_calls:
                raise OptionError("resamples", f"the edit takes {calls} network calls per "
                                  f"image, more than this server's {self.max_calls}; use fewer "
                                  "steps or resamples")
        job = Job(n, seed, options, self.image_shape, on_progress, on_done, job_id, edit=edit,
                  calls=calls, previews=previews, on_preview=on_preview)
        with self._lock:
            if job.id in self._live:
                raise RequestIdInUse(f"request id {job.id!r} is already in use by a queued or "
                                     "running request; choose another")
            if self._closed:
                self.refused += 1
                raise ShuttingDown("the server is shutting down; retry on another server")
            if len(self._queue) >= self.max_queue:
                self.refused += 1
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); "
                                "retry later")
            self._queue.append(job)
            self._live[job.id] = job
            self._wake.notify()
        return job

    def get(self, job_id: str) -> Job | None:
        """A queued or running job by id (finished ones are forgotten)."""
        with self._lock:
            return self._live.get(job_id)

    def cancel(self, job_id: str) -> bool:
        job = self.get(job_id)
        if job is None:
            return False
        job.cancel()
        with self._lock:
            self._wake.notify()
        return True

    def _schedule(self, options: SampleOptions) -> Schedule:
        key = (options.steps, options.spacing)
        schedule = self._schedules.get(key)
        if schedule is None:
            schedule = options.respace(self.schedule)
            if len(self._schedules) >= 64:  # bounded: a step count per request could differ
                self._schedules.pop(next(iter(self._schedules)), None)
            self._schedules[key] = schedule
        return schedule

    # === The loop ===

    def idle(self) -> bool:
        with self._lock:
            return not self._queue and not self._groups

    def tick(self) -> int:
        """Drop cancelled work, admit waiting images, run one step for every row.
        Returns the rows that ran (0: nothing to do)."""
        self._drop_cancelled()
        self._admit()
        groups = self._groups
        if not groups:
            return 0
        rows = sum(g.rows for g in groups)
        x, t = self._x[:rows], self._t[:rows]
        pos = 0
        for g in groups:
            x[pos:pos + g.rows] = g.run.x
            t[pos:pos + g.rows] = g.run.t
            pos += g.rows
        start = time.perf_counter()
        try:
            eps = np.asarray(self.eps_fn(x, t))
            if eps.shape != x.shape:
                raise ValueError(f"the network returned shape {eps.shape}, expected {x.shape}")
        except Exception as err:  # every job in this call fails; the others go on
            for job in {g.job.id: g.job for g in groups}.values():
                self._finish(job, "failed", err)
            return rows
        finally:
            self.network_seconds += time.perf_counter() - start
            self.ticks += 1
            self.rows_run += rows
        # One NaN check for the whole call; only if it fails does each run check its rows
        # (and name its step).
        finite = bool(np.isfinite(eps).all())
        pos = 0
        advanced: dict[str, Job] = {}
        finished: list[_Group] = []
        for g in list(groups):
            e = eps[pos:pos + g.rows]
            pos += g.rows
            job = g.job
            if job.status != "running":
                continue  # failed by an earlier group this tick
            try:
                g.run.advance(e, finite=finite)
            except Exception as err:  # this request's own step (NaN, ...): it fails alone
                self._finish(job, "failed", err)
                continue
            job.steps_done += g.rows
            advanced[job.id] = job
            if job.previews:
                try:
                    job.report_preview(g.lo, g.run)
                except Exception as err:  # the listener's failure is its request's
                    self._finish(job, "failed", err)
                    continue
            if g.run.done:
                finished.append(g)
        for job in advanced.values():
            if job.status == "running":
                self._progress(job)
        for g in finished:
            if g.job.status == "running":
                self._retire(g)
        return rows

    def _admit(self) -> None:
        free = self.max_batch - sum(g.rows for g in self._groups)
        taken: list[tuple[Job, int, int]] = []
        with self._lock:
            while self._queue and free > 0:
                if not self.batching and (self._groups or taken):
                    break  # request at a time: the next waits for an empty batch
                job = self._queue[0]
                lo, hi = job.admit(free)
                free -= hi - lo
                taken.append((job, lo, hi))
                if not job.waiting:
                    self._queue.popleft()
        for job, lo, hi in taken:
            if job.begin():
                group = _Group(job, lo, hi, self._schedule(job.options), self.record)
                self._groups.append(group)
                if group.run.done:  # an edit with nothing to run (img2img at strength 0)
                    self._retire(group)

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled = {j.id: j for j in self._queue if j.cancel_requested}
        cancelled.update({g.job.id: g.job for g in self._groups if g.job.cancel_requested})
        for job in cancelled.values():
            if job.status in ("queued", "running"):
                self._finish(job, "cancelled", Cancelled(
                    f"request {job.id} cancelled after {job.steps_done} of "
                    f"{job.steps_total} image steps"))

    def _retire(self, g: _Group) -> None:
        self._groups.remove(g)
        self.images_done += g.rows
        if g.job.store(g.lo, g.hi, g.run.x):
            self._finish(g.job, "done", None)

    def _progress(self, job: Job) -> None:
        try:
            keep = job.report_progress()
        except Exception as err:
            self._finish(job, "failed", err)
            return
        if keep is False:
            job.cancel()

    def _finish(self, job: Job, outcome: str, error: BaseException | None) -> None:
        """Leave the queue and the batch, record the outcome, wake waiters (once)."""
        if job.status in OUTCOMES:
            return
        self._groups[:] = [g for g in self._groups if g.job is not job]
        with self._lock:
            if job.waiting and job in self._queue:
                self._queue.remove(job)
            self._live.pop(job.id, None)
        self.outcomes[outcome] += 1
        job.end(outcome, error)

    # === A thread that ticks ===

    def start(self) -> BatchScheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="batch-scheduler",
                                            daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._queue or self._groups or self._closed):
                    self._wake.wait()
                if self._closed and not (self._queue or self._groups):
                    return
            try:
                self.tick()
            except Exception as err:  # a bug must not leave requests waiting forever
                for job in {g.job.id: g.job for g in self._groups}.values():
                    self._finish(job, "failed", err)

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; finish (``drain``) or cancel the ones held, then stop."""
        with self._lock:
            self._closed = True
            held = list(self._live.values())
            self._wake.notify()
        if not drain:
            for job in held:
                job.cancel()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # drain ran out of time: cancel what is left
                for job in held:
                    job.cancel()
                self._thread.join()
        else:
            while self.tick():
                pass

    # === Metrics ===

    def snapshot(self) -> dict:
        with self._lock:
            queued = len(self._queue)
            waiting = sum(j.waiting for j in self._queue)
        in_flight = sum(g.rows for g in list(self._groups))
        return {
            "queue_requests": queued, "queue_images": waiting, "images_in_flight": in_flight,
            "max_batch": self.max_batch, "ticks": self.ticks, "rows_run": self.rows_run,
            "batch_fill": self.rows_run / (self.ticks * self.max_batch) if self.ticks else 0.0,
            "network_seconds": self.network_seconds, "images_done": self.images_done,
            "requests": {k: self.outcomes[k] for k in OUTCOMES}, "refused": self.refused,
        }

