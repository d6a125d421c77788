"""The in-loop transport: a bounded channel forward, a gradient box back, both on the event loop."""
from __future__ import annotations

import asyncio
from typing import Any

from ..aio.channel import Channel
from ..core.frame import Payload
from ..core.job import NO_GRADIENT, Job
from .base import Inlet, Outlet


def local_link(capacity: int, *, name: str, grads: str | None = None) -> tuple[Outlet, Inlet]:
    """A link between two stages of this process: the upstream stage's :class:`Outlet` and
    the downstream stage's :class:`Inlet`. Jobs go through one bounded, blocking
    :class:`~partime_async.aio.channel.Channel` of ``capacity`` named ``name``
    (backpressure); with ``grads`` (the name of the stage they go back to), gradients come
    back through a :class:`GradBox`."""
    channel: Channel[Job] = Channel(capacity, name=name)
    box = GradBox(grads) if grads is not None else None
    return Outlet(channel, box), Inlet(channel, box)


class GradBox:
    """Gradients sent back to a stage by the next one, looked up by the frame's job key.

    Bounded by the schedule, not by a capacity: a stage only ever has the few gradients it
    is owed in flight (at most 2 in steady state).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._grads: dict[int, tuple[Any, Any]] = {}
        self._waiters: dict[int, tuple[asyncio.Future[tuple[Any, Any]], int]] = {}  # key: (waiter, seq)
        self._closed = False

    def put(self, key: int, grad: Payload, ready: Any) -> None:
        waiter, _ = self._waiters.pop(key, (None, None))
        if waiter is not None and not waiter.done():
            waiter.set_result((grad, ready))
        else:
            self._grads[key] = (grad, ready)

    def forgo(self, key: int) -> None:
        self.put(key, NO_GRADIENT, None)

    async def get(self, key: int, seq: int) -> tuple[Payload, Any]:
        if key in self._grads:
            return self._grads.pop(key)
        if self._closed:
            raise RuntimeError(self._never_came(seq))
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[key] = waiter, seq
        try:
            return await waiter
        finally:
            self._waiters.pop(key, None)

    def close(self) -> None:
        self._closed = True
        for waiter, seq in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(RuntimeError(self._never_came(seq)))

    def abort(self, exc: BaseException) -> None:
        self._closed = True
        for waiter, _ in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(exc)

    def _never_came(self, seq: int) -> str:
        return f"{self.name}: the gradient of frame {seq} never came (the next stage ended)"

    def __len__(self) -> int:
        return len(self._grads)
