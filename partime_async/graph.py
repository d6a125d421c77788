"""Composing and running graphs: ``source >> pipeline >> [sink, …]``.

:func:`run` owns the whole graph in one ``asyncio.TaskGroup``: the pipeline, the source pump
and one task per sink, each sink fed through its own bounded channel with its own policy (a
slow sink with ``policy="latest"`` drops frames for itself only; with ``block`` it throttles
the whole graph). The first failure anywhere cancels everything and :func:`run` raises one
:class:`PipelineError` naming the component and the frame.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, Literal, Protocol

from .aio.channel import POLICIES, Channel, Policy
from .aio.threads import to_the_end
from .core.errors import PipelineError, primary_error
from .core.frame import Frame
from .core.stats import PipelineStats


class Streaming(Protocol):
    """What a graph runs between its source and its sinks (a :class:`~partime_async.Pipeline`)."""

    async def __aenter__(self) -> Any: ...

    async def __aexit__(self, *exc_info: Any) -> Any: ...

    def stream(self, source: Any) -> AsyncIterator[Frame]: ...

    def stats(self) -> PipelineStats: ...


class Sink:
    """Receives a graph's output frames, in order.

    Subclasses implement :meth:`write` (and :meth:`open` / :meth:`close` when they hold
    resources: :func:`partime_async.run` calls ``close`` after success and :meth:`abort`,
    which is ``close`` unless overridden, after a failure or cancellation; either runs to
    its end on a task of its own, even if the run is cancelled meanwhile). ``capacity`` and
    ``policy`` configure the channel that feeds this sink alone: ``"block"`` slows the graph
    to this sink's pace; a drop policy lets the sink fall behind and counts what it missed in
    :attr:`dropped`. The sinks of a graph are handed the same :class:`Frame` objects: treat
    them as read-only (copy a frame before changing it). The sinks that ship are in
    :mod:`partime_async.sinks`.
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


class Graph:
    """A source, a pipeline and its sinks; build it with ``>>`` and start it with :func:`run`."""

    def __init__(self, source: Any, pipeline: Streaming, sinks: Sequence[Sink] = ()) -> None:
        self.source = source
        self.pipeline = pipeline
        self.sinks = list(sinks)

    def __rshift__(self, sinks: Sink | Sequence[Sink]) -> Graph:
        given: list[Any] = list(sinks) if isinstance(sinks, (list, tuple)) else [sinks]
        added: list[Sink] = []
        for sink in given:
            if not isinstance(sink, Sink):
                raise TypeError(f"{sink!r} is not a Sink; wrap a function with sinks.CallbackSink(fn)")
            if any(sink is other for other in self.sinks + added):
                raise ValueError(f"{sink!r} is in this graph twice: it would be opened twice and write every "
                                 "frame twice; make a second sink instead")
            added.append(sink)
        return Graph(self.source, self.pipeline, self.sinks + added)

    def __rrshift__(self, source: Any) -> Graph:
        if self.source is not None:
            raise TypeError("this graph already has a source")
        return Graph(source, self.pipeline, self.sinks)

    def __repr__(self) -> str:
        return f"Graph({self.source!r} >> {self.pipeline!r} >> {self.sinks!r})"


async def run(graph: Graph) -> PipelineStats:
    """Run ``graph`` until its source ends and every sink has written every frame.

    Returns the pipeline's final statistics. Raises one :class:`PipelineError` on failure,
    after every task is cancelled and every worker thread joined. A failure of the pipeline
    (a source, a frame, a stage) comes in frame order: every sink writes the frames delivered
    before it first. The sinks are closed last, together, once the whole graph has ended:
    :meth:`Sink.close` on success, :meth:`Sink.abort` after a failure or cancellation
    anywhere in the graph (a file sink commits only when the whole graph succeeded).
    """
    if graph.source is None:
        raise ValueError("the graph has no source: write `source >> pipeline >> sinks`")
    pipe = graph.pipeline
    if not getattr(pipe, "driving", True):  # a serving rank: its stages serve the driving rank's run
        async with pipe:
            pass
        return pipe.stats()
    opened: list[Sink] = []  # in the order they opened: each is closed exactly once
    try:
        async with pipe, asyncio.TaskGroup() as tg:
            channels, ready, drivers = [], [], []
            for sink in graph.sinks:
                channel: Channel[Frame] = Channel(sink.capacity, sink.policy, name=f"sink {sink.name}",
                                                  on_drop=sink.count_drop)
                channels.append(channel)
                ready.append(asyncio.get_running_loop().create_future())
                drivers.append(tg.create_task(_drive(sink, channel, ready[-1], opened),
                                              name=f"partime-sink-{sink.name}"))
            failed: Exception | None = None
            try:
                # Every sink is open before the first frame is read (a checkpoint sink asks
                # the pipeline for its cuts when it opens). A sink that fails to open fails
                # its task, and the task group cancels this wait.
                await asyncio.gather(*ready)
                async for frame in pipe.stream(graph.source):
                    for channel in channels:
                        await channel.send(frame)
            except PipelineError as exc:  # the pipeline failed, in frame order: the sinks write what came before
                failed = exc
            finally:
                for channel in channels:
                    channel.close()
            # The body outlives its sinks: one that fails now cancels this wait, which the task
            # group then takes back. (A failure after the body had ended left this task
            # "being cancelled" for good on Python 3.11.)
            if drivers:
                await asyncio.wait(drivers)
            if failed is not None:
                raise failed
    except BaseException as exc:
        errors = await _close(opened, failed=True)
        error = primary_error(exc) if isinstance(exc, BaseExceptionGroup) else None
        if error is None:  # cancelled, or an error raised as it is (say, a pipeline that could not start)
            _note(exc, errors)
            raise
        _note(error, errors)
        raise error from error.__cause__  # one error, still chained to what really failed
    errors = await _close(opened, failed=False)
    if errors:
        raise _note(errors[0], errors[1:])
    return pipe.stats()


