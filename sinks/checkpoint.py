"""The checkpoint sink: the pipeline's state written atomically every N frames."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from partime_async.checkpoint import META_KEY, save_atomic_async
from partime_async.frame import Frame

from .base import Sink


class Checkpoint(Sink):
    """Writes ``pipe``'s state (weights, per-stage optimiser state, stream position) every
    ``every`` frames, atomically (temporary file + rename: a crash never leaves a partial
    file). ``path`` may contain ``{seq}`` to keep one file per checkpoint; otherwise the file
    is replaced each time. Resume with::

        state = partime_async.checkpoint.load(path)
        pipe.load_state_dict(state)           # then stream from state["position"]

    With learning, each checkpoint is a consistent cut taken by the stages as frame t passes
    them (see :mod:`partime_async.checkpoint`); without, it is the model and the position.
    """

    name = "checkpoint"

    def __init__(self, pipe: Any, path: str | Path, *, every: int = 100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.pipe = pipe
        self.path = str(path)
        self.every = every
        self.saved: list[Path] = []
        pipe.checkpoint_every = every

    async def write(self, frame: Frame) -> None:
        snapshot = frame.meta.get(META_KEY)
        if snapshot is None:
            return
        if snapshot is True:  # no learning: the weights do not change while streaming
            state = self.pipe.state_dict()
            state["position"] = frame.seq + 1
        else:
            state = await snapshot.state(self.pipe)
        self.saved.append(await save_atomic_async(state, self.path.format(seq=frame.seq)))
