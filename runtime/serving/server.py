"""HTTP server over the batching scheduler: ``python -m runtime serve MODEL``.

Starlette on uvicorn, metrics by prometheus_client; all three come with the ``serve``
extra (``pip install .[serve]``) and are imported only by this module.

``POST /v1/samples`` takes JSON ``{n, seed}``, the sampling options (``sampler``, ``steps``,
``spacing`` and each sampler's own, from :mod:`runtime.options`), ``format`` ("grid": one
PNG; "png": JSON with one base64 PNG per image; "npz"), ``stream`` (server-sent events:
progress, then the result) and ``id`` (optional; names the request for
``DELETE /v1/samples/{id}``). The options are echoed in the ``X-Sample-Options``
header (and in the JSON and npz bodies). A client that disconnects cancels its request.

Every error is JSON ``{"error": message, "code": code}`` (plus ``"field"`` for a bad
field); :data:`ERROR_CODES` lists the codes and their HTTP statuses.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import ipaddress
import json
import math
import re
import secrets
import signal
import socket
import time
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..edits import EDITS, broadcast_images, edit_class, images_from_uint8, mask_from_array
from ..errors import (
    Cancelled,
    OptionError,
    QueueFull,
    RequestIdInUse,
    ShuttingDown,
)
from ..images import make_grid, png_bytes, read_png, to_uint8
from ..options import SEED, N, Option, SampleOptions, option_names, show_value
from .scheduler import BatchScheduler, Job

FORMATS = ("grid", "png", "npz")
REQUEST_FIELDS = ("format", "stream", "id", "previews")
MAX_BODY = 16 << 10  # a request is a few small fields
# An edit carries its images: base64 PNGs at most this many bytes per pixel value each
# (PNG's worst case is a little over 1; base64 adds a third), up to the server's max n.
EDIT_BYTES_PER_VALUE = 2
PREVIEWS = Option("previews", int, 0, "stream the predicted x_0 every k steps (0: none)",
                  low=0)
ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
# Longer integers are kept as a stand-in that names their length: Python refuses to convert
# over 4300 digits, and none is a valid value of any field.
MAX_INT_DIGITS = 100

# code -> (HTTP status, meaning): the machine-readable "code" of every error body.
ERROR_CODES = {
    "bad_request": (400, "the body is not a JSON object of known fields of the right types"),
    "invalid_field": (422, "a field's value is out of range or not one of its choices"),
    "body_too_large": (413, f"the body is over {MAX_BODY} bytes (an edit's: its images' "
                            "worth)"),
    "body_timeout": (408, "the body did not arrive within the server's --body-timeout"),
    "id_in_use": (409, "the request's id names a queued or running request"),
    "cancelled": (409, "the request was cancelled (DELETE, or its client went away)"),
    "queue_full": (429, "too many requests are waiting; retry after Retry-After seconds"),
    "too_many_connections": (429, "this client holds --max-client-connections connections "
                                  "already; reuse or close one"),
    "shutting_down": (503, "the server is draining; retry on another server"),
    "not_found": (404, "no such route, or no queued or running request with that id"),
    "method_not_allowed": (405, "the route does not take that method"),
    "client_disconnected": (499, "the client went away before the result"),
    "sampling_failed": (500, "the network failed or returned NaN/inf for this request"),
    "internal_error": (500, "a bug in the server"),
}
_BY_STATUS = {status: code for code, (status, _) in reversed(ERROR_CODES.items())}


class BadRequest(Exception):
    def __init__(self, message: str, code: str = "bad_request", field: str | None = None):
        super().__init__(message)
        self.code, self.field = code, field

    @classmethod
    def of(cls, err: OptionError) -> BadRequest:
        """The answer to a bad field: 400 for a wrong type, 422 for a wrong value."""
        return cls(str(err), "bad_request" if err.kind == "type" else "invalid_field",
                   err.field)


def error(code: str, message: str, *, field: str | None = None, **headers) -> JSONResponse:
    body = {"error": message, "code": code}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=ERROR_CODES[code][0], headers=headers or None)


# === Request parsing ===

class HugeInt(int):
    """An integer literal too long to be any field's value, kept by its length."""

    def __repr__(self) -> str:
        return f"an integer of {self.digits} digits"

    __str__ = __repr__


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) <= MAX_INT_DIGITS:
        return int(text)
    huge = HugeInt(-(10 ** MAX_INT_DIGITS) if text.startswith("-") else 10 ** MAX_INT_DIGITS)
    huge.digits = len(text.lstrip("-"))
    return huge


