"""The two phases of a run: capacity (closed-loop clients) and load (open-loop arrivals)."""

from __future__ import annotations

import http.client
import json
import math
import queue
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .server import MAX_N, ServerProcess
from .workload import WORKLOAD, RequestClass, draw


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
        conn.request("POST", cls.path, body=json.dumps(body).encode(),
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


def saturate(server: ServerProcess, clients: int, requests: list, seed: int) -> dict:
    """Capacity: ``requests`` ((class, body) pairs, e.g. ``workload.draw_list``'s: the same
    list for every mode) sent by ``clients`` closed-loop clients, each taking the next as soon
    as its last returns; images/s over the time until the last reply."""
    todo = queue.Queue()
    for item in requests:
        todo.put(item)
    records: list[dict] = []
    lock = threading.Lock()
    steady: list = []  # (time, metrics) when the first client found no request left

    def client(k: int):
        rng = random.Random(seed * 1000 + k)
        while True:
            try:
                cls, body = todo.get_nowait()
            except queue.Empty:
                with lock:
                    if not steady:
                        steady.append((time.monotonic(), server.metrics()))
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
    # Capacity is what the server serves while every client has a request in it: from then
    # on the last requests drain alone (a 1000-step one at batch 1), which measures the
    # request list's tail, not the scheduler.
    steady_at, at_steady = steady[0] if steady else (start + elapsed, after)
    steady_s = max(steady_at - start, 1e-9)
    steady_rows = int(at_steady["ddpm_rows_total"] - before["ddpm_rows_total"])
    return {"seconds": elapsed, "requests": len(ok), "requests_per_s": len(ok) / elapsed,
            "images_per_s": sum(r["n"] for r in ok) / elapsed,
            "image_steps_per_s": sum(r["work"] for r in ok) / elapsed,
            # Every row the network ran, as the server counts them (cancelled work too).
            "rows_per_s": (after["ddpm_rows_total"] - before["ddpm_rows_total"]) / elapsed,
            "network_calls": int(after["ddpm_ticks_total"] - before["ddpm_ticks_total"]),
            "rows": int(after["ddpm_rows_total"] - before["ddpm_rows_total"]),
            "errors": sum(r["outcome"] in ("error", "lost") for r in records),
            "batch_fill": _fill(before, after), "busy": _busy(before, after, elapsed),
            "steady_seconds": steady_s, "steady_rows": steady_rows,
            "steady_rows_per_s": steady_rows / steady_s,
            "steady_fill": _fill(before, at_steady),
            "steady_busy": _busy(before, at_steady, steady_s),
            # Cores the server process kept busy: below the cores its threads could use,
            # the rest of the window went to waiting (the tick's serial part), not to work.
            "steady_cores": (at_steady.get("process_cpu_seconds_total", math.nan)
                             - before.get("process_cpu_seconds_total", math.nan)) / steady_s}


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


def network_best(model, threads: int | None, batch: int, calls: int = 20,
                 trials: int = 5) -> float:
    """Rows per second of the network alone at full batch, with the server's threads: the
    most any scheduling can serve, the denominator of the server's efficiency. The best of
    ``trials`` runs of ``calls`` calls: one run is a fraction of a second, which a shared
    machine's noise moves by 10-20%."""
    import runtime

    with runtime.load(model, threads=threads) as pipe:
        x = np.random.default_rng(0).standard_normal((batch, *pipe.image_shape),
                                                     dtype=np.float32)
        t = np.full(batch, pipe.record.num_timesteps // 2, np.float32)
        pipe.eps_fn(x, t)  # untimed: sessions, allocations
        best = 0.0
        for _ in range(trials):
            start = time.perf_counter()
            for _ in range(calls):
                pipe.eps_fn(x, t)
            best = max(best, batch * calls / (time.perf_counter() - start))
        return best


def scheduler_alone(model, threads: int | None, max_batch: int, clients: int, requests: list,
                    batching: bool = True) -> float:
    """Rows per second of the batch scheduler driven in this process over ``requests``, with
    ``clients`` of them in flight, until the last is handed out (saturate's window): the
    server's own scheduling without HTTP, so a report can tell the two losses apart."""
    import runtime
    from runtime.options import SampleOptions
    from runtime.serving.scheduler import BatchScheduler

    with runtime.load(model, threads=threads) as pipe:
        scheduler = BatchScheduler(pipe.eps_fn, pipe.record, max_batch=max_batch,
                                   max_queue=len(requests) + 1, max_n=MAX_N,
                                   batching=batching).start()
        slots = threading.Semaphore(clients)
        jobs = []
        try:
            start = time.perf_counter()
            for _cls, body in requests:
                slots.acquire()
                options = SampleOptions.make(body["sampler"], body["steps"],
                                             defaults=pipe.record.defaults)
                jobs.append(scheduler.submit(body["n"], body["seed"], options,
                                             on_done=lambda _job: slots.release()))
            rows, seconds = scheduler.rows_run, time.perf_counter() - start
            for job in jobs:
                job.result()
        finally:
            scheduler.close(drain=False)
    return rows / max(seconds, 1e-9)
