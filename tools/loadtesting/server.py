"""The server under test: ``python -m runtime serve`` as a subprocess on a localhost port."""

from __future__ import annotations

import http.client
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


# The largest n a load-test server (and the scheduler driven alone) takes: above any request's.
MAX_N = 64


def load_test_args(max_batch: int, threads: int | None) -> list[str]:
    """``serve``'s options for a load test: a queue and limits no test reaches, and no
    per-address connection cap (every client is 127.0.0.1 here)."""
    return (["--max-batch", str(max_batch), "--max-queue", "4096", "--max-n", str(MAX_N),
             "--max-client-connections", "100000", "--grace", "0"]
            + (["--threads", str(threads)] if threads else []))


class ServerProcess:
    """`python -m runtime serve MODEL --port 0 ...` as a subprocess; the port is read from
    the line it prints once listening."""

    def __init__(self, model, *args: str, host: str = HOST, start_timeout: float = 120):
        cmd = [sys.executable, "-m", "runtime", "serve", str(model), "--host", host,
               "--port", "0", *args]
        self.host = host
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        for stream, put in [(self.proc.stdout, self.lines.put),
                            (self.proc.stderr, self.stderr.append)]:
            threading.Thread(target=lambda s=stream, p=put: [p(line) for line in s],
                             daemon=True).start()
        deadline = time.monotonic() + start_timeout
        line = ""
        while "serving" not in line:  # notes (a clamped --max-batch) may come first
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                raise RuntimeError(f"the server did not start: {''.join(self.stderr)}") from None
        self.port = int(line.split(f"http://{host}:")[1].split()[0])

    def request(self, method: str, path: str, body=None, *, raw: bytes | None = None,
                headers=None, timeout: float = 600):
        """(status, headers with lower-case names, body bytes)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            data = raw if raw is not None else (None if body is None else
                                                json.dumps(body).encode())
            conn.request(method, path, body=data, headers=headers or {})
            response = conn.getresponse()
            return (response.status, {k.lower(): v for k, v in response.getheaders()},
                    response.read())
        finally:
            conn.close()

    def metrics(self) -> dict[str, float]:
        """/metrics parsed by prometheus_client: name{label=value} -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        status, _, body = self.request("GET", "/metrics", timeout=30)
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        values = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                label = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                values[s.name + (f"{{{label}}}" if label else "")] = s.value
        return values

    def wait_metric(self, name: str, test, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.metrics().get(name, 0.0)
            if test(value):
                return value
            time.sleep(0.05)
        raise AssertionError(f"{name} stayed at {self.metrics().get(name)}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
