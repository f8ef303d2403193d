"""HTTP server over the batching engine: ``python -m runtime serve MODEL``.

Starlette on uvicorn, metrics by prometheus_client; all three come with the ``serve``
extra (``pip install .[serve]``) and are imported only by this module.

``POST /v1/samples`` takes JSON ``{n, seed, sampler, steps, spacing, variance, eta}`` plus
``format`` ("grid": one PNG; "png": JSON with one base64 PNG per image; "npz"), ``stream``
(server-sent events: progress, then the result) and ``id`` (optional; names the request
for ``DELETE /v1/samples/{id}``). The options are echoed in the ``X-Sample-Options``
header (and in the JSON and npz bodies). A client that disconnects cancels its request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import math
import re
import secrets
import signal
import socket
import time

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import Engine, Job, Options
from .errors import MAX_SEED, Cancelled, Overloaded
from .images import make_grid, png_bytes, to_uint8

FORMATS = ("grid", "png", "npz")
FIELDS = {"n", "seed", "sampler", "steps", "spacing", "variance", "eta", "format", "stream",
          "id"}
MAX_BODY = 16 << 10  # a request is a few small fields
ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def error(status: int, message: str, **headers) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


# === Request parsing ===

def _int_field(body: dict, name: str, default):
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer, got {json.dumps(value)[:40]}")
    return value


def parse_request(body) -> dict:
    """The request's fields, typed and defaulted; BadRequest names the first bad one."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object such as {\"n\": 4, \"seed\": 0}")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; expected some of {sorted(FIELDS)}")
    req = {"n": _int_field(body, "n", 1), "seed": _int_field(body, "seed", None),
           "steps": _int_field(body, "steps", None)}
    if req["n"] is None:
        raise BadRequest("n must be an integer, got null")
    if req["seed"] is None:
        req["seed"] = secrets.randbits(63)  # echoed, so the images can be made again
    elif not 0 <= req["seed"] <= MAX_SEED:
        raise BadRequest(f"seed must be in [0, 2**63 - 1], got {req['seed']}", 422)
    for name, default in [("sampler", "ddpm"), ("variance", "fixedlarge"),
                          ("spacing", "linspace"), ("format", "grid")]:
        value = body.get(name, default)
        if not isinstance(value, str):
            raise BadRequest(f"{name} must be a string, got {json.dumps(value)[:40]}")
        req[name] = value
    if req["format"] not in FORMATS:
        raise BadRequest(f"unknown format {req['format']!r}; expected one of {FORMATS}")
    eta = body.get("eta", 0.0)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta):
        raise BadRequest(f"eta must be a finite number, got {json.dumps(eta)[:40]}")
    req["eta"] = float(eta)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"stream must be true or false, got {json.dumps(stream)[:40]}")
    req["stream"] = stream
    job_id = body.get("id")
    if job_id is not None and not (isinstance(job_id, str) and ID_PATTERN.fullmatch(job_id)):
        raise BadRequest("id must be 1-64 characters of letters, digits, '_', '.', '-'")
    req["id"] = job_id
    return req


async def read_json(request: Request):
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise BadRequest(f"the body must be at most {MAX_BODY} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise BadRequest(f"the body must be at most {MAX_BODY} bytes", 413)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadRequest(f"the body is not valid JSON ({err})") from None
    except RecursionError:
        raise BadRequest("the body's JSON nests too deeply; a request is one flat object") \
            from None


# === Encoding ===

def encode(images: np.ndarray, fmt: str, echo: dict) -> tuple[bytes, str]:
    """uint8 [n, H, W, C] -> (body, media type) in the client's format."""
    if fmt == "grid":
        return png_bytes(make_grid(images)), "image/png"
    if fmt == "png":
        pngs = [base64.b64encode(png_bytes(image)).decode() for image in images]
        return json.dumps(echo | {"images": pngs}).encode(), "application/json"
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images, seed=np.uint64(echo["seed"]),
                        options=np.array(json.dumps(echo)))
    return buf.getvalue(), "application/x-npz"


# === Metrics ===

