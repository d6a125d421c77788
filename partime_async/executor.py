"""The stage executor: the coroutine that drives one stage on one device.

It receives jobs from its inbox channel, runs its slice of the model on each frame's payload
on its device, and sends the jobs on, in order, to its outbox. Two ways of running:

* **windowed** (worker thread or GPU streams): a *feeder* submits up to ``window`` frames to
  the device ahead of the one being finished, and a *collector* awaits them in order. The
  device therefore has the next frame queued when it finishes one (a busy CPU stage never
  waits for the loop; on a GPU the copy of frame t+1 overlaps the compute of frame t).
* **inline**: the stage is cheaper than a thread hand-off, so it runs on the loop thread
  between a receive and a send.

A stage that raises on a frame either fails the pipeline with a :class:`PipelineError`
naming the stage and the frame, or (``on_error="skip"``) skips that frame and counts it.

With metrics on, every stage appends its spans to the pipeline's ring (a bounded deque, whose
appends are thread-safe): one plain tuple ``(stage, kind, seq, t0, t1)`` per span, see
:class:`partime_async.metrics.Span`. A CPU stage times its work on the thread that runs it
(the same two clock reads that feed ``busy_s``); a CUDA device times its own, with events.
"""
from __future__ import annotations

import asyncio
import dataclasses
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol

import torch
from torch import nn

from .channel import Channel
from .devices import CpuDevice, CudaDevice, Device, WorkerDied, _host_input
from .errors import FrameError, PipelineError
from .frame import Frame, Payload, now
from .checkpoint import stage_state
from .cuda_graphs import GraphedLearningStage, GraphedStage
from .learning import ForwardFailed, StageLearner
from .threads import in_thread
from .validation import InputSpec

OnError = Literal["raise", "skip"]


class Job:
    """A frame inside the pipeline, with where its output goes and its readiness on device."""

    __slots__ = ("frame", "route", "key", "ready", "ticket")

    def __init__(self, frame: Frame, route: Any, key: int = -1) -> None:
        self.frame = frame
        self.route = route
        # Unique in a run, in admission order: learning matches a frame's gradients by it
        # (seqs need not be unique: two streams, or a stream and submit(), each count from 0).
        self.key = key
        self.ready: Any = None  # event marking ``frame.data`` complete on its device (GPU)
        self.ticket: Any = None


class Outbox(Protocol):
    """Where a stage sends its finished jobs, in order: the next stage's inbox (a
    :class:`Channel`), or, after the last stage, the pipeline's egress."""

    def send_nowait(self, job: Job) -> bool:
        """Send ``job`` if that needs no waiting; False (nothing sent) means: await :meth:`send`."""

    async def send(self, job: Job) -> None:
        """Send ``job``, waiting for room."""

    def close(self) -> None:
        """No more jobs will come."""


@dataclass
class StageStats:
    """What one stage did so far."""

    name: str
    device: str
    layers: int
    inline: bool = False
    frames: int = 0
    skipped: int = 0
    busy_s: float = 0.0
    skipped_seqs: deque[int] = field(default_factory=lambda: deque(maxlen=1024))  # the latest
    loss: float | None = None  # learning, last stage: the latest frame's loss

    @property
    def mean_compute_s(self) -> float:
        """Busy seconds per frame: the forward, and for a learning stage its backward and
        optimiser step too (spans time the forward alone: see :class:`~partime_async.metrics.Report`)."""
        return self.busy_s / self.frames if self.frames else 0.0

    def snapshot(self) -> StageStats:
        """A copy that the stage's threads no longer write."""
        return dataclasses.replace(self, skipped_seqs=deque(self.skipped_seqs, maxlen=self.skipped_seqs.maxlen))


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

    def put(self, key: int, grad: Any, ready: Any) -> None:
        waiter, _ = self._waiters.pop(key, (None, None))
        if waiter is not None and not waiter.done():
            waiter.set_result((grad, ready))
        else:
            self._grads[key] = (grad, ready)

    async def get(self, key: int, seq: int) -> tuple[Any, Any]:
        """The gradient for the job ``key`` (frame ``seq``, for the message if it never comes)."""
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

    def _never_came(self, seq: int) -> str:
        return f"{self.name}: the gradient of frame {seq} never came (the next stage ended)"

    def __len__(self) -> int:
        return len(self._grads)


