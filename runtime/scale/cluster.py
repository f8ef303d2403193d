"""Joining a Ray cluster: the one place the runtime imports Ray (an optional extra).

``address`` is ``"local"`` (start a Ray instance inside this process's session, on this
machine's cores), ``"auto"`` (the cluster that ``ray start`` runs on this machine), or
``host:port`` / ``ray://host:port`` of a cluster's head. Either way the runtime package
itself travels to the workers (``py_modules``), so every node samples with the driver's
exact code: the same images whatever machine draws them.
"""

from __future__ import annotations

import hashlib
import logging
import socket
from pathlib import Path

from ..errors import BackendUnavailableError

INSTALL_HINT = "Ray is not installed: pip install .[ray] (or pip install 'ray[serve]')"
# A head that does not answer this fast is reported at once: ray.init would retry for minutes.
CONNECT_TIMEOUT_S = 5.0


class RayClusterError(RuntimeError):
    """The Ray cluster named by ``--ray-address`` cannot be reached or used (one line)."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise BackendUnavailableError(INSTALL_HINT) from None
    return ray


def runtime_env() -> dict:
    """What each worker needs to import this runtime: the package folder itself."""
    return {"py_modules": [str(Path(__file__).resolve().parent)]}


def _host_port(address: str) -> tuple[str, int] | None:
    rest = address.split("://", 1)[-1]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def _check_reachable(address: str) -> None:
    target = _host_port(address)
    if target is None:
        raise RayClusterError(f"--ray-address {address!r} is not 'local', 'auto', host:port "
                              "or ray://host:port")
    try:
        socket.create_connection(target, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise RayClusterError(
            f"cannot reach the Ray cluster at {address} ({err.strerror or err}); start one "
            "with `ray start --head` there, or use --ray-address local"
        ) from None


def connect(address: str = "local", *, num_cpus: int | None = None):
    """Join (or start) the Ray cluster at ``address``; returns the ``ray`` module.

    A driver that is already connected (an app, a test) keeps its connection, and the
    runtime_env it chose: pass it :func:`runtime_env` if its workers cannot import this package.
    ``num_cpus`` sizes a ``"local"`` instance (default: Ray's count of this machine's cores).
    """
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address not in ("local", "auto"):
        _check_reachable(address)
    kwargs = dict(address=address, include_dashboard=False, logging_level=logging.ERROR,
                  log_to_driver=False, runtime_env=runtime_env())
    if address == "local" and num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RayClusterError(f"cannot join the Ray cluster at {address!r} ({first_line}); "
                              "start one with `ray start --head`, or use --ray-address local"
                              ) from None
    return ray


def cluster_cpus(ray) -> int:
    return int(ray.cluster_resources().get("CPU", 0))


def check_capacity(ray, copies: int, threads: int, what: str) -> None:
    """Refuse ``copies`` x ``threads`` CPUs beyond the cluster's: Ray would wait forever."""
    capacity = cluster_cpus(ray)
    if copies * threads > capacity:
        raise RayClusterError(f"{what} {copies} x --threads {threads} need {copies * threads} "
                              f"CPUs; the Ray cluster has {capacity}: ask for fewer")


def ship_model(ray, files: list[Path]) -> dict:
    """Put a model's files (:func:`runtime.backends.model_files`: the model first, then
    what it needs, by their paths relative to its folder) in the object store, for workers
    on any machine, with each file's SHA-256."""
    base = Path(files[0]).parent
    blobs = {Path(f).relative_to(base).as_posix(): Path(f).read_bytes() for f in files}
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()}
    return {"name": Path(files[0]).name, "sha256": digests, "ref": ray.put(blobs)}


class ShippedModel:
    """On a worker: the shipped model written to a private folder, checked and loaded once.
    ``pipe`` is the loaded :class:`~runtime.pipeline.Pipeline`; :meth:`close` frees both."""

    def __init__(self, shipped: dict, *, threads: int, load_kwargs: dict):
        import tempfile

        import ray

        from ..pipeline import load

        files = ray.get(shipped["ref"])
        for name, data in files.items():
            if hashlib.sha256(data).hexdigest() != shipped["sha256"].get(name):
                raise ValueError(f"{name}: the model bytes this worker received do not match "
                                 "the driver's SHA-256")
        self._dir = tempfile.TemporaryDirectory(prefix="ddpm-model-")
        for name, data in files.items():
            target = Path(self._dir.name) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        path = Path(self._dir.name) / shipped["name"]
        self.pipe = load(path, threads=threads, **load_kwargs)

    def close(self) -> None:
        self.pipe.close()
        self._dir.cleanup()