class EngineCollector:
    """The engine's counters, read at scrape time."""

    def __init__(self, engine: Engine, invalid: dict):
        self.engine, self.invalid = engine, invalid

    def collect(self):
        snap = self.engine.snapshot()
        for name, doc, value in [
            ("ddpm_queue_requests", "requests waiting for rows", snap["queue_requests"]),
            ("ddpm_queue_images", "images waiting for rows", snap["queue_images"]),
            ("ddpm_images_in_flight", "images in the running batch", snap["images_in_flight"]),
            ("ddpm_max_batch", "images the running batch may hold", snap["max_batch"]),
            ("ddpm_batch_fill", "mean rows per network call / max_batch", snap["batch_fill"]),
        ]:
            yield GaugeMetricFamily(name, doc, value=value)
        for name, doc, value in [
            ("ddpm_ticks", "network calls made", snap["ticks"]),
            ("ddpm_rows", "image steps run (rows over all network calls)", snap["rows_run"]),
            ("ddpm_network_seconds", "seconds spent in network calls", snap["network_seconds"]),
            ("ddpm_images", "images finished", snap["images_done"]),
        ]:
            yield CounterMetricFamily(name, doc, value=value)
        requests = CounterMetricFamily("ddpm_requests", "sample requests by outcome",
                                       labels=["outcome"])
        for outcome, count in snap["requests"].items():
            requests.add_metric([outcome], count)
        requests.add_metric(["refused"], snap["refused"])
        requests.add_metric(["invalid"], self.invalid["count"])
        yield requests


# === The app ===

