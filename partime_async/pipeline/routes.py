"""Routes: where the output of an admitted frame goes.

Every frame admitted into a pipeline carries a route, and every admitted frame *settles* on
its route exactly once: delivered, skipped (``on_error="skip"``) or dropped (a channel
policy), unless the pipeline stops or fails first, which abandons it (counted; the route
learns why). That invariant is what lets ``stream()`` end exactly when its last frame is out
and lets ``submit()`` never hang, and it is what makes "nothing lost silently" checkable.
"""
from __future__ import annotations

import asyncio

from ..aio.channel import Channel, ChannelClosed
from ..core.errors import FrameDropped, PipelineError
from ..core.frame import Frame


class Route:
    """Base route; counts outcomes. ``request``: its frames are ``submit()`` requests, numbered
    apart from the streams' (errors and statistics name them so)."""

    request = False

    def __init__(self) -> None:
        self.admitted = 0
        self.delivered = 0  # or discarded, when the reader had gone (see :attr:`gone`)
        self.skipped = 0
        self.dropped = 0

    @property
    def gone(self) -> bool:
        """Whether the reader went away: a frame settled now is discarded, not delivered."""
        return False

    def offer(self, frame: Frame) -> bool:
        """Deliver ``frame`` if that needs no waiting; False means: await :meth:`deliver`."""
        raise NotImplementedError

    async def deliver(self, frame: Frame) -> None:
        """Deliver ``frame``, waiting for room if the reader is behind."""
        raise NotImplementedError

    def skip(self, frame: Frame, error: PipelineError) -> None:
        self.skipped += 1

    def drop(self, frame: Frame, where: str) -> None:
        self.dropped += 1

    def fail(self, error: BaseException) -> None:
        """The pipeline failed or stopped: whoever waits on this route must learn why."""

    def failing(self, error: BaseException) -> None:
        """The pipeline is failing with ``error`` and admits nothing more; the frames already
        admitted may still settle. A route that would end cleanly ends with ``error``."""

    def lose(self, key: int, error: PipelineError) -> None:
        """The frame of job ``key`` failed with ``error``, which fails the pipeline: whoever
        waits for it learns it (a stream's reader after the frames before it)."""
        self.failing(error)


class FutureRoute(Route):
    """One frame, one answer: the route of ``Pipeline.submit``."""

    request = True

    def __init__(self, future: asyncio.Future[Frame]) -> None:
        super().__init__()
        self.future = future

    @property
    def gone(self) -> bool:
        return self.future.cancelled()

    def offer(self, frame: Frame) -> bool:
        self.delivered += 1
        if not self.future.done():  # the submitter may have been cancelled
            self.future.set_result(frame)
        return True

    async def deliver(self, frame: Frame) -> None:
        self.offer(frame)

    def skip(self, frame: Frame, error: PipelineError) -> None:
        super().skip(frame, error)
        self.fail(error)

    def drop(self, frame: Frame, where: str) -> None:
        super().drop(frame, where)
        self.fail(FrameDropped(f"dropped by the {where} channel policy", component="pipeline", seq=frame.seq,
                               request=True))

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def lose(self, key: int, error: PipelineError) -> None:
        self.fail(error)


class StreamRoute(Route):
    """Many frames in order, read from :attr:`out`; it closes once admission has ended and
    every admitted frame has settled, or with the pipeline's error after them (errors come in
    order: the reader gets every frame that was delivered first)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.out: Channel[Frame] = Channel(capacity, name="stream output")
        self.admitting = True
        self.detached = False  # the reader went away: settle quietly, never block the egress
        self.error: BaseException | None = None  # the pipeline is failing: the stream ends with it
        self._lost = float("inf")  # the job key of its earliest frame that failed

    @property
    def gone(self) -> bool:
        return self.detached

    def offer(self, frame: Frame) -> bool:
        if not self.detached and not self.out.send_nowait(frame):
            return False
        self.delivered += 1
        self._settled()
        return True

    async def deliver(self, frame: Frame) -> None:
        if not self.detached:
            try:
                await self.out.send(frame)
            except ChannelClosed:
                if not self.detached:  # closed by detach() while we waited: fine
                    raise
        self.delivered += 1
        self._settled()

    def skip(self, frame: Frame, error: PipelineError) -> None:
        super().skip(frame, error)
        self._settled()

    def drop(self, frame: Frame, where: str) -> None:
        super().drop(frame, where)
        self._settled()

    def end_admission(self) -> None:
        self.admitting = False
        self._settled()

    def detach(self) -> None:
        self.detached = True
        self.out.close()

    def fail(self, error: BaseException) -> None:
        # After the frames already delivered to it (a complete stream ends as it was), with
        # the error of its own frame if one failed.
        self.out.close(self.error or error)

    def failing(self, error: BaseException) -> None:
        self.error = self.error or error

    def lose(self, key: int, error: PipelineError) -> None:
        if key < self._lost:  # the stream ends with the error of its earliest frame that failed
            self._lost, self.error = key, error

    def _settled(self) -> None:
        if not self.admitting and self.delivered + self.skipped + self.dropped == self.admitted:
            self.out.close(self.error)
