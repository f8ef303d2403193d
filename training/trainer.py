"""The training loop: L_simple with Adam, warmup, grad clipping, EMA, checkpoints, previews.

Every random draw of step n (data order, t, noise, flips, dropout) comes from seeds derived
from (seed, rank, n), so a run resumed from its step-n checkpoint repeats an uninterrupted
run exactly (on the same number of processes and the same kind of device), and each DDP
rank draws its own stream.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function

from runtime.util.cpus import cpu_count
from runtime.util.fileio import (
    OutputError,
    describe_os_error,
    remove_stale_temporaries,
    write_bytes,
)

from .bridge import schedule_tensors
from .checkpoint import make_checkpoint, nonfinite_tensor, save_checkpoint
from .config import ModelConfig, TrainConfig
from .data import Dataset, DatasetError, to_unit_range
from .diffusion import loss_simple
from .distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    destroy_process_group,
    dist_info_from_env,
    init_process_group,
    resolve_device,
    set_cpu_threads,
)
from .ema import EMA
from .preview import write_preview
from .progress import StepBar
from .unet import UNet

CKPT_NAME = "ckpt.pt"
LOG_NAME = "log.jsonl"
# Tags that keep the derived seed streams apart.
_EPOCH, _BATCH, _DROPOUT = 0, 1, 2
# Datasets up to this size live on the training device; larger ones are copied per batch.
_ON_DEVICE_BYTES = 2**30


class DivergedError(FloatingPointError):
    """Training produced NaN or inf (loss, gradients or weights); nothing bad is saved."""


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SeedSequence hashing: nearby inputs give unrelated seeds)."""
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def scheduled_lr(cfg: TrainConfig, step: int, horizon: int) -> float:
    """Linear warmup from 0 to lr over ``warmup`` steps, then constant (the paper) or a
    cosine decay that reaches 0 at step ``horizon``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_decay == "cosine":
        done = (step - cfg.warmup) / max(horizon - cfg.warmup, 1)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))
    return cfg.lr


def epoch_steps(dataset: Dataset, batch_size: int, world_size: int, *,
                resuming: bool = False) -> int:
    """Steps per epoch: whole batches of each process's shard (DatasetError when none fits)."""
    local = max(batch_size // world_size, 1)
    steps = len(dataset) // world_size // local
    if steps == 0:
        fix = ("a resumed run keeps its batch size: restore the data it was trained on, or "
               "start a new run (another --out) with a lower --batch-size" if resuming
               else "lower --batch-size")
        raise DatasetError(f"{dataset.spec}: {len(dataset)} images cannot fill a batch of "
                           f"{local} per process; {fix}")
    return steps


class Trainer:
    """One process's share of a run. Build, optionally ``load_state``, then ``fit``.

    ``model``: the network to train, UNet(model_config) by default (the distiller passes
    a copy of its teacher; tests, a closed-form family).
    """

    checkpoint_name = CKPT_NAME

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig, dataset: Dataset,
                 out_dir: str | Path, *, device: torch.device | str = "cpu",
                 info: DistInfo | None = None, bf16: bool = False, progress: bool = True,
                 resuming: bool = False, model: torch.nn.Module | None = None):
        expected = (model_config.in_channels, model_config.image_size, model_config.image_size)
        if dataset.image_shape != expected:
            raise ValueError(f"dataset images are [C, H, W] = {list(dataset.image_shape)}, the "
                             f"model expects {list(expected)}")
        info = info or DistInfo()
        if train_config.batch_size % info.world_size:
            raise ValueError(f"batch size {train_config.batch_size} does not split evenly over "
                             f"{info.world_size} processes")
        self.model_config, self.config, self.dataset = model_config, train_config, dataset
        self.out_dir = Path(out_dir)
        self.device = torch.device(device)
        self.info, self.bf16, self.progress = info, bf16, progress
        self.schedule = train_config.schedule()
        self.st = schedule_tensors(self.schedule, self.device)
        self.local_batch = train_config.batch_size // info.world_size
        # Before anything is written: a refused run leaves its folder as it was.
        self.steps_per_epoch = epoch_steps(dataset, train_config.batch_size, info.world_size,
                                           resuming=resuming)

        torch.manual_seed(train_config.seed)  # the same initial weights on every rank
        self.model = (UNet(model_config) if model is None else model).to(self.device)
        self.ema = EMA(self.model, train_config.ema_decay, warmup=train_config.ema_warmup)
        # The fused kernel updates every tensor in one call; on a small CPU model the default
        # per-tensor loop costs as much again as clipping and the EMA together.
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=train_config.lr,
                                          fused=self.device.type in ("cpu", "cuda"))
        levels = torch.from_numpy(dataset.levels)
        self.levels = levels.to(self.device) if levels.nbytes <= _ON_DEVICE_BYTES else levels
        self.step = 0
        self._finite = torch.ones((), dtype=torch.bool, device=self.device)  # all grads so far
        self.elapsed_s = 0.0  # training wall time over all sessions of this run
        self._epoch, self._order = -1, None
        self._net = None  # the DDP wrapper (or the model), made in fit()

    # === State ===

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint: plain data and tensors only (loads with weights_only=True)."""
        return make_checkpoint(
            model_config=self.model_config.to_dict(),
            train_config=self.config.to_dict(),
            schedule=dict(self.schedule.config),
            data={"name": self.dataset.name, "spec": self.dataset.spec,
                  "image_shape": list(self.dataset.image_shape), "data_range": [-1.0, 1.0],
                  "num_levels": self.dataset.num_levels},
            step=self.step,
            model=self.model.state_dict(),
            ema=self.ema.state_dict(),
            optimizer=self.optimizer.state_dict(),
            rng=_rng_state(),
            world_size=self.info.world_size,
            threads=torch.get_num_threads(),
            elapsed_s=self.elapsed_s,
            torch_version=str(torch.__version__),
        )

    def load_state(self, ckpt: dict[str, Any]) -> None:
        """Continue from a checkpoint (call before fit)."""
        if ckpt["model_config"] != self.model_config.to_dict():
            raise ValueError("the checkpoint's model config differs from this run's; resume "
                             "with the checkpoint's own configuration")
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = int(ckpt["step"])
        self.elapsed_s = float(ckpt.get("elapsed_s", 0.0))
        _set_rng_state(ckpt["rng"])

    # === One step ===

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step``: :func:`scheduled_lr` over the whole run."""
        return scheduled_lr(self.config, step, self.config.steps)

    def ema_updates(self, step: int) -> int:
        """The EMA's update count at ``step``, for its warmup: the run's steps."""
        return step

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_0, t, noise) of this rank at ``step``: a function of (seed, rank, step) alone."""
        cfg, b = self.config, self.local_batch
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            # One permutation per epoch shared by all ranks; rank r takes every r-th image.
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, _EPOCH, epoch))
            order = torch.randperm(len(self.dataset), generator=gen)
            usable = (len(self.dataset) // self.info.world_size) * self.info.world_size
            self._order = order[self.info.rank:usable:self.info.world_size]
            self._epoch = epoch
        idx = self._order[pos * b:(pos + 1) * b]
        x0 = to_unit_range(self.levels[idx.to(self.levels.device)].to(self.device),
                           self.dataset.num_levels)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(derive_seed(cfg.seed, _BATCH, self.info.rank, step))
        if cfg.hflip:
            flip = torch.rand(b, generator=gen, device=self.device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        t = torch.randint(0, self.schedule.num_timesteps, (b,), generator=gen, device=self.device)
        noise = torch.randn(x0.shape, generator=gen, device=self.device)
        return x0, t, noise

    def loss(self, net: torch.nn.Module, batch) -> torch.Tensor:
        """The objective on ``batch`` (what :meth:`batch` returned): L_simple."""
        x0, t, noise = batch
        return loss_simple(net, self.st, x0, t, noise)

    def train_step(self, net: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns (loss, grad norm before clipping) as device tensors."""
        step = self.step
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        torch.manual_seed(derive_seed(self.config.seed, _DROPOUT, self.info.rank, step))
        # Phases are labelled for the profiler (tools/train_bench.py --profile).
        with record_function("data"):
            batch = self.batch(step)
        with record_function("forward"), \
                torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss(net, batch)
        self.optimizer.zero_grad(set_to_none=True)
        with record_function("backward"):
            loss.backward()
        with record_function("clip"):
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), self.config.grad_clip, foreach=True)
        # Kept on the device (no sync per step); checked with the weights at each log and save.
        self._finite &= torch.isfinite(grad_norm)
        with record_function("optimizer"):
            self.optimizer.step()
        with record_function("ema"):
            self.ema.update(self.model, self.ema_updates(step))
        self.step += 1
        return loss.detach(), grad_norm.detach()

    # === The loop ===

    def fit(self) -> None:
        """Train until ``config.steps``, logging, previewing and checkpointing on the way."""
        self.prepare_fit()
        self.train_until(self.config.steps, self.progress_bar(self.config.steps, self.step))

    def prepare_fit(self) -> None:
        """Before the first step of a session: the network to step and the run folder
        (temporaries of a killed save removed, the log cut back to the checkpoint)."""
        if self._net is None:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._net = (DistributedDataParallel(self.model, device_ids=ids)
                         if self.info.enabled else self.model)
        if self.info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.out_dir / self.checkpoint_name)  # a killed save's
            _truncate_log(self.out_dir / LOG_NAME, self.step)

    def progress_bar(self, total: int, initial: int, desc: str | None = None) -> StepBar:
        return StepBar(total=total, initial=initial, desc=desc, unit="step", mininterval=1.0,
                       disable=not (self.info.is_main and self.progress), dynamic_ncols=True)

    def train_until(self, end: int, bar: StepBar) -> None:
        """Step until ``end``: logs every ``log_every`` steps, checkpoints and previews every
        ``save_every`` / ``sample_every``, and all three at ``end``. Closes ``bar``."""
        cfg = self.config
        loss_sum = torch.zeros((), device=self.device)
        norm_sum = torch.zeros((), device=self.device)
        window, window_start = 0, time.perf_counter()
        session_start, elapsed_before = window_start, self.elapsed_s
        try:
            while self.step < end:
                loss, grad_norm = self.train_step(self._net)
                loss_sum += loss
                norm_sum += grad_norm
                window += 1
                bar.update(1)
                self.elapsed_s = elapsed_before + time.perf_counter() - session_start
                last = self.step == end
                if self.step % cfg.log_every == 0 or last:
                    now = time.perf_counter()
                    self._log(bar, loss_sum / window, norm_sum / window,
                              window / (now - window_start))
                    loss_sum.zero_()
                    norm_sum.zero_()
                    window, window_start = 0, now
                pause_start = time.perf_counter()
                if last or (cfg.save_every and self.step % cfg.save_every == 0):
                    self.save()
                if last or (cfg.sample_every and self.step % cfg.sample_every == 0):
                    self.preview()
                # Throughput counts training only, not checkpoints and previews.
                window_start += time.perf_counter() - pause_start
        finally:
            bar.close()

    def _log(self, bar, loss: torch.Tensor, grad_norm: torch.Tensor, steps_per_s: float) -> None:
        loss_v, norm_v = all_reduce_mean(torch.stack([loss, grad_norm]), self.info).tolist()
        if not math.isfinite(loss_v):
            raise DivergedError(f"the loss became {loss_v} by step {self.step}; lower --lr "
                                "or resume from an earlier checkpoint")
        self.check_finite()
        record = {"step": self.step, **self.log_fields(), "loss": loss_v,
                  "lr": self.lr_at(self.step - 1), "grad_norm": norm_v,
                  "steps_per_s": steps_per_s,
                  "images_per_s": steps_per_s * self.config.batch_size,
                  "threads": torch.get_num_threads(),
                  "elapsed_s": self.elapsed_s}
        if self.info.is_main:
            append_log(self.out_dir / LOG_NAME, record)
            bar.set_postfix(loss=f"{loss_v:.4f}", refresh=False)

    def log_fields(self) -> dict[str, Any]:
        """Fields a subclass adds to every log record, after ``step``."""
        return {}

    def check_finite(self) -> None:
        """Stop on NaN or inf in any gradient so far or in the weights (after the update)."""
        bad = None if bool(self._finite) else "a gradient"
        for what, module in (("weight", self.model), ("EMA weight", self.ema.model)):
            name = None if bad else nonfinite_tensor(module.state_dict())
            bad = f"{what} {name}" if name else bad
        if bad:
            raise DivergedError(f"{bad} became NaN or inf by step {self.step}; train again "
                                "with a lower --lr (the last checkpoint is left as it was)")

    def save(self) -> Path:
        path = self.out_dir / self.checkpoint_name
        self.check_finite()  # never write a checkpoint that cannot be sampled from
        if self.info.is_main:
            save_checkpoint(path, self.state_dict())
        barrier(self.info)
        return path

    def preview(self) -> Path | None:
        if not self.info.is_main:
            return None
        cfg = self.config
        return write_preview(self.out_dir / f"samples_{self.step:07d}.png", self.ema.model,
                             self.schedule, count=cfg.preview_count, steps=cfg.preview_steps,
                             image_shape=self.dataset.image_shape, seed=cfg.seed,
                             device=self.device)


