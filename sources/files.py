"""Frames from NumPy files, read with aiofiles (the event loop never waits on the disk).

* :class:`NpyDirectory`: a folder of ``.npy`` files, one frame each (what
  :class:`~partime_async.sinks.NpySink` writes), in file-name or index order.
* :class:`NpzVideo`: one ``.npz`` archive holding a whole video as one array, frames along its
  first axis.

Arrays come back bit for bit: same dtype, shape and bytes (non-native byte orders are
converted to native, which keeps the values). Pickled (object) arrays are refused.
"""
from __future__ import annotations

import io
import itertools
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import aiofiles
import numpy as np
import torch

from partime_async.aio.threads import to_the_end
from partime_async.core.frame import Frame

from .base import Source

Order = Literal["name", "index"]
_DIGITS = re.compile(r"(\d+)")


async def read_bytes(path: str | Path) -> bytes:
    """The whole content of ``path``, read on aiofiles' worker thread. A cancelled caller
    waits for the read to end (and the file to be closed) before the cancellation goes on."""
    async def read() -> bytes:
        async with aiofiles.open(path, "rb") as f:
            return await f.read()

    return await to_the_end(read())


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """``array`` as a tensor of the same dtype, shape and values; a read-only array (what
    ``np.load`` gives from bytes) is copied first, since torch would write through its view."""
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return torch.from_numpy(np.require(array, requirements="W"))


def file_index(path: Path) -> int:
    """The last run of digits in a file's name (``frame_00000012.npy`` -> 12)."""
    numbers = _DIGITS.findall(path.stem)
    if not numbers:
        raise ValueError(f"{path.name} has no number in its name; order='index' needs one in every file name "
                         "(or use order='name')")
    return int(numbers[-1])


class NpyDirectory(Source):
    """One frame per ``.npy`` file in ``directory``.

    Args:
        directory: the folder.
        pattern: a glob of the files to read (default ``*.npy``); hidden files (names starting
            with a dot, such as a sink's temporary files) are skipped.
        order: ``"name"`` (sorted file names; frames get seq 0, 1, 2, …) or ``"index"`` (sorted
            by the last number in each name, which becomes the frame's seq: a folder written by
            :class:`~partime_async.sinks.NpySink` reads back with its original seqs, gaps
            included). Two files with the same index are an error.
        fps: pace to a wall clock (None: as fast as consumed).

    Each frame's ``meta["path"]`` is its file. The folder is listed when iteration starts.
    """

    name = "npy directory"

    def __init__(self, directory: str | Path, *, pattern: str = "*.npy", order: Order = "name",
                 fps: float | None = None, name: str | None = None) -> None:
        super().__init__(fps=fps, name=name)
        if order not in ("name", "index"):
            raise ValueError(f"order must be 'name' or 'index', got {order!r}")
        self.directory = Path(directory)
        self.pattern = pattern
        self.order: Order = order

    def files(self) -> list[tuple[int, Path]]:
        """``(seq, path)`` of every frame, in stream order."""
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory} is not a directory")
        paths = [p for p in self.directory.glob(self.pattern) if p.is_file() and not p.name.startswith(".")]
        if self.order == "name":
            return list(enumerate(sorted(paths, key=lambda p: p.name)))
        indexed = sorted(((file_index(p), p) for p in paths), key=lambda item: (item[0], item[1].name))
        for (a, pa), (b, pb) in itertools.pairwise(indexed):
            if a == b:
                raise ValueError(f"{pa.name} and {pb.name} have the same index {a}; order='index' needs unique ones")
        return indexed

    async def frames(self) -> AsyncIterator[Frame]:
        for seq, path in self.files():
            array = np.load(io.BytesIO(await read_bytes(path)), allow_pickle=False)
            yield Frame(seq, to_tensor(array), meta={"path": str(path)})


class NpzVideo(Source):
    """The frames of one array in a ``.npz`` (or ``.npy``) file, along its first axis.

    Args:
        path: the file; it is read whole (with aiofiles) when iteration starts.
        key: the array in an ``.npz`` (default: the only one in the file).
        batch: frame t is ``array[t:t+1]`` (a batch of one, like :class:`SyntheticVideo`'s
            frames) if True, ``array[t]`` if False.
        fps: pace to a wall clock (None: as fast as consumed).

    Frame t has seq t and owns its memory (a model may modify it in place).
    """

    name = "npz video"

    def __init__(self, path: str | Path, *, key: str | None = None, batch: bool = True,
                 fps: float | None = None, name: str | None = None) -> None:
        super().__init__(fps=fps, name=name)
        self.path = Path(path)
        self.key = key
        self.batch = batch

    async def load(self) -> np.ndarray:
        """The whole video array."""
        loaded = np.load(io.BytesIO(await read_bytes(self.path)), allow_pickle=False)
        if isinstance(loaded, np.ndarray):  # a plain .npy
            if self.key is not None:
                raise ValueError(f"{self.path.name} is an .npy file with a single array; key={self.key!r} "
                                 "applies to .npz archives only")
            return loaded
        with loaded:
            keys = list(loaded.files)
            if self.key is None:
                if len(keys) != 1:
                    raise ValueError(f"{self.path.name} holds {len(keys)} arrays ({', '.join(keys)}); pass key=")
                return loaded[keys[0]]
            if self.key not in keys:
                raise KeyError(f"{self.path.name} has no array {self.key!r}; it has {', '.join(keys)}")
            return loaded[self.key]

    async def frames(self) -> AsyncIterator[Frame]:
        video = await self.load()
        if video.ndim < 1:
            raise ValueError(f"{self.path.name}: a video needs a frame axis, got a 0-d array")
        for t in range(video.shape[0]):
            yield Frame(t, to_tensor(np.array(video[t:t + 1] if self.batch else video[t])))
