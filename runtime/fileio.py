"""The one way the project writes a file: checked first, written beside, renamed last.

Every output of every entry point (PNG grids, npz, checkpoints, ONNX files, engines,
sidecars, reports) goes through :func:`check_output` before the work starts and
:func:`atomic_output` when it is written:

1. ``check_output`` refuses a destination that is one of the command's inputs, a folder,
   or in a place that cannot be written, so a bad ``-o`` fails in a second, not after
   an hour of work, and never replaces the file the command reads.
2. ``atomic_output`` hands the writer a temporary path beside the target (same folder,
   so the rename is atomic), fsyncs it, and renames it over the target only when the
   ``with`` block ends without an error. Any failure, Ctrl-C included, removes the
   temporary; the previous file under the target name is untouched. Temporaries that a
   killed run left behind (their process is gone) are removed the next time.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"


class OutputError(ValueError):
    """An output file cannot be written where asked (one-line message naming it)."""


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def check_output(path, *, inputs: Iterable = (), option: str = "output") -> Path:
    """Validate an output path before any work: returns it as a Path or raises OutputError.

    ``inputs`` are the files the same command reads; ``option`` names the flag in messages
    (e.g. "-o/--out"). The folder is created if missing, so that an unwritable place is
    found now; nothing is written under the target name.
    """
    path = Path(path)
    if str(path) in ("", "."):
        raise OutputError(f"{option}: empty output path; give a file name")
    for source in inputs:
        if source is not None and _same_file(path, Path(source)):
            raise OutputError(f"{option} {path} is also an input of this command; "
                              "choose another output path")
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder; give a file name inside it")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{option} {path}: cannot create folder {parent} "
                          f"({err.strerror or err}); choose another output path") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: folder {parent} is not writable; "
                          "choose another output path")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{option} {path}: the existing file is read-only; "
                          "choose another output path or make it writable")
    # Permission bits do not tell everything (root, read-only mounts, /proc): create the
    # kind of temporary atomic_output will write, and remove it.
    probe = temporary_path(path)
    try:
        probe.open("xb").close()
    except OSError as err:
        raise OutputError(f"{option} {describe_os_error(err, path)}") from None
    with contextlib.suppress(OSError):
        probe.unlink()
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path) -> list[Path]:
    """Delete temporaries of ``path`` written by processes that no longer run."""
    path = Path(path)
    removed = []
    prefix = f".{path.name}."
    try:
        candidates = list(path.parent.glob(f"{glob_escape(prefix)}*{TMP_SUFFIX}"))
    except OSError:
        return removed
    for tmp in candidates:
        middle = tmp.name[len(prefix):-len(TMP_SUFFIX)]
        pid_text = middle.split(".", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def temporary_path(path) -> Path:
    """A fresh name beside ``path``: ``.<name>.<pid>.<random>.tmp`` (pid: stale-file cleanup)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not open folders; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass  # fsync of a folder is unsupported on some filesystems; the data is synced
    finally:
        os.close(fd)


def describe_os_error(err: OSError, path) -> str:
    """One line for a failed write: what, where, how to fix."""
    if err.errno == errno.ENOSPC:
        return f"{path}: no space left on the device; free some space or write elsewhere"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{path}: permission denied; choose a writable output path"
    return f"{path}: cannot write ({err.strerror or err}); choose another output path"


@contextlib.contextmanager
def atomic_output(path) -> Iterator[Path]:
    """``with atomic_output(p) as tmp:`` write ``tmp`` completely; it becomes ``p`` on success.

    The temporary is fsynced, renamed over ``p`` and the folder fsynced, so a crash at any
    moment leaves either the old file or the new one. On any exception the temporary is
    removed and ``p`` is untouched; an OSError (a full disk, say) becomes OutputError.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        if not tmp.exists():
            raise OutputError(f"{path}: the writer produced no file")
        _fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputError(describe_os_error(err, path)) from err
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def write_bytes(path, data) -> Path:
    """Write ``data`` (bytes, or any buffer: TensorRT's IHostMemory) to ``path`` atomically."""
    path = Path(path)
    with atomic_output(path) as tmp, open(tmp, "xb") as f:
        f.write(data)
    return path


def write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))
