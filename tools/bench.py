"""Sampling throughput: the runtime beside PyTorch eager and diffusers, same network, same threads.

    python tools/bench.py [--preset digits|cifar10] [--checkpoint CKPT] [--batch 64]
                          [--steps 100] [--threads 2] [--repeats 3] [--out bench/]

Each contender runs in its own subprocess, so peak memory is its own and thread pools
never compete: one untimed network call at the batch size (set-up), then a whole
sampling loop (respaced DDPM with --steps steps, figures scaled to the full T-step
chain). Contenders alternate over --repeats rounds; medians are reported. Writes
OUT/bench.json and OUT/bench.md.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402
import numpy as np  # noqa: E402

from runtime.errors import MAX_THREADS  # noqa: E402
from runtime.util.clierrors import guarded_command  # noqa: E402
from runtime.util.cpus import cpu_count  # noqa: E402
from runtime.util.fileio import check_output, write_text  # noqa: E402

CONTENDERS = ("torch", "diffusers", "ort_cpu", "ort_cuda", "trt_fp32", "trt_fp16", "torch_cuda")
BASELINE = "torch"
TORCH_NETWORK = ("torch", "diffusers", "torch_cuda")  # run the paper's network, not the file


# === Workers: one contender, one sampling loop, in a fresh process ===


class Timed:
    """Wrap eps_fn and count the seconds spent inside it: the rest is sampler overhead."""

    def __init__(self, fn, sync=None):
        self.fn, self.sync, self.seconds, self.calls = fn, sync, 0.0, 0

    def __call__(self, x, t):
        start = time.perf_counter()
        out = self.fn(x, t)
        if self.sync is not None:
            self.sync()  # CUDA work is asynchronous: count it where it happens
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def _torch_model(model_dir: Path, device: str):
    import torch

    from training.checkpoint import build_model, load_checkpoint

    model = build_model(load_checkpoint(model_dir / "ckpt.pt")).to(device)
    return model, torch


def run_worker(contender: str, model_dir: Path, batch: int, steps: int, threads: int) -> dict:
    meta = json.loads((model_dir / "meta.json").read_text())
    shape = (batch, *meta["image_shape"])
    from runtime.samplers import ImageNoise
    from runtime.schedule import Schedule

    schedule = Schedule.from_config(meta["schedule"]).respaced(steps)
    noise = ImageNoise(0, batch)
    x = np.zeros(shape, np.float32)
    t = np.full(batch, schedule.timesteps[-1], np.float32)
    if contender in ("torch", "torch_cuda"):
        device = "cuda" if contender == "torch_cuda" else "cpu"
        model, torch = _torch_model(model_dir, device)
        torch.set_num_threads(threads)
        from training.reference import reference_sample

        sync = torch.cuda.synchronize if device == "cuda" else None
        with torch.inference_mode():  # untimed warm-up: kernel selection, allocations
            model(torch.from_numpy(x).to(device), torch.from_numpy(t).to(device))
        timed = Timed(model, sync)
        start = time.perf_counter()
        reference_sample(timed, schedule, shape, noise, device=device)
    elif contender == "diffusers":
        model, torch = _torch_model(model_dir, "cpu")
        torch.set_num_threads(threads)
        from diffusers import DDPMScheduler

        sched = DDPMScheduler(num_train_timesteps=meta["schedule"]["num_timesteps"],
                              beta_start=meta["schedule"]["beta_start"],
                              beta_end=meta["schedule"]["beta_end"], beta_schedule="linear",
                              variance_type="fixed_large", clip_sample=True)
        sched.set_timesteps(steps)
        with torch.inference_mode():
            model(torch.from_numpy(x), torch.from_numpy(t))
        timed = Timed(model)
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        with torch.inference_mode():
            x = torch.randn(shape, generator=generator)
            for t in sched.timesteps:
                eps = timed(x, torch.full((batch,), float(t)))
                x = sched.step(eps, t, x, generator=generator).prev_sample
    else:
        import runtime

        if contender.startswith("trt"):
            pipe = runtime.load(model_dir / f"model_{contender[4:]}.plan")
        else:
            device = "cuda" if contender == "ort_cuda" else "cpu"
            pipe = runtime.load(model_dir / "model.onnx", device=device, threads=threads)
        pipe.eps_fn(x, t)  # untimed warm-up: sessions, engine contexts, allocations
        # The pipeline as users call it, with its network call timed.
        timed = pipe.eps_fn = Timed(pipe.eps_fn)
        start = time.perf_counter()
        pipe.sample_float(batch, seed=0, steps=steps, batch_size=batch, progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "network_seconds": timed.seconds, "calls": timed.calls,
            "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory. Not getrusage: on Linux its ru_maxrss carries
    the parent's peak across fork and exec, so every worker would report the driver's."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# === The driver ===


def matmul_gflops(threads: int, n: int = 1024, repeats: int = 10) -> float:
    """The machine's fp32 matrix-multiply rate with this thread budget (best of repeats)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_time(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def machine() -> str:
    from tools.loadtesting.report import cpu_name

    return f"{cpu_name()}, {cpu_count()} cores"


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def prepare(model_dir: Path, preset_name: str, checkpoint: Path | None) -> dict:
    """Write ckpt.pt (given or random weights), model.onnx and meta.json into model_dir."""
    import shutil

    from export.onnx_export import export_checkpoint
    from training.checkpoint import save_checkpoint

    if checkpoint is not None:
        shutil.copy(checkpoint, model_dir / "ckpt.pt")
        source = str(checkpoint)
    else:
        save_checkpoint(model_dir / "ckpt.pt", random_checkpoint(preset_name))
        source = f"{preset_name} preset, random weights"
    _, record, check = export_checkpoint(model_dir / "ckpt.pt", model_dir / "model.onnx")
    meta = {"image_shape": list(record.image_shape), "schedule": record.schedule,
            "flops_per_image": record.flops_per_image, "source": source,
            "onnx_max_rel_diff": check.max_rel,
            "exported_flops_per_image": exported_flops(model_dir / "ckpt.pt")}
    write_text(model_dir / "meta.json", json.dumps(meta))
    return meta


