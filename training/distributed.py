"""torchrun / DistributedDataParallel plumbing: who am I, which device, how many threads."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from runtime.util.cpus import busy_cores, cpu_count


class DeviceError(RuntimeError):
    """The requested device cannot be used here (one-line message)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info_from_env() -> DistInfo:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; a plain `python` run is rank 0 of 1."""
    env = os.environ
    return DistInfo(rank=int(env.get("RANK", 0)), world_size=int(env.get("WORLD_SIZE", 1)),
                    local_rank=int(env.get("LOCAL_RANK", 0)),
                    local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)))


def resolve_device(name: str, info: DistInfo) -> torch.device:
    """'auto' -> CUDA when available, else CPU; under torchrun each rank takes cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r}: no CUDA device is visible to torch "
                              f"{torch.__version__}; use --device cpu")
        index = info.local_rank if device.index is None and info.enabled else device.index
        device = torch.device("cuda", index or 0)
        if device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device}: only {torch.cuda.device_count()} CUDA "
                              "device(s) visible")
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise DeviceError(f"device {name!r}: unsupported; use auto, cpu, cuda or cuda:N")
    return device


def set_cpu_threads(info: DistInfo, threads: int | None = None) -> int:
    """Intra-op threads for CPU training: ``threads``, else OMP_NUM_THREADS, else automatic.

    Automatic: this process's share of the usable cores, less the cores that other work
    keeps busy right now (sampled for a fraction of a second; where that cannot be read,
    one core is left free). Every op synchronises its OpenMP threads, so one thread that
    shares its core stalls them all: on a 2-core machine 2 threads trained the digits
    ~1.45x faster than 1 while nothing else ran, and 2-20x slower than 1 beside another
    busy process (tools/train_bench.py).
    """
    if threads is None:
        if "OMP_NUM_THREADS" in os.environ:
            return torch.get_num_threads()  # the user (or torchrun) chose; respect it
        cores = cpu_count()
        share = max(1, cores // info.local_world_size)
        if info.local_world_size > 1:
            threads = share
        else:
            busy = busy_cores()
            threads = max(1, share - (1 if busy is None else round(busy)))
    torch.set_num_threads(threads)
    return threads


def init_process_group(info: DistInfo, device: torch.device) -> None:
    """NCCL between GPUs, gloo between CPU processes; a no-op for a single process."""
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size,
                                device_id=device if device.type == "cuda" else None)


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= info.world_size
    return values


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
