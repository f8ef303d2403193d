"""How ONNX Runtime should use the CPU's threads: time and CPU per row of each policy.

    python tools/bench_threads.py MODEL.onnx [--batches 1,2,4,8,16,64] [--calls 100]
                                  [--rounds 3] [--hog 0]

Policies, each in its own process (an operator-threaded session's spinning threads would
otherwise bill the next policy measured), rounds alternating so load on a shared machine
falls on all alike:
  one      one session, one intra-op thread (what a batch of 1 gets by default now)
  wide     one session whose operators use --threads threads, ONNX Runtime spinning
           its idle threads (its default)
  wide-ns  the same without spinning (session.intra_op.allow_spinning = 0)
  backend  the runtime's OrtBackend as shipped, threads automatic (one-thread shards,
           as many as the cores other processes leave free; a batch of one on one thread)
For each batch size: wall milliseconds per call, rows per second and CPU milliseconds per
row (the process's user + system time, so threads spinning idle show up). ``--hog N``
keeps N busy-looping processes running during the measurement: a shared host.
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402
import numpy as np  # noqa: E402

POLICIES = ("one", "wide", "wide-ns", "backend")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _session(model: Path, threads: int, spinning: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 4
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    return lambda x, t: session.run(["eps"], {"x": x, "t": t})[0]


def _hog(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


def measure(model: Path, name: str, sizes: list[int], calls: int, threads: int) -> dict:
    """One policy in this process: {batch: (seconds per call, CPU seconds per row)}."""
    from runtime.backends.ort import OrtBackend
    from runtime.metadata import METADATA_KEY, ModelRecord

    if name == "backend":
        fn = OrtBackend(model, threads=None if threads == 0 else threads)
    else:
        fn = _session(model, 1 if name == "one" else threads, name != "wide-ns")
    import onnxruntime as ort

    meta = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    record = ModelRecord.from_json(meta.get_modelmeta().custom_metadata_map.get(METADATA_KEY),
                                   str(model))
    rng = np.random.default_rng(0)
    out = {}
    for b in sizes:
        x = rng.standard_normal((b, *record.image_shape)).astype(np.float32)
        t = np.full(b, 500.0, np.float32)
        fn(x, t)  # warm
        cpu0, wall0 = _cpu_seconds(), time.perf_counter()
        for _ in range(calls):
            fn(x, t)
        wall, cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
        out[b] = (wall / calls, cpu / (calls * b))
    return out


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--batches", default="1,2,4,8,16,64", show_default=True)
@click.option("--calls", type=click.IntRange(min=1), default=100, show_default=True,
              help="calls per batch size, policy and round")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--threads", type=click.IntRange(min=2), default=2, show_default=True)
@click.option("--hog", type=click.IntRange(min=0), default=0, show_default=True,
              help="busy processes running meanwhile (a shared host)")
@click.option("--worker", hidden=True, default=None)
def main(model, batches, calls, rounds, threads, hog, worker):
    import json
    import subprocess

    sizes = [int(b) for b in batches.split(",")]
    if worker is not None:
        print(json.dumps(measure(model, worker, sizes, calls, threads)))
        return
    stop = multiprocessing.Event()
    hogs = [multiprocessing.Process(target=_hog, args=(stop,), daemon=True) for _ in range(hog)]
    for p in hogs:
        p.start()
    results: dict = {}
    try:
        for r in range(rounds):
            for name in (POLICIES if r % 2 == 0 else POLICIES[::-1]):
                proc = subprocess.run([sys.executable, __file__, str(model), "--batches",
                                       batches, "--calls", str(calls), "--threads",
                                       str(threads), "--worker", name],
                                      capture_output=True, text=True, check=True)
                for b, value in json.loads(proc.stdout.strip().splitlines()[-1]).items():
                    results.setdefault((int(b), name), []).append(value)
    finally:
        stop.set()
        for p in hogs:
            p.join()
    print(f"model {model.name}, {threads} threads (backend: automatic), {hog} busy processes "
          f"meanwhile, medians of {rounds} rounds of {calls} calls, each policy in its own "
          "process")
    print("| batch | policy | ms per call | rows/s | CPU ms per row |")
    print("|---|---|---|---|---|")
    for b in sizes:
        for name in POLICIES:
            wall = statistics.median(r[0] for r in results[b, name])
            cpu = statistics.median(r[1] for r in results[b, name])
            print(f"| {b} | {name} | {wall * 1e3:.2f} | {b / wall:.0f} | {cpu * 1e3:.3f} |")


if __name__ == "__main__":
    main()
