"""The checkpoint sink: the pipeline's state written atomically every N frames."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from partime_async.checkpoint import save_atomic_async
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
    The pipeline takes cuts for this sink from when it is opened (a graph opens its sinks
    before the first frame) until it is closed; several sinks may checkpoint one pipeline,
    each at its own period.
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
        self._asked = False

    async def open(self) -> None:
        if not self._asked:
            self.pipe._ask_checkpoints(self.every)
            self._asked = True

    async def write(self, frame: Frame) -> None:
        if not self._asked:
            raise RuntimeError("this Checkpoint sink is not open: the pipeline takes cuts only for open checkpoint "
                               "sinks; run it in a graph (pa.run(source >> pipe >> sink)) or `await sink.open()` "
                               "before the frames flow")
        snapshot = frame.checkpoint
        if snapshot is None or snapshot.index % self.every:  # none, or another sink's cut
            return
        state = await snapshot.state(self.pipe)
        self.saved.append(await save_atomic_async(state, self.path.format(seq=frame.seq)))

    async def close(self) -> None:
        if self._asked:
            self.pipe._stop_checkpoints(self.every)
            self._asked = False
