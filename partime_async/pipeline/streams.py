"""Streams: a source fed through a running pipeline, and its outputs read back in order.

:class:`OutputStream` is what :meth:`Pipeline.stream` returns; when first read it opens a
:class:`~partime_async.pipeline.routes.StreamRoute` in the pipeline's current run and starts
:func:`pump`, the task that reads the source and admits its frames.
"""
from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import torch

from ..aio.channel import ChannelClosed, Policy
from ..aio.threads import aclose_to_the_end
from ..core.errors import PipelineError
from ..core.frame import Frame, Payload
from .routes import StreamRoute
from .run import Run


class OutputStream:
    """The outputs of one :meth:`Pipeline.stream` call: an async iterator of frames, in order,
    and an async context manager that closes it.

    A read that is cancelled closes the stream, as it would finish an async generator: the
    task reading it may be gone for good, and a stream nobody reads holds the pipeline up.
    (``asyncio.wait_for(anext(stream), t)`` timing out is such a read: the reads after it
    raise a ``RuntimeError`` that says so.) To wait for a frame with a timeout and read on,
    use :meth:`next`.
    """

    def __init__(self, source: Iterable[Any] | AsyncIterable[Any], *, active: Callable[[], Run], capacity: int,
                 policy: Policy) -> None:
        self._source = source
        self._active = active  # the pipeline's running run (raises if it is not running)
        self._capacity = capacity
        self._policy = policy
        self._route: StreamRoute | None = None
        self._pump: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: weakref.ref[asyncio.Task[Any]] | None = None  # the task that read it last
        self._run: Run | None = None  # the run it was opened in
        self._cancelled = False  # closed because a read was cancelled
        self._closed = False

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> Frame:
        route = self._begin_read()
        try:
            frame = await route.out.__anext__()
        except BaseException as exc:  # the end, a failure, or a cancelled read
            self._end(exc)
            raise
        self._settled(frame)
        return frame

    async def next(self, timeout: float | None = None) -> Frame:
        """The next frame, as ``anext(stream)``, but waiting at most ``timeout`` seconds:
        ``TimeoutError`` then, and the stream stays open (a later call gets that frame).
        Raises ``StopAsyncIteration`` at the end of the stream."""
        route = self._begin_read()
        try:
            async with asyncio.timeout(timeout):
                frame = await route.out.__anext__()
        except TimeoutError:
            raise  # the timeout's own cancellation: no frame was taken, the stream stays open
        except BaseException as exc:
            self._end(exc)
            raise
        self._settled(frame)
        return frame

    async def aclose(self) -> None:
        """Stop reading: the source is closed, frames still in flight are discarded."""
        self.close_now()

    async def __aenter__(self) -> OutputStream:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.close_now()

    def read_by(self, task: asyncio.Task[Any] | None) -> bool:
        """Whether ``task`` is the one that read this stream last."""
        return self._reader is not None and self._reader() is task

    def close_now(self) -> None:
        """Close the stream (see :meth:`aclose`), from the loop's thread."""
        self._closed = True
        run = self._run
        if run is None:  # never opened: no pump, no route
            return
        if self._pump is not None:
            self._pump.cancel()
            run.pumps.discard(self._pump)
        if self._route is not None:  # opened: registered with its run
            run.unread(self._route.out, counted=run.current)
            self._route.detach()
            run.routes.discard(self._route)
            run.streams.discard(self)

    def _begin_read(self) -> StreamRoute:
        if self._cancelled:
            raise RuntimeError("this stream was closed when a read of it was cancelled (say, by "
                               "asyncio.wait_for's timeout) and the frames after it were discarded; to wait for "
                               "a frame with a timeout and read on, use `await stream.next(timeout=t)`")
        if self._closed:
            raise StopAsyncIteration
        route = self._route or self._open()
        task = asyncio.current_task()
        assert task is not None  # a coroutine reads it, in a task
        self._reader = weakref.ref(task)
        return route

    def _settled(self, frame: Frame) -> None:
        """Its reader took ``frame``: delivered, if this stream is of the pipeline's current run
        (one read after a restart belongs to a run whose counts are gone)."""
        assert self._run is not None  # opened by the read that took it
        if self._run.current:
            self._run.handed(frame)

    def _end(self, exc: BaseException) -> None:
        self._cancelled = self._cancelled or isinstance(exc, asyncio.CancelledError)
        self.close_now()

    def _open(self) -> StreamRoute:
        run = self._active()
        tg = run.check_running()
        self._loop = asyncio.get_running_loop()
        self._route = route = StreamRoute(self._capacity)
        self._run = run
        run.routes.add(route)
        run.streams.add(self)
        self._pump = tg.create_task(pump(self._source, route, run, self._policy), name="partime-source")
        run.pumps.add(self._pump)
        return route

    def __del__(self) -> None:
        # A reader that breaks out of ``async for`` without closing: CPython frees the stream at
        # once, and its pump must not keep the pipeline's egress waiting for it. Closed on the
        # loop's thread: a garbage collection may run this finaliser on any thread.
        if self._route is not None and not self._route.detached and self._loop is not None:
            try:
                if self._loop is _running_loop():
                    self.close_now()
                else:
                    self._loop.call_soon_threadsafe(self.close_now)
            except RuntimeError:  # the loop is already closed: nothing left to unblock
                pass


