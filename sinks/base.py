"""The sink base class and the in-memory sinks."""
from __future__ import annotations

import inspect
from typing import Any, Awaitable, Callable

from partime_async.channel import POLICIES, Policy
from partime_async.frame import Frame


class Sink:
    """Receives a graph's output frames, in order.

    Subclasses implement :meth:`write` (and :meth:`open` / :meth:`close` when they hold
    resources: :func:`partime_async.run` calls ``close`` after success and :meth:`abort`,
    which is ``close`` unless overridden, after a failure or cancellation; either runs to
    its end on a task of its own, even if the run is cancelled meanwhile). ``capacity`` and
    ``policy`` configure the channel that feeds this sink alone: ``"block"`` slows the graph
    to this sink's pace; a drop policy lets the sink fall behind and counts what it missed in
    :attr:`dropped`. The sinks of a graph are handed the same :class:`Frame` objects: treat
    them as read-only (copy a frame before changing it).
    """

    name = "sink"

    def __init__(self, *, capacity: int = 8, policy: Policy = "block", name: str | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown sink policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"sink capacity must be an int >= 1 (frames queued for this sink), got {capacity!r}")
        self.capacity = capacity
        self.policy: Policy = policy
        if name is not None:
            self.name = name
        self.written = 0
        self.dropped = 0

    async def open(self) -> None:
        """Acquire resources before the first frame."""

    async def write(self, frame: Frame) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Flush and release after success. Once :meth:`open` succeeded, :func:`partime_async.run`
        calls exactly one of ``close()`` and :meth:`abort`, after the whole graph has ended."""

    async def abort(self) -> None:
        """Release after a failure or cancellation anywhere in the graph (a file sink
        discards its file here); by default the same as :meth:`close`."""
        await self.close()

    def count_drop(self, frame: Frame) -> None:
        self.dropped += 1

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} written={self.written} dropped={self.dropped}>"


class Collect(Sink):
    """Keeps every output frame in :attr:`frames` (in order). ``capacity``, ``policy`` and
    ``name`` as for every :class:`Sink` (with a drop policy, it keeps the frames it got)."""

    name = "collect"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.frames: list[Frame] = []

    async def write(self, frame: Frame) -> None:
        self.frames.append(frame)

    @property
    def outputs(self) -> list[Any]:
        """The payloads of the collected frames."""
        return [f.data for f in self.frames]


class CallbackSink(Sink):
    """Calls ``fn(frame)`` for every output; ``fn`` may be sync or async. ``capacity``,
    ``policy`` and ``name`` (default: ``fn``'s name) as for every :class:`Sink`."""

    def __init__(self, fn: Callable[[Frame], Any | Awaitable[Any]], **kwargs: Any) -> None:
        kwargs.setdefault("name", getattr(fn, "__name__", "callback"))
        super().__init__(**kwargs)
        self.fn = fn
        self._is_async = inspect.iscoroutinefunction(fn)

    async def write(self, frame: Frame) -> None:
        result = self.fn(frame)
        if self._is_async or inspect.isawaitable(result):
            await result


class NullSink(Sink):
    """Discards outputs (for benchmarks and for graphs run for their side effects)."""

    name = "null"

    async def write(self, frame: Frame) -> None:
        pass
