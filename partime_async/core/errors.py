"""The errors a pipeline raises: one error naming the component and the frame."""
from __future__ import annotations

import asyncio
from typing import Any, Self


class PipelineError(RuntimeError):
    """A component of the graph failed; ``component`` and ``seq`` say where.

    ``request``: ``seq`` numbers a frame of ``Pipeline.submit()`` (which counts its own,
    apart from the streams' seqs): the message says "request N", not "frame N". The original
    exception is chained as ``__cause__``.
    """

    def __init__(self, message: str, *, component: str, seq: int | None = None, request: bool = False) -> None:
        self.component = component
        self.seq = seq
        self.request = request
        self.detail = message
        super().__init__(self._headline(message))

    def of_request(self) -> Self:
        """This error naming its frame as the request of a ``submit()`` it is: a copy (this
        one may be the run's own error, which others are given too), with the same cause
        (and not shown as raised while handling this one)."""
        if self.request:
            return self
        error = BaseException.__new__(type(self))
        error.__dict__.update(self.__dict__)
        error.request = True
        error.args = (error._headline(self.detail),)
        error.__cause__, error.__context__ = self.__cause__, self.__context__
        error.__suppress_context__ = True
        return error

    def _headline(self, message: str) -> str:
        frame = "request" if self.request else "frame"
        where = f"{self.component} failed" if self.seq is None else f"{self.component} failed on {frame} {self.seq}"
        return f"{where}: {message}"


class FrameError(PipelineError, ValueError):
    """A frame was rejected: its payload is not what the pipeline expects."""


class FrameDropped(PipelineError):
    """A submitted frame was dropped by a channel policy before it produced an output
    (nothing failed: the pipeline was full and its policy drops)."""

    def _headline(self, message: str) -> str:
        return f"{'request' if self.request else 'frame'} {self.seq} was not run: {message}"


class PipelineClosed(RuntimeError):
    """The pipeline is not running (never started, stopped, or failed)."""


def primary_error(exc: BaseException) -> PipelineError | None:
    """One error for the user out of what a task group raised: the first real failure
    (None when the only thing that happened is cancellation)."""
    if isinstance(exc, BaseExceptionGroup):
        leaves: list[BaseException] = []
        stack: list[BaseException] = [exc]
        while stack:
            e = stack.pop(0)
            if isinstance(e, BaseExceptionGroup):
                stack[:0] = list(e.exceptions)
            else:
                leaves.append(e)
        for e in leaves:
            if isinstance(e, PipelineError):
                return e
        real = [e for e in leaves if not isinstance(e, asyncio.CancelledError)]
        exc = real[0] if real else leaves[0]
    if isinstance(exc, PipelineError):
        return exc
    if isinstance(exc, asyncio.CancelledError):
        return None
    error = PipelineError(f"{type(exc).__name__}: {exc}", component="pipeline")
    error.__cause__ = exc
    return error


class StageLost(RuntimeError):
    """What runs a stage is gone (a device's worker thread died; a peer process, for a stage on
    another rank): no later frame could run there, so this is never skipped; the pipeline
    stops, whatever ``on_error``. ``device`` is what was lost (the runner names its stage)."""

    def __init__(self, message: str, device: Any) -> None:
        super().__init__(message)
        self.device = device


class StageFailed(Exception):
    """Carries the exception stage ``stage`` raised (``error``) to where it is reported: from
    a worker thread of a thread chain to the chain's runner, or from the set-up timing to the
    pipeline's build. Internal: users see the :class:`PipelineError` made of it."""

    def __init__(self, stage: int, error: BaseException) -> None:
        super().__init__(stage, error)
        self.stage = stage
        self.error = error
