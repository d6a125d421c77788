"""The runner: the coroutine that drives a stage's program over its transports, on its device.

A :class:`StageRunner` receives jobs from its :class:`~partime_async.transport.Inlet`, runs
its stage's program on each frame on the stage's device, and sends the jobs on, in order,
through its :class:`~partime_async.transport.Outlet`. It knows neither what the program
computes (:mod:`partime_async.programs`) nor what kind of device or transport it holds.
Three ways of driving:

* **windowed** (worker thread or GPU streams; a replicated stage's frames dealt to the least
  busy of its devices, :mod:`partime_async.stage.replicas`): a *feeder* submits up to ``window`` frames to
  the device ahead of the one being finished, and a *collector* awaits them in order. The
  device therefore has the next frame queued when it finishes one (a busy CPU stage never
  waits for the loop; on a GPU the copy of frame t+1 overlaps the compute of frame t). A
  runner of several consecutive threaded CPU stages submits to their
  :class:`~partime_async.transport.ThreadChain` instead: frames go from worker to worker,
  and the loop sees only the chain's two ends.
* **inline**: the stage is cheaper than a thread hand-off, so it runs on the loop thread
  between a receive and a send.
* **learning**: the windowed way, plus the backward the program owes after each forward,
  submitted in the schedule's order, and the gradients it returns sent back upstream.

A stage that raises on a frame either fails the pipeline with a :class:`PipelineError`
naming the stage and the frame, or (``on_error="skip"``) skips that frame and counts it.
The failure comes in frame order where the runner is given ``on_failure`` (the pipeline's
:meth:`~partime_async.pipeline.run.Run.fail`): the runner reports it, stops taking frames,
closes its outlet cleanly so that the frames before the failing one complete downstream, and
drops the rest (the pipeline counts them as abandoned). Without ``on_failure`` it raises, and
aborts its ends with the error.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from ..aio.channel import Channel
from ..core.errors import FrameError, PipelineError, StageFailed, StageLost, primary_error
from ..core.job import Job
from ..core.stats import StageStats
from ..devices import Device, Ticket, settle
from ..partition import StagePlan
from ..programs import StageProgram
from ..transport import Inlet, Outlet, Step, ThreadChain
from .replicas import Dealer, Replica

OnError = Literal["raise", "skip"]
OnFailure = Callable[[PipelineError, "StageRunner", int], None]
"""``on_failure(error, runner, key)``: ``runner`` failed on the frame of job ``key``."""


class _Halted(Exception):
    """This runner stopped at a failing frame, which it has reported: unwinds its loops."""


@dataclass
class Stage:
    """One stage of a run: what it holds, what it does, what it did, and whether it runs on
    the loop's thread (``inline``: chosen at the build, by measurement)."""

    plan: StagePlan
    program: StageProgram
    stats: StageStats
    inline: bool = False
    replicas: tuple[Replica, ...] = ()  # a stage on several devices: one program on each

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def device(self) -> Device:
        return self.plan.device