def parse_request(body, defaults=None, *, extra=()) -> dict:
    """The request's fields, typed and defaulted (sampling options from the model's
    ``defaults``, then the schema's); BadRequest names the first bad one. ``extra``: the
    route's own fields (an edit's), left for the route to read."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object such as {\"n\": 4, \"seed\": 0}")
    fields = {"n", "seed", *option_names(), *REQUEST_FIELDS, *extra}
    unknown = sorted(set(body) - fields)
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; expected some of {sorted(fields)}")
    try:
        if body.get("n", 1) is None:
            raise OptionError("n", "n must be an integer, got None", kind="type")
        req = {"n": N.check(body.get("n", 1)),
               "options": SampleOptions.from_json(body, defaults=defaults)}
        seed = body.get("seed")
        # No seed: one is drawn and echoed, so the images can be made again.
        req["seed"] = secrets.randbits(63) if seed is None else SEED.check(seed)
    except OptionError as err:
        raise BadRequest.of(err) from None
    fmt = body.get("format", "grid")
    if fmt not in FORMATS:
        raise BadRequest(f"unknown format {show_value(fmt)}; expected one of {FORMATS}",
                         field="format")
    req["format"] = fmt
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"stream must be true or false, got {show_value(stream)}",
                         field="stream")
    req["stream"] = stream
    job_id = body.get("id")
    if job_id is not None and not (isinstance(job_id, str) and ID_PATTERN.fullmatch(job_id)):
        raise BadRequest("id must be 1-64 characters of letters, digits, '_', '.', '-'",
                         field="id")
    req["id"] = job_id
    previews = body.get("previews", 0)
    try:
        req["previews"] = PREVIEWS.check(previews)
    except OptionError as err:
        raise BadRequest.of(err) from None
    if req["previews"] and not stream:
        raise BadRequest("previews are sent as stream events; set \"stream\": true",
                         field="previews")
    return req


def parse_edit(kind: str, body: dict, scheduler: BatchScheduler) -> dict:
    """An edit request: the common fields, then ``image`` (one base64 PNG, or a list of
    them), ``mask`` (inpaint) and the edit's options; BadRequest names the first bad one."""
    cls = edit_class(kind)
    own = [o.name for o in cls.options]
    extra = ["image", *(["mask"] if cls.takes_mask else []), *own]
    record = scheduler.record
    n_given = isinstance(body, dict) and body.get("n") is not None
    req = parse_request(body, record.defaults, extra=extra)
    shape, data_range = record.image_shape, record.data_range
    try:
        if "image" not in body:
            raise OptionError("image", "image is missing: a base64 PNG, or a list of them",
                              kind="type")
        pngs = body["image"] if isinstance(body["image"], list) else [body["image"]]
        if not 1 <= len(pngs) <= scheduler.max_n:
            raise OptionError("image", f"give 1 to {scheduler.max_n} images, got {len(pngs)}")
        if n_given and req["n"] > scheduler.max_n:  # before one image is repeated n times
            raise OptionError("n", f"n must be at most {scheduler.max_n} on this server, got "
                              f"{show_value(req['n'])}; split the request")
        pixels = np.stack([decode_png(p, shape, "image") for p in pngs])
        images = broadcast_images(images_from_uint8(pixels, shape, data_range),
                                  req["n"] if n_given else None)
        mask = None
        if cls.takes_mask:
            if "mask" not in body:
                raise OptionError("mask", "mask is missing: a base64 PNG, white (255) where "
                                  "the image is kept, black (0) where it is filled in",
                                  kind="type")
            mask = mask_from_array(decode_png(body["mask"], shape, "mask", mask=True), shape)
        edit = cls(images, mask=mask, **{k: body[k] for k in own if body.get(k) is not None})
    except OptionError as err:
        raise BadRequest.of(err) from None
    except ValueError as err:  # the pixels: size, channels, a mask that is not binary
        raise BadRequest(str(err), "invalid_field",
                         "mask" if str(err).startswith("mask") else "image") from None
    req["n"], req["edit"] = edit.n, edit
    return req


