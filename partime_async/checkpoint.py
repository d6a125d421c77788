"""Checkpoint files: written atomically (a temporary file, flushed, renamed, the folder
flushed), read back with :func:`load`.

The states they hold are a pipeline's :meth:`~partime_async.Pipeline.state_dict`, or one taken
at a consistent cut while frames flow (:mod:`partime_async.pipeline.cuts`, written by the
:class:`~partime_async.sinks.Checkpoint` sink).
"""
from __future__ import annotations

import errno
import io
import os
import pickle
import secrets
import tempfile
from pathlib import Path
from typing import Any

import torch

from .aio.threads import in_thread

# Flags of a new file for writing that is surely ours: never an existing one, never a link.
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)


def create_temporary(path: Path) -> tuple[int, Path]:
    """Create a new, empty hidden file ``.NAME.XXXXXXXX.tmp`` in ``path``'s folder (which must
    exist), open for writing; returns its descriptor and its path.

    The file gets the mode a plain ``open(path, "w")`` would give a new ``path``: 0o666 less
    the umask (not :func:`tempfile.mkstemp`'s 0o600, which the rename would carry over to
    ``path``). The OS applies the umask as it creates the file, so the umask is never read or
    changed here (``os.umask`` is process-wide: changing it races with other threads)."""
    if path.is_dir():  # found now, not at the rename after all the writing
        raise IsADirectoryError(errno.EISDIR, "a folder is where the file would go; give the path of a file",
                                str(path))
    for _ in range(tempfile.TMP_MAX):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, _NEW_FILE, 0o666), tmp
        except FileExistsError:  # another writer's temporary file: draw another name
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path.parent))


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` so that a crash never leaves a partial file: write a
    temporary file in the same folder, flush it to disk, rename it over ``path``, then flush
    the folder (the rename survives a power loss). A new
    file gets the same mode as with ``torch.save`` (0o666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    fd, tmp = create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return path


def fsync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries to the disk, so that a rename into it survives a power loss
    (POSIX). Where a folder cannot be synced (another OS, a file system that refuses, a folder
    this process may write but not read) there is nothing more to do: the rename is done."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except PermissionError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EACCES, errno.EPERM):
            raise
    finally:
        os.close(fd)


async def save_atomic_async(obj: Any, path: str | Path) -> Path:
    """:func:`save_atomic` on a worker thread, keeping the event loop free. Cancelled while the
    thread writes, it waits for that write to end (:func:`~partime_async.aio.threads.in_thread`,
    up to its grace period): a run that returns leaves no checkpoint being written behind it."""
    return await in_thread(save_atomic, obj, path)


def load(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by :class:`~partime_async.sinks.Checkpoint` or :func:`save_atomic`
    (tensors on CPU).

    Loaded with ``torch.load(weights_only=True)``: a checkpoint holds only tensors, numbers,
    strings and plain containers (weights, optimiser and scheduler states, positions), so
    opening one, whoever made it, never runs code. A file that holds anything else (a pickled
    object) is refused with a :class:`pickle.UnpicklingError` that names it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise pickle.UnpicklingError(
            f"{path}: this checkpoint holds more than tensors, numbers, strings and plain containers, and loading "
            "it could run code, so partime_async.checkpoint.load refuses it. If you made the file yourself or trust "
            "whoever did, load it with torch.load(path, weights_only=False), or register the type it names with "
            f"torch.serialization.add_safe_globals. (torch says: {_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in lines if "Unsupported global" in line), lines[0] if lines else type(exc).__name__)
