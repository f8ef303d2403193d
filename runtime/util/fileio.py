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
3. ``atomic_outputs`` does the same for all the outputs of one command as a set: every
   temporary is written and fsynced first, and only then are they renamed into place, so
   a command that fails (a full disk on its last file) leaves every old file as it was.
   ``atomic_output`` is a set of one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"
# A temporary's name keeps only this many characters of the target's: any name the OS
# takes for the target (255 bytes) leaves room for ".<pid>.<random>.tmp".
TMP_NAME_CHARS = 32
_TMP_NAME = re.compile(r"\.(?P<stem>.*)\.(?P<pid>[0-9]+)\.[^.]+" + re.escape(TMP_SUFFIX))


class OutputError(ValueError):
    """An output file cannot be written where asked (one-line message naming it)."""


def same_file(a: Path, b: Path) -> bool:
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
    check_name_lengths(path, option)
    try:
        return _check_output(path, inputs, option)
    except OSError as err:  # what the checks above cannot foresee (EIO, ELOOP, ...)
        raise OutputError(f"{option} {describe_os_error(err, path)}") from None


# POSIX's limits where pathconf cannot tell (a folder that does not exist yet).
NAME_MAX, PATH_MAX = 255, 4096


def check_name_lengths(path, option: str = "output") -> None:
    """Refuse a path the OS would refuse with ENAMETOOLONG: a component longer than the
    file system's NAME_MAX bytes, or a path of PATH_MAX bytes or more (with its NUL)."""
    path = Path(path)
    encoded = os.fsencode(path)
    if len(encoded) >= PATH_MAX:
        raise OutputError(f"{option}: the path is {len(encoded)} bytes long, too long (the "
                          f"limit is {PATH_MAX - 1}); choose a shorter path")
    existing = next((p for p in [path.parent, *path.parent.parents] if _is_dir(p)), None)
    try:
        limit = os.pathconf(existing or ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = NAME_MAX
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            raise OutputError(f"{option} {path}: the name {part[:40]}... is "
                              f"{len(os.fsencode(part))} bytes, too long (the file system "
                              f"takes {limit}); choose a shorter name")


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _check_output(path: Path, inputs: Iterable, option: str) -> Path:
    for source in inputs:
        if source is not None and same_file(path, Path(source)):
            raise OutputError(f"{option} {path} is also an input of this command; "
                              "choose another output path")
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder; give a file name inside it")
    parent = path.parent
    for folder in [parent, *parent.parents]:
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise OutputError(f"{option} {path}: {folder} is a file, not a folder; "
                                  "choose another output path")
            break
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


def _dead_temporaries(folder: Path) -> dict[str, list[Path]]:
    """Temporaries in ``folder`` whose process no longer runs, by the target's cut name."""
    found: dict[str, list[Path]] = {}
    try:
        names = [entry.name for entry in os.scandir(folder)]
    except OSError:
        return found
    for name in names:
        match = _TMP_NAME.fullmatch(name)
        if match and not _pid_alive(int(match["pid"])):
            found.setdefault(match["stem"], []).append(folder / name)
    return found


def _remove(paths: list[Path]) -> list[Path]:
    removed = []
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed


def remove_stale_temporaries(path) -> list[Path]:
    """Delete temporaries of ``path`` written by processes that no longer run."""
    path = Path(path)
    return _remove(_dead_temporaries(path.parent).get(path.name[:TMP_NAME_CHARS], []))


def temporary_path(path) -> Path:
    """A fresh name beside ``path``: ``.<name, cut short>.<pid>.<random>.tmp``.

    The pid lets a later run remove what a killed one left; the name is cut so that the
    temporary of the longest name the OS accepts is still a legal name.
    """
    path = Path(path)
    return path.with_name(f".{path.name[:TMP_NAME_CHARS]}.{os.getpid()}."
                          f"{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
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


def check_free_space(path, nbytes: int, what: str, option: str = "output") -> None:
    """Before a long job whose output is about ``nbytes``: refuse now if the device that will
    hold ``path`` has less free, rather than fail at the write, after the work."""
    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        return  # the write itself will say what is wrong
    if free < nbytes:
        mib = 1 << 20
        raise OutputError(f"{option} {path}: no space left on the device for {what} (about "
                          f"{-(-nbytes // mib)} MiB, {free // mib} MiB free); free some space "
                          "or write elsewhere")


def check_existing_targets(folder, is_target, option: str | None = None) -> None:
    """Refuse targets in ``folder`` (names for which ``is_target(name)`` holds) that a rename
    cannot replace: folders, and files that are read-only. One listing of the folder,
    however many targets (``--each`` writes one file per image)."""
    folder = Path(folder)
    try:
        entries = [e for e in os.scandir(folder) if is_target(e.name)]
    except FileNotFoundError:
        return
    except OSError as err:
        raise OutputError(describe_os_error(err, folder)) from None
    for entry in sorted(entries, key=lambda e: e.name):
        where = f"{option} {folder / entry.name}" if option else str(folder / entry.name)
        if entry.is_dir():
            raise OutputError(f"{where} is a folder; remove it or choose another output path")
        if not os.access(entry.path, os.W_OK):
            raise OutputError(f"{where}: the existing file is read-only; choose another "
                              "output path or make it writable")


class OutputSet:
    """The outputs of one command, written to temporaries and renamed into place together.

    Made by :func:`atomic_outputs`; ``add(path)`` returns the temporary to write.
    """

    def __init__(self):
        self._pending: dict[Path, Path] = {}   # temporary -> target
        self._targets: set[Path] = set()
        # Per folder, one listing of what killed runs left (--each writes thousands).
        self._dead: dict[Path, dict[str, list[Path]]] = {}

    def add(self, path) -> Path:
        path = Path(path)
        if path in self._targets:
            raise OutputError(f"{path} is written twice by this command; "
                              "give each output its own name")
        if path.parent not in self._dead:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dead[path.parent] = _dead_temporaries(path.parent)
        # Before writing: on a full disk, a killed run's temporaries hold the space needed.
        _remove(self._dead[path.parent].pop(path.name[:TMP_NAME_CHARS], []))
        tmp = temporary_path(path)
        self._pending[tmp] = path
        self._targets.add(path)
        return tmp

    def write_bytes(self, path, data) -> Path:
        with open(self.add(path), "xb") as f:
            f.write(data)
        return Path(path)

    def _commit(self) -> None:
        for tmp, path in self._pending.items():
            if not tmp.exists():
                raise OutputError(f"{path}: the writer produced no file")
            fsync_file(tmp)
        # Every target is checked before the first rename: a folder (or a read-only file)
        # under the 1000th name must not leave the first 999 already replaced.
        by_folder: dict[Path, set[str]] = {}
        for path in self._pending.values():
            by_folder.setdefault(path.parent, set()).add(path.name)
        for folder, names in by_folder.items():
            check_existing_targets(folder, names.__contains__)
        # Everything is on disk: only now is any old file replaced.
        for tmp, path in self._pending.items():
            os.replace(tmp, path)
        for folder in {path.parent for path in self._pending.values()}:
            fsync_dir(folder)

    def _discard(self) -> None:
        for tmp in self._pending:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _target_of(self, err: OSError) -> Path | None:
        for name in (err.filename, err.filename2):
            if name is not None and Path(name) in self._pending:
                return self._pending[Path(name)]
        return next(reversed(self._pending.values()), None)


@contextlib.contextmanager
def atomic_outputs() -> Iterator[OutputSet]:
    """``with atomic_outputs() as outs:`` write ``outs.add(p)`` for every output ``p``.

    When the block ends without an error every temporary is fsynced and then all are
    renamed over their targets; on any exception all temporaries are removed and no target
    is touched (an OSError, a full disk say, becomes OutputError naming its file).
    Temporaries of the same targets that killed runs left behind are removed first.
    """
    outputs = OutputSet()
    try:
        yield outputs
        outputs._commit()
    except OSError as err:
        outputs._discard()
        target = outputs._target_of(err)
        raise OutputError(describe_os_error(err, target if target is not None else
                                            err.filename)) from err
    except BaseException:
        outputs._discard()
        raise


@contextlib.contextmanager
def atomic_output(path) -> Iterator[Path]:
    """``with atomic_output(p) as tmp:`` write ``tmp`` completely; it becomes ``p`` on success.

    A set of one (:func:`atomic_outputs`): the temporary is fsynced, renamed over ``p`` and
    the folder fsynced, so a crash at any moment leaves either the old file or the new one.
    """
    with atomic_outputs() as outputs:
        yield outputs.add(path)


def write_bytes(path, data) -> Path:
    """Write ``data`` (bytes, or any buffer: TensorRT's IHostMemory) to ``path`` atomically."""
    path = Path(path)
    with atomic_output(path) as tmp, open(tmp, "xb") as f:
        f.write(data)
    return path


def write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


class FolderBusyError(OutputError):
    """Another process owns the folder (holds its lock): one line naming the folder."""


LOCK_NAME = ".lock"


@contextlib.contextmanager
def folder_lock(folder, *, option: str = "--out", what: str = "run") -> Iterator[Path]:
    """Own ``folder`` for the ``with`` block: an exclusive flock on ``folder/.lock``.

    A second process is refused at once (FolderBusyError naming the folder and the owner's
    pid). The kernel drops a flock when its process dies, so a lock file left by a killed
    run blocks nothing; a clean exit removes the file while still holding the lock.
    """
    folder = Path(folder)
    path = folder / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OutputError(f"{option} {describe_os_error(err, path)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise FolderBusyError(f"{option} {folder}: another {what} (pid {owner}) is using "
                                  f"this folder; wait for it to end or choose another "
                                  f"{option}") from None
        except OSError as err:
            os.close(fd)
            raise OutputError(f"{option} {describe_os_error(err, path)}") from None
        # The owner before us may have removed the file between our open and our lock:
        # then we hold the lock of a name nobody else sees. Only the file still under
        # the name counts.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding the lock: see the check above
        os.close(fd)


class NotRegularFileError(ValueError):
    """A small file to read (a sidecar, a manifest) is a device, a FIFO, a folder or too
    large; the message says which, the caller names the file."""


def read_regular_file(path, limit: int) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes.

    Opened without blocking and checked on the open descriptor: a FIFO would wait forever
    for a writer, a link to /dev/zero never ends. FileNotFoundError and other OSErrors
    pass through; NotRegularFileError for the rest.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kinds = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
                     stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}
            kind = kinds.get(stat.S_IFMT(info.st_mode), "not a regular file")
            raise NotRegularFileError(f"is {kind}, not a regular file")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise NotRegularFileError(f"is larger than the {limit} bytes such a file can be")
        return b"".join(chunks)
    finally:
        os.close(fd)
