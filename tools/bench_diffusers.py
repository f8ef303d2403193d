"""A diffusers DDPM folder served by the runtime against diffusers' own pipeline in torch.

    python tools/bench_diffusers.py FOLDER MODEL.onnx [--batches 1,8] [--threads 2]
                                    [--calls 5] [--rounds 2] [--out bench-diffusers/]

MODEL.onnx is FOLDER exported by ``export/to_onnx.py``. Two contenders, each round in a
fresh subprocess (so peak memory is its own), alternating: ``runtime`` (ONNX Runtime on
the CPU through ``runtime.load``, torch never imported) and ``diffusers`` (its
``UNet2DModel`` in torch eager with ``DPMSolverMultistepScheduler``, the same
``--threads``). Each measures, per batch size: the median time of ``--calls`` network
calls after ``WARMUP`` untimed ones, and one 10-call DPM-Solver++ 2M sample; seconds per image,
medians over rounds. Peak memory: the process's VmHWM. Writes OUT/bench.json and
OUT/bench.md; states the CPU.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402
import numpy as np  # noqa: E402

from tools.loadtesting.report import cpu_name  # noqa: E402

CONTENDERS = ("runtime", "diffusers")
SOLVER_STEPS = 10
# Untimed calls first: both libraries' second and third calls still settle their memory
# (ONNX Runtime's arena and allocation plan, CIFAR-10 batch 8: 32.6 ms/image on the second
# call, 29-30 from the third on).
WARMUP = 3


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(contender: str, folder: Path, onnx: Path, batch: int, threads: int,
           calls: int) -> dict:
    rng = np.random.default_rng(0)
    if contender == "runtime":
        import runtime

        pipe = runtime.load(onnx, threads=threads)
        shape = (batch, *pipe.image_shape)
        x = rng.standard_normal(shape, dtype=np.float32)
        t = np.full(batch, 500.0, np.float32)
        for _ in range(WARMUP):
            pipe.eps_fn(x, t)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            pipe.eps_fn(x, t)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        pipe.sample_float(batch, 0, sampler="dpmpp_2m", steps=SOLVER_STEPS, batch_size=batch,
                          progress=False)
        sample_s = time.perf_counter() - start
    else:
        import torch
        from diffusers import DPMSolverMultistepScheduler, UNet2DModel

        torch.set_num_threads(threads)
        unet = UNet2DModel.from_pretrained(folder / "unet").eval()
        cfg = unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        shape = (batch, cfg.in_channels, size, size)
        x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
        t = torch.full((batch,), 500.0)
        times = []
        with torch.inference_mode():
            for _ in range(WARMUP):
                unet(x, t)
            for _ in range(calls):
                start = time.perf_counter()
                unet(x, t)
                times.append(time.perf_counter() - start)
            sched = DPMSolverMultistepScheduler.from_pretrained(folder / "scheduler")
            sched.set_timesteps(SOLVER_STEPS)
            start = time.perf_counter()
            sample = torch.randn(shape, generator=torch.Generator().manual_seed(0))
            for step_t in sched.timesteps:
                out = unet(sample, step_t).sample
                sample = sched.step(out, step_t, sample).prev_sample
            sample_s = time.perf_counter() - start
    return {"call_s": statistics.median(times), "sample_s": sample_s,
            "peak_rss_mib": peak_rss_mib()}


@click.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("onnx", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--batches", default="1,8", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--calls", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("bench-diffusers"), show_default=True)
@click.option("--worker", "worker_args", hidden=True, default=None)
def main(folder, onnx, batches, threads, calls, rounds, out, worker_args):
    """Runtime (ONNX Runtime) against diffusers (torch eager) on FOLDER's network."""
    if worker_args is not None:  # one measurement, in its own process
        contender, batch = worker_args.split(":")
        print(json.dumps(worker(contender, folder, onnx, int(batch), threads, calls)))
        return
    from runtime.util.fileio import write_text

    sizes = [int(b) for b in batches.split(",")]
    results: dict = {}
    for r in range(rounds):
        for contender in (CONTENDERS if r % 2 == 0 else CONTENDERS[::-1]):
            for batch in sizes:
                proc = subprocess.run(
                    [sys.executable, __file__, str(folder), str(onnx), "--threads",
                     str(threads), "--calls", str(calls), "--worker", f"{contender}:{batch}"],
                    capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
                if proc.returncode != 0:
                    raise click.ClickException(f"{contender} batch {batch} failed: "
                                               f"{proc.stderr.strip().splitlines()[-1:]}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                results.setdefault(f"{contender}:{batch}", []).append(res)
                click.echo(f"[{r}] {contender} batch {batch}: {res}", err=True)
    rows, summary = [], {}
    for batch in sizes:
        med = {c: {k: statistics.median(x[k] for x in results[f"{c}:{batch}"])
                   for k in ("call_s", "sample_s", "peak_rss_mib")} for c in CONTENDERS}
        summary[batch] = med
        rt, df = med["runtime"], med["diffusers"]
        rows.append(f"| {batch} | {rt['call_s'] / batch * 1e3:.1f} | "
                    f"{df['call_s'] / batch * 1e3:.1f} | {df['call_s'] / rt['call_s']:.2f}x | "
                    f"{rt['sample_s'] / batch:.2f} | "
                    f"{df['sample_s'] / batch:.2f} | {df['sample_s'] / rt['sample_s']:.2f}x | "
                    f"{rt['peak_rss_mib']:.0f} | {df['peak_rss_mib']:.0f} |")
    from runtime.backends import model_files

    size_mb = sum(p.stat().st_size for p in model_files(onnx)) / 2**20  # with its weights
    table = "\n".join([
        f"{folder.name}: runtime (ONNX Runtime, {onnx.name}, {size_mb:.0f} MiB) against "
        f"diffusers (torch eager), {threads} threads, {cpu_name()}, medians of {rounds} "
        "rounds.", "",
        "| batch | runtime ms/image, 1 call | diffusers ms/image, 1 call | speed-up | "
        f"runtime s/image, {SOLVER_STEPS}-call dpmpp_2m | diffusers s/image | speed-up | "
        "runtime peak MiB | diffusers peak MiB |",
        "|---|---|---|---|---|---|---|---|---|", *rows]) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "bench.json", json.dumps({"summary": summary, "runs": results,
                                               "cpu": cpu_name(), "threads": threads},
                                              indent=1) + "\n")
    write_text(out / "bench.md", table)
    click.echo(table)


if __name__ == "__main__":
    main()
