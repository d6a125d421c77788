"""File sinks, written with aiofiles and atomically: a file appears complete or not at all.

* :class:`NpySink`: one ``.npy`` file per frame, each written atomically; read them back with
  :class:`~partime_async.sources.NpyDirectory` (bit for bit).
* :class:`JsonlSink`: one JSON line per frame in one file that appears when the stream ends
  well; a crash (an exception or a cancellation) leaves no file at all.

Both use :class:`AtomicFile`, the same pattern as :func:`partime_async.checkpoint.save_atomic`
(a temporary file in the target's folder, flushed, fsynced, then renamed over the target) with
the writes on aiofiles' threads, so the event loop never waits on the disk.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os
import numpy as np
import torch

from partime_async.aio.threads import to_the_end
from partime_async.checkpoint import create_temporary, fsync_folder
from partime_async.core.frame import Frame, Payload, tree_map

from .base import Sink

_fsync = aiofiles.os.wrap(os.fsync)
_fsync_folder = aiofiles.os.wrap(fsync_folder)


class AtomicFile:
    """A binary file that appears at ``path`` complete, or not at all.

    :meth:`open` creates a hidden temporary file (``.NAME.XXXX.tmp``) in ``path``'s folder,
    with the mode a plain ``open()`` would give ``path`` (0o666 less the umask);
    :meth:`write` appends to it; :meth:`commit` flushes it, fsyncs it (``fsync=True``),
    renames it over ``path`` (an atomic replace on POSIX and Windows) and fsyncs the folder
    (``fsync=True``: the rename survives a power loss); :meth:`discard` removes
    it. As an async context manager it commits on success and discards on any exception,
    cancellation included. Until the commit, ``path`` is untouched (an older file there stays).
    """

    def __init__(self, path: str | Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.tmp: Path | None = None
        self._file: Any = None

    async def open(self) -> None:
        """Create the temporary file (and ``path``'s folder if missing)."""
        if self.tmp is not None:
            raise RuntimeError(f"{self.path} is already open")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = create_temporary(self.path)
        os.close(fd)
        self.tmp = tmp

        async def open_tmp() -> None:
            self._file = await aiofiles.open(tmp, "wb")

        try:
            await to_the_end(open_tmp())  # cancelled or not, a file opened is kept to be closed
        except BaseException:
            await self.discard()
            raise

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` to the temporary file."""
        if self._file is None:
            raise RuntimeError(f"{self.path}: open() it first (or it was already committed or discarded)")
        await self._file.write(data)

    async def commit(self) -> Path:
        """Make the written bytes the content of ``path``; returns ``path``."""
        file, self._file = self._file, None
        if file is None:
            raise RuntimeError(f"{self.path}: open() it first (or it was already committed or discarded)")
        tmp = self.tmp
        assert tmp is not None  # open() made it before the file

        async def flush() -> None:
            await file.flush()
            if self.fsync:
                await _fsync(file.fileno())

        try:
            try:  # even when cancelled: no flush or fsync may still run once the file is closed
                await to_the_end(flush())
            finally:
                await to_the_end(file.close())
            # On the loop thread: a rename is one metadata operation, and done here no
            # cancellation can fall between the file appearing and the commit being recorded.
            os.replace(tmp, self.path)
        except BaseException:
            self._remove_tmp()
            raise
        self.tmp = None
        if self.fsync:  # the rename itself, to the disk
            await to_the_end(_fsync_folder(self.path.parent))
        return self.path

    async def discard(self) -> None:
        """Drop what was written; ``path`` stays as it was. Safe to call twice."""
        file, self._file = self._file, None
        try:
            if file is not None:
                # Closed before the task goes on, even when cancelled meanwhile: a close left
                # running on aiofiles' thread would keep the file open after the sink is done.
                await to_the_end(file.close())
        finally:
            self._remove_tmp()

    def _remove_tmp(self) -> None:
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None

    async def __aenter__(self) -> AtomicFile:
        await self.open()
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            await self.commit()
        else:
            await self.discard()


class NpySink(Sink):
    """One ``.npy`` file per output frame in ``directory``, named ``{prefix}{seq:0{digits}d}.npy``.

    Each file is written atomically (:class:`AtomicFile`): a crash leaves the files of the
    frames already written, complete, and nothing else. With the default zero-padding, name
    order is seq order, so ``NpyDirectory(directory)`` reads the outputs back in order and
    bit for bit (``order="index"`` also restores their seqs). Files already in ``directory``
    stay, and a frame's file replaces one of an equal seq (a stream resumed at a checkpoint
    writes on where it left off); read back only one run's outputs from a folder of its own.

    Args:
        directory: the folder (created if missing).
        prefix, digits: the file names.
        select: ``select(frame)`` gives the tensor or array to save (default: ``frame.data``,
            which must then be one tensor).
        fsync: flush each file to the disk before its rename (durable across power loss;
            slower).

    :attr:`paths` lists the files written, in order.
    """

    name = "npy"

    def __init__(self, directory: str | Path, *, prefix: str = "frame_", digits: int = 8,
                 select: Callable[[Frame], torch.Tensor | np.ndarray] | None = None, fsync: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if os.sep in prefix or (os.altsep and os.altsep in prefix):
            raise ValueError(f"prefix must be a file-name prefix, not a path: {prefix!r}")
        self.directory = Path(directory)
        self.prefix = prefix
        self.digits = digits
        self.select = select
        self.fsync = fsync
        self.paths: list[Path] = []

    def path_of(self, seq: int) -> Path:
        """The file of frame ``seq``."""
        return self.directory / f"{self.prefix}{seq:0{self.digits}d}.npy"

    async def open(self) -> None:
        await aiofiles.os.makedirs(self.directory, exist_ok=True)

    async def write(self, frame: Frame) -> None:
        buffer = io.BytesIO()
        np.save(buffer, self._array(frame), allow_pickle=False)
        path = self.path_of(frame.seq)
        async with AtomicFile(path, fsync=self.fsync) as f:
            await f.write(buffer.getbuffer())
        self.paths.append(path)

    def _array(self, frame: Frame) -> np.ndarray:
        data = self.select(frame) if self.select is not None else frame.data
        if isinstance(data, np.ndarray):
            return data
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"NpySink saves one tensor per frame, but frame {frame.seq} holds "
                            f"{type(data).__name__}; pass select=lambda frame: <the tensor to save>")
        try:
            return data.detach().cpu().resolve_conj().resolve_neg().numpy()
        except TypeError as exc:  # e.g. bfloat16
            raise TypeError(f"frame {frame.seq}: NumPy cannot hold a {data.dtype} tensor; pass e.g. "
                            "select=lambda frame: frame.data.float()") from exc


def summarize(payload: Payload) -> Any:
    """A JSON-able summary of a payload, its structure kept: for each tensor its ``shape``,
    ``dtype``, and (when not empty and not complex) ``min``, ``max`` and ``mean``."""
    def one(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        t = leaf.detach()
        summary: dict[str, Any] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        if t.numel() and not t.is_complex():
            values = t.double()
            summary.update(min=values.min().item(), max=values.max().item(), mean=values.mean().item())
        return summary
    return tree_map(one, payload)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else summarize(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return repr(obj)


class JsonlSink(Sink):
    """One JSON line per output frame, in one file at ``path`` that appears when the stream
    ends well.

    Each line is ``{"seq", "t_capture", "t_done", "latency", "meta", "output"}``: timestamps
    in seconds of :func:`partime_async.core.frame.now` (monotonic; latency = t_done - t_capture),
    the frame's metadata, and ``to_json(frame)`` (default: :func:`summarize` of its payload).
    Values JSON cannot hold are converted: one-element tensors and NumPy scalars to numbers,
    other tensors to their summary, anything else to its ``repr``; non-finite floats are
    written as ``NaN`` / ``Infinity`` (Python's ``json`` reads them back).

    Lines go to a temporary file (:class:`AtomicFile`) that :meth:`close` renames to ``path``
    (unless a write failed); :meth:`abort` removes it instead, which is what
    :func:`partime_async.run` calls after a failure or cancellation anywhere in the graph: no
    partial file is ever left, and an older file at ``path`` stays untouched.
    """

    name = "jsonl"

    def __init__(self, path: str | Path, *, to_json: Callable[[Frame], Any] | None = None, fsync: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = Path(path)
        self.to_json = to_json if to_json is not None else (lambda frame: summarize(frame.data))
        self.fsync = fsync
        self.committed: Path | None = None
        self._file: AtomicFile | None = None
        self._failed = False

    async def open(self) -> None:
        if self._file is not None:
            raise RuntimeError(f"{self.name} sink {self.path} is already open; a sink writes one graph's frames "
                               "(make another sink for another graph)")
        self._failed = False
        self.committed = None
        self._file = file = AtomicFile(self.path, fsync=self.fsync)  # before the await: a second open() is refused
        try:
            await file.open()
        except BaseException:
            self._file = None  # a sink that failed to open may be opened again
            raise

    async def write(self, frame: Frame) -> None:
        if self._file is None:
            raise RuntimeError(f"{self.name}: open() the sink before writing")
        try:
            record = {"seq": frame.seq, "t_capture": frame.t_capture, "t_done": frame.t_done,
                      "latency": frame.latency, "meta": frame.meta, "output": self.to_json(frame)}
            await self._file.write((json.dumps(record, default=_json_default) + "\n").encode())
        except BaseException:
            self._failed = True
            raise

    async def close(self) -> None:
        """Commit the file, or discard it if a write failed (see the class docstring)."""
        file, self._file = self._file, None
        if file is None:
            return
        if self._failed:
            await file.discard()
        else:
            self.committed = await file.commit()

    async def abort(self) -> None:
        """Discard what was written; ``path`` is left as it was."""
        file, self._file = self._file, None
        if file is not None:
            await file.discard()
