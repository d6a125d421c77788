"""Bounded channels between the components of a graph.

A channel holds at most ``capacity`` items. What happens when a sender finds it full is the
channel's *policy*:

``block``        the sender waits (backpressure; nothing is ever lost),
``drop_oldest``  the oldest queued item is evicted to make room,
``drop_newest``  the item being sent is discarded,
``latest``       capacity 1 and ``drop_oldest``: a receiver always gets the newest item.

Every drop is counted in :attr:`Channel.dropped` and handed to the ``on_drop`` callback, so
that nothing is lost silently. ``close()`` ends the stream: receivers drain what is queued and
then get :class:`EndOfStream` (``async for`` simply stops); ``close(exc)`` ends it after what
is queued with an error, in order. ``abort(exc)`` ends it with an error at once: what is
queued is discarded, receivers and blocked senders raise ``exc``.

The channel is asyncio-only: call it from the event loop's thread.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, Literal, TypeVar, get_args

T = TypeVar("T")
Policy = Literal["block", "drop_oldest", "drop_newest", "latest"]
POLICIES: tuple[str, ...] = get_args(Policy)


class EndOfStream(Exception):
    """``receive()`` on a channel that is closed and drained."""


class ChannelClosed(RuntimeError):
    """``send()`` on a channel that was closed."""


class Channel(Generic[T]):
    """A bounded FIFO channel with an explicit close and a drop policy."""

    __slots__ = (
        "name", "capacity", "policy", "on_drop", "sent", "received", "dropped",
        "_items", "_getters", "_putters", "_closed", "_error",
    )

    def __init__(
        self,
        capacity: int = 4,
        policy: Policy = "block",
        *,
        name: str = "channel",
        on_drop: Callable[[T], None] | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown channel policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if policy == "latest":
            capacity = 1
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"channel capacity must be an int >= 1, got {capacity!r}")
        self.name = name
        self.capacity = capacity
        self.policy: Policy = policy
        self.on_drop = on_drop
        self.sent = 0
        self.received = 0
        self.dropped = 0
        self._items: deque[T] = deque()
        self._getters: deque[asyncio.Future[None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self._error: BaseException | None = None

    def __len__(self) -> int:
        return len(self._items)

    def newest(self) -> T | None:
        """The item queued last, still queued (None when empty)."""
        return self._items[-1] if self._items else None

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (f"<Channel {self.name} {state} {len(self._items)}/{self.capacity} {self.policy} "
                f"sent={self.sent} received={self.received} dropped={self.dropped}>")

    @property
    def closed(self) -> bool:
        return self._closed

    # -- sending -------------------------------------------------------------------------
    async def send(self, item: T) -> None:
        """Queue ``item``; with ``block``, wait while the channel is full."""
        if self.policy == "block":
            while len(self._items) >= self.capacity and not self._closed:
                waiter = asyncio.get_running_loop().create_future()
                self._putters.append(waiter)
                try:
                    await waiter
                except BaseException:
                    waiter.cancel()
                    self._discard(self._putters, waiter)
                    # We may have been woken as the one sender allowed in: pass the turn on.
                    if len(self._items) < self.capacity:
                        _wake_one(self._putters)
                    raise
        self.send_nowait(item)

    def send_nowait(self, item: T) -> bool:
        """Queue ``item`` without waiting.

        Returns False when a ``block`` channel is full (nothing is queued). Drop policies always
        accept, dropping by their rule (and returning True).
        """
        if self._closed:
            raise self._error if self._error is not None else ChannelClosed(f"{self.name} is closed")
        if len(self._items) >= self.capacity:
            if self.policy == "block":
                return False
            if self.policy == "drop_newest":
                self._drop(item)
                return True
            self._drop(self._items.popleft())
        self._items.append(item)
        self.sent += 1
        _wake_one(self._getters)
        return True

    def _drop(self, item: T) -> None:
        self.dropped += 1
        if self.on_drop is not None:
            self.on_drop(item)

    # -- receiving -----------------------------------------------------------------------
    async def receive(self) -> T:
        """The next item; raises :class:`EndOfStream` once closed and drained."""
        while not self._items:
            if self._closed:
                if self._error is not None:
                    raise self._error
                raise EndOfStream(self.name)
            waiter = asyncio.get_running_loop().create_future()
            self._getters.append(waiter)
            try:
                await waiter
            except BaseException:
                waiter.cancel()
                self._discard(self._getters, waiter)
                if self._items:
                    _wake_one(self._getters)
                raise
        return self._pop()

    def receive_nowait(self) -> T:
        """The next item if one is queued; raises :class:`asyncio.QueueEmpty` otherwise."""
        if self._items:
            return self._pop()
        if self._closed:
            if self._error is not None:
                raise self._error
            raise EndOfStream(self.name)
        raise asyncio.QueueEmpty

    def _pop(self) -> T:
        item = self._items.popleft()
        self.received += 1
        _wake_one(self._putters)
        return item

    def __aiter__(self) -> Channel[T]:
        return self

    async def __anext__(self) -> T:
        if self._items:  # fast path: no coroutine frame for receive()
            return self._pop()
        try:
            return await self.receive()
        except EndOfStream:
            raise StopAsyncIteration from None

    # -- closing -------------------------------------------------------------------------
    def close(self, exc: BaseException | None = None) -> None:
        """End the stream: queued items are still delivered, then receivers stop, or with
        ``exc`` raise it (an error in order with the items)."""
        if self._closed:
            return
        self._error = exc
        self._closed = True
        _wake_all(self._getters)
        _wake_all(self._putters)

    def abort(self, exc: BaseException) -> None:
        """End the stream with an error: queued items are discarded, everyone raises ``exc``."""
        if self._closed and self._error is not None:
            return
        self._error = exc
        self._items.clear()
        self._closed = True
        _wake_all(self._getters)
        _wake_all(self._putters)

    @staticmethod
    def _discard(waiters: deque[asyncio.Future[None]], waiter: asyncio.Future[None]) -> None:
        try:
            waiters.remove(waiter)
        except ValueError:
            pass


def _wake_one(waiters: deque[asyncio.Future[None]]) -> None:
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            return


def _wake_all(waiters: deque[asyncio.Future[None]]) -> None:
    while waiters:
        _wake_one(waiters)
