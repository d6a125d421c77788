"""Blocking work on a thread, awaited so that cancellation never leaves it running behind.

``asyncio.to_thread`` cannot stop its thread: a cancelled caller returns at once while the
thread goes on (writing a file, measuring a model). :func:`in_thread` waits for the thread to
end before it re-raises the cancellation, and can ask it to stop early through an event.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], *args: Any, stop: threading.Event | None = None) -> T:
    """``fn(*args)`` on a worker thread. If the caller is cancelled meanwhile, ``stop`` is set
    (``fn`` should check it and return soon) and the thread is waited for, then the
    cancellation goes on: whatever ``fn`` does is over when the caller has left."""
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        if stop is not None:
            stop.set()
        await asyncio.wait({work})
        if not work.cancelled():
            work.exception()  # retrieved: the cancellation is what the caller reports
        raise