class StageRunner:
    """Drives ``stages`` (one, or several consecutive threaded CPU stages that infer, joined
    by a thread chain) from ``inlet`` to ``outlet``; see the module docstring."""

    def __init__(self, stages: Sequence[Stage], inlet: Inlet, outlet: Outlet, *, window: int = 2,
                 on_error: OnError = "raise", on_failure: OnFailure | None = None) -> None:
        self.stages = tuple(stages)
        self.inlet = inlet
        self.outlet = outlet
        # Frames in flight: the window per stage (and per replica), more for a device from far.
        self.window = window * len(self.stages) * max(1, len(self.stages[0].replicas)) + self.stages[0].device.ahead
        self.on_error = on_error
        self._on_failure = on_failure
        first, last = self.stages[0], self.stages[-1]
        self.name = first.name if len(self.stages) == 1 else f"stages {first.plan.index}-{last.plan.index}"
        # Last stage on a device whose results are not host tensors: hand the sinks host copies.
        self._download = last.plan.last and not last.device.on_host
        self._submit: Callable[..., Ticket]  # (payload, ready, *, seq)
        self._dealer: Dealer | None = None
        if len(self.stages) > 1:
            self._submit = ThreadChain([Step(s.device, s.program.forward, s.stats) for s in self.stages]).submit
        elif first.replicas:
            self._dealer = Dealer(first.replicas)
            self._submit = self._dealer.submit
        else:
            self._submit = partial(first.device.submit, first.program.forward)

    async def run(self) -> None:
        """Process jobs until the inlet ends; then close the outlet (always). A failure that
        is not reported in order aborts the outlet and the gradients going back with its
        error first: the ends learn why the stream ended, not just that it did (what a peer
        in another process needs)."""
        first = self.stages[0]
        for stage in self.stages:
            stage.program.attach()
        try:
            if first.program.learns:
                await self._run_learning()
            elif first.inline:
                await self._run_inline()
            else:
                await self._run_windowed()
        except Exception as exc:
            if not _halted(exc):
                error = primary_error(exc) or exc
                self.outlet.jobs.abort(error)
                if self.inlet.grads is not None:
                    self.inlet.grads.abort(error)
                raise
            async for _ in self.inlet.jobs:  # after the failing frame: abandoned
                pass
        finally:
            for stage in self.stages:
                stage.program.detach()
            self.outlet.jobs.close()
            if self.inlet.grads is not None:
                self.inlet.grads.close()

    async def _run_inline(self) -> None:
        stage = self.stages[0]
        device, forward, stats, outbox = stage.device, stage.program.forward, stage.stats, self.outlet.jobs
        async for job in self.inlet.jobs:
            if job.ready is not None:  # a GPU stage's output, maybe not computed yet: wait off the loop
                await settle(job.ready)
                job.ready = None
            try:
                job.frame.data = device.run_inline(forward, job.frame.data, None, seq=job.frame.seq)
            except Exception as exc:
                self._failed(stage, job, exc)
                continue
            stats.frames += 1
            if not outbox.send_nowait(job):
                await outbox.send(job)

    async def _run_windowed(self) -> None:
        inflight: Channel[Job] = Channel(self.window, name=f"{self.name} in-flight")
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._feed(inflight))
            tg.create_task(self._collect(inflight))

    async def _feed(self, inflight: Channel[Job]) -> None:
        submit = self._submit
        try:
            async for job in self.inlet.jobs:
                try:
                    job.ticket = submit(job.frame.data, job.ready, seq=job.frame.seq)
                except StageLost as exc:  # reported by the collector, in order after the frames before it
                    job.ticket = _failed_ticket(exc)
                if not inflight.send_nowait(job):
                    await inflight.send(job)
        finally:
            inflight.close()

    async def _collect(self, inflight: Channel[Job]) -> None:
        outbox, device, download = self.outlet.jobs, self.stages[-1].device, self._download
        learning, last = self.stages[0].program.learns, self.stages[-1].plan.last
        # One stage counts its frames here; a chain's stages count theirs on their threads.
        counted = self.stages[0].stats if len(self.stages) == 1 else None
        try:
            async for job in inflight:
                if self._dealer is not None:  # a replicated stage: its result is on that replica's device
                    device = self._dealer.device_of(job.ticket)
                try:
                    data, job.ready = await job.ticket
                    if learning:
                        data, loss = data
                        if loss is not None:
                            if job.ready is not None:  # on a GPU, possibly not computed yet
                                loss = await device.download(loss, job.ready, seq=job.frame.seq)
                            job.frame.meta["loss"] = self.stages[0].stats.loss = float(loss)
                    if download and not job.skipped:
                        data = await device.download(data, job.ready, seq=job.frame.seq)
                        job.ready = None
                except StageFailed as failed:  # a chain's: the stage is named
                    stage = self.stages[failed.stage]
                    if isinstance(failed.error, StageLost):
                        self._halt(self._died(stage, failed.error, job.frame.seq), job, failed.error)
                    self._failed(stage, job, failed.error)
                    continue
                except StageLost as exc:  # the frame was queued to a worker that then died
                    stage = next((s for s in self.stages if s.device is exc.device), self.stages[0])
                    self._halt(self._died(stage, exc, job.frame.seq), job, exc)
                except Exception as exc:
                    self._failed(self.stages[0], job, exc)
                    if not job.skipped:
                        continue
                finally:
                    job.ticket = None
                if job.skipped:  # a learning marker (see Job): the later stages count it
                    job.ready = None
                    if not last and not outbox.send_nowait(job):
                        await outbox.send(job)
                    continue
                job.frame.data = data
                if counted is not None:
                    counted.frames += 1
                if not outbox.send_nowait(job):
                    await outbox.send(job)
        finally:
            # The next stage may start its end-of-stream work (a learning drain) now, while
            # this stage still waits for the gradients that drain will send back.
            outbox.close()

    # -- learning --------------------------------------------------------------------------
    async def _run_learning(self) -> None:
        inflight: Channel[Job] = Channel(self.window, name=f"{self.name} in-flight")
        backward: Channel[tuple[int, int, Any]] = Channel(self.window, name=f"{self.name} backward")
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._feed_learning(inflight, backward))
            tg.create_task(self._collect(inflight))
            tg.create_task(self._send_gradients(backward))

    async def _feed_learning(self, inflight: Channel[Job], backward: Channel[tuple[int, int, Any]]) -> None:
        """Forward every frame, and after each forward the backward the schedule owes.

        Submissions to the device are strictly ordered forward(t), backward(owed at t),
        forward(t+1), … whatever the timing; that order is what makes learning deterministic.
        """
        stage = self.stages[0]
        program = stage.program
        try:
            async for job in self.inlet.jobs:
                frame = job.frame
                job.ticket = self._call(program.forward, program.forward_input(job), job.ready, frame.seq)
                if not inflight.send_nowait(job):
                    await inflight.send(job)
                owed = program.owes(job)
                if owed is not None:
                    await self._backward(*owed, backward)
                cut = frame.checkpoint
                if cut is not None:  # this stage's part of a checkpoint cut at this frame
                    cut.add(stage.plan.index, self._call(program.state, None, None, -1, "state"))
            inflight.close()
            for owed in program.remaining():
                await self._backward(*owed, backward)
        finally:
            inflight.close()
            backward.close()

    async def _backward(self, key: int, seq: int, backward: Channel[tuple[int, int, Any]]) -> None:
        """Submit the backward owed for job ``key`` (frame ``seq``) once its gradient is in."""
        grads = self.outlet.grads
        grad, ready = (None, None) if grads is None else await grads.get(key, seq)
        ticket = self._call(self.stages[0].program.backward, (key, grad), ready, seq, "backward")
        await backward.send((key, seq, ticket))

    async def _send_gradients(self, backward: Channel[tuple[int, int, Any]]) -> None:
        grads = self.inlet.grads
        async for key, seq, ticket in backward:
            try:
                (_, grad), ready = await ticket
            except Exception as exc:
                error = PipelineError(f"{type(exc).__name__}: {exc} (in the backward step)",
                                      component=self.stages[0].name, seq=seq)
                raise error from exc
            if grads is not None:
                grads.put(key, grad, ready)

    # -- failures ----------------------------------------------------------------------------
    def _call(self, fn: Any, payload: Any, ready: Any, seq: int, kind: str = "compute") -> Any:
        """``device.submit``. A lost device is this stage's failure on ``seq``: a forward's
        ticket raises it (the collector reports it in order); other work raises it now."""
        stage = self.stages[0]
        try:
            return stage.device.submit(fn, payload, ready, seq=seq, kind=kind)
        except StageLost as exc:
            if kind == "compute":
                return _failed_ticket(exc)
            raise self._died(stage, exc, seq) from exc

    @staticmethod
    def _died(stage: Stage, exc: StageLost, seq: int) -> PipelineError:
        """The error that stops the pipeline when what runs ``stage`` is gone (never skipped:
        no later frame could run there either)."""
        return PipelineError(str(exc), component=stage.name, seq=seq)

    def _failed(self, stage: Stage, job: Job, exc: BaseException) -> None:
        seq, request = job.frame.seq, job.route.request
        if isinstance(exc, FrameError):  # already says where and what
            error: PipelineError = exc.of_request() if request else exc
        else:
            error = PipelineError(f"{type(exc).__name__}: {exc}", component=stage.name, seq=seq, request=request)
            error.__cause__ = exc
        if self.on_error != "skip":
            self._halt(error, job, exc)
        stage.stats.skipped += 1
        (stage.stats.skipped_requests if request else stage.stats.skipped_seqs).append(seq)
        if stage.program.learns:
            if self.outlet.grads is not None and stage.program.learns_from(job):
                self.outlet.grads.forgo(job.key)  # no gradient of it will come back
            job.skipped = True  # it goes on as a marker (see Job)
        job.route.skip(job.frame, error)

    def _halt(self, error: PipelineError, job: Job, cause: BaseException) -> None:
        """Stop at ``job``'s frame, which failed with ``error``: report it in order (its own
        route gets its own error first) and unwind; without ``on_failure``, raise it."""
        if cause is not error and error.__cause__ is None:
            error.__cause__ = cause
        if job.route is not None and job.route.request:
            error = error.of_request()
        if self._on_failure is None:
            raise error
        job.route.lose(job.key, error)
        self._on_failure(error, self, job.key)
        raise _Halted


def _failed_ticket(exc: BaseException) -> asyncio.Future[Any]:
    """A ticket that raises ``exc`` when awaited (and is not logged if it never is: the run
    may end first)."""
    ticket = asyncio.get_running_loop().create_future()
    ticket.set_exception(exc)
    ticket.exception()
    return ticket


def _halted(exc: BaseException) -> bool:
    """Whether ``exc`` (or every exception of its group) is this runner's own :class:`_Halted`."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(_Halted)[1] is None
    return isinstance(exc, _Halted)
