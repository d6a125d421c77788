"""The source base class and adapters for what users already have."""
from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable
from typing import Any

from partime_async.aio.threads import aclose_to_the_end
from partime_async.core.frame import Frame, now


class Source:
    """A named, async-iterable stream of frames.

    Subclasses implement :meth:`frames`. Iterating a source twice starts the stream again
    (deterministic sources give the same frames). ``fps`` paces the frames to a wall clock
    (None: as fast as the consumer takes them): the first frame goes out at once, whatever
    seq it has (a stream resumed at a checkpoint's position starts at once), and each next one
    ``(seq - previous seq) / fps`` seconds after the one before was due. A frame that comes
    late goes out at once: less than a period late, the schedule holds (the next frame may
    follow sooner); a period or more (the source, or its consumer, stalled), the schedule
    restarts from it, with no burst to catch up. Where the seqs go back (a clip that starts
    over), the frame is due one period after the one before.
    """

    name = "source"

    def __init__(self, *, fps: float | None = None, name: str | None = None) -> None:
        if fps is not None and fps <= 0:
            raise ValueError(f"fps must be positive or None, got {fps!r}")
        self.fps = fps
        if name is not None:
            self.name = name

    def frames(self) -> AsyncIterator[Frame]:
        """The stream: an async generator or any async iterator; if it has ``aclose``, it is
        closed when the stream ends or its consumer stops."""
        raise NotImplementedError

    async def __aiter__(self) -> AsyncIterator[Frame]:
        due: float | None = None  # when the previous frame was due
        previous = 0
        frames = self.frames()
        try:
            async for frame in frames:
                if self.fps is not None:
                    t = now()
                    if due is None:
                        due = t
                    else:  # seqs that went back (a clip starting over): one period
                        due += (frame.seq - previous if frame.seq > previous else 1) / self.fps
                        if due > t:
                            await asyncio.sleep(due - t)
                        elif t - due >= 1 / self.fps:  # a period or more late: restart here
                            due = t
                    previous = frame.seq
                    frame.t_capture = now()
                yield frame
        finally:
            # A consumer that stops early closes frames() at once (its finally blocks run now,
            # on this task), not whenever the garbage collector finalises the generator.
            aclose = getattr(frames, "aclose", None)
            if aclose is not None:
                await aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class _Iterable(Source):
    def __init__(self, items: Iterable[Any] | AsyncIterable[Any], *, fps: float | None, name: str) -> None:
        super().__init__(fps=fps, name=name)
        self.items = items

    def frames(self) -> AsyncIterator[Frame]:
        return iterate_frames(self.items)


async def iterate_frames(items: Iterable[Any] | AsyncIterable[Any]) -> AsyncGenerator[Frame, None]:
    """The items of any (async) iterable as frames; payloads get seq 0, 1, 2, …

    An async iterator that has ``aclose`` (an async generator, a :class:`Source`), or a
    generator, is closed when this generator is, so that its ``finally`` blocks run when the
    consumer stops early (other iterators are left open: they are the caller's).
    """
    counter = itertools.count()
    if isinstance(items, AsyncIterable):
        aiterator = aiter(items)
        try:
            async for item in aiterator:
                yield item if isinstance(item, Frame) else Frame(next(counter), item)
        finally:
            await aclose_to_the_end(aiterator)
    else:
        iterator = iter(items)
        try:
            for item in iterator:
                yield item if isinstance(item, Frame) else Frame(next(counter), item)
        finally:
            await aclose_to_the_end(iterator)  # a generator's close(): its finally blocks run now


def from_iterable(items: Iterable[Any], *, fps: float | None = None, name: str = "iterable") -> Source:
    """A source over tensors, payloads or frames from any iterable (list, generator, …)."""
    return _Iterable(items, fps=fps, name=name)


def from_async_iterable(items: AsyncIterable[Any], *, fps: float | None = None, name: str = "async iterable") -> Source:
    """A source over an async iterable (async generator, websocket reader, …)."""
    return _Iterable(items, fps=fps, name=name)