def _note(error: BaseException, closing: Sequence[PipelineError]) -> BaseException:
    """``error``, noting the errors that closing the sinks raised besides it."""
    for also in closing:
        error.add_note(f"also, while closing: {also}")
    return error


async def _drive(sink: Sink, channel: Channel[Frame], ready: asyncio.Future[None], opened: list[Sink]) -> None:
    await _call(sink, sink.open())
    opened.append(sink)
    if not ready.done():  # (cancelled with the run's wait for it)
        ready.set_result(None)
    async for frame in channel:
        await _call(sink, sink.write(frame), frame.seq)
        sink.written += 1


async def _call(sink: Sink, call: Awaitable[None], seq: int | None = None) -> None:
    """Await ``sink``'s ``open()`` or ``write()``; what it raises, as a :class:`PipelineError`
    naming the sink (and the frame)."""
    try:
        await call
    except Exception as exc:
        raise PipelineError(f"{type(exc).__name__}: {exc}", component=f"sink {sink.name}", seq=seq) from exc
    except asyncio.CancelledError as exc:
        if asyncio.current_task().cancelling():  # type: ignore[union-attr]
            raise  # the graph is being cancelled
        # The sink's own (say, a future it awaited was cancelled): ending quietly here would
        # leave this sink's channel undrained, or the graph waiting for it to open, for ever.
        raise PipelineError("CancelledError raised by the sink itself (not a cancellation of the graph)",
                            component=f"sink {sink.name}", seq=seq) from exc


async def _close(sinks: list[Sink], *, failed: bool) -> list[PipelineError]:
    """Close every sink once, all of them whatever fails (``abort()`` if ``failed``), each to
    its end even if this task is cancelled meanwhile (that cancellation goes on afterwards).
    Returns their errors, named."""
    errors: list[PipelineError] = []
    cancelled: asyncio.CancelledError | None = None
    for sink in sinks:
        try:
            await to_the_end(sink.abort() if failed else sink.close())
        except asyncio.CancelledError as exc:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                cancelled = exc  # this run's: the other sinks are closed first
            else:  # the sink's own (a future it awaited was cancelled): a failure of that sink
                error = PipelineError("CancelledError raised by the sink itself while closing",
                                      component=f"sink {sink.name}")
                error.__cause__ = exc
                errors.append(error)
        except Exception as exc:
            error = PipelineError(f"{type(exc).__name__} while closing: {exc}", component=f"sink {sink.name}")
            error.__cause__ = exc
            errors.append(error)
    sinks.clear()
    if cancelled is not None:
        raise cancelled
    return errors


LoopKind = Literal["auto", "uvloop", "asyncio"]


def run_sync(graph: Graph, *, loop: LoopKind = "auto") -> PipelineStats:
    """:func:`run` from synchronous code, on a fresh event loop.

    ``loop="uvloop"`` requires uvloop; ``"auto"`` uses it when it is installed.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no loop running in this thread: as it should be
        pass
    else:
        raise RuntimeError("run_sync() starts its own event loop, and one is already running in this thread; "
                           "inside a coroutine, use `await pa.run(graph)`")
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(run(graph))


def loop_factory(kind: LoopKind = "auto") -> Any:
    """The event-loop factory for ``kind`` (None means asyncio's default)."""
    if kind not in ("auto", "uvloop", "asyncio"):
        raise ValueError(f"loop must be 'auto', 'uvloop' or 'asyncio', got {kind!r}")
    if kind == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if kind == "uvloop":
            raise RuntimeError("loop='uvloop' needs uvloop: pip install uvloop") from None
        return None
    return uvloop.new_event_loop
