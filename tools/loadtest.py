"""Load test: step-level batching against one request at a time, on one machine, in one run.

    python tools/loadtest.py MODEL [--saturation 100] [--duration 60] [--load 0.7]
                             [--clients 16] [--cancel 0] [--threads 2] [--max-batch 64]
                             [--repeats 1] [--out loadtest/]

Each mode (``batching``: ``serve``'s default; ``serial``: ``serve --no-batching``) gets a
fresh server on a free localhost port and two phases, modes alternating per repeat:

1. saturation: ``--clients`` closed-loop clients work through the same ``--saturation``
   requests, in the workload's proportions: images/s and requests/s at capacity;
2. load: open-loop Poisson arrivals for ``--duration`` seconds at ``--load`` times the
   request-at-a-time capacity measured in phase 1 (the same rate for both modes), then a
   drain; latency p50/p95/p99 per request class.

Workload (``--steps-scale`` shrinks every chain, for smoke runs): short = DDIM 20 steps,
n = 1-4 (85%); medium = DDPM 100 steps, n = 8 (12%); long = DDPM 1000 steps, n = 1 (3%).
``--cancel p``: each request is cancelled with probability p after a random delay, by
DELETE or by hanging up (a soak). A 200 reply must carry exactly n images (else "lost");
any 5xx, connection failure or malformed reply is an error; 429 is counted as refused.
Latency runs from the scheduled arrival, so a lagging client is charged, not hidden.
Writes OUT/loadtest.json and OUT/loadtest.md.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import platform
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
MODES = {"batching": [], "serial": ["--no-batching"]}


@dataclass(frozen=True)
class RequestClass:
    name: str
    weight: float
    sampler: str
    steps: int
    n: tuple[int, int]  # inclusive range


WORKLOAD = (RequestClass("short", 0.85, "ddim", 20, (1, 4)),
            RequestClass("medium", 0.12, "ddpm", 100, (8, 8)),
            RequestClass("long", 0.03, "ddpm", 1000, (1, 1)))


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


# === Clients ===


def draw(rng: random.Random, scale: float) -> tuple[RequestClass, dict]:
    cls = rng.choices(WORKLOAD, weights=[c.weight for c in WORKLOAD])[0]
    body = {"n": rng.randint(*cls.n), "seed": rng.randrange(2**31), "sampler": cls.sampler,
            "steps": max(1, round(cls.steps * scale)), "format": "png"}
    return cls, body


def draw_list(rng: random.Random, count: int, scale: float) -> list[tuple[RequestClass, dict]]:
    """``count`` requests whose classes follow the workload's weights exactly (rounded,
    at least one of each), shuffled: their rate at saturation is the workload's capacity."""
    classes = [c for c in WORKLOAD for _ in range(max(1, round(c.weight * count)))]
    rng.shuffle(classes)
    requests = []
    for cls in classes:
        _, body = draw(rng, scale)
        body.update(n=rng.randint(*cls.n), sampler=cls.sampler,
                    steps=max(1, round(cls.steps * scale)))
        requests.append((cls, body))
    return requests


