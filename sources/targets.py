"""Targets that arrive after their frame, joined to it by seq."""
from __future__ import annotations

import contextlib
import warnings
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

from partime_async.core.frame import Frame, clone

from .base import Source, iterate_frames


class NextFrameTargets(Source):
    """Next-frame prediction: frame t carries frame t + ``horizon``'s payload as its target,
    joined by seq.

    The target is a copy of that payload (the payload itself goes on into the model, which may
    modify it in place). Frame t is emitted once frame t + horizon has arrived (the target
    exists only then), so each frame is ``horizon`` frames late. A frame whose target never comes (the last
    ``horizon`` frames of the stream; frames before a gap in the seqs, as a real-time source
    that drops frames leaves; the frames before a seq that goes back, as when a source starts
    over) is not emitted, and counted in :attr:`unpaired`; the first such gap in a stream
    raises a ``RuntimeWarning``. Seqs are expected to count 0, 1, 2, … (a source whose seqs
    step by k pairs frames k seqs apart with ``horizon=k``).
    """

    def __init__(self, source: AsyncIterable[Any] | Any, *, horizon: int = 1) -> None:
        super().__init__(name=f"next-frame targets of {getattr(source, 'name', type(source).__name__)}")
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.source = source
        self.horizon = horizon
        self.unpaired = 0  # frames left without a target (not emitted), over every iteration

    async def frames(self) -> AsyncIterator[Frame]:
        waiting: deque[Frame] = deque()  # frames whose target may still come, in seq order
        warned = False
        # Closed with this generator (not left to the garbage collector's finaliser).
        try:
            async with contextlib.aclosing(iterate_frames(self.source)) as frames:
                async for frame in frames:
                    if waiting and frame.seq <= waiting[-1].seq:  # the seqs went back: a new sequence
                        self.unpaired += len(waiting)
                        waiting.clear()
                    wanted = frame.seq - self.horizon
                    while waiting and waiting[0].seq < wanted:  # its target's seq was skipped
                        early = waiting.popleft()
                        self.unpaired += 1
                        if not warned:  # once per stream: a source that drops frames would repeat it
                            warned = True
                            warnings.warn(f"{self.name}: frame {early.seq} gets no target, frame "
                                          f"{early.seq + self.horizon} never came (targets are joined by seq; "
                                          "frames without one are not emitted and are counted in .unpaired)",
                                          RuntimeWarning, stacklevel=2)
                    if waiting and waiting[0].seq == wanted:
                        early = waiting.popleft()
                        # A copy: frame t + horizon's own payload enters the pipeline, and a model
                        # may modify its input in place (a first ReLU(inplace=True)).
                        yield Frame(early.seq, early.data, clone(frame.data), dict(early.meta), early.t_capture)
                    waiting.append(frame)
        finally:
            self.unpaired += len(waiting)


def next_frame_targets(source: AsyncIterable[Any] | Any, *, horizon: int = 1) -> NextFrameTargets:
    """``source`` with each frame's target set to the payload ``horizon`` frames later."""
    return NextFrameTargets(source, horizon=horizon)
