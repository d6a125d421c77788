"""An ``asyncio.Queue`` as a source: frames pushed by other tasks (handlers, callbacks, sensors)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from partime_async.core.frame import Frame

from .base import Source, iterate_frames


class _End:
    def __repr__(self) -> str:
        return "END"


END: Any = _End()
"""The default end-of-stream marker: ``await queue.put(END)`` ends a :class:`QueueSource`."""

_SHUTDOWN: tuple[type[BaseException], ...] = tuple(
    e for e in [getattr(asyncio, "QueueShutDown", None)] if e is not None)  # Python >= 3.13


class QueueSource(Source):
    """Frames (or payloads: they get seq 0, 1, 2, …) taken from an ``asyncio.Queue``.

    The stream ends when the ``sentinel`` is taken from the queue (put it with :meth:`close`,
    or ``queue.put(END)`` yourself), after every item queued before it; on Python 3.13+ a
    ``queue.shutdown()`` ends it too. ``task_done()`` is called for every item taken, so
    ``await queue.join()`` works. A queue is consumed as it is read: iterating the source
    again continues where the last iteration stopped.
    """

    name = "queue"

    def __init__(self, queue: asyncio.Queue[Any] | None = None, *, maxsize: int = 0, sentinel: Any = END,
                 name: str | None = None) -> None:
        super().__init__(name=name)
        self.queue: asyncio.Queue[Any] = queue if queue is not None else asyncio.Queue(maxsize)
        self.sentinel = sentinel

    async def put(self, item: Any) -> None:
        """Queue a frame or a payload (waits while a bounded queue is full)."""
        await self.queue.put(item)

    async def close(self) -> None:
        """End the stream after the items already queued."""
        await self.queue.put(self.sentinel)

    async def _items(self) -> AsyncIterator[Any]:
        while True:
            try:
                item = await self.queue.get()
            except _SHUTDOWN:
                return
            self.queue.task_done()
            if item is self.sentinel:
                return
            yield item

    def frames(self) -> AsyncIterator[Frame]:
        return iterate_frames(self._items())


def from_queue(queue: asyncio.Queue[Any], *, sentinel: Any = END, name: str = "queue") -> QueueSource:
    """A source over ``queue``; it ends when ``sentinel`` (default :data:`END`) is taken."""
    return QueueSource(queue, sentinel=sentinel, name=name)