def create_app(engine: Engine, model_info: dict) -> Starlette:
    """The ASGI app; it starts the engine's thread on startup and cancels what is left on
    shutdown (after the server's grace period for in-flight requests)."""
    registry = CollectorRegistry()
    invalid = {"count": 0}
    registry.register(EngineCollector(engine, invalid))
    latency = Histogram("ddpm_request_seconds", "time from submit to result, by sampler",
                        ["sampler"], registry=registry,
                        buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
    state = {"draining": False}
    data_range = engine.record.data_range

    async def samples(request: Request) -> Response:
        try:
            req = parse_request(await read_json(request))
        except BadRequest as err:
            invalid["count"] += 1
            return error(err.status, str(err))
        except ClientDisconnect:
            return error(400, "the client went away")
        options = Options(req["sampler"], req["steps"], req["variance"], req["eta"],
                          req["spacing"])
        loop = asyncio.get_running_loop()
        finished = loop.create_future()
        progress = {"event": asyncio.Event(), "steps": (0, 0)}

        def on_done(_job):
            loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))

        def on_progress(done, total):
            def publish():
                progress["steps"] = (done, total)
                progress["event"].set()
            loop.call_soon_threadsafe(publish)

        try:
            job = engine.submit(req["n"], req["seed"], options, on_done=on_done,
                                on_progress=on_progress if req["stream"] else None,
                                job_id=req["id"])
        except Overloaded as err:
            status = 503 if state["draining"] or "shutting down" in str(err) else 429
            return error(status, str(err), **{"Retry-After": "1"})
        except ValueError as err:
            invalid["count"] += 1
            status = 409 if "already in use" in str(err) else 422
            return error(status, str(err))
        echo = {"id": job.id, "n": job.n, "seed": job.seed, "sampler": options.sampler,
                "steps": job.steps, "spacing": options.spacing, "variance": options.variance,
                "eta": options.eta}
        if req["stream"]:
            return StreamingResponse(_events(job, finished, progress, req["format"], echo),
                                     media_type="text/event-stream",
                                     headers={"X-Request-Id": job.id, "Cache-Control": "no-cache"})
        try:
            if not await _until_done_or_gone(request, finished):
                job.cancel()  # the client went away: its rows go at the next tick
                return error(499, "client disconnected")
        except asyncio.CancelledError:  # the server's grace period ran out
            job.cancel()
            raise
        return await _result_response(job, req["format"], echo, latency, data_range,
                                      state["draining"])

    async def _events(job: Job, finished, progress, fmt, echo):
        try:
            yield _sse("accepted", echo)
            while not finished.done():
                waiter = asyncio.ensure_future(progress["event"].wait())
                await asyncio.wait({waiter, finished}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                progress["event"].clear()
                done, total = progress["steps"]
                if total and not finished.done():
                    yield _sse("progress", {"steps_done": done, "steps_total": total})
            outcome = await _outcome(job, fmt, echo, latency, data_range, state["draining"])
            if isinstance(outcome, Response):
                yield _sse("error", json.loads(outcome.body) | {"status": outcome.status_code})
            else:
                body, media = outcome
                yield _sse("result", echo | {"media_type": media,
                                             "data": base64.b64encode(body).decode()})
        finally:
            job.cancel()  # a no-op once done; on a disconnect it frees the rows

    async def cancel(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        if not engine.cancel(job_id):
            return error(404, f"no queued or running request {job_id!r}")
        return JSONResponse({"id": job_id, "status": "cancelling"}, status_code=202)

    async def healthz(_request: Request) -> Response:
        if state["draining"]:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def model(_request: Request) -> Response:
        return JSONResponse(model_info)

    async def metrics(_request: Request) -> Response:
        return Response(generate_latest(registry), media_type=PROMETHEUS_TEXT)

    async def http_error(_request: Request, exc: HTTPException) -> Response:
        return error(exc.status_code, exc.detail, **(exc.headers or {}))

    async def internal_error(_request: Request, exc: Exception) -> Response:
        return error(500, f"internal error ({type(exc).__name__})")

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        state["draining"] = True
        engine.close(drain=False, timeout=30)

    routes = [Route("/v1/samples", samples, methods=["POST"]),
              Route("/v1/samples/{job_id}", cancel, methods=["DELETE"]),
              Route("/healthz", healthz), Route("/v1/model", model),
              Route("/metrics", metrics)]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: internal_error})
    app.state.flags = state
    return app


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def _until_done_or_gone(request: Request, finished) -> bool:
    """Wait for the job; False if the client disconnects first."""
    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({watcher, finished}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    return finished.done()


async def _outcome(job: Job, fmt: str, echo: dict, latency, data_range, draining=False):
    """(body, media type) of a finished job, or the error response."""
    try:
        images = job.result(timeout=0)
    except Cancelled as err:
        if draining:
            return error(503, "the server is shutting down; retry on another server")
        return error(409, str(err))
    except Exception as err:  # a failed network call: the message, never a traceback
        return error(500, f"sampling failed: {err}")
    latency.labels(job.options.sampler).observe(time.monotonic() - job.submitted)
    uint8 = to_uint8(images, data_range)
    return await asyncio.to_thread(encode, uint8, fmt, echo)


async def _result_response(job, fmt, echo, latency, data_range, draining) -> Response:
    outcome = await _outcome(job, fmt, echo, latency, data_range, draining)
    if isinstance(outcome, Response):
        return outcome
    body, media = outcome
    return Response(body, media_type=media,
                    headers={"X-Request-Id": job.id, "X-Sample-Options": json.dumps(echo)})


def build_app(pipe, *, max_batch: int, max_queue: int, max_n: int, max_steps: int | None,
              batching: bool, engine_cls: type[Engine] = Engine, log=print) -> Starlette:
    """The engine over ``pipe`` and the app over the engine (``app.state.engine``): what
    one server process runs, and what each Ray Serve replica runs (with its own
    ``engine_cls``)."""
    if pipe.max_batch is not None and max_batch > pipe.max_batch:
        log(f"--max-batch {max_batch} is more than {pipe.source} takes; using {pipe.max_batch}")
        max_batch = pipe.max_batch
    engine = engine_cls(pipe.eps_fn, pipe.record, max_batch=max_batch, max_queue=max_queue,
                        max_n=max_n, max_steps=max_steps, batching=batching)
    info = {"record": json.loads(pipe.record.to_json()), "source": pipe.source,
            "backend": pipe.backend_name,
            "limits": {"max_batch": max_batch, "max_queue": max_queue, "max_n": max_n,
                       "max_steps": engine.max_steps, "batching": batching}}
    app = create_app(engine, info)
    app.state.engine = engine
    return app


def serve(pipe, *, host: str, port: int, max_batch: int, max_queue: int, max_n: int,
          max_steps: int | None, batching: bool, grace: float, log=print) -> None:
    """Run until SIGTERM/SIGINT: in-flight requests get ``grace`` seconds, then are
    cancelled; returns normally (exit status 0)."""
    import uvicorn

    app = build_app(pipe, max_batch=max_batch, max_queue=max_queue, max_n=max_n,
                    max_steps=max_steps, batching=batching, log=log)
    engine = app.state.engine
    max_batch = engine.max_batch
    sock = socket.create_server((host, port))
    flags = app.state.flags

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            """Stop accepting; after ``grace`` seconds cancel what is left, so every
            request still gets an answer (503) before uvicorn's own deadline."""
            flags["draining"] = True

            async def cancel_after_grace():
                await asyncio.sleep(grace)
                await asyncio.to_thread(engine.close, drain=False, timeout=30)

            task = asyncio.ensure_future(cancel_after_grace())
            try:
                await super().shutdown(sockets)
            finally:
                task.cancel()

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=grace + 30,
                            limit_concurrency=max_queue + max_batch + 64, access_log=False)
    server = Server(config)
    # uvicorn re-raises the signal it stopped on once it is done; a no-op handler makes
    # that a clean exit instead of a death by SIGTERM.
    signal.signal(signal.SIGTERM, lambda *_: None)
    bound_host, bound_port = sock.getsockname()[:2]
    log(f"serving {pipe.source} on http://{bound_host}:{bound_port} "
        f"({'step-level batching' if batching else 'one request at a time'}, "
        f"max batch {max_batch}, max queue {max_queue})")
    try:
        server.run(sockets=[sock])
    finally:
        engine.close(drain=False, timeout=30)
        sock.close()
    log("server stopped")