def exported_flops(ckpt_path: Path) -> int:
    """FLOPs of the graph the model file runs: export's rewrites do less work than the
    paper's network (``flops_per_image``), and efficiency should count the work done."""
    from export.onnx_export import count_flops
    from export.rewrites import deploy_form
    from training.checkpoint import build_model, load_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    return count_flops(deploy_form(build_model(ckpt)), ckpt["data"]["image_shape"])


def random_checkpoint(preset_name: str) -> dict:
    """A checkpoint of the preset's network with random (not zero-initialised) weights."""
    import torch

    from training.checkpoint import make_checkpoint
    from training.config import preset
    from training.unet import UNet

    model_cfg, train_cfg = preset(preset_name)
    torch.manual_seed(0)
    model = UNet(model_cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    state = model.state_dict()
    shape = [model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size]
    return make_checkpoint(model_config=model_cfg.to_dict(), train_config=train_cfg.to_dict(),
                           schedule=train_cfg.schedule().config,
                           data={"name": preset_name, "image_shape": shape,
                                 "data_range": [-1.0, 1.0], "num_levels": 256},
                           step=0, model=state, ema=state)


def available(contender: str) -> str | None:
    """None if the contender can run here, else why not."""
    import importlib.util

    if contender == "diffusers" and importlib.util.find_spec("diffusers") is None:
        return "diffusers is not installed (pip install diffusers)"
    if contender in ("torch_cuda",):
        import torch

        return None if torch.cuda.is_available() else "no CUDA GPU"
    if contender == "ort_cuda":
        from runtime.backends.ort import available_providers

        ok = "CUDAExecutionProvider" in available_providers()
        return None if ok else "onnxruntime-gpu's CUDA provider is not available"
    if contender.startswith("trt"):
        from runtime.backends.trt import trt_unavailable_reason

        return trt_unavailable_reason()
    return None


def build_engines(model_dir: Path, batch: int) -> None:
    from export.trt_build import build_engine
    from runtime.backends.ort import read_record

    record = read_record(model_dir / "model.onnx")
    for precision in ("fp32", "fp16"):
        build_engine(model_dir / "model.onnx", model_dir / f"model_{precision}.plan",
                     precision=precision, min_batch=1, opt_batch=batch, max_batch=batch,
                     record=record)


def summarize(runs: dict[str, list[dict]], meta: dict, args: dict, matmul: float) -> dict:
    T = meta["schedule"]["num_timesteps"]
    steps, batch = args["steps"], args["batch"]
    rows = {}
    for name, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        network = statistics.median(r["network_seconds"] for r in results)
        per_image_full = seconds / batch * T / steps  # the whole T-step chain
        flops = meta["flops_per_image" if name in TORCH_NETWORK else "exported_flops_per_image"]
        gflops = flops * batch * steps / network / 1e9
        rows[name] = {
            "images_per_s": 1.0 / per_image_full,
            "seconds_median": seconds,
            "seconds_all": [r["seconds"] for r in results],
            "overhead_share": max(0.0, 1.0 - network / seconds),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "network_gflops": gflops,
            "network_share_of_matmul": gflops / matmul,
        }
    base = rows.get(BASELINE, {}).get("images_per_s")
    for row in rows.values():
        row["speedup_vs_torch"] = row["images_per_s"] / base if base else None
    return rows


def markdown(report: dict) -> str:
    a = report["args"]
    lines = [
        f"Preset `{a['preset']}` ({report['meta']['source']}), batch {a['batch']}, "
        f"{a['threads']} threads, {a['steps']}-step loops scaled to "
        f"{report['meta']['schedule']['num_timesteps']} steps, median of {a['repeats']}; "
        f"{report['machine']}; fp32 matmul {report['matmul_gflops']:.1f} GFLOP/s.",
        "",
        "| contender | images/s | vs torch | overhead | peak RSS MB | network GFLOP/s "
        "| of matmul |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in report["rows"].items():
        ratio = f"{r['speedup_vs_torch']:.2f}x" if r["speedup_vs_torch"] else "-"
        lines.append(f"| {name} | {r['images_per_s']:.3g} | {ratio} | "
                     f"{r['overhead_share']:.1%} | {r['peak_rss_mb']:.0f} | "
                     f"{r['network_gflops']:.1f} | {r['network_share_of_matmul']:.0%} |")
    for name, why in report["skipped"].items():
        lines.append(f"| {name} | skipped: {why} | | | | | |")
    meta = report["meta"]
    saved = 1 - meta["exported_flops_per_image"] / meta["flops_per_image"]
    lines += ["", f"GFLOP/s counts the work each network does: {meta['flops_per_image'] / 1e9:.3g} "
              f"GFLOP per image for torch's, {saved:.1%} less for the exported file "
              "(upsampling as a transposed convolution)."]
    return "\n".join(lines) + "\n"


@click.command(cls=guarded_command(), context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", "preset_name", type=click.Choice(["digits", "cifar10"]),
              default="digits", show_default=True)
@click.option("--checkpoint", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="trained weights (default: the preset at random init)")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True,
              help="steps per timed loop; figures are scaled to the full chain")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=2, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--only", multiple=True, type=click.Choice(CONTENDERS),
              help="run only these contenders (repeatable)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("bench"), show_default=True)
@click.option("--worker", type=click.Choice(CONTENDERS), default=None, hidden=True)
@click.option("--model-dir", type=click.Path(path_type=Path), default=None, hidden=True)
def main(preset_name, checkpoint, batch, steps, threads, repeats, only, out, worker, model_dir):
    """Time full sampling loops of one network through every contender available here."""
    if worker is not None:
        click.echo(json.dumps(run_worker(worker, model_dir, batch, steps, threads)))
        return
    for name in ("bench.json", "bench.md"):  # before the (long) run, not after it
        check_output(out / name, inputs=[checkpoint], option="--out")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        meta = prepare(model_dir, preset_name, checkpoint)
        contenders, skipped = [], {}
        for name in only or CONTENDERS:
            why = available(name)
            if why:
                skipped[name] = why
            else:
                contenders.append(name)
        if any(c.startswith("trt") for c in contenders):
            build_engines(model_dir, batch)
        matmul = matmul_gflops(threads)
        runs: dict[str, list[dict]] = {c: [] for c in contenders}
        for round_ in range(repeats):
            # Alternate the order each round so drift in the machine shows up in every row.
            for name in contenders if round_ % 2 == 0 else contenders[::-1]:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name,
                       "--model-dir", str(model_dir), "--batch", str(batch),
                       "--steps", str(steps), "--threads", str(threads)]
                result = subprocess.run(cmd, capture_output=True, text=True)
                if result.returncode != 0:
                    raise click.ClickException(f"{name} failed: {result.stderr.strip()[-500:]}")
                runs[name].append(json.loads(result.stdout.strip().splitlines()[-1]))
                click.echo(f"round {round_ + 1}/{repeats} {name}: "
                           f"{runs[name][-1]['seconds']:.2f} s", err=True)
    args = {"preset": preset_name, "batch": batch, "steps": steps, "threads": threads,
            "repeats": repeats}
    report = {"args": args, "meta": meta, "matmul_gflops": matmul, "skipped": skipped,
              "machine": machine(),
              "rows": summarize(runs, meta, args, matmul)}
    write_text(out / "bench.json", json.dumps(report, indent=2))
    table = markdown(report)
    write_text(out / "bench.md", table)
    click.echo(table)


if __name__ == "__main__":
    main()
