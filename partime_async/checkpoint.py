"""Consistent checkpoints of a learning pipeline, taken while frames keep flowing.

A checkpoint "at frame t" is a cut through the schedule: every stage contributes its state
as it is right after its work for frame t (its forward of t and the optimiser step that
follows it), captured on the stage's own device thread, in order with its other work, so no
update is half-applied and no stage waits. The frame that closes the cut carries a
:class:`Snapshot` as ``frame.checkpoint``; the checkpoint sink awaits it and writes it
atomically. Without learning the weights do not change while frames flow, and the snapshot
is the model and the position.

Cuts are taken every ``every`` admitted frames for each :class:`~partime_async.sinks.Checkpoint`
sink that is open (several sinks, several periods; a sink that is not running asks for none).

Resuming from a checkpoint restores exactly those weights and optimiser states, and the
stream goes on at ``state["position"]`` (t + 1). What the cut leaves out: gradients that were
still owed for frames before t (in flight between the stages) — the resumed pipeline starts a
fresh warm-up, as at the start of a stream.
"""
from __future__ import annotations

import copy
import errno
import io
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any, Awaitable

import torch

from .threads import in_thread

class Snapshot:
    """One cut at frame ``seq``, for the checkpoint sinks whose period is in ``periods``
    (frames admitted in the run, counted from 1: a sink with period N takes the cut at the
    N-th, 2N-th, … frame admitted; a cut whose frame a drop policy dropped before stage 0
    moves to the newest frame still queued). With learning, filled in by the stage executors as
    they pass it (``n_stages`` parts); without, ``n_stages`` is 0."""

    def __init__(self, seq: int, periods: frozenset[int], n_stages: int) -> None:
        self.seq = seq
        self.periods = periods
        self._parts: list[Awaitable[Any] | None] = [None] * n_stages

    def add(self, stage: int, part: Awaitable[Any]) -> None:
        self._parts[stage] = part

    async def state(self, pipe: Any) -> dict[str, Any]:
        """The pipeline's state at this cut, shaped like :meth:`Pipeline.state_dict`."""
        if not self._parts:  # no learning: the weights do not change while streaming
            state = pipe.state_dict()
            state["position"] = self.seq + 1
            return state
        model: dict[str, torch.Tensor] = {}
        learners = []
        offset = 0
        for k, part in enumerate(self._parts):
            if part is None:
                raise RuntimeError(f"stage {k} did not contribute to the checkpoint at frame {self.seq}")
            (module_state, learner_state), ready = await part
            if ready is not None:  # copied on a GPU stream: complete before anyone reads it
                await in_thread(ready.synchronize)
            for key, value in module_state.items():  # keyed by the stage's layer index: the model's names
                index, _, rest = key.partition(".")
                model[f"{pipe.layer_names[int(index) + offset]}.{rest}"] = value
            offset += pipe.balance[k]
            learners.append(learner_state)
        return {"model": model, "balance": list(pipe.balance), "learners": learners,
                "position": self.seq + 1, "next_seq": pipe._next_seq_value()}


def stage_state(module: torch.nn.Module, learner: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A copy of one stage's weights and learner state (run on the stage's device thread)."""
    return copy.deepcopy((module.state_dict(), learner.state_dict()))


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
    thread writes, it waits for that write to end (:func:`~partime_async.threads.in_thread`,
    up to its grace period): a run that returns leaves no checkpoint being written behind it."""
    return await in_thread(save_atomic, obj, path)


def load(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by :class:`~partime_async.sinks.Checkpoint` (tensors on CPU)."""
    return torch.load(path, map_location="cpu", weights_only=False)