async def pump(source: Iterable[Any] | AsyncIterable[Any], route: StreamRoute, run: Run, policy: Policy) -> None:
    """Read ``source`` and admit its frames for ``route`` until it ends, fails, or the pump is
    cancelled (the reader went away, or the pipeline stops); then end the route's admission
    and close the source, to its end. A source that raises, or a frame that fails at the
    door, fails the run in frame order (:meth:`Run.fail`): the frames admitted before it
    still complete and are delivered, then the stream raises the error."""
    admission = run.admission
    name = getattr(source, "name", type(source).__name__)
    items: AsyncIterator[Any] | Iterator[Any]
    if isinstance(source, AsyncIterable):
        is_async, items = True, aiter(source)
    else:
        is_async, items = False, iter(source)
    seq = 0
    try:
        while True:
            try:
                # (is_async tells the two apart: cheaper than an isinstance test per frame)
                item = (await anext(items)) if is_async else next(items)  # type: ignore[arg-type]
            except (StopIteration, StopAsyncIteration):
                break
            except Exception as exc:
                # A source's notes say what it tried (a sensor: how often it reconnected).
                notes = "".join(f"; {note}" for note in getattr(exc, "__notes__", ()))
                raise PipelineError(f"{type(exc).__name__}: {exc}{notes}", component=f"source {name}",
                                    seq=seq) from exc
            except asyncio.CancelledError as exc:
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise  # this pump was cancelled (stop(), or the reader went away)
                # The source's own: ending here would pass for the end of the stream.
                raise PipelineError("CancelledError raised by the source itself (not a cancellation of "
                                    "the pipeline)", component=f"source {name}", seq=seq) from exc
            frame = own_frame(item) if isinstance(item, Frame) else Frame(seq, item)
            seq = frame.seq + 1
            await admission.admit(frame, route)
            if policy != "block":
                # A drop policy never blocks, and a source (sync, or async without a real
                # wait) may never suspend either: let the stages run between frames.
                await asyncio.sleep(0)
    except (asyncio.CancelledError, ChannelClosed):
        pass  # stop() or the reader went away: admission ends, not an error of the graph
    except PipelineError as exc:
        if exc is not run.error:  # this source's failure (the run's own has ended admission already)
            route.failing(exc)
            run.fail(exc)
    except BaseException as exc:
        # Fail the reader now: ending admission cleanly would let a stream whose frames
        # were all delivered end as if the source had simply run out.
        route.fail(exc)
        raise
    finally:
        route.end_admission()
        # To its end: a pump is cancelled by its reader and may be cancelled again by the
        # pipeline's own shutdown while the source is still closing.
        await aclose_to_the_end(items)


def is_source(source: object) -> bool:
    """Whether ``source`` can feed a stream: an iterable or async iterable (not a tensor)."""
    return hasattr(source, "__aiter__") or (hasattr(source, "__iter__") and not isinstance(source, torch.Tensor))


def request_frame(x: Payload | Frame, seq: int, target: Payload | None, meta: dict[str, Any] | None) -> Frame:
    """The frame of a ``submit(x, target=, meta=)`` numbered ``seq``: ``x`` itself if it is a
    :class:`Frame` (a private copy; ``target`` replaces its target, ``meta`` adds to its meta)."""
    if isinstance(x, Frame):
        frame = own_frame(x, seq)
        if target is not None:
            frame.target = target
        frame.meta.update(meta or {})
        return frame
    return Frame(seq, x, target, dict(meta or {}))


def own_frame(frame: Frame, seq: int | None = None) -> Frame:
    """A private copy whose ``data`` the stages may replace, leaving the caller's frame as it was."""
    return Frame(frame.seq if seq is None else seq, frame.data, frame.target, dict(frame.meta), frame.t_capture)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