def train(model_config: ModelConfig, train_config: TrainConfig, dataset: Dataset,
          out_dir: str | Path, *, device: str = "auto", bf16: bool = False,
          resume_from: dict[str, Any] | None = None, progress: bool = True,
          threads: int | None = None) -> Trainer:
    """Run (or continue) training in this process; under torchrun, as one DDP rank."""
    info = dist_info_from_env()
    torch_device = run_device(info, device, resume_from, threads)
    init_process_group(info, torch_device)
    try:
        trainer = Trainer(model_config, train_config, dataset, out_dir, device=torch_device,
                          info=info, bf16=bf16, progress=progress,
                          resuming=resume_from is not None)
        if resume_from is not None:
            trainer.load_state(resume_from)
        trainer.fit()
    finally:
        destroy_process_group()
    return trainer


def run_device(info: DistInfo, device: str, resume_from: dict[str, Any] | None,
               threads: int | None) -> torch.device:
    """This process's device (resolve_device) and, on the CPU, its threads: ``threads``,
    else OMP_NUM_THREADS, else a resumed run's own count, else the free cores."""
    torch_device = resolve_device(device, info)
    if torch_device.type == "cpu":
        if threads is None and resume_from is not None and "OMP_NUM_THREADS" not in os.environ:
            threads = _saved_threads(resume_from)
        set_cpu_threads(info, threads)
    return torch_device


