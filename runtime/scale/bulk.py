"""``python -m runtime bulk``: a :class:`~runtime.scale.shards.BulkJob` drawn by Ray actors.

Why actors and not Ray Data: Ray's batch-inference guide puts a stateful model in a
``map_batches`` callable class, i.e. an actor per model copy, which is what this is. The
rest of what Ray Data adds does not apply: the inputs are index ranges (nothing to read,
stream or preprocess), and the outputs must be this job's own atomic, resumable shards,
which Ray Data's writers know nothing of; it would also pull pandas and pyarrow into the
extra. Each actor reserves ``threads`` CPUs, so Ray never runs more sampling threads than
the cluster has cores, and loads the model once from bytes the driver put in the object
store (a worker machine needs no copy of the file). The driver writes every shard, so only
it needs the output folder. A worker that dies is replaced and its shards drawn again.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StudentSamplingWarning
from .cluster import (
    RayClusterError,
    ShippedModel,
    check_capacity,
    cluster_cpus,
    connect,
    ship_model,
)
from .shards import BulkJob, Shard

IN_FLIGHT_PER_WORKER = 2  # a queued shard starts the moment the previous one is sent back
MAX_REPLACEMENTS_PER_WORKER = 2


class SampleWorker:
    """One model copy on one Ray worker: draws whole shards, image k as ``pipe.sample`` would."""

    def __init__(self, shipped: dict, threads: int, load_kwargs: dict):
        self.model = ShippedModel(shipped, threads=threads, load_kwargs=load_kwargs)

    def close(self) -> None:
        self.model.close()

    def sample(self, first: int, count: int, seed: int, options: dict):
        """The images and when this worker started and ended them (its own clock)."""
        start = time.time()
        with warnings.catch_warnings():  # a student sampled off its steps: the driver said so
            warnings.simplefilter("ignore", StudentSamplingWarning)
            images = self.model.pipe.sample(count, seed, first_index=first, progress=False,
                                            **options)
        return images, start, time.time()


@dataclass
class BulkStats:
    workers: int = 0
    threads: int = 0
    shards_total: int = 0
    shards_written: int = 0
    images_written: int = 0
    startup_s: float = 0.0        # joining Ray and loading the model on every worker
    sampling_s: float = 0.0       # from the first shard sent to the last one written
    worker_busy_s: float = 0.0    # sum over shards of the time a worker spent sampling
    workers_replaced: int = 0     # workers that died mid-run and were started again
    # Per worker, from the end of one shard to the start of the next: what Ray costs a shard
    # (returning the images, dispatching the next call; the driver writes meanwhile).
    gaps_s: list = field(default_factory=list)

    @property
    def overhead_per_shard_s(self) -> float | None:
        return statistics.median(self.gaps_s) if self.gaps_s else None


def run(job: BulkJob, files: list[Path], *, address: str = "local", workers: int | None = None,
        threads: int = 1, load_kwargs: dict | None = None, progress: bool = True) -> BulkStats:
    """Draw the job's missing shards on Ray with the model made of ``files``
    (:func:`runtime.backends.model_files`); returns what was done and how long it took."""
    stats = BulkStats(threads=threads, shards_total=len(job.shards))
    todo = job.missing()
    if not todo:
        job.write_manifest(complete=True)
        return stats
    t0 = time.perf_counter()
    ray = connect(address)
    from ray.exceptions import RayActorError, RayTaskError

    if workers is None:
        workers = max(1, cluster_cpus(ray) // threads)
    check_capacity(ray, workers, threads, "--workers")
    workers = min(workers, len(todo))
    stats.workers = workers
    shipped = ship_model(ray, files)
    # A worker that dies (its machine lost, say) is replaced here and its shards drawn
    # again, a few times over; Ray's own actor restarts would need the constructor's
    # arguments kept alive by Ray for ever.
    actor_cls = ray.remote(SampleWorker).options(num_cpus=threads)
    alive = [actor_cls.remote(shipped, threads, load_kwargs or {}) for _ in range(workers)]
    everyone = list(alive)
    options = {k: v for k, v in job.options.items() if k not in ("n", "seed", "shard_size")}
    queue: deque[Shard] = deque(todo)
    pending: dict = {}
    in_flight: Counter = Counter()
    last_end: dict = {}

    def fill() -> None:
        for actor in alive:
            while queue and in_flight[actor] < IN_FLIGHT_PER_WORKER:
                shard = queue.popleft()
                ref = actor.sample.remote(shard.first, shard.count, job.options["seed"], options)
                pending[ref] = (shard, actor)
                in_flight[actor] += 1

    def replace(actor, err) -> None:
        alive.remove(actor)
        stats.workers_replaced += 1
        if stats.workers_replaced > MAX_REPLACEMENTS_PER_WORKER * workers:
            raise RayClusterError(f"sampling workers keep dying ({_first_line(err)}); the "
                                  "shards written so far are kept: rerun to resume")
        everyone.append(actor_cls.remote(shipped, threads, load_kwargs or {}))
        alive.append(everyone[-1])

    bar = None
    try:
        # Warm-up: every actor has loaded its model before the clock for sampling starts.
        ray.get([a.__ray_ready__.remote() for a in alive])
        stats.startup_s = time.perf_counter() - t0
        bar = _bar(progress, job.options["n"], job.options["n"] - sum(s.count for s in todo))
        t1 = time.perf_counter()
        fill()
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            shard, actor = pending.pop(ref)
            in_flight[actor] -= 1
            try:
                images, began, ended = ray.get(ref)
            except RayActorError as err:
                queue.appendleft(shard)
                if actor in alive:
                    replace(actor, err)
                fill()
                continue
            job.write_shard(shard, images)
            stats.shards_written += 1
            stats.images_written += shard.count
            stats.worker_busy_s += ended - began
            if actor in last_end:
                stats.gaps_s.append(began - last_end[actor])
            last_end[actor] = ended
            if bar is not None:
                bar.update(shard.count)
            fill()
        stats.sampling_s = time.perf_counter() - t1
    except RayTaskError as err:
        raise _unwrap(err) from None
    except RayActorError as err:  # a worker that cannot even start (a model it cannot load)
        raise RayClusterError(f"a sampling worker died while starting ({_first_line(err)}); "
                              "the shards written so far are kept: rerun to resume") from None
    finally:
        if bar is not None:
            bar.close()
        _stop(ray, everyone)
    job.write_manifest(complete=True)
    return stats


def _stop(ray, actors) -> None:
    """Let each worker delete its model copy, then end it (a stuck one is ended anyway)."""
    with contextlib.suppress(Exception):  # a dead or stuck worker is ended below all the same
        ray.get([a.close.remote() for a in actors], timeout=30)
    for actor in actors:
        ray.kill(actor)


def _unwrap(err) -> BaseException:
    """The worker's own exception (a ModelFileError, NonFiniteError...) with its one line."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    return RayClusterError(f"a sampling worker failed: {_first_line(err)}")


def _first_line(err) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="bulk", unit="image")