def one_request(server: ServerProcess, cls: RequestClass, body: dict, scheduled: float,
                cancel_after: float | None, rng: random.Random) -> dict:
    """Send one request; return its record (class, outcome, latency, images)."""
    record = {"class": cls.name, "n": body["n"], "work": body["n"] * body["steps"],
              "scheduled": scheduled}
    conn = http.client.HTTPConnection(server.host, server.port, timeout=900)
    hung_up = threading.Event()
    timer = None
    if cancel_after is not None:
        body = body | {"id": f"c{rng.randrange(2**62):x}"}
        by_delete = rng.random() < 0.5

        def cancel():
            if by_delete:
                try:
                    server.request("DELETE", f"/v1/samples/{body['id']}", timeout=30)
                except OSError:
                    pass
            else:
                hung_up.set()
                record["hung_up"] = True
                if conn.sock is not None:
                    conn.sock.shutdown(socket.SHUT_RDWR)

        timer = threading.Timer(cancel_after, cancel)
        timer.start()
    try:
        conn.request("POST", "/v1/samples", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        record["status"] = response.status
        if response.status == 200:
            images = json.loads(data)["images"]
            record["outcome"] = "ok" if len(images) == body["n"] else "lost"
        elif response.status == 409 and cancel_after is not None:
            record["outcome"] = "cancelled"
        elif response.status == 429:
            record["outcome"] = "refused"
        else:
            record["outcome"] = "error"
            record["error"] = data[:200].decode(errors="replace")
    except (OSError, http.client.HTTPException, ValueError, KeyError) as err:
        record["outcome"] = "cancelled" if hung_up.is_set() else "error"
        if not hung_up.is_set():
            record["error"] = f"{type(err).__name__}: {err}"
    finally:
        if timer is not None:
            timer.cancel()
        conn.close()
    record["done"] = time.monotonic()
    record["latency"] = record["done"] - scheduled
    return record


def saturate(server: ServerProcess, clients: int, count: int, scale: float,
             seed: int) -> dict:
    """Capacity: ``count`` requests drawn from the workload (the same list for every mode),
    sent by ``clients`` closed-loop clients, each taking the next as soon as its last
    returns; images/s over the time until the last reply."""
    todo = queue.Queue()
    for item in draw_list(random.Random(seed), count, scale):
        todo.put(item)
    records: list[dict] = []
    lock = threading.Lock()

    def client(k: int):
        rng = random.Random(seed * 1000 + k)
        while True:
            try:
                cls, body = todo.get_nowait()
            except queue.Empty:
                return
            record = one_request(server, cls, body, time.monotonic(), None, rng)
            with lock:
                records.append(record)

    before = server.metrics()
    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    after = server.metrics()
    ok = [r for r in records if r["outcome"] == "ok"]
    return {"seconds": elapsed, "requests": len(ok), "requests_per_s": len(ok) / elapsed,
            "images_per_s": sum(r["n"] for r in ok) / elapsed,
            "image_steps_per_s": sum(r["work"] for r in ok) / elapsed,
            "errors": sum(r["outcome"] in ("error", "lost") for r in records),
            "batch_fill": _fill(before, after), "busy": _busy(before, after, elapsed)}


def open_loop(server: ServerProcess, rate: float, seconds: float, scale: float, seed: int,
              cancel: float, drain: float) -> dict:
    """Poisson arrivals at ``rate`` per second for ``seconds``, then wait for the replies."""
    rng = random.Random(seed)
    pool = ThreadPoolExecutor(max_workers=1024, thread_name_prefix="client")
    before = server.metrics()
    start = time.monotonic()
    futures = []
    at = start
    while True:
        at += rng.expovariate(rate)
        if at >= start + seconds:
            break
        time.sleep(max(0.0, at - time.monotonic()))
        cls, body = draw(rng, scale)
        cancel_after = rng.uniform(0.0, 2.0) if rng.random() < cancel else None
        futures.append(pool.submit(one_request, server, cls, body, at, cancel_after,
                                   random.Random(rng.random())))
    deadline = time.monotonic() + drain
    records = []
    for future in futures:
        try:
            records.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
        except TimeoutError:
            records.append({"class": "?", "outcome": "unfinished", "n": 0, "work": 0})
    pool.shutdown(wait=False, cancel_futures=True)
    server.wait_metric("ddpm_images_in_flight", lambda v: v == 0, timeout=60)
    after = server.metrics()
    elapsed = max(r.get("done", start) for r in records) - start if records else seconds
    ok = [r for r in records if r["outcome"] == "ok"]
    hung_up = sum(r.get("hung_up", False) for r in records)
    outcomes = {k: sum(r["outcome"] == k for r in records)
                for k in ("ok", "cancelled", "refused", "error", "lost", "unfinished")}
    served = {k: after.get(f"ddpm_requests_total{{outcome={k}}}", 0)
              - before.get(f"ddpm_requests_total{{outcome={k}}}", 0)
              for k in ("done", "cancelled", "failed")}
    classes = {}
    for cls in WORKLOAD:
        lat = [r["latency"] for r in ok if r["class"] == cls.name]
        classes[cls.name] = ({"count": len(lat), **{f"p{q}": float(np.percentile(lat, q))
                                                   for q in (50, 95, 99)}}
                             if lat else {"count": 0})
    return {"rate": rate, "seconds": elapsed, "requests": len(records), "outcomes": outcomes,
            "server_outcomes": served, "hung_up": hung_up,
            # Every request the server took ended one way; each 200 was served once. A
            # client that hung up may miss a reply the server had just finished.
            "server_agrees": (sum(served.values()) == len(records) - outcomes["refused"]
                              and outcomes["ok"] <= served["done"]
                              <= outcomes["ok"] + hung_up),
            "images_per_s": sum(r["n"] for r in ok) / elapsed if elapsed > 0 else 0.0,
            "batch_fill": _fill(before, after), "busy": _busy(before, after, elapsed),
            "latency": classes,
            "error_samples": [r["error"] for r in records if "error" in r][:5]}


def _busy(before: dict, after: dict, seconds: float) -> float:
    """Share of the wall time the server spent in network calls: its utilisation."""
    spent = after["ddpm_network_seconds_total"] - before["ddpm_network_seconds_total"]
    return spent / seconds if seconds > 0 else 0.0


def _fill(before: dict, after: dict) -> float:
    ticks = after["ddpm_ticks_total"] - before["ddpm_ticks_total"]
    rows = after["ddpm_rows_total"] - before["ddpm_rows_total"]
    return rows / (ticks * after["ddpm_max_batch"]) if ticks else 0.0


# === Report ===


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [f"Load test: {meta['model']}, {meta['cpu']} ({meta['cores']} cores, shared), "
             f"ORT threads {meta['threads']}, max batch {meta['max_batch']}, "
             f"steps scale {meta['steps_scale']}.", "",
             "| mode | saturation images/s | vs serial | load req/s | short p50 / p95 / p99 s"
             " | medium p95 s | long p95 s | images/s | busy | errors | lost | refused"
             " | cancelled | batch fill |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = report["summary"].get("serial", {}).get("saturation_images_per_s", math.nan)

    def p(c: dict, q: str) -> str:
        return f"{c[q]:.2f}" if c.get("count") else "-"

    for mode, s in report["summary"].items():
        short = s["latency"]["short"]
        lines.append(
            f"| {mode} | {s['saturation_images_per_s']:.1f} | "
            f"{s['saturation_images_per_s'] / base:.2f}x | {s['rate']:.2f} | "
            f"{p(short, 'p50')} / {p(short, 'p95')} / {p(short, 'p99')} | "
            f"{p(s['latency']['medium'], 'p95')} | {p(s['latency']['long'], 'p95')} | "
            f"{s['images_per_s']:.1f} | {s['busy']:.2f} | {s['errors']} | {s['lost']} | "
            f"{s['refused']} | "
            f"{s['cancelled']} | {s['batch_fill']:.2f} |")
    t = report["targets"]
    lines += ["", f"Saturation throughput, batching / serial: {t['throughput_ratio']:.2f}x "
              f"(target >= 1.3x). Short-request p95 at {meta['rate']:.2f} requests/s, "
              f"batching / serial: {t['short_p95_ratio']:.3f} (target <= 0.2). "
              f"Errors {t['errors']}, lost images {t['lost']} (target 0). Load columns are "
              "the open-loop phase; busy = share of its wall time spent in network calls; "
              "batch fill = mean rows per call / max batch."]
    return "\n".join(lines) + "\n"


def summarize(runs: list[dict], modes) -> dict:
    """Medians over repeats per mode; counts are summed."""
    summary = {}
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        load = [r["load"] for r in mine]
        latency = {}
        for cls in WORKLOAD:
            per = [x["latency"][cls.name] for x in load if x["latency"][cls.name]["count"]]
            latency[cls.name] = ({"count": sum(c["count"] for c in per),
                                  **{q: float(np.median([c[q] for c in per]))
                                     for q in ("p50", "p95", "p99")}} if per else {"count": 0})
        summary[mode] = {
            "saturation_images_per_s": float(np.median(
                [r["saturation"]["images_per_s"] for r in mine])),
            "rate": load[0]["rate"], "latency": latency,
            "images_per_s": float(np.median([x["images_per_s"] for x in load])),
            "errors": sum(x["outcomes"]["error"] + x["outcomes"]["unfinished"] for x in load)
            + sum(r["saturation"]["errors"] for r in mine),
            "lost": sum(x["outcomes"]["lost"] + (not x["server_agrees"]) for x in load),
            "refused": sum(x["outcomes"]["refused"] for x in load),
            "cancelled": sum(x["outcomes"]["cancelled"] for x in load),
            "batch_fill": float(np.median([x["batch_fill"] for x in load])),
            "busy": float(np.median([x["busy"] for x in load])),
            "saturation_busy": float(np.median([r["saturation"]["busy"] for r in mine])),
        }
    return summary


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--saturation", type=click.IntRange(min=1), default=100, show_default=True,
              help="requests in the capacity phase (the same list for every mode)")
@click.option("--duration", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="seconds of Poisson arrivals per mode")
@click.option("--load", type=click.FloatRange(min=0.01), default=0.7, show_default=True,
              help="arrival rate as a fraction of the request-at-a-time capacity")
@click.option("--rate", type=click.FloatRange(min=0.001), default=None,
              help="arrivals per second (default: --load x the serial capacity)")
@click.option("--modes", type=click.Choice(["both", "batching", "serial"]), default="both",
              show_default=True, help="one mode only: a soak of the server as deployed")
@click.option("--clients", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--cancel", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="share of requests cancelled at random (DELETE or hang-up)")
@click.option("--drain", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="seconds to wait for replies after the arrivals stop")
@click.option("--steps-scale", type=click.FloatRange(min=0.0001, max=1), default=1.0,
              show_default=True, help="multiply every class's steps (smoke runs)")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="ONNX Runtime threads (default: all cores)")
@click.option("--max-batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="rounds; modes alternate within each")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("loadtest"), show_default=True)
def main(model, saturation, duration, load, rate, modes, clients, cancel, drain, steps_scale,
         threads, max_batch, repeats, seed, out):
    """Batching vs request-at-a-time under a mixed load, against localhost servers."""
    from runtime.util.fileio import OutputError, atomic_output, check_output

    try:
        for name in ("loadtest.json", "loadtest.md"):
            check_output(out / name, inputs=[model], option="--out")
    except OutputError as err:
        raise click.ClickException(str(err)) from None
    server_args = ["--max-batch", str(max_batch), "--max-queue", "4096", "--max-n", "64",
                   "--grace", "0"] + (["--threads", str(threads)] if threads else [])
    if modes != "both" and rate is None:
        raise click.UsageError("--modes batching|serial needs --rate (there is no serial "
                               "capacity to take --load of)")
    chosen = list(MODES) if modes == "both" else [modes]
    runs = []
    for rep in range(repeats):
        order = chosen if rep % 2 == 0 else chosen[::-1]
        sat = {}
        for mode in order:  # saturation first for both: the load rate needs serial's capacity
            server = ServerProcess(model, *server_args, *MODES[mode])
            try:
                sat[mode] = saturate(server, clients, saturation, steps_scale, seed + rep)
            finally:
                server.stop()
            click.echo(f"[{rep}] {mode} saturation: {sat[mode]['images_per_s']:.1f} images/s, "
                       f"fill {sat[mode]['batch_fill']:.2f}", err=True)
        if rate is None:
            rate = load * sat["serial"]["requests_per_s"]
        for mode in order:
            server = ServerProcess(model, *server_args, *MODES[mode])
            try:
                result = open_loop(server, rate, duration, steps_scale, seed + rep, cancel,
                                   drain)
            finally:
                code = server.stop()
            result["exit_code"] = code
            runs.append({"mode": mode, "repeat": rep, "saturation": sat[mode], "load": result})
            click.echo(f"[{rep}] {mode} load {rate:.2f} req/s: {result['outcomes']}, short "
                       f"p95 {result['latency']['short'].get('p95', math.nan):.3f} s, exit "
                       f"{code}", err=True)
    summary = summarize(runs, chosen)
    nan = {"saturation_images_per_s": math.nan, "latency": {"short": {}}, "errors": 0,
           "lost": 0}
    base, fast = summary.get("serial", nan), summary.get("batching", nan)
    short_base = base["latency"]["short"].get("p95")
    short_fast = fast["latency"]["short"].get("p95")
    report = {
        "meta": {"model": str(model), "cpu": cpu_name(), "cores": os.cpu_count(),
                 "threads": threads, "max_batch": max_batch, "clients": clients,
                 "saturation_requests": saturation, "duration_s": duration, "load": load,
                 "cancel": cancel, "steps_scale": steps_scale, "repeats": repeats,
                 "rate": rate,
                 "workload": [c.__dict__ for c in WORKLOAD], "python": sys.version.split()[0]},
        "summary": summary,
        "targets": {
            "throughput_ratio": fast["saturation_images_per_s"]
            / base["saturation_images_per_s"],
            "short_p95_ratio": (short_fast / short_base if short_base and short_fast
                                else math.nan),
            "errors": base["errors"] + fast["errors"], "lost": base["lost"] + fast["lost"]},
        "runs": runs,
    }
    out.mkdir(parents=True, exist_ok=True)
    with atomic_output(out / "loadtest.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=float))
    table = markdown(report)
    with atomic_output(out / "loadtest.md") as tmp:
        tmp.write_text(table)
    click.echo(table)


if __name__ == "__main__":
    main()
