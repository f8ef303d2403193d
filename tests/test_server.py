"""The real server: `python -m runtime serve` on a free localhost port, spoken to over HTTP."""

from __future__ import annotations

import base64
import contextlib
import http.client
import importlib.util
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime.images import make_grid
from tools.loadtest import ServerProcess

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def Server(model, *args: str) -> ServerProcess:
    """The real server, one ORT thread (the tests run on a shared 2-core machine)."""
    return ServerProcess(model, "--threads", "1", *args, host=HOST)
SERVE_EXTRA = ("starlette", "uvicorn", "prometheus_client")
NO_EXTRA = any(importlib.util.find_spec(m) is None for m in SERVE_EXTRA)
needs_serve = pytest.mark.skipif(NO_EXTRA, reason="the server extra is not installed "
                                 "(pip install .[serve])")


def test_without_the_extra_serve_says_what_to_install(tiny_onnx):
    """The base install has no server: `serve` names the extra in one line."""
    block = ("import sys, importlib.abc\n"
             "class Block(importlib.abc.MetaPathFinder):\n"
             "    def find_spec(self, name, *a):\n"
             "        if name.split('.')[0] in ('starlette', 'uvicorn', 'prometheus_client'):\n"
             "            raise ModuleNotFoundError(name=name)\n"
             "sys.meta_path.insert(0, Block())\n"
             "from runtime.cli import main\n"
             f"main(['serve', {str(tiny_onnx)!r}, '--port', '0'])\n")
    run = subprocess.run([sys.executable, "-c", block], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip().count("\n") == 0 and "pip install .[serve]" in run.stderr


@pytest.fixture(scope="module")
def server(tiny_onnx):
    if NO_EXTRA:
        pytest.skip("the server extra is not installed (pip install .[serve])")
    srv = Server(tiny_onnx, "--max-batch", "8", "--max-n", "16")
    yield srv
    assert srv.stop() == 0, "".join(srv.stderr)


@pytest.fixture(scope="module")
def local(tiny_onnx):
    with runtime.load(tiny_onnx, threads=1) as pipe:
        yield pipe


def _png_array(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def test_health_model_and_metrics(server, local):
    assert server.request("GET", "/healthz")[0] == 200
    status, _, body = server.request("GET", "/v1/model")
    info = json.loads(body)
    assert status == 200 and info["record"] == json.loads(local.record.to_json())
    assert info["limits"]["max_batch"] == 8 and info["limits"]["max_n"] == 16
    # The file's name, not where it lives on the server.
    assert info["source"] == local.source.rsplit("/", 1)[-1] == "tiny.onnx"
    assert str(Path(local.source).parent).encode() not in body
    metrics = server.metrics()
    for name in ("ddpm_queue_requests", "ddpm_images_in_flight", "ddpm_batch_fill",
                 "ddpm_network_seconds_total", "ddpm_requests_total{outcome=done}"):
        assert name in metrics
    # The process's own series (Linux): CPU spent and memory held, both positive.
    if sys.platform.startswith("linux"):
        assert metrics["process_cpu_seconds_total"] > 0
        assert metrics["process_resident_memory_bytes"] > 2**20


REQUESTS = [{"n": 3, "seed": 5, "sampler": "ddim", "steps": 7, "format": "png"},
            {"n": 2, "seed": 6, "sampler": "ddpm", "steps": 9, "variance": "fixedsmall",
             "format": "grid"},
            {"n": 4, "seed": 7, "sampler": "ddim", "steps": 5, "eta": 1.0, "format": "npz"},
            {"n": 5, "seed": 8, "sampler": "ddpm", "steps": 4, "format": "png"},
            {"n": 2, "seed": 9, "sampler": "dpmpp_2m", "steps": 6, "spacing": "trailing",
             "format": "npz"}]


def _decode(fmt: str, body: bytes, headers) -> tuple[np.ndarray, dict]:
    if fmt == "png":
        data = json.loads(body)
        return np.stack([_png_array(base64.b64decode(p)) for p in data["images"]]), data
    if fmt == "npz":
        with np.load(io.BytesIO(body)) as z:
            return z["images"], json.loads(str(z["options"]))
    return _png_array(body), json.loads(headers["x-sample-options"])


def test_images_equal_a_local_pipeline_in_every_format(server, local):
    before = server.metrics()["ddpm_ticks_total"]
    with ThreadPoolExecutor(len(REQUESTS)) as pool:  # at once: they share network calls
        replies = list(pool.map(lambda r: server.request("POST", "/v1/samples", r), REQUESTS))
    for req, (status, headers, body) in zip(REQUESTS, replies, strict=True):
        assert status == 200, body
        got, echo = _decode(req["format"], body, headers)
        options = {k: req[k] for k in ("sampler", "steps", "spacing", "variance", "eta")
                   if k in req}
        want = local.sample(req["n"], req["seed"], progress=False, **options)
        if req["format"] == "grid":
            want = make_grid(want)[..., 0]
        else:
            got = got.reshape(want.shape)
        np.testing.assert_array_equal(got, want)
        assert echo["seed"] == req["seed"] and echo["n"] == req["n"]
        assert echo["steps"] == req["steps"] and echo["sampler"] == req["sampler"]
    ticks = server.metrics()["ddpm_ticks_total"] - before
    assert ticks < sum(r["steps"] * -(-r["n"] // 8) for r in REQUESTS) or len(REQUESTS) == 1


HUGE = b"9" * 5000
# (method, path, body, status[, the field the error names])
BAD = [
    ("POST", "/v1/samples", b"{not json", 400),
    ("POST", "/v1/samples", b"[1, 2]", 400),
    ("POST", "/v1/samples", b'{"n": 1, "colour": "red"}', 400),
    ("POST", "/v1/samples", b'{"n": "4"}', 400),
    ("POST", "/v1/samples", b'{"n": 1.5}', 400),
    ("POST", "/v1/samples", b'{"n": null}', 400),
    ("POST", "/v1/samples", b'{"n": 0}', 422),
    ("POST", "/v1/samples", b'{"n": 17}', 422),
    ("POST", "/v1/samples", b'{"n": 1, "seed": -3}', 422),
    ("POST", "/v1/samples", b'{"n": 1, "steps": 1001}', 422),
    ("POST", "/v1/samples", b'{"n": 1, "steps": 0}', 422),
    ("POST", "/v1/samples", b'{"n": 1, "sampler": "euler"}', 422),
    ("POST", "/v1/samples", b'{"n": 1, "variance": 3}', 400),
    ("POST", "/v1/samples", b'{"n": 1, "eta": -1}', 422),
    ("POST", "/v1/samples", b'{"n": 1, "sampler": "unipc", "eta": 0.5}', 422),
    ("POST", "/v1/samples", b'{"n": 1, "spacing": "random"}', 422),
    ("POST", "/v1/samples", b'{"n": 1, "eta": "much"}', 400),
    ("POST", "/v1/samples", b'{"n": 1, "format": "gif"}', 400),
    ("POST", "/v1/samples", b'{"n": 1, "stream": "yes"}', 400),
    ("POST", "/v1/samples", b'{"n": 1, "id": "../x"}', 400),
    ("POST", "/v1/samples", b'{"n": 1, "seed": 99999999999999999999999}', 422, "seed"),
    # Longer than Python converts (4300 digits): a 4xx naming the field, never a 500.
    ("POST", "/v1/samples", b'{"n": ' + HUGE + b"}", 422, "n"),
    ("POST", "/v1/samples", b'{"n": -' + HUGE + b"}", 422, "n"),
    ("POST", "/v1/samples", b'{"n": 1, "seed": ' + HUGE + b"}", 422, "seed"),
    ("POST", "/v1/samples", b'{"n": 1, "seed": -' + HUGE + b"}", 422, "seed"),
    ("POST", "/v1/samples", b'{"n": 1, "steps": ' + HUGE + b"}", 422, "steps"),
    ("POST", "/v1/samples", b'{"n": 1, "sampler": "ddim", "eta": ' + HUGE + b"}", 422, "eta"),
    ("POST", "/v1/samples", b'{"n": 1, "stream": ' + HUGE + b"}", 400, "stream"),
    ("POST", "/v1/samples", b"\xff\xfe", 400),
    ("POST", "/v1/samples", b"[" * 16000, 400),
    ("POST", "/v1/samples", b'{"n": 1, "pad": "' + b"x" * 20000 + b'"}', 413),
    ("GET", "/v1/samples", None, 405),
    ("DELETE", "/v1/samples/nothing-here", None, 404),
    ("GET", "/no/such/page", None, 404),
]


def test_every_bad_request_gets_a_4xx_json_error(server):
    from runtime.serving.server import ERROR_CODES

    for method, path, raw, want, *field in BAD:
        status, headers, body = server.request(method, path, raw=raw)
        assert status == want, (raw[:80] if raw else raw, status, body[:300])
        assert headers["content-type"].startswith("application/json"), (raw, headers)
        error = json.loads(body)
        assert "error" in error and b"Traceback" not in body
        assert ERROR_CODES[error["code"]][0] == status, error
        if field:
            assert error.get("field") == field[0], (raw[:80], error)
            assert "digits" in error["error"] or raw.count(b"9") < 100, error
    assert server.request("GET", "/healthz")[0] == 200
    assert server.metrics()["ddpm_requests_total{outcome=invalid}"] >= 19


def test_stream_reports_progress_then_the_result(server, local):
    conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
    conn.request("POST", "/v1/samples", body=json.dumps(
        {"n": 2, "seed": 3, "sampler": "ddpm", "steps": 300, "stream": True}))
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("content-type").startswith("text/event-stream")
    events = []
    for chunk in response.read().decode().split("\n\n"):
        if chunk.strip():
            kind, data = chunk.split("\n", 1)
            events.append((kind.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    conn.close()
    assert events[0][0] == "accepted" and events[-1][0] == "result"
    done = [e["steps_done"] for kind, e in events if kind == "progress"]
    assert done and done == sorted(done) and done[-1] <= 600
    result = events[-1][1]
    assert result["media_type"] == "image/png" and result["seed"] == 3
    want = make_grid(local.sample(2, 3, sampler="ddpm", steps=300, progress=False))[..., 0]
    np.testing.assert_array_equal(_png_array(base64.b64decode(result["data"])), want)


def _in_background(fn, *args):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("reply", fn(*args)), daemon=True)
    thread.start()
    return thread, out


def test_delete_and_disconnect_cancel_and_free_rows(server):
    cancelled = server.metrics().get("ddpm_requests_total{outcome=cancelled}", 0.0)
    # 16 images in two groups of max_batch 8: 2000 ticks, long enough to cancel midway.
    long = {"n": 16, "seed": 1, "sampler": "ddpm", "steps": 1000, "id": "long-1"}
    thread, out = _in_background(server.request, "POST", "/v1/samples", long)
    server.wait_metric("ddpm_images_in_flight", lambda v: v >= 8)
    status, _, body = server.request("DELETE", "/v1/samples/long-1")
    assert status == 202, body
    thread.join(30)
    assert out["reply"][0] == 409 and "cancelled" in json.loads(out["reply"][2])["error"]
    server.wait_metric("ddpm_images_in_flight", lambda v: v == 0)
    server.wait_metric("ddpm_requests_total{outcome=cancelled}", lambda v: v == cancelled + 1)

    # A client that hangs up cancels its request.
    sock = socket.create_connection((HOST, server.port), timeout=30)
    body = json.dumps({"n": 16, "seed": 2, "sampler": "ddpm", "steps": 1000}).encode()
    sock.sendall(b"POST /v1/samples HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    server.wait_metric("ddpm_images_in_flight", lambda v: v >= 8)
    sock.close()
    server.wait_metric("ddpm_images_in_flight", lambda v: v == 0)
    server.wait_metric("ddpm_requests_total{outcome=cancelled}", lambda v: v == cancelled + 2)


@needs_serve
def test_full_queue_is_refused_at_once_and_sigterm_cancels_and_exits_0(tiny_onnx):
    srv = Server(tiny_onnx, "--max-batch", "1", "--max-queue", "2", "--grace", "0")
    try:
        long = {"n": 1, "seed": 0, "sampler": "ddpm", "steps": 1000}
        # 16 images one at a time: 16000 ticks, still running when SIGTERM comes.
        first, first_out = _in_background(srv.request, "POST", "/v1/samples",
                                          long | {"id": "a", "n": 16})
        srv.wait_metric("ddpm_images_in_flight", lambda v: v == 1)
        second, second_out = _in_background(srv.request, "POST", "/v1/samples",
                                             long | {"id": "b"})
        # a's other 15 images wait for rows too: a counts in the queue until admitted.
        srv.wait_metric("ddpm_queue_requests", lambda v: v == 2)
        start = time.monotonic()
        status, headers, body = srv.request("POST", "/v1/samples", long)
        assert status == 429 and "queue is full" in json.loads(body)["error"]
        assert "retry-after" in headers and time.monotonic() - start < 5
        assert srv.request("DELETE", "/v1/samples/b")[0] == 202
        second.join(30)
        assert second_out["reply"][0] == 409
        # SIGTERM with no grace: the running request is cancelled and the server exits 0.
        assert srv.stop() == 0, "".join(srv.stderr)
        first.join(30)
        status, _, body = first_out["reply"]
        assert status == 503 and "shutting down" in json.loads(body)["error"]
        assert "Traceback" not in "".join(srv.stderr)
    finally:
        srv.stop(signal.SIGKILL)


@needs_serve
def test_sigterm_lets_in_flight_requests_finish(tiny_onnx, local):
    srv = Server(tiny_onnx, "--grace", "60")
    try:
        req = {"n": 2, "seed": 4, "sampler": "ddpm", "steps": 1000, "format": "npz"}
        thread, out = _in_background(srv.request, "POST", "/v1/samples", req)
        srv.wait_metric("ddpm_images_in_flight", lambda v: v == 2)
        srv.proc.send_signal(signal.SIGTERM)
        thread.join(60)
        status, headers, body = out["reply"]
        assert status == 200
        images, _ = _decode("npz", body, headers)
        np.testing.assert_array_equal(images, local.sample(2, 4, steps=1000, progress=False))
        assert srv.proc.wait(60) == 0, "".join(srv.stderr)
    finally:
        srv.stop(signal.SIGKILL)


# === Hostile clients: slow, idle, too many connections ===

def _connect(port: int, source: str) -> socket.socket:
    """A connection from ``source`` (any 127.x address is this machine's loopback on Linux:
    each is a different client to the server)."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect((HOST, port))
    return sock


def _read_until_closed(sock: socket.socket, deadline: float) -> tuple[bytes, bool]:
    """What the server sent, and whether it closed the connection before ``deadline``."""
    data = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            break
        except OSError:  # reset: closed too
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


@pytest.mark.slow  # a server process of its own
@needs_serve
def test_slow_and_idle_clients_cost_only_themselves(tiny_onnx):
    """80 connections that do no work (silent, slowloris headers, a body that never ends,
    idle keep-alive, idle after an Upgrade) from 10 other clients: /healthz and a real POST
    still answer, a 9th connection from one of them is refused, and the server closes them
    all within its bounds. (Before, uvicorn's limit_concurrency, max queue + batch + 64 = 70
    here, counted them and answered 503 to everyone.)"""
    limit, bound = 8, 1.0
    srv = Server(tiny_onnx, "--max-batch", "2", "--max-queue", "4",
                 "--header-timeout", str(bound), "--body-timeout", str(bound),
                 "--keep-alive", str(bound), "--max-client-connections", str(limit))
    slow: list[tuple[str, socket.socket]] = []
    try:
        kinds = ("silent", "headers", "body", "keep-alive", "upgrade")
        for k in range(80):
            kind, sock = kinds[k % 5], _connect(srv.port, f"127.0.0.{2 + k // limit}")
            if kind == "headers":
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            elif kind == "body":
                sock.sendall(b"POST /v1/samples HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Length: 100\r\n\r\n{")
            elif kind in ("keep-alive", "upgrade"):
                # An Upgrade is served as plain HTTP: no WebSocket routes, no other protocol.
                upgrade = (b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
                           b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
                           b"dGhlIHNhbXBsZSBub25jZQ==\r\n") if kind == "upgrade" else b""
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + upgrade + b"\r\n")
                reply = b""
                while not reply.endswith(b'{"status":"ok"}'):  # the whole response
                    chunk = sock.recv(4096)
                    assert chunk, reply
                    reply += chunk
                assert reply.startswith(b"HTTP/1.1 200"), reply
            slow.append((kind, sock))
        opened = time.monotonic()
        stop = threading.Event()

        def trickle():  # one byte each 0.2 s: never done, never quite idle
            while not stop.wait(0.2) and time.monotonic() < opened + 30:
                for kind, sock in slow:
                    with contextlib.suppress(OSError):
                        if kind in ("headers", "body"):
                            sock.send(b"X" if kind == "headers" else b" ")

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        # Another client (127.0.0.1) is served at once.
        for _ in range(3):
            start = time.monotonic()
            assert srv.request("GET", "/healthz", timeout=5)[0] == 200
            assert time.monotonic() - start < 5
        status, _, body = srv.request("POST", "/v1/samples", {"n": 2, "seed": 0, "steps": 5},
                                      timeout=5)
        assert status == 200, body
        # One connection too many from a client that holds its limit: 429, then closed.
        extra = _connect(srv.port, "127.0.0.2")
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        reply, closed = _read_until_closed(extra, time.monotonic() + 5)
        extra.close()
        head, _, payload = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 429") and closed, reply
        assert json.loads(payload)["code"] == "too_many_connections"
        # Every slow connection is closed by the server within its bound (plus slack).
        for kind, sock in slow:
            data, closed = _read_until_closed(sock, opened + bound + 5)
            assert closed, (kind, data)
            if kind == "body":  # the app answers a late body before closing
                head, _, payload = data.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 408"), data
                assert json.loads(payload)["code"] == "body_timeout"
            else:
                assert data == b"", (kind, data)
        stop.set()
        trickler.join(5)
        # Their places are free again.
        again = _connect(srv.port, "127.0.0.2")
        again.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _read_until_closed(again, time.monotonic() + 5)[0].startswith(b"HTTP/1.1 200")
        again.close()
        assert srv.request("GET", "/healthz", timeout=5)[0] == 200
    finally:
        for _, sock in slow:
            sock.close()
        code = srv.stop()
    assert code == 0, "".join(srv.stderr)
    assert "Traceback" not in "".join(srv.stderr)


@pytest.mark.slow  # a server process of its own
@needs_serve
def test_sigterm_the_moment_the_server_says_it_is_ready_stops_it(tiny_onnx):
    """The start line is a promise: SIGTERM sent on it is handled (exit 0, promptly)."""
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "runtime", "serve", str(tiny_onnx),
                                 "--port", "0", "--threads", "1"], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            assert line.startswith("serving "), (line, proc.stderr.read())
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0, proc.stderr.read()
            assert "server stopped" in proc.stdout.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        # On loopback the line says nothing more.
        assert line.rstrip().endswith(")") and "interfaces" not in line


def test_bind_beyond_loopback_is_said(tmp_path):
    """What the start line adds for each kind of address (no socket is bound here)."""
    from runtime.serving.server import bind_note

    for address in ("127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"):
        assert bind_note(address) == "", address
    for address in ("0.0.0.0", "::"):
        assert bind_note(address) == " (listening on all interfaces)", address
    for address in ("192.168.1.5", "10.0.0.1", "2001:db8::1"):
        assert f"listening on {address}: reachable from other machines" in bind_note(address)


@needs_serve
def test_bad_serve_options_are_one_line(tiny_onnx, tmp_path):
    from tests.test_hostile import run_table

    cases = [(["serve", tiny_onnx, "--host", ""], "--host"),
             (["serve", tiny_onnx, "--host", " "], "--host"),
             (["serve", tiny_onnx, "--header-timeout", "0"], "--header-timeout"),
             (["serve", tiny_onnx, "--body-timeout", "nan"], "--body-timeout"),
             (["serve", tiny_onnx, "--keep-alive", "-1"], "--keep-alive"),
             (["serve", tiny_onnx, "--max-client-connections", "0"],
              "--max-client-connections")]
    run_table("runtime.cli:main", cases, tmp_path)


# === Edits: images in, sharing network calls with sampling requests ===

def _png_b64(image: np.ndarray) -> str:
    from runtime.images import png_bytes

    return base64.b64encode(png_bytes(image)).decode()


def _edit_inputs(local):
    images = local.sample(3, 11, sampler="ddim", steps=10, progress=False)
    mask = np.full((8, 8, 1), 255, np.uint8)
    mask[4:] = 0
    return images, mask


def test_served_edits_equal_the_library_while_sharing_calls_with_samples(server, local):
    images, mask = _edit_inputs(local)
    requests = [
        ("/v1/edits/img2img", {"image": _png_b64(images[0]), "n": 4, "seed": 2,
                               "strength": 0.6, "steps": 40, "format": "npz"}),
        ("/v1/edits/inpaint", {"image": [_png_b64(im) for im in images], "seed": 5,
                               "mask": _png_b64(mask), "steps": 30, "jump_length": 5,
                               "resamples": 2, "sampler": "ddim", "format": "npz"}),
        ("/v1/samples", {"n": 3, "seed": 1, "steps": 50, "format": "npz"}),
    ]
    before = server.metrics()["ddpm_ticks_total"]
    with ThreadPoolExecutor(len(requests)) as pool:
        replies = list(pool.map(lambda r: server.request("POST", r[0], r[1]), requests))
    got = []
    for status, _, body in replies:
        assert status == 200, body
        got.append(np.load(io.BytesIO(body))["images"])
    np.testing.assert_array_equal(got[0], local.img2img(images[0], 2, n=4, strength=0.6,
                                                        steps=40, progress=False))
    np.testing.assert_array_equal(got[1], local.inpaint(
        images, mask[..., 0], 5, steps=30, jump_length=5, resamples=2, sampler="ddim",
        progress=False))
    np.testing.assert_array_equal(got[2], local.sample(3, 1, steps=50, progress=False))
    np.testing.assert_array_equal(got[1][:, :4], images[:, :4])  # the kept rows
    echo = json.loads(replies[0][1]["x-sample-options"])
    assert echo["edit"] == "img2img" and echo["strength"] == 0.6 and echo["n"] == 4
    ticks = server.metrics()["ddpm_ticks_total"] - before
    inpaint_calls = 30 + 5 * len(range(0, 25, 5))
    assert ticks < 24 + inpaint_calls + 50  # fewer calls than the three alone


def test_stream_sends_previews_of_the_predicted_x0(server, local):
    conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
    conn.request("POST", "/v1/samples", body=json.dumps(
        {"n": 2, "seed": 3, "sampler": "ddim", "steps": 20, "stream": True, "previews": 5}))
    response = conn.getresponse()
    events = [chunk.split("\n", 1) for chunk in response.read().decode().split("\n\n")
              if chunk.strip()]
    conn.close()
    previews = [json.loads(data.removeprefix("data: ")) for kind, data in events
                if kind == "event: preview"]
    assert [p["steps_done"] for p in previews] == [10, 20, 30, 40]
    result = json.loads(events[-1][1].removeprefix("data: "))
    # The last preview is the x_0 of the last step: the image itself (DDIM at t = 0).
    last = _png_array(base64.b64decode(previews[-1]["png"]))
    np.testing.assert_array_equal(last, _png_array(base64.b64decode(result["data"])))


def test_bad_edit_requests_name_the_field(server, local):
    images, mask = _edit_inputs(local)
    from PIL import Image

    rgb = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(rgb, format="PNG")
    big = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(big, format="PNG")
    grey = mask.copy()
    grey[0, 0] = 7
    ok = _png_b64(images[0])
    cases = [
        ("img2img", {}, 400, "image"),
        ("img2img", {"image": "***"}, 400, "image"),
        ("img2img", {"image": base64.b64encode(b"GIF89a").decode()}, 422, "image"),
        ("img2img", {"image": base64.b64encode(rgb.getvalue()).decode()}, 422, "image"),
        ("img2img", {"image": base64.b64encode(big.getvalue()).decode()}, 422, "image"),
        ("img2img", {"image": ok, "strength": 2}, 422, "strength"),
        ("img2img", {"image": ok, "strength": "lots"}, 400, "strength"),
        ("img2img", {"image": ok, "mask": ok}, 400, None),
        ("img2img", {"image": [ok] * 17}, 422, "image"),
        ("img2img", {"image": [ok, ok], "n": 3}, 422, "n"),
        ("img2img", {"image": ok, "n": 10**12}, 422, "n"),
        ("inpaint", {"image": ok}, 400, "mask"),
        ("inpaint", {"image": ok, "mask": _png_b64(grey)}, 422, "mask"),
        ("inpaint", {"image": ok, "mask": _png_b64(np.full((8, 8, 1), 255, np.uint8))}, 422,
         "mask"),
        ("inpaint", {"image": ok, "mask": _png_b64(mask), "sampler": "unipc"}, 422, "sampler"),
        ("inpaint", {"image": ok, "mask": _png_b64(mask), "resamples": 0}, 422, "resamples"),
        ("blur", {"image": ok}, 404, None),
        ("img2img", {"image": ok, "previews": 2}, 400, "previews"),
    ]
    for kind, body, want, field in cases:
        status, _, reply = server.request("POST", f"/v1/edits/{kind}", body)
        error = json.loads(reply)
        assert status == want, (kind, list(body), reply[:300])
        assert b"Traceback" not in reply and "\n" not in error["error"]
        if field:
            assert error.get("field") == field, (kind, list(body), error)


@pytest.mark.slow  # a server process of its own
def test_a_student_asked_for_other_steps_is_served_with_a_warning(tiny_onnx, tmp_path):
    """A distilled student's own sampling (its record's defaults) comes without a warning;
    other steps are served and the echo carries the one-line warning."""
    import onnx

    from runtime.metadata import METADATA_KEY

    if NO_EXTRA:
        pytest.skip("the server extra is not installed (pip install .[serve])")
    proto = onnx.load(str(tiny_onnx))
    entry = next(p for p in proto.metadata_props if p.key == METADATA_KEY)
    record = json.loads(entry.value)
    record["defaults"] = {"sampler": "ddim", "steps": 4, "spacing": "trailing", "eta": 0.0}
    record["distilled"] = {"method": "progressive", "from_steps": 8, "steps": 4,
                           "teacher_sha256": "0" * 64}
    entry.value = json.dumps(record)
    student = tmp_path / "student.onnx"
    onnx.save(proto, str(student))
    srv = Server(student, "--max-batch", "4")
    try:
        status, headers, _ = srv.request("POST", "/v1/samples", {"n": 1, "seed": 0})
        echo = json.loads(headers["x-sample-options"])
        assert status == 200 and echo["steps"] == 4 and "warning" not in echo
        status, headers, _ = srv.request("POST", "/v1/samples", {"n": 1, "steps": 8})
        warning = json.loads(headers["x-sample-options"])["warning"]
        assert status == 200 and "student distilled for sampler ddim, steps 4" in warning
        assert "steps 8" in warning and "\n" not in warning
    finally:
        assert srv.stop() == 0, "".join(srv.stderr)
