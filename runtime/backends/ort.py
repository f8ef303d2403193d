"""ONNX Runtime backend: an ONNX ε-network file as an ``eps_fn(x, t)`` callable."""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import MAX_THREADS, BackendUnavailableError, ModelFileError, check_int
from ..metadata import METADATA_KEY, ModelRecord
from ..util.cpus import OtherLoad, cpu_count
from . import register
from .onnx_files import onnx_files

# A network of at least this many FLOPs per image threads its operators instead of cutting
# batches into one-thread shards. Measured on 2 cores (tools/bench_threads.py,
# tools/bench_diffusers.py): digits (46 MFLOP) ran 2.3x slower with threaded operators at
# batch 1 on a busy machine; CIFAR-10's network (12 GFLOP) ran 1.6x faster with them at
# batch 1, as fast as shards at batch 8, with one copy of the weights.
WIDE_MIN_FLOPS = 1e9
# Such a network is run at most this many FLOPs per session call, a batch in slices: one
# call of ~100 GFLOP keeps every core's operators busy, and more rows only add activation
# memory. The 256x256 network (497 GFLOP) at batch 8, 2 threads: peak 4078 MiB in one call,
# 1109 MiB one image per call, 4% slower (torch eager: 3856 MiB). CIFAR-10's (12 GFLOP)
# still runs a batch of 8 in one call.
HEAVY_CALL_FLOPS = 1e11


def _flops_per_image(path) -> float:
    """The record's flops_per_image read from the file's metadata, 0 where unknown (the
    record itself is validated once the session is open)."""
    import json

    from .onnx_files import metadata_props

    try:
        flops = json.loads(metadata_props(path).get(METADATA_KEY, "{}")).get("flops_per_image")
    except (ValueError, AttributeError, RecursionError):
        return 0.0
    return float(flops) if isinstance(flops, (int, float)) and not isinstance(flops, bool) \
        else 0.0

# What the user asks for -> the execution provider that must end up running it.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError(
            "onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu for CUDA)"
        ) from None
    return onnxruntime


