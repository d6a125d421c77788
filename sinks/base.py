"""The in-memory sinks, and the :class:`Sink` base class (defined with the graphs that drive
sinks, :mod:`partime_async.graph`)."""
from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from partime_async.core.frame import Frame
from partime_async.graph import Sink

__all__ = ["CallbackSink", "Collect", "NullSink", "Sink"]


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
