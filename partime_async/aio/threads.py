"""Threads and the event loop: blocking work awaited safely, and results sent back in batches.

``asyncio.to_thread`` cannot stop its thread: a cancelled caller returns at once while the
thread goes on (writing a file, measuring a model). :func:`in_thread` waits for the thread to
end before it re-raises the cancellation, and can ask it to stop early through an event;
:func:`to_the_end` does the same for any awaitable (aiofiles' opens and closes).

:class:`LoopNotifier` resolves a loop's futures from other threads (device workers, CUDA event
waiters), waking the loop once per batch of results rather than once per result.
"""
from __future__ import annotations

import asyncio
import threading
import warnings
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], *args: Any, stop: threading.Event | None = None) -> T:
    """``fn(*args)`` on a worker thread. If the caller is cancelled meanwhile, ``stop`` is set
    (``fn`` should check it and return soon) and the thread is waited for (up to
    :data:`CLEANUP_GRACE_S`), then the cancellation goes on: whatever ``fn`` does is over when
    the caller has left."""
    return await to_the_end(asyncio.to_thread(fn, *args), on_cancel=stop.set if stop is not None else None)


CLEANUP_GRACE_S = 30.0
"""How long :func:`to_the_end` waits for work once its caller was cancelled, before it gives
up on it (so that a close that hangs cannot make a pipeline impossible to stop)."""


async def to_the_end(aw: Awaitable[T], *, on_cancel: Callable[[], Any] | None = None,
                     grace: float | None = None) -> T:
    """Await ``aw`` to its end even if the caller is cancelled meanwhile (once or more), then
    re-raise the cancellation. For work on another thread that must not be abandoned half-way:
    a file that aiofiles' thread opens or closes for a cancelled task would otherwise still be
    open after the task ended. ``on_cancel`` runs at the first cancellation (to ask the work
    to end early). After a cancellation the work gets ``grace`` seconds (default
    :data:`CLEANUP_GRACE_S`); if it is still running then, it is left to finish on its own,
    with a ``RuntimeWarning``, and the cancellation goes on."""
    loop = asyncio.get_running_loop()
    wait_s = CLEANUP_GRACE_S if grace is None else grace
    work = asyncio.ensure_future(aw)
    cancelled: asyncio.CancelledError | None = None
    deadline = 0.0
    while not work.done():
        try:
            timeout = None if cancelled is None else max(0.0, deadline - loop.time())
            done, _ = await asyncio.wait({work}, timeout=timeout)
        except asyncio.CancelledError as exc:
            if cancelled is None:
                cancelled, deadline = exc, loop.time() + wait_s
                if on_cancel is not None:
                    on_cancel()
            continue
        if not done:
            warnings.warn(f"{work!r} was still running {wait_s:g} s after its task was cancelled; "
                          "left to finish on its own", RuntimeWarning, stacklevel=2)
            _abandoned.add(work)  # the loop keeps tasks weakly: held here until it ends
            work.add_done_callback(retrieve)
            work.add_done_callback(_abandoned.discard)
            break
    if cancelled is not None:
        if work.done():
            retrieve(work)  # the cancellation is what the caller reports
        raise cancelled
    return work.result()


async def aclose_to_the_end(iterator: Any) -> None:
    """Close ``iterator``: with ``aclose()`` if it has one (an async generator, a source), to its
    end even if the caller is cancelled again meanwhile (see :func:`to_the_end`); a generator
    with ``close()`` (its ``finally`` blocks run now). Other iterators (a file, an object of
    the caller's) are left as they are."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await to_the_end(aclose())
    elif isinstance(iterator, Generator):  # (Cython's generators too)
        iterator.close()


_abandoned: set[asyncio.Future[Any]] = set()


def retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a finished future's exception as seen (its owner reports something else), so that
    asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


def resolve(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    """Set ``future``'s result or exception, unless it is already done (its awaiter was
    cancelled). Call on the future's loop."""
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
        # Whoever awaits the future still gets the error; one that nobody will await (its
        # stage is being cancelled because the pipeline already failed) is not logged again.
        future.exception()
    else:
        future.set_result(result)


class LoopNotifier:
    """Resolves futures of one event loop from any thread, in batches.

    While the loop has not yet run the previous wake-up, new results only join the queue, so a
    busy producer wakes the loop once per batch of results instead of once per result (a
    wake-up costs tens of microseconds of CPU on both sides).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._done: deque[tuple[asyncio.Future[Any], Any, BaseException | None]] = deque()
        self._wake_pending = False

    def notify(self, future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
        """Resolve ``future`` with ``result`` (or ``exc``) on the loop, soon. Any thread.
        Raises RuntimeError if the loop is closed."""
        self._done.append((future, result, exc))
        if not self._wake_pending:
            self._wake_pending = True
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        self._wake_pending = False  # first: a result appended from now on schedules a new wake-up
        done = self._done
        while done:
            resolve(*done.popleft())
