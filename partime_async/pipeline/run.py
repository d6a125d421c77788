"""One run of a pipeline, from ``start()`` to the end of its task group.

A :class:`Run` holds what a run owns and nothing outlives: its task group, the routes and
streams waiting on it, its admission, its stages and runners (built with its first frame),
its span ring and its delivery counters. :meth:`Run.serve` is the run's task: it starts the
devices, keeps the task group open until a stop is asked, and on the way out (done, failed
or cancelled) fails whatever still waits, counts what it abandons, closes every device it
started (joining their threads) and records the one error to report.

Errors come in frame order (:meth:`Run.fail`): a frame that fails a stage, or a source or an
input that fails at the door, stops admission at once, but the frames before it that can
still complete do, and are delivered; then every waiter gets the error. That frame (if it
was admitted) and those after it are abandoned: ``stats().abandoned`` counts them, so that
``admitted == delivered + discarded + dropped + skipped + abandoned`` once the streams are
read or closed.
"""
from __future__ import annotations

import asyncio
import warnings
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from ..aio.channel import Channel
from ..core.errors import PipelineClosed, PipelineError, primary_error
from ..core.frame import Frame, Payload, now
from ..core.stats import PipelineStats
from ..devices import Device
from ..stage import Stage, StageRunner
from .admission import Admission
from .cuts import CutSchedule
from .routes import Route

BuildRun = Callable[["Run", Payload, "int | None", bool], Awaitable[None]]
"""``build(run, sample, seq, request)``: make ``run``'s stages from its first frame
(:func:`partime_async.pipeline.build.build`, bound to the pipeline's settings)."""