def decode_png(data, shape, field: str, *, mask: bool = False) -> np.ndarray:
    """A base64 PNG field -> uint8 [H, W, C] of the model's size; OptionError names the
    field. Its size is checked from the header, before the pixels are decoded."""
    if not isinstance(data, str):
        raise OptionError(field, f"{field} must be a base64 PNG string, got "
                          f"{type(data).__name__}", kind="type")
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        raise OptionError(field, f"{field} is not valid base64", kind="type") from None
    try:
        return read_png(raw, shape, field, mask=mask)
    except ValueError as err:
        raise OptionError(field, str(err)) from None


async def read_json(request: Request, timeout: float = 10.0, max_body: int = MAX_BODY):
    """The body as JSON, read within ``timeout`` seconds: a body that never ends would hold
    its connection and its task for ever."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_body):
        raise BadRequest(f"the body must be at most {max_body} bytes", "body_too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body:
                    raise BadRequest(f"the body must be at most {max_body} bytes",
                                     "body_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise BadRequest(f"the body did not arrive within {timeout:g} s "
                         f"({size} bytes came)", "body_timeout") from None
    try:
        return json.loads(b"".join(chunks), parse_int=_parse_int)
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

class SchedulerCollector:
    """The scheduler's counters, read at scrape time."""

    def __init__(self, scheduler: BatchScheduler, invalid: dict):
        self.scheduler, self.invalid = scheduler, invalid

    def collect(self):
        snap = self.scheduler.snapshot()
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

