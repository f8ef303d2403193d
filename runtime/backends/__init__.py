"""Backends evaluate the ε-network of a model file; this module is their contract and registry.

A backend is one module in this package that defines a class following :class:`Backend`
and registers an opener for it with :func:`register`, under a short name (``--backend``),
the file suffixes it reads and the files a model of its format is made of (``files``: the
model file first, then the others it needs, such as ONNX external data or an engine's
sidecar), which :func:`model_files` and :func:`model_digest` give to whatever ships,
copies or checksums a model (Ray workers, bulk manifests). ``runtime.load`` is a lookup
here: the name when one is given, else the file's suffix. Modules are imported on the
first lookup, and each imports its engine (ONNX Runtime, TensorRT, ...) only when a model
is opened. See docs/contributing.md, "Add a backend".
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pkgutil
import stat
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from ..errors import ModelFileError

if TYPE_CHECKING:
    from ..metadata import ModelRecord

AUTO = "auto"


@runtime_checkable
class Backend(Protocol):
    """What the pipeline and ``runtime info`` need from an opened model file."""

    name: str                # for reports: "onnxruntime:CPUExecutionProvider", "tensorrt:fp16"
    record: ModelRecord      # the file's ddpm record, validated by runtime.metadata
    max_batch: int | None    # the largest batch one call takes; None: any

    def __call__(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        """ε for float32 ``x`` [B, C, H, W] at float32 timesteps ``t`` [B] (T-step indices).

        Safe to call from several threads at once (a pipeline may be shared); a row's ε
        should not depend on the other rows, which step-level batching relies on."""

    def describe(self) -> list[tuple[str, str]]:
        """(label, text) lines about the file and the engine running it, for ``runtime info``."""

    def close(self) -> None:
        """Release sessions, device memory and threads; safe to call twice."""


CONTRACT = ("name", "record", "max_batch", "describe", "close")

# opener(path, *, device, threads, device_id) -> Backend; each checks the options it takes.
Opener = Callable[..., Backend]
# files(path) -> [path, *companions]: the model's files, each an existing regular file.
FilesFn = Callable[[Path], list[Path]]


def single_file(path: Path) -> list[Path]:
    return [Path(path)]


@dataclass(frozen=True)
class Entry:
    name: str
    suffixes: tuple[str, ...]
    opener: Opener
    files: FilesFn = single_file


_REGISTRY: dict[str, Entry] = {}
_discovered = False
_discovery_lock = threading.Lock()  # two threads loading models must not see half a registry


def register(name: str, *, suffixes: Iterable[str],
             files: FilesFn = single_file) -> Callable[[Opener], Opener]:
    """Decorator: ``@register("ort", suffixes=(".onnx",), files=onnx_files)`` on the
    backend's opener; ``files`` (default: the model file alone) lists a model's files."""
    suffixes = tuple(s.lower() for s in suffixes)
    if not name or name == AUTO or not all(s.startswith(".") for s in suffixes):
        raise ValueError(f"backend name {name!r} or suffixes {suffixes} not valid: a name other "
                         "than 'auto' and suffixes like '.onnx'")

    def decorate(opener: Opener) -> Opener:
        old = _REGISTRY.get(name)
        if old is not None and _qualname(old.opener) != _qualname(opener):
            raise ValueError(f"backend {name!r} is already registered by {_qualname(old.opener)}")
        for other in _REGISTRY.values():
            taken = set(other.suffixes) & set(suffixes)
            if other.name != name and taken:
                raise ValueError(f"backend {name!r}: suffix {sorted(taken)[0]} already belongs "
                                 f"to backend {other.name!r}")
        _REGISTRY[name] = Entry(name, suffixes, opener, files)
        return opener

    return decorate


def unregister(name: str) -> None:
    """Remove a backend (tests that register their own call this when done)."""
    _REGISTRY.pop(name, None)


def _qualname(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _discover() -> None:
    """Import every module of this package once: each registers the backend it defines."""
    global _discovered
    with _discovery_lock:
        if _discovered:
            return
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _discovered = True


def entries() -> dict[str, Entry]:
    """Registered backends by name."""
    _discover()
    return dict(_REGISTRY)


def names() -> tuple[str, ...]:
    return tuple(sorted(entries()))


def _suffix_table() -> str:
    return ", ".join(f"{'/'.join(e.suffixes)} ({e.name})" for e in entries().values())


def lookup(path, backend: str = AUTO) -> Entry:
    """The backend for ``path``: ``backend`` by name, or by the file's suffix for ``auto``."""
    table = entries()
    if backend != AUTO:
        if backend not in table:
            raise ValueError(f"unknown backend {backend!r}; expected one of "
                             f"{', '.join((AUTO, *sorted(table)))}")
        return table[backend]
    suffix = Path(path).suffix.lower()
    for entry in table.values():
        if suffix in entry.suffixes:
            return entry
    raise ModelFileError(f"{path}: no backend reads {suffix or 'files without a suffix'!r}; "
                         f"known: {_suffix_table()}; rename the file or pass --backend")


def open_backend(path, *, backend: str = AUTO, device: str | None = None,
                 threads: int | None = None, device_id: int = 0) -> Backend:
    """Open ``path`` with the backend named, or the one its suffix maps to."""
    entry = lookup(path, backend) if backend != AUTO else None  # a bad name before a bad path
    _check_model_path(path)
    entry = entry or lookup(path)
    opened = entry.opener(Path(path), device=device, threads=threads, device_id=device_id)
    missing = [m for m in CONTRACT if not hasattr(opened, m)]
    if missing or not callable(opened):
        if callable(getattr(opened, "close", None)):
            opened.close()
        lacks = ", ".join(missing + ([] if callable(opened) else ["__call__"]))
        raise TypeError(f"backend {entry.name!r} ({_qualname(entry.opener)}) returned a "
                        f"{type(opened).__name__} without {lacks}; see runtime.backends.Backend")
    return opened


def model_files(path, backend: str = AUTO) -> list[Path]:
    """The files of the model at ``path`` as its backend declares them: ``path`` first."""
    _check_model_path(path)
    files = lookup(path, backend).files(Path(path))
    if not files or Path(files[0]) != Path(path):
        raise TypeError(f"backend {lookup(path, backend).name!r}: files() must list the model "
                        "file first")
    return [Path(f) for f in files]


def model_digest(files: list[Path]) -> str:
    """SHA-256 naming a model's content: the file's own digest for a one-file model (what
    earlier manifests recorded), else the digest of each file's name and digest in order."""
    from ..metadata import sha256_file

    if len(files) == 1:
        return sha256_file(files[0])
    base = Path(files[0]).parent
    lines = "".join(f"{Path(f).relative_to(base).as_posix()}\0{sha256_file(f)}\n"
                    for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _check_model_path(path) -> None:
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise ModelFileError(f"{path}: no such model file") from None
    except OSError as err:  # a name too long, a link loop, no permission
        raise ModelFileError(f"{path}: cannot open the model file ({err.strerror})") from None
    if stat.S_ISDIR(mode):
        raise ModelFileError(f"{path} is a folder, not a model file; give the .onnx or .plan "
                             "file inside it")
    if not stat.S_ISREG(mode):  # a FIFO would hang the engine's reader, /dev/zero never end
        raise ModelFileError(f"{path} is not a regular file (a device, FIFO or socket); give "
                             "the .onnx or .plan file")