def _load_errors() -> tuple[type[BaseException], ...]:
    """The exception types ONNX Runtime raises for a file it cannot load."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile",
             "NotImplemented", "RuntimeException")
    return tuple(getattr(state, n) for n in names if hasattr(state, n))


def available_providers() -> list[str]:
    return list(_import_ort().get_available_providers())


class OrtBackend:
    """An ONNX Runtime session over an ε-network file (docs/design.md, "The model file").

    Inputs ``x`` float32 [B, C, H, W] and ``t`` float32 [B]; output ``eps``.
    ``device`` picks one execution provider explicitly; if ONNX Runtime cannot give
    it, that is an error, never a silent fall back to the CPU.

    On the CPU, ``threads`` (default: every core this process may use) go to images for a
    network of small operators: a batch is cut into up to ``threads`` shards that run at
    once, one thread each, on one session of one intra-op thread (images are independent,
    so the output is the same: tested). Threading such operators left ONNX Runtime's
    threads waiting on each other, and spinning while they waited: 2.3x slower than one
    thread at batch 1 on a busy 2-core machine, at 2.2x the CPU per image. So a batch of
    one runs on one thread, and by default (``threads`` None) the number of shards follows
    the cores other processes leave free (:class:`~runtime.util.cpus.OtherLoad`, measured
    at most once a second). A network of at least ``WIDE_MIN_FLOPS`` per image (CIFAR-10's
    and larger) threads its operators instead, on one session: its convolutions are large
    enough to share, and one session holds one copy of the weights. Spinning is off.

    One backend may be called from any number of threads at once: sessions are opened
    under a lock, and a call keeps the session it started with.
    """

    def __init__(self, path, *, device: str = "cpu", threads: int | None = None,
                 device_id: int = 0):
        ort = self._ort = _import_ort()
        self.path = Path(path)
        if device not in PROVIDERS:
            raise ValueError(f"unknown device {device!r} for ONNX Runtime; expected one of "
                             f"{sorted(PROVIDERS)}")
        provider = PROVIDERS[device]
        if provider not in ort.get_available_providers():
            raise BackendUnavailableError(
                f"ONNX Runtime provider {provider} is not available here (available: "
                f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu for "
                "cuda/tensorrt, or use --device cpu"
            )
        if not self.path.is_file():
            raise ModelFileError(f"{self.path}: no such model file")
        if threads is not None:
            check_int(threads, "threads", maximum=MAX_THREADS)
        self.device = device
        self._provider_options = [{}] if device == "cpu" else [{"device_id": device_id}]
        self.threads = cpu_count() if threads is None and device == "cpu" else threads
        # Shards follow the free cores unless the caller fixed the thread count.
        self._load = OtherLoad() if threads is None and device == "cpu" else None
        # A network of large operators threads them (one session, one copy of the weights);
        # a network of small ones runs one-thread shards. Known before the session opens.
        flops = _flops_per_image(self.path)
        self._heavy = device == "cpu" and flops >= WIDE_MIN_FLOPS
        self._heavy_rows = max(1, int(HEAVY_CALL_FLOPS // max(flops, 1.0)))
        # GPU: the device does the work.
        self.session = self._open(provider, (self.threads if self._heavy else 1)
                                  if device == "cpu" else threads)
        running = self.session.get_providers()
        if not running or running[0] != provider:
            raise BackendUnavailableError(
                f"{self.path}: asked for {provider} but ONNX Runtime runs {running}; "
                "check the GPU driver and onnxruntime-gpu install"
            )
        self.max_batch: int | None = None  # the batch axis is dynamic
        self.providers = running
        self.name = f"onnxruntime:{running[0]}"
        try:  # ONNX Runtime decodes every metadata string as UTF-8 here
            text = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        except UnicodeDecodeError as err:
            raise ModelFileError(f"{self.path}: its metadata is not UTF-8 text (byte "
                                 f"{err.start} of an entry); re-export the model") from None
        self.record = ModelRecord.from_json(text, str(self.path))
        self._check_signature()
        self._gpu = device != "cpu"
        self._pool = (ThreadPoolExecutor(self.threads - 1, thread_name_prefix="ort-shard")
                      if device == "cpu" and self.threads > 1 else None)

    def _open(self, provider: str, threads: int | None):
        ort = self._ort
        options = ort.SessionOptions()
        # ONNX Runtime's arena keeps a call's activations for the next: no page faults on
        # fresh allocations (digits, batch 64: 1.25x; CIFAR-10, batch 8: 1.12x for 15 MiB
        # more). A network sliced to one image per call keeps a peak it no longer needs
        # (256x256, batch 1: 1.9 GiB with it, 1.5 GiB without, same speed).
        options.enable_cpu_mem_arena = self.device != "cpu" or self._heavy_rows > 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1  # one chain of ops: parallelism lives inside ops
        # Fatal only: every failure becomes one line of ours, not a second copy in red.
        options.log_severity_level = 4
        if threads is not None:
            options.intra_op_num_threads = threads
        # A thread spinning while it waits takes a core from whoever else runs here.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            return ort.InferenceSession(str(self.path), sess_options=options,
                                        providers=[provider],
                                        provider_options=self._provider_options)
        except _load_errors() as err:
            raise ModelFileError(
                f"{self.path}: ONNX Runtime cannot load it ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); re-export the model"
            ) from None

    def _check_signature(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        where = str(self.path)
        if set(inputs) != {"x", "t"} or "eps" not in outputs:
            raise ModelFileError(f"{where}: expected inputs x, t and output eps, got inputs "
                                 f"{sorted(inputs)} and outputs {sorted(outputs)}")
        for name, node in [("x", inputs["x"]), ("t", inputs["t"]), ("eps", outputs["eps"])]:
            if node.type != "tensor(float)":
                raise ModelFileError(f"{where}: {name} must be float32, the file says {node.type}")
        x_shape, eps_shape = inputs["x"].shape, outputs["eps"].shape
        # A symbolic C, H or W ('C') is as wrong as a different number: the record fixes them.
        if len(x_shape) != 4 or list(x_shape[1:]) != list(self.record.image_shape):
            raise ModelFileError(f"{where}: input x has shape {x_shape} but the metadata says "
                                 f"[B, {', '.join(map(str, self.record.image_shape))}]")
        if len(eps_shape) != 4 or list(eps_shape[1:]) != list(x_shape[1:]):
            raise ModelFileError(f"{where}: output eps has shape {eps_shape}, input x {x_shape}")
        if len(inputs["t"].shape) != 1:
            raise ModelFileError(f"{where}: input t must be 1-D [B], got {inputs['t'].shape}")
        if isinstance(x_shape[0], int):
            raise ModelFileError(f"{where}: input x has a fixed batch of {x_shape[0]}; the "
                                 "contract is a dynamic batch axis: re-export the model")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.record.image_shape

    def describe(self) -> list[tuple[str, str]]:
        """The file's inputs and outputs as ONNX Runtime reads them, and the providers here."""
        lines = []
        for kind, nodes in [("input", self.session.get_inputs()),
                            ("output", self.session.get_outputs())]:
            lines += [(kind, f"{node.name} {node.type} {node.shape}") for node in nodes]
        if self._gpu:
            lines.append(("threads", str(self.threads) if self.threads else "ONNX Runtime's "
                          "default"))
        elif self._heavy:
            lines.append(("threads", f"{self.threads} (on each operator: a network of large "
                          "operators)"))
        else:
            lines.append(("threads", f"{self.threads} (one per shard of a batch"
                          + ("; fewer while other processes keep cores busy)"
                             if self._load is not None else ")")))
        lines.append(("onnxruntime providers available", ", ".join(available_providers())))
        return lines

    def __call__(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        # ONNX Runtime accepts some wrong shapes silently: check before run.
        if x.dtype != np.float32 or x.ndim != 4 or x.shape[1:] != self.image_shape:
            raise ValueError(f"x must be float32 [B, {', '.join(map(str, self.image_shape))}], "
                             f"got {x.dtype} {list(x.shape)}")
        if t.dtype != np.float32 or t.shape != (x.shape[0],):
            raise ValueError(f"t must be float32 [{x.shape[0]}], got {t.dtype} {list(t.shape)}")
        x, t = np.ascontiguousarray(x), np.ascontiguousarray(t)
        if not self._gpu:
            return self._run_cpu(x, t)
        # On a GPU: bind host inputs and let ORT allocate eps on the device, one copy back.
        # A binding per call: a shared one would mix concurrent callers' tensors.
        binding = self.session.io_binding()
        binding.bind_cpu_input("x", x)
        binding.bind_cpu_input("t", t)
        binding.bind_output("eps", "cuda")
        with self._run_errors(x):
            self.session.run_with_iobinding(binding)
        return self._checked(binding.copy_outputs_to_cpu()[0], x)

    @contextlib.contextmanager
    def _run_errors(self, x: np.ndarray):
        """A file that loads can still fail to run (a graph that fixes the batch inside, a
        machine out of memory): one line naming the file, not ONNX Runtime's trace."""
        try:
            yield
        except _load_errors() as err:
            first = (str(err).splitlines() or [""])[0][:300]
            raise ModelFileError(
                f"{self.path}: ONNX Runtime failed on a batch of {x.shape[0]} "
                f"({type(err).__name__}: {first}); re-export the model with "
                "export/to_onnx.py, or use a smaller batch if memory ran out"
            ) from None

    def _checked(self, eps: np.ndarray, x: np.ndarray) -> np.ndarray:
        # The declared output shape is symbolic in the batch: only a run shows the real one.
        if eps.shape != x.shape or eps.dtype != np.float32:
            raise ModelFileError(
                f"{self.path}: the network returned eps {eps.dtype} {list(eps.shape)} for x "
                f"{list(x.shape)}; the contract is eps float32 of x's shape: re-export the model"
            )
        return eps

    def _run(self, session, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        with self._run_errors(x):
            eps = session.run(["eps"], {"x": x, "t": t})[0]
        return self._checked(eps, x)

    def usable_threads(self) -> int:
        """Threads to use now: ``threads``, or by default as many as the cores other
        processes leave free."""
        threads = self.threads or 1
        if self._load is not None and threads > 1:
            free = (os.cpu_count() or 1) - self._load.cores()
            threads = max(1, min(threads, int(free + 0.5)))
        return threads

    def shards(self, batch: int) -> int:
        """How many one-thread shards a CPU batch is cut into now."""
        return min(self.usable_threads(), batch)

    def _run_cpu(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        batch = x.shape[0]
        if self._heavy:  # its threads are the operators'; a large batch in slices
            rows = self._heavy_rows
            if batch <= rows:
                return self._run(self.session, x, t)
            out = np.empty(x.shape, np.float32)
            for lo in range(0, batch, rows):
                out[lo:lo + rows] = self._run(self.session, x[lo:lo + rows], t[lo:lo + rows])
            return out
        shards = self.shards(batch) if self._pool is not None else 1
        if shards == 1:
            return self._run(self.session, x, t)
        session = self.session
        bounds = np.linspace(0, batch, shards + 1).round().astype(int)
        out = np.empty(x.shape, np.float32)

        def shard(i: int) -> None:
            lo, hi = bounds[i], bounds[i + 1]
            # ONNX Runtime lets go of the GIL while it runs, so the shards run together.
            out[lo:hi] = self._run(session, x[lo:hi], t[lo:hi])

        others = [self._pool.submit(shard, i) for i in range(1, shards)]
        shard(0)  # the calling thread takes the first shard
        for future in others:
            future.result()  # a shard's error is raised here
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self.session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@register("ort", suffixes=(".onnx",), files=onnx_files)
def open_onnx(path, *, device: str | None = None, threads: int | None = None,
              device_id: int = 0) -> OrtBackend:
    """``device``: ONNX Runtime's provider, "cpu" (default), "cuda" or "tensorrt"."""
    return OrtBackend(path, device=device or "cpu", threads=threads, device_id=device_id)


def read_record(path) -> ModelRecord:
    """The validated ``ddpm`` record of an ONNX model file, as the runtime reads it."""
    with OrtBackend(path, device="cpu", threads=1) as backend:
        return backend.record