def _saved_threads(ckpt: dict[str, Any]) -> int | None:
    """The run's own thread count, to keep on resume (results depend on it in the last
    bits); None (automatic) where it is missing, malformed or more than this machine has."""
    saved = ckpt.get("threads")
    if isinstance(saved, int) and not isinstance(saved, bool) and 1 <= saved <= cpu_count():
        return saved
    return None


def _rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain data (numpy's array becomes a list)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and \
            len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np.array(np_state["keys"], dtype=np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))


def append_log(path: Path, record: dict[str, Any]) -> None:
    """Append one record to a run's log.jsonl. Strict JSON: a non-finite number (a timing
    over a zero-length window) is written as null."""
    record = {k: v if not isinstance(v, float) or math.isfinite(v) else None
              for k, v in record.items()}
    try:  # appended, not replaced: a line cut short by a crash is dropped on resume
        with open(path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
    except OSError as err:
        raise OutputError(describe_os_error(err, path)) from None


def _logged_step(line: bytes) -> int | None:
    """The step of a log record, or None for a line that is not one."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if type(step) is int else None


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop records the interrupted session wrote after its last checkpoint.

    A last line cut short by a crash (no newline) is dropped with them. Lines that are not
    records (edited, damaged) neither block the resume nor get lost: the file is copied
    aside whole, with a one-line warning, and the records up to ``step`` are kept.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    except OSError as err:
        raise OutputError(describe_os_error(err, path)) from None
    lines = data.split(b"\n")
    lines.pop()  # empty when the file ends with a newline, else a line cut short
    kept, bad = [], []
    for number, line in enumerate(lines, 1):
        logged = _logged_step(line)
        if logged is None and line.strip():
            bad.append(number)
        elif logged is not None and logged <= step:
            kept.append(line)
    if bad:
        aside = path.with_name(path.name + ".corrupt")
        for n in range(1, 1000):
            if not aside.exists():
                break
            aside = path.with_name(f"{path.name}.corrupt.{n}")
        write_bytes(aside, data)
        print(f"warning: {path}: {len(bad)} line(s) are not log records (first: line "
              f"{bad[0]}); kept the records up to step {step}, the whole file is in {aside}",
              file=sys.stderr)
    if len(kept) != len(lines) or (data and not data.endswith(b"\n")):
        write_bytes(path, b"".join(line + b"\n" for line in kept))
