"""``python -m runtime serve MODEL --ray``: the same server as a Ray Serve deployment.

Each replica is what one ``python -m runtime serve`` process runs: the model (shipped
through Ray's object store), one :class:`~runtime.serving.scheduler.BatchScheduler` and
the same ASGI app (:func:`runtime.serving.server.build_app`), mounted with
``serve.ingress``. Ray Serve runs the replicas (a number, or ``auto`` for its autoscaler)
and its HTTP proxy spreads requests over them, so a client sees the same API, routes and
JSON errors either way; a :class:`CancelBoard` actor carries ``DELETE`` to whichever
replica runs the request, and owns request ids across replicas: an id in use anywhere is
refused (409) everywhere.
"""

from __future__ import annotations

import contextlib
import math
import signal
import socket
import threading
import uuid

from .cluster import RayClusterError, ShippedModel, check_capacity, connect, ship_model

APP_NAME = "ddpm"


class CancelBoard:
    """A Ray actor: which replica runs which request id, and the cancels waiting for it.

    Ray Serve's router sends ``DELETE /v1/samples/{id}`` to any replica (the least busy,
    so rarely the one running the request); that replica posts the cancel here and the
    owner picks it up within :data:`POLL_S`.
    """

    def __init__(self):
        self.owner: dict[str, str] = {}
        self.pending: dict[str, set[str]] = {}

    def register(self, job_id: str, replica: str) -> bool:
        """Claim ``job_id`` for ``replica``; False if another request holds it."""
        if job_id in self.owner:
            return False
        self.owner[job_id] = replica
        return True

    def forget(self, job_id: str, replica: str) -> None:
        """Release ``job_id`` if ``replica`` holds it (a refused duplicate never does)."""
        if self.owner.get(job_id) == replica:
            del self.owner[job_id]
            self.pending.get(replica, set()).discard(job_id)

    def cancel(self, job_id: str) -> bool:
        replica = self.owner.get(job_id)
        if replica is None:
            return False
        self.pending.setdefault(replica, set()).add(job_id)
        return True

    def take(self, replica: str) -> list[str]:
        return sorted(self.pending.pop(replica, ()))


POLL_S = 0.1


def _board_scheduler(board, replica: str):
    """A BatchScheduler that claims its request ids on the board and cancels others' through
    it."""
    import ray

    from ..errors import RequestIdInUse
    from ..serving.scheduler import BatchScheduler

    class BoardScheduler(BatchScheduler):
        def submit(self, *args, on_done=None, job_id=None, **kwargs):
            job_id = job_id or uuid.uuid4().hex
            # Claimed before the job can run, finish and forget it; refused while another
            # replica's request holds it, so one id means one request on N replicas too.
            if not ray.get(board.register.remote(job_id, replica), timeout=10):
                raise RequestIdInUse(f"request id {job_id!r} is already in use by a queued "
                                     "or running request; choose another")

            def done(job):
                board.forget.remote(job.id, replica)
                if on_done is not None:
                    on_done(job)

            try:
                return super().submit(*args, on_done=done, job_id=job_id, **kwargs)
            except BaseException:
                board.forget.remote(job_id, replica)
                raise

        def cancel(self, job_id: str) -> bool:
            return super().cancel(job_id) or ray.get(board.cancel.remote(job_id), timeout=10)

        def cancel_posted(self) -> None:
            for job_id in ray.get(board.take.remote(replica), timeout=10):
                super().cancel(job_id)

    return BoardScheduler


class SamplingReplica:
    """One replica: a model copy, its batch scheduler and the server's app over it."""

    def __init__(self, shipped: dict, threads: int, load_kwargs: dict, limits: dict, board):
        from ..serving.server import build_app

        self.model = ShippedModel(shipped, threads=threads, load_kwargs=load_kwargs)
        self.asgi = build_app(self.model.pipe, **limits,
                              scheduler_cls=_board_scheduler(board, uuid.uuid4().hex))
        self._stop = threading.Event()
        threading.Thread(target=self._poll, name="cancel-board", daemon=True).start()

    def _poll(self) -> None:
        scheduler = self.asgi.state.scheduler
        while not self._stop.wait(POLL_S):
            with contextlib.suppress(Exception):  # the board gone: the deployment is ending
                scheduler.cancel_posted()

    def __serve_build_asgi_app__(self):
        # Called by Ray Serve after __init__; the app's lifespan starts and stops the scheduler.
        return self.asgi

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        model = getattr(self, "model", None)
        if model is not None:
            model.close()


def _resolve(host: str) -> str:
    """The address Ray's proxy binds for ``host`` (a name is resolved as the proxy does)."""
    with contextlib.suppress(OSError):
        return socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)[0][4][0]
    return host


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_on_ray(model, *, files: list, address: str, replicas, host: str, port: int,
                 threads: int, limits: dict, grace: float, load_kwargs: dict,
                 keep_alive: float = 5.0, log=print) -> None:
    """Deploy, print where it listens, and run until SIGTERM/SIGINT; then shut Serve down
    (each replica gets ``grace`` seconds for its in-flight requests)."""
    ray = connect(address)
    from ray import serve

    if replicas != "auto":
        check_capacity(ray, replicas, threads, "--replicas")
    port = port or free_port(host)
    # A replica holds requests waiting for rows too: the scheduler, not Ray, bounds the queue.
    in_flight = limits["max_queue"] + limits["max_batch"]
    deployment = serve.deployment(serve.ingress()(SamplingReplica)).options(
        name="sampler", num_replicas=replicas, max_ongoing_requests=in_flight,
        max_queued_requests=in_flight, graceful_shutdown_timeout_s=grace,
        ray_actor_options={"num_cpus": threads})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # Held here while Serve runs: a replica started later (autoscaling, a restart) loads it.
    shipped = ship_model(ray, files)
    board = ray.remote(CancelBoard).options(num_cpus=0).remote()
    # Ray's proxy takes whole seconds.
    serve.start(http_options={"host": host, "port": port,
                              "keep_alive_timeout_s": max(1, math.ceil(keep_alive))})
    try:
        try:
            serve.run(deployment.bind(shipped, threads, load_kwargs, limits, board), name=APP_NAME,
                      route_prefix="/", blocking=False)
        except RuntimeError as err:  # Serve's message ends in a replica's whole traceback
            raise RayClusterError(f"the Ray Serve deployment did not start "
                                  f"({str(err).strip().splitlines()[0]}); its replicas' logs "
                                  "are under /tmp/ray/session_latest/logs/serve/") from None
        from ..serving.server import bind_note

        log(f"serving {model} on http://{host}:{port} (Ray Serve, {replicas} replicas, "
            f"max batch {limits['max_batch']} each){bind_note(_resolve(host))}")
        stop.wait()
    finally:
        serve.shutdown()
    log("server stopped")
