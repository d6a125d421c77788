"""A source paced to a wall clock, whose consumer always gets the newest frame."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from partime_async.aio.channel import Channel, Policy
from partime_async.aio.threads import retrieve, to_the_end
from partime_async.core.frame import Frame, now

from .base import Source, iterate_frames


class RealTime(Source):
    """``source`` played at ``fps`` frames per second, as a live camera would deliver it.

    A producer task takes frames from ``source`` and emits one per period of a clock into a
    :class:`~partime_async.Channel`; the consumer (a pipeline, a loop) reads that channel.
    With the default ``policy="latest"`` a consumer slower than the clock never makes the
    producer wait: each new frame replaces one still unread, so the consumer always gets the
    newest frame and latency stays bounded; every replaced frame is counted in
    :attr:`dropped`. With ``policy="block"`` nothing is dropped and a slow consumer slows the
    clock down instead.

    Pacing: frame k is emitted at ``t0 + k / fps`` while the source keeps up (a frame a little
    late does not move the schedule); after a frame a period or more late, the schedule
    restarts from it (the next frame comes a period after it), so a slow source is never
    followed by a burst.

    After (or during) an iteration, ``produced == delivered + dropped + (frames still queued)``;
    once the stream has ended, ``produced == delivered + dropped``. Each frame's ``t_capture``
    is set when it is emitted. An error in ``source`` reaches the consumer (after the frames
    emitted before it); a consumer that stops early stops the producer.

    Args:
        source: a :class:`Source` or any (async) iterable of frames or payloads.
        fps: emission rate (> 0).
        policy: the channel's policy: ``"latest"`` (default), ``"drop_oldest"``,
            ``"drop_newest"`` or ``"block"``.
        capacity: channel slots (``"latest"`` always has 1).
        clock, sleep: the clock (seconds) and the sleep the pacing uses; inject fakes to test
            pacing without waiting.
    """

    def __init__(self, source: Iterable[Any] | AsyncIterable[Any], *, fps: float, policy: Policy = "latest",
                 capacity: int = 1, clock: Callable[[], float] = now,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep, name: str | None = None) -> None:
        super().__init__(name=name or f"real-time {getattr(source, 'name', type(source).__name__)}")
        if not fps or fps <= 0:
            raise ValueError(f"fps must be positive, got {fps!r}")
        Channel(capacity, policy)  # validates both, with the channel's own messages
        self.source = source
        self.fps = fps
        self.period = 1.0 / fps
        self.policy: Policy = policy
        self.capacity = capacity
        self.clock = clock
        self.sleep = sleep
        self.produced = 0
        self.delivered = 0
        self._channel: Channel[Frame] | None = None

    @property
    def dropped(self) -> int:
        """Frames emitted but replaced before the consumer took them (this iteration)."""
        return self._channel.dropped if self._channel is not None else 0

    def __aiter__(self) -> AsyncIterator[Frame]:
        return self.frames()  # paced here, not by Source.__aiter__

    async def frames(self) -> AsyncIterator[Frame]:
        self.produced = self.delivered = 0
        channel: Channel[Frame] = Channel(self.capacity, self.policy, name=self.name)
        self._channel = channel
        producer = asyncio.create_task(self._produce(channel), name=f"real-time producer of {self.name}")
        try:
            async for frame in channel:
                self.delivered += 1
                yield frame
            await producer  # the stream ended: raises the source's error, if it had one
        finally:
            try:
                if not producer.done():  # the consumer stopped early, or failed
                    producer.cancel()
                    await to_the_end(asyncio.wait([producer]))  # its source closed before this one ends
            finally:
                if producer.done():
                    retrieve(producer)  # raised above, or moot once the consumer has left

    async def _produce(self, channel: Channel[Frame]) -> None:
        try:
            deadline = self.clock()
            async with contextlib.aclosing(iterate_frames(self.source)) as frames:
                async for frame in frames:
                    delay = deadline - self.clock()
                    if delay > 0:
                        await self.sleep(delay)
                    else:  # late: no wait, but let the loop run (a latest-policy send never suspends)
                        await asyncio.sleep(0)
                    frame.t_capture = now()
                    await channel.send(frame)
                    self.produced += 1
                    # The next frame is due a period after this one was due; if that time has
                    # passed already (this frame went out a period or more late, or a blocking
                    # send waited that long), a period after now: never at once.
                    deadline += self.period
                    if deadline <= self.clock():
                        deadline = self.clock() + self.period
        finally:
            channel.close()  # the consumer gets the frames already queued, then the end (or the error)