class Run:
    """What one run owns; see the module docstring. Made by :meth:`Pipeline.start`.

    ``admission`` is the run's door (made with the ``door`` settings; its ingress is aborted
    when the run ends); ``stages`` and ``runners`` exist once its first frame has built them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, spans: deque[Any] | None, build: BuildRun, cuts: CutSchedule,
                 **door: Any) -> None:
        self.error: PipelineError | None = None
        self.current = True  # until the pipeline starts another run (which counts on its own)
        self.tg: asyncio.TaskGroup | None = None
        self.routes: set[Route] = set()
        self.streams: weakref.WeakSet[Any] = weakref.WeakSet()  # OutputStreams being read
        self.pumps: set[asyncio.Task[None]] = set()
        self.stop_requested: asyncio.Future[None] = loop.create_future()
        self.spans = spans
        self.stages: list[Stage] = []  # built with the first frame: stats() shows no old run's
        self.runners: list[StageRunner] = []
        self.build_lock = asyncio.Lock()
        self.admission = Admission(self.check_running, partial(build, self), cuts, **door)
        self._runner_tasks: list[asyncio.Task[None]] = []
        self._error_rank = float("inf")  # where in frame order the reported failure happened
        self.delivered = self.discarded = 0
        self.egressed = 0  # frames that left the last stage (delivered, discarded, or waiting in a stream)
        self.ended = False
        self.latency_sum_s = 0.0  # over the delivered frames (Prometheus' summary sum)
        self.t_start = self.t_end = now()

    def install(self, stages: list[Stage], runners: list[StageRunner]) -> None:
        """The stages the first frame built, and their runners, started in the task group."""
        tg = self.check_running()
        self.stages, self.runners = stages, runners
        self._runner_tasks = [tg.create_task(runner.run(), name=f"partime-{runner.name}") for runner in runners]
        self.t_start = now()  # throughput counts from here, not from set-up and profiling

    def check_running(self) -> asyncio.TaskGroup:
        """The run's task group; raises its error, or PipelineClosed, if it has ended."""
        if self.error is not None:
            raise self.error
        if self.tg is None:
            raise PipelineClosed("the pipeline is not running; use `async with pipe:` or `await pipe.start()`")
        return self.tg

    async def serve(self, devices: Sequence[Device], started: asyncio.Future[None]) -> None:
        """The run's task: see the module docstring."""
        mine: list[Device] = []  # the devices this run started: those it closes (one may serve another pipeline)
        try:
            for device in devices:
                device.start(asyncio.get_running_loop())
                mine.append(device)
            async with asyncio.TaskGroup() as tg:
                self.tg = tg
                started.set_result(None)
                await self.stop_requested
        except BaseException as exc:  # recorded and re-raised by stop(); never lost here
            self.error = self.error or primary_error(exc)  # the first: a failure in order came before
            if not started.done():
                started.set_exception(self.error or PipelineClosed("the pipeline was cancelled while starting"))
        finally:
            self.tg = None
            self.t_end = now()
            self.ended = True
            closed = PipelineClosed("the pipeline stopped before this frame's output")
            self.admission.ingress.abort(self.error or closed)
            for route in list(self.routes):
                route.fail(self.error or closed)
            for device in mine:
                device.close()
            if self.error is None:
                # A worker that died with no frame left to find it dead (after the last one):
                # every output is complete, so the run stands, but not in silence.
                for k, device in enumerate(devices):
                    if device in mine and device.died is not None:
                        warnings.warn(f"stage {k} ({device.name}): {device.died}; every frame had been "
                                      "delivered", RuntimeWarning, stacklevel=2)

    def stats(self, balance: list[int] | None, running: bool) -> PipelineStats:
        """A snapshot of the counters (``running``: the run still goes on, its clock too)."""
        end = now() if running else self.t_end
        return PipelineStats(
            balance=balance, admitted=self.admission.admitted, delivered=self.delivered, discarded=self.discarded,
            skipped_input=self.admission.skipped_input, dropped=self.admission.ingress.dropped,
            stages=[stage.stats.snapshot() for stage in self.stages], elapsed_s=end - self.t_start,
            abandoned=self.abandoned)

    def span_tuples(self) -> list[tuple[int, str, int, float, float]]:
        """A copy of the span ring as it holds them (one C-level copy: worker threads that
        append meanwhile need the GIL, so it is consistent); empty with metrics off."""
        return list(self.spans) if self.spans is not None else []

    @property
    def abandoned(self) -> int:
        """Frames admitted that never settled because the run ended: 0 while it runs. Worked
        out when asked, not when the run ends: a ``submit()`` waiting for room on the ingress
        was counted as admitted and is uncounted once it learns that the run has ended."""
        if not self.ended:
            return 0
        return self.admission.admitted - self.egressed - self.admission.ingress.dropped - sum(
            stage.stats.skipped for stage in self.stages)

    def fail(self, error: PipelineError, runner: StageRunner | None = None, key: int | None = None) -> None:
        """Fail the run in frame order with ``error``: admit nothing more, let what is in
        flight before the failure complete, then every waiter gets the error. ``runner``
        failed on the frame of job ``key``: the runners before it, which hold only frames
        after that one, are cancelled (their frames abandoned). Without them (a source or an
        input at the door) the failure comes after every frame admitted. Of several, the run
        reports the one earliest in frame order."""
        rank = key if key is not None else float("inf")
        if self.error is None or rank < self._error_rank:
            self.error, self._error_rank = error, rank
        for route in self.routes:
            route.failing(self.error)
        if runner is not None and runner in self.runners:
            for task in self._runner_tasks[:self.runners.index(runner)]:
                task.cancel()
        self.request_stop()

    def request_stop(self) -> None:
        """Admit nothing more; the task group ends once what is in flight has finished."""
        me = asyncio.current_task()
        for pump in list(self.pumps):
            if pump is not me:
                pump.cancel()
        # A stream whose reader is the task stopping here (it broke out of ``async for``
        # without closing the stream) is read no more: closed, or stop would wait for it.
        # (Not one whose last reader task has ended: on Python 3.11 ``wait_for(anext(stream),
        # t)`` reads each frame from a task of its own, and that reader is not done with it.)
        for stream in list(self.streams):
            if stream.read_by(me):
                stream.close_now()
        self.admission.ingress.close()
        if not self.stop_requested.done():
            self.stop_requested.set_result(None)

    def handed(self, frame: Frame) -> None:
        """``frame`` reached its reader (a stream's, or a submitter): delivered. Counted then,
        not when it left the last stage, so that the counters only grow (Prometheus' rate()
        needs it: a stream closed with frames unread turns those into discarded ones)."""
        self.delivered += 1
        assert frame.t_done is not None  # stamped by the egress
        self.latency_sum_s += frame.t_done - frame.t_capture

    def unread(self, out: Channel[Frame], *, counted: bool = True) -> None:
        """The frames a closing stream's reader never took: discarded (``counted``: the stream
        is of this run)."""
        while len(out):
            out.receive_nowait()
            if counted:
                self.discarded += 1

    def queued(self) -> list[int]:
        """Per stage, the frames waiting for it now: in its inlet (a chain's inner stages have
        none) and on its device."""
        out = []
        for runner in self.runners:
            for j, stage in enumerate(runner.stages):
                out.append((len(runner.inlet.jobs) if j == 0 else 0) + stage.device.queued)
        return out