class StageExecutor:
    """Runs ``module`` on ``device`` for every job from ``inbox``, forwarding to ``outbox``."""

    def __init__(
        self,
        index: int,
        module: nn.Module,
        device: Device,
        inbox: Channel[Job],
        outbox: Outbox,
        *,
        window: int = 2,
        on_error: OnError = "raise",
        download: bool = False,
        learner: StageLearner | None = None,
        grads_in: GradBox | None = None,
        grads_out: GradBox | None = None,
        spans: deque[tuple[int, str, int, float, float]] | None = None,
        check_outputs: bool = True,
    ) -> None:
        self.index = index
        self.module = module
        self.device = device
        self.inbox = inbox
        self.outbox = outbox
        self.window = window
        self.on_error = on_error
        self.download = download  # last stage: hand host tensors to the sinks
        self.learner = learner      # learning: this stage's optimiser and schedule
        self.grads_in = grads_in    # gradients from the next stage, by job key (None on the last)
        self.grads_out = grads_out  # the previous stage's box (None on the first)
        self.name = f"stage {index} ({device.name})"
        self.stats = StageStats(self.name, device.name, len(module),
                                inline=device.inline and learner is None)
        # Spans (metrics on): a CPU stage records its own; a CUDA device records with events.
        self._spans = spans if isinstance(device, CpuDevice) else None
        if isinstance(device, CudaDevice):  # it times its own work on the GPU
            device.spans, device.track, device.stats = spans, index, self.stats
        if learner is not None:
            learner.graphed = None
            if isinstance(device, CudaDevice) and device.graphs:
                if learner.graphable:
                    learner.graphed = GraphedLearningStage(learner.module, name=self.name)
                else:
                    warnings.warn(f"{self.name}: graphs=True does not apply to a stashed stage with a delay (it keeps "
                                  f"{learner.delay + 1} frames' graphs at stashed weights; a CUDA graph has one set "
                                  "of buffers): its learning runs eagerly; use mode='partime' to graph it, or pass "
                                  "graphs=False to silence this", RuntimeWarning, stacklevel=2)
        self._check_output = self._output_checker() if check_outputs else None
        self._compute = self._make_compute()

    def _output_checker(self) -> Callable[[Payload, int], None]:
        """``check(y, seq)``: the stage's first output fixes the structure, shapes, dtypes and
        device of every later one; a frame whose output differs gets a :class:`FrameError`
        (a model whose output changes mid-stream would otherwise corrupt the next stage or a
        sink far from the cause). Called on the thread that ran the stage, one at a time."""
        spec: list[InputSpec | None] = [None]
        component, hint = f"{self.name} output", (
            " (a stage's output must keep the structure, shapes and dtypes of its first output; "
            "if it varies by design, pass output_spec=None to the Pipeline)")

        def check(y: Payload, seq: int) -> None:
            if spec[0] is None:
                spec[0] = InputSpec.like(y)
            else:
                spec[0].check(y, seq, component=component, hint=hint)

        return check

    def _make_compute(self) -> Callable[[Payload], Payload]:
        # The layers are called one after another, as nn.Sequential would, minus its own call
        # overhead; grad mode is toggled with the primitive that ``torch.no_grad`` wraps (a
        # context manager costs microseconds per frame, which is most of a cheap hop). Grad
        # mode is thread-local, so the previous mode is restored before returning. The span
        # (metrics on) reuses the two clock reads; the device says which frame runs.
        layers, stats, device, index = tuple(self.module), self._host_timed_stats(), self.device, self.index
        record = self._spans.append if self._spans is not None else None
        check = self._check_output
        grad_enabled, set_grad_enabled = torch.is_grad_enabled, torch._C._set_grad_enabled
        graphed = (GraphedStage(lambda x: _forward(layers, x), name=self.name)
                   if isinstance(device, CudaDevice) and device.graphs and self.learner is None else None)

        def compute(x: Payload) -> Payload:
            t0 = now()
            previous = grad_enabled()
            set_grad_enabled(False)
            try:
                if graphed is not None:
                    x = graphed(x)
                else:
                    for layer in layers:
                        x = layer(x)
            finally:
                set_grad_enabled(previous)
            t1 = now()
            stats.busy_s += t1 - t0
            if record is not None:
                record((index, "compute", device.seq, t0, t1))
            if check is not None:
                check(x, device.seq)
            return x

        return compute

    async def run(self) -> None:
        """Process jobs until the inbox ends; then close the outbox (always)."""
        try:
            if self.learner is not None:
                await self._run_learning()
            elif self.device.inline:
                await self._run_inline()
            else:
                await self._run_windowed()
        finally:
            self.outbox.close()
            if self.grads_out is not None:
                self.grads_out.close()

    async def _run_inline(self) -> None:
        compute, device = self._compute, self.device
        assert isinstance(device, CpuDevice)
        stats, outbox = self.stats, self.outbox
        async for job in self.inbox:
            if job.ready is not None:  # a GPU stage's output, maybe not computed yet: wait off the loop
                await in_thread(job.ready.synchronize)
                job.ready = None
            try:
                job.frame.data = device.run_inline(compute, job.frame.data, None, seq=job.frame.seq)
            except Exception as exc:
                self._failed(job, exc)
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
        submit, compute = self._submit, self._compute
        try:
            async for job in self.inbox:
                job.ticket = submit(compute, job.frame.data, job.ready, job.frame.seq)
                if not inflight.send_nowait(job):
                    await inflight.send(job)
        finally:
            inflight.close()

    async def _collect(self, inflight: Channel[Job]) -> None:
        stats, outbox, device, learning = self.stats, self.outbox, self.device, self.learner is not None
        try:
            async for job in inflight:
                try:
                    data, job.ready = await job.ticket
                    if learning:
                        data, loss = data
                        if loss is not None:
                            if job.ready is not None:  # on a GPU, possibly not computed yet
                                loss = await device.download(loss, job.ready, seq=job.frame.seq)
                            job.frame.meta["loss"] = stats.loss = float(loss)
                    if self.download:
                        data = await device.download(data, job.ready, seq=job.frame.seq)
                        job.ready = None
                except WorkerDied as exc:
                    raise self._died(exc, job.frame.seq) from exc
                except Exception as exc:
                    self._failed(job, exc)
                    continue
                finally:
                    job.ticket = None
                job.frame.data = data
                stats.frames += 1
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
        hooks = self._step_hooks()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._feed_learning(inflight, backward))
                tg.create_task(self._collect(inflight))
                tg.create_task(self._send_gradients(backward))
        finally:
            for hook in hooks:
                hook.remove()

    def _step_hooks(self) -> list[Any]:
        """Spans of the optimiser steps (CPU, metrics on), from the optimiser's own step hooks,
        which run on the worker thread inside the backward; their handles, to remove."""
        optimizer, spans, device, index = self.learner.optimizer, self._spans, self.device, self.index
        if spans is None or optimizer is None:
            return []
        started = [0.0]

        def before(*_: Any) -> None:
            started[0] = now()

        def after(*_: Any) -> None:
            spans.append((index, "step", device.seq, started[0], now()))

        return [optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)]

    async def _feed_learning(self, inflight: Channel[Job], backward: Channel[tuple[int, int, Any]]) -> None:
        """Forward every frame, and after each forward the backward the schedule owes.

        Submissions to the device are strictly ordered forward(t), backward(owed at t),
        forward(t+1), … whatever the timing; that order is what makes learning deterministic.
        """
        learner, submit, last = self.learner, self._submit, self.grads_in is None
        forward, backward_step = self._timed(self._checked(learner.forward), "compute"), \
            self._timed(learner.backward, "backward")
        try:
            async for job in self.inbox:
                frame = job.frame
                has_target = frame.target is not None
                payload = (job.key, frame.data, learner.learns(has_target), frame.target if last else None)
                job.ticket = submit(forward, payload, job.ready, frame.seq)
                if not inflight.send_nowait(job):
                    await inflight.send(job)
                owed = learner.owes(job.key, frame.seq, has_target)
                if owed is not None:
                    await self._backward(*owed, backward_step, backward)
                snapshot = frame.checkpoint
                if snapshot is not None:  # this stage's part of a checkpoint cut at this frame
                    snapshot.add(self.index, submit(self._stage_state, None, None, -1))
            inflight.close()
            for owed in learner.remaining():
                if learner.config.mode == "partime":
                    learner.dropped_gradients += 1  # no newer graph left to carry it
                else:
                    await self._backward(*owed, backward_step, backward)
        finally:
            inflight.close()
            backward.close()

    async def _backward(self, key: int, seq: int, step: Callable[[Any], Any],
                        backward: Channel[tuple[int, int, Any]]) -> None:
        """Submit the backward owed for job ``key`` (frame ``seq``) once its gradient is in."""
        grad, ready = (None, None) if self.grads_in is None else await self.grads_in.get(key, seq)
        ticket = self._submit(step, (key, grad), ready, seq, "backward")
        await backward.send((key, seq, ticket))

    async def _send_gradients(self, backward: Channel[tuple[int, int, Any]]) -> None:
        async for key, seq, ticket in backward:
            try:
                (_, grad), ready = await ticket
            except ForwardFailed:
                continue  # the collector reports the forward's error, which stops the pipeline
            except Exception as exc:
                error = PipelineError(f"{type(exc).__name__}: {exc} (in the backward step)", component=self.name, seq=seq)
                raise error from exc
            if self.grads_out is not None:
                self.grads_out.put(key, grad, ready)

    def _checked(self, forward: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """A learning forward whose output goes through the stage's output check."""
        check, device = self._check_output, self.device
        if check is None:
            return forward

        def checked(payload: Any) -> Any:
            y, loss = forward(payload)
            check(y, device.seq)  # the frame's seq (the payload carries its job key)
            return y, loss

        return checked

    def _stage_state(self, _: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        return stage_state(self.module, self.learner)

    def _host_timed_stats(self) -> StageStats:
        """Where host-clock busy time goes: this stage's statistics on a CPU device; a
        throwaway on a CUDA device, whose host clocks time only the launches (the device adds
        the kernels' time itself, from its timing events)."""
        return StageStats(self.name, self.device.name, 0) if isinstance(self.device, CudaDevice) else self.stats

    def _timed(self, fn: Callable[[Any], Any], kind: str) -> Callable[[Any], Any]:
        stats, device, index = self._host_timed_stats(), self.device, self.index
        record = self._spans.append if self._spans is not None else None

        def timed(payload: Any) -> Any:
            t0 = now()
            try:
                return fn(payload)
            finally:
                t1 = now()
                stats.busy_s += t1 - t0
                if record is not None:
                    record((index, kind, device.seq, t0, t1))

        return timed

    def _submit(self, fn: Callable[[Any], Any], payload: Any, ready: Any, seq: int, kind: str = "compute") -> Any:
        """``device.submit``, with a dead worker reported as this stage's failure on ``seq``."""
        try:
            return self.device.submit(fn, payload, ready, seq=seq, kind=kind)
        except WorkerDied as exc:
            raise self._died(exc, seq) from exc

    def _died(self, exc: WorkerDied, seq: int) -> PipelineError:
        """The error that stops the pipeline when this stage's worker is gone (never skipped:
        no later frame could run here either)."""
        return PipelineError(str(exc), component=self.name, seq=seq)

    def _failed(self, job: Job, exc: Exception) -> None:
        seq = job.frame.seq
        if isinstance(exc, FrameError):  # already says where and what
            error: PipelineError = exc
        else:
            error = PipelineError(f"{type(exc).__name__}: {exc}", component=self.name, seq=seq)
            error.__cause__ = exc
        if self.on_error != "skip":
            raise error
        self.stats.skipped += 1
        self.stats.skipped_seqs.append(seq)
        job.route.skip(job.frame, error)


def _forward(layers: tuple[nn.Module, ...], x: Payload) -> Payload:
    for layer in layers:
        x = layer(x)
    return x


class StageFailed(Exception):
    """Carries the exception a stage raised (``error``) to where it is reported: from a worker
    thread to a chain's collector, or from the set-up timing to the pipeline's build."""

    def __init__(self, stage: int, error: BaseException) -> None:
        super().__init__(stage, error)
        self.stage = stage
        self.error = error


class ThreadChain:
    """Consecutive threaded CPU stages that hand frames from worker thread to worker thread.

    The loop submits each frame to the first stage's worker; every worker, once done, queues
    the frame straight onto the next stage's worker, and only the last one tells the loop
    (batched, see :meth:`CpuDevice.notify`). In steady state no stage pays a loop round trip
    per frame, and the loop thread, which shares the cores with the workers, stays idle.
    Order is kept by the FIFO worker queues; up to ``window`` frames per stage are in flight.
    The stages' own executors supply their compute functions, statistics and error rules.
    """

    def __init__(self, executors: list[StageExecutor]) -> None:
        self.executors = executors
        self.inbox = executors[0].inbox
        self.outbox = executors[-1].outbox
        self.window = sum(e.window for e in executors)
        self.name = f"stages {executors[0].index}-{executors[-1].index}"

    async def run(self) -> None:
        inflight: Channel[Job] = Channel(self.window, name=f"{self.name} in-flight")
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._feed(inflight))
                tg.create_task(self._collect(inflight))
        finally:
            self.outbox.close()

    async def _feed(self, inflight: Channel[Job]) -> None:
        first = self.executors[0].device
        loop = asyncio.get_running_loop()
        try:
            async for job in self.inbox:
                job.ticket = future = loop.create_future()
                try:
                    first.post(self._task(0, job.frame.seq, job.frame.data, future, job.ready), future)
                except WorkerDied as exc:
                    raise self.executors[0]._died(exc, job.frame.seq) from exc
                if not inflight.send_nowait(job):
                    await inflight.send(job)
        finally:
            inflight.close()

    def _task(self, k: int, seq: int, x: Payload, future: asyncio.Future[Any], ready: Any = None) -> Callable[[], None]:
        executor = self.executors[k]
        last = k == len(self.executors) - 1

        def task() -> None:  # runs on stage k's worker thread
            device = executor.device
            device.seq = seq
            try:
                y = executor._compute(_host_input(x, ready) if k == 0 else x)
            except BaseException as exc:
                device.notify(future, None, StageFailed(k, exc))
                return
            executor.stats.frames += 1
            if last:
                device.notify(future, y, None)
                return
            try:
                self.executors[k + 1].device.post(self._task(k + 1, seq, y, future), future)
            except RuntimeError as exc:  # the next worker is gone (or stopping): the frame fails, not this thread
                device.notify(future, None, StageFailed(k + 1, exc))

        return task

    async def _collect(self, inflight: Channel[Job]) -> None:
        outbox = self.outbox
        async for job in inflight:
            try:
                job.frame.data = await job.ticket
            except StageFailed as failed:
                executor = self.executors[failed.stage]
                if isinstance(failed.error, WorkerDied):
                    raise executor._died(failed.error, job.frame.seq) from failed.error
                executor._failed(job, failed.error)  # raises, or skips and counts
                continue
            except WorkerDied as exc:  # the frame was queued to a worker that then died
                executor = next(e for e in self.executors if e.device is exc.device)
                raise executor._died(exc, job.frame.seq) from exc
            finally:
                job.ticket = None
            job.ready = None
            if not outbox.send_nowait(job):
                await outbox.send(job)
