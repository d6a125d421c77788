"""Targets that arrive after their frame, joined to it by seq."""
from __future__ import annotations

import contextlib
from collections import deque
from typing import Any, AsyncIterable, AsyncIterator

from partime_async.frame import Frame

from .base import Source, iterate_frames


class NextFrameTargets(Source):
    """Next-frame prediction: frame t carries frame t + ``horizon``'s payload as its target.

    Frame t is emitted once frame t + horizon has arrived (the target exists only then), so
    the stream is ``horizon`` frames shorter and each frame is ``horizon`` frames late.
    """

    def __init__(self, source: AsyncIterable[Any] | Any, *, horizon: int = 1) -> None:
        super().__init__(name=f"next-frame targets of {getattr(source, 'name', type(source).__name__)}")
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.source = source
        self.horizon = horizon

    async def frames(self) -> AsyncIterator[Frame]:
        waiting: deque[Frame] = deque()
        # Closed with this generator (not left to the garbage collector's finaliser).
        async with contextlib.aclosing(iterate_frames(self.source)) as frames:
            async for frame in frames:
                waiting.append(frame)
                if len(waiting) > self.horizon:
                    early = waiting.popleft()
                    yield Frame(early.seq, early.data, frame.data, dict(early.meta), early.t_capture)


def next_frame_targets(source: AsyncIterable[Any] | Any, *, horizon: int = 1) -> NextFrameTargets:
    """``source`` with each frame's target set to the payload ``horizon`` frames later."""
    return NextFrameTargets(source, horizon=horizon)