def create_app(scheduler: BatchScheduler, model_info: dict, *,
               body_timeout: float = 10.0) -> Starlette:
    """The ASGI app; it starts the scheduler's thread on startup and cancels what is left on
    shutdown (after the server's grace period for in-flight requests). A request body must
    arrive within ``body_timeout`` seconds."""
    registry = CollectorRegistry()
    # The standard process_* series (CPU seconds, resident memory, open files): what an
    # operator watches for leaks, and how a load test sees the cores the server used.
    ProcessCollector(registry=registry)
    invalid = {"count": 0}
    registry.register(SchedulerCollector(scheduler, invalid))
    latency = Histogram("ddpm_request_seconds", "time from submit to result, by sampler",
                        ["sampler"], registry=registry,
                        buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
    state = {"draining": False}
    data_range = scheduler.record.data_range

    edit_body = MAX_BODY + EDIT_BYTES_PER_VALUE * (scheduler.max_n + 1) * math.prod(
        scheduler.image_shape)

    async def samples(request: Request) -> Response:
        return await handle(request, None)

    async def edits(request: Request) -> Response:
        kind = request.path_params["kind"]
        if kind not in EDITS:
            return error("not_found", f"no edit {kind!r}; edits are {sorted(EDITS)}")
        return await handle(request, kind)

    async def handle(request: Request, kind: str | None) -> Response:
        try:
            if kind is None:
                req = parse_request(await read_json(request, body_timeout),
                                    scheduler.record.defaults)
            else:
                body = await read_json(request, body_timeout, edit_body)
                req = await asyncio.to_thread(parse_edit, kind, body, scheduler)
        except BadRequest as err:
            invalid["count"] += 1
            # The rest of a late body may still come: the connection cannot be reused.
            close = {"Connection": "close"} if err.code == "body_timeout" else {}
            return error(err.code, str(err), field=err.field, **close)
        except ClientDisconnect:
            return error("client_disconnected", "the client went away")
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

        def on_preview(job, lo, x0):
            # A copy, handed over: the PNG is made off the scheduler's thread.
            event = {"steps_done": job.steps_done, "steps_total": job.steps_total,
                     "first_image": lo, "images": len(x0)}
            loop.call_soon_threadsafe(progress["previews"].append, (event, x0.copy()))
            loop.call_soon_threadsafe(progress["event"].set)

        progress["previews"] = []
        try:
            job = scheduler.submit(req["n"], req["seed"], req["options"], on_done=on_done,
                                   on_progress=on_progress if req["stream"] else None,
                                   job_id=req["id"], edit=req.get("edit"),
                                   previews=req["previews"],
                                   on_preview=on_preview if req["previews"] else None)
        except ShuttingDown as err:
            return error("shutting_down", str(err), **{"Retry-After": "1"})
        except QueueFull as err:
            code = "shutting_down" if state["draining"] else "queue_full"
            return error(code, str(err), **{"Retry-After": "1"})
        except RequestIdInUse as err:
            invalid["count"] += 1
            return error("id_in_use", str(err), field="id")
        except OptionError as err:
            invalid["count"] += 1
            return error("invalid_field", str(err), field=err.field)
        echo = {"id": job.id, "n": job.n, "seed": job.seed, **job.options.to_dict(),
                **(job.edit.to_dict() if job.edit is not None else {})}
        # A distilled student asked for other sampling than its own: served, and said.
        off = scheduler.record.off_distillation(job.options, "this model")
        if off is not None:
            echo["warning"] = off
        if req["stream"]:
            return StreamingResponse(_events(job, finished, progress, req["format"], echo),
                                     media_type="text/event-stream",
                                     headers={"X-Request-Id": job.id, "Cache-Control": "no-cache"})
        try:
            if not await _until_done_or_gone(request, finished):
                job.cancel()  # the client went away: its rows go at the next tick
                return error("client_disconnected", "client disconnected")
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
                while progress["previews"]:
                    yield _sse("preview", await preview(*progress["previews"].pop(0)))
            while progress["previews"]:  # the last step's: queued before the end was
                yield _sse("preview", await preview(*progress["previews"].pop(0)))
            outcome = await _outcome(job, fmt, echo, latency, data_range, state["draining"])
            if isinstance(outcome, Response):
                yield _sse("error", json.loads(outcome.body) | {"status": outcome.status_code})
            else:
                body, media = outcome
                yield _sse("result", echo | {"media_type": media,
                                             "data": base64.b64encode(body).decode()})
        finally:
            job.cancel()  # a no-op once done; on a disconnect it frees the rows

    async def preview(event: dict, x0: np.ndarray) -> dict:
        png = await asyncio.to_thread(lambda: png_bytes(make_grid(to_uint8(x0, data_range))))
        return event | {"png": base64.b64encode(png).decode()}

    async def cancel(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        if not scheduler.cancel(job_id):
            return error("not_found", f"no queued or running request {job_id!r}")
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
        code = _BY_STATUS.get(exc.status_code, "bad_request")
        return JSONResponse({"error": exc.detail, "code": code}, status_code=exc.status_code,
                            headers=exc.headers or None)

    async def internal_error(_request: Request, exc: Exception) -> Response:
        return error("internal_error", f"internal error ({type(exc).__name__})")

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        scheduler.start()
        yield
        state["draining"] = True
        scheduler.close(drain=False, timeout=30)

    routes = [Route("/v1/samples", samples, methods=["POST"]),
              Route("/v1/edits/{kind}", edits, methods=["POST"]),
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
            return error("shutting_down", "the server is shutting down; retry on another server")
        return error("cancelled", str(err))
    except Exception as err:  # a failed network call: the message, never a traceback
        return error("sampling_failed", f"sampling failed: {err}")
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
              batching: bool, scheduler_cls: type[BatchScheduler] = BatchScheduler,
              body_timeout: float = 10.0, log=print) -> Starlette:
    """The batch scheduler over ``pipe`` and the app over it (``app.state.scheduler``): what
    one server process runs, and what each Ray Serve replica runs (with its own
    ``scheduler_cls``)."""
    if pipe.max_batch is not None and max_batch > pipe.max_batch:
        log(f"--max-batch {max_batch} is more than {pipe.source} takes; using {pipe.max_batch}")
        max_batch = pipe.max_batch
    scheduler = scheduler_cls(pipe.eps_fn, pipe.record, max_batch=max_batch,
                              max_queue=max_queue, max_n=max_n, max_steps=max_steps,
                              batching=batching)
    # The file name only: where the model lives on the server is no client's business.
    info = {"record": json.loads(pipe.record.to_json()), "source": Path(pipe.source).name,
            "backend": pipe.backend_name,
            "limits": {"max_batch": max_batch, "max_queue": max_queue, "max_n": max_n,
                       "max_steps": scheduler.max_steps, "batching": batching}}
    app = create_app(scheduler, info, body_timeout=body_timeout)
    app.state.scheduler = scheduler
    return app


def bind_note(address: str) -> str:
    """What the start line adds about who can reach a socket bound to ``address``."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:  # not an address: nothing to add
        return ""
    ip = getattr(ip, "ipv4_mapped", None) or ip
    if ip.is_unspecified:
        return " (listening on all interfaces)"
    if ip.is_loopback:
        return ""
    return f" (listening on {ip}: reachable from other machines)"


def serve(pipe, *, host: str, port: int, max_batch: int, max_queue: int, max_n: int,
          max_steps: int | None, batching: bool, grace: float, header_timeout: float = 10.0,
          body_timeout: float = 10.0, keep_alive: float = 5.0,
          max_client_connections: int = 64, log=print) -> None:
    """Run until SIGTERM/SIGINT: in-flight requests get ``grace`` seconds, then are
    cancelled; returns normally (exit status 0).

    A connection must send its request headers within ``header_timeout`` seconds and its body
    within ``body_timeout``, may stay idle between requests for ``keep_alive``, and one client
    (peer address) may hold ``max_client_connections`` at once: a slow client costs itself.
    """
    import uvicorn

    from .connections import bounded_protocol

    app = build_app(pipe, max_batch=max_batch, max_queue=max_queue, max_n=max_n,
                    max_steps=max_steps, batching=batching, body_timeout=body_timeout, log=log)
    scheduler = app.state.scheduler
    max_batch = scheduler.max_batch
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family)
    flags = app.state.flags
    bound_host, bound_port = sock.getsockname()[:2]
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    start_line = (f"serving {pipe.source} on http://{url_host}:{bound_port} "
                  f"({'step-level batching' if batching else 'one request at a time'}, "
                  f"max batch {max_batch}, max queue {max_queue}){bind_note(bound_host)}")

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            # Said only now: the socket is served and uvicorn's signal handlers (installed
            # by run() before startup) are in place, so a SIGTERM sent on this line counts.
            if not self.should_exit:
                log(start_line)

        async def shutdown(self, sockets=None):
            """Stop accepting; after ``grace`` seconds cancel what is left, so every
            request still gets an answer (503) before uvicorn's own deadline."""
            flags["draining"] = True

            async def cancel_after_grace():
                await asyncio.sleep(grace)
                await asyncio.to_thread(scheduler.close, drain=False, timeout=30)

            task = asyncio.ensure_future(cancel_after_grace())
            try:
                await super().shutdown(sockets)
            finally:
                task.cancel()

    refuse = error("too_many_connections",
                   f"this client already holds {max_client_connections} connections to the "
                   "server; reuse one (keep-alive) or close some",
                   **{"Connection": "close", "Retry-After": "1"})
    protocol = bounded_protocol(header_timeout=header_timeout,
                                max_client_connections=max_client_connections,
                                refuse_app=refuse)
    # No limit_concurrency: uvicorn counts idle connections against it, so a few idle
    # clients refused everyone (503). Work is bounded by the scheduler's queue (429), idle
    # connections by the timeouts and the per-client cap.
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=grace + 30,
                            http=protocol, timeout_keep_alive=keep_alive, access_log=False,
                            ws="none")  # no WebSocket routes: no upgrade past the bounds
    server = Server(config)
    # uvicorn re-raises the signal it stopped on once it is done, and a SIGTERM may come
    # before its own handlers are in: this one stops the server either way, and makes the
    # re-raise a clean exit (status 0) instead of a death by SIGTERM.
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.close(drain=False, timeout=30)
        sock.close()
    log("server stopped")
