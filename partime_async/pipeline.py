"""The pipeline: a model split over devices, one stage executor per device, on one event loop.

::

    ingress ──ch0──▶ stage 0 (dev0) ──ch1──▶ stage 1 (dev1) ── … ──▶ stage S-1 ──egress──▶ routes

Frames enter through :meth:`Pipeline.stream` (a whole source) or :meth:`Pipeline.submit` (one
request); each carries a route that its output goes back to, in order: the last stage hands
each finished frame through the :class:`Egress` straight to its route, from its own task. The
stage executors are tasks of one ``asyncio.TaskGroup`` owned by the pipeline: the first failure
cancels them all, every worker thread is joined, and one :class:`PipelineError` naming the
component and the frame reaches whoever is waiting.

The split is made when the first frame arrives (``balance="time"`` profiles every layer on
it) unless a ``sample`` is given to :meth:`start`.
"""
from __future__ import annotations

import asyncio
import copy
import itertools
import statistics
import warnings
import weakref
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterable, Iterable, Literal, Sequence

import torch
from torch import nn

from .channel import Channel, ChannelClosed, Policy
from .devices import CpuDevice, CudaDevice, Device, resolve_devices
from .errors import FrameError, PipelineClosed, PipelineError, primary_error
from .checkpoint import Snapshot
from .executor import GradBox, Job, OnError, StageExecutor, StageFailed, StageStats, ThreadChain
from .learning import OnlineLearning, StageLearner
from .frame import Frame, Payload, clone, now
from . import metrics as _metrics
from .metrics import Report, Span, as_spans, report
from .partition import (LayerFailed, balance_by_params, check_balance, check_unshared, layers_of, min_max_partition,
                        profile_layers, split)
from .routes import FutureRoute, Route, StreamRoute
from .threads import aclose_to_the_end, in_thread, to_the_end
from .validation import InputSpec, check_tensors

Balance = Sequence[int] | Literal["time", "params"]


@dataclass
class PipelineStats:
    """A snapshot of what the pipeline did so far.

    ``delivered`` frames reached their reader: a stream's when it is read, a ``submit()``'s
    answer when it is handed back (so ``delivered``, like every counter here, only grows).
    Once the pipeline has drained and its streams are read to their end or closed (frames
    waiting in a stream for its reader are neither delivered nor discarded yet; one read after
    the pipeline restarted counts in no run), every admitted frame is accounted for:
    ``admitted == delivered + discarded + dropped + sum(stage.skipped)``, where
    ``discarded`` frames finished after their reader had gone, or were never read (a stream
    closed early, a cancelled ``submit()``); frames rejected at the door
    (with ``on_error="skip"``: bad input, or a first frame that the model failed on while
    the pipeline split it) are counted in ``skipped_input`` instead.
    """

    balance: list[int] | None
    admitted: int = 0
    delivered: int = 0
    discarded: int = 0
    skipped_input: int = 0
    dropped: int = 0
    stages: list[StageStats] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def skipped(self) -> int:
        return self.skipped_input + sum(s.skipped for s in self.stages)

    @property
    def throughput(self) -> float:
        """Delivered frames per second since start."""
        return self.delivered / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def busy(self) -> list[float]:
        """Each stage's busy fraction of the elapsed time."""
        return [s.busy_s / self.elapsed_s if self.elapsed_s > 0 else 0.0 for s in self.stages]


class OutputStream:
    """The outputs of one :meth:`Pipeline.stream` call: an async iterator of frames, in order,
    and an async context manager that closes it.

    A read that is cancelled closes the stream, as it would finish an async generator: the
    task reading it may be gone for good, and a stream nobody reads holds the pipeline up.
    (``asyncio.wait_for(anext(stream), t)`` timing out is such a read: the reads after it
    raise a ``RuntimeError`` that says so.) To wait for a frame with a timeout and read on,
    use :meth:`next`.
    """

    def __init__(self, pipe: Pipeline, source: Iterable[Any] | AsyncIterable[Any]) -> None:
        self._pipe = pipe
        self._source = source
        self._route: StreamRoute | None = None
        self._pump: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: weakref.ref[asyncio.Task[Any]] | None = None  # the task that read it last
        self._run = 0  # the pipeline's run it was opened in
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

    def _begin_read(self) -> StreamRoute:
        if self._cancelled:
            raise RuntimeError("this stream was closed when a read of it was cancelled (say, by "
                               "asyncio.wait_for's timeout) and the frames after it were discarded; to wait for "
                               "a frame with a timeout and read on, use `await stream.next(timeout=t)`")
        if self._closed:
            raise StopAsyncIteration
        route = self._route or self._open()
        self._reader = weakref.ref(asyncio.current_task())
        return route

    def _settled(self, frame: Frame) -> None:
        """Its reader took ``frame``: delivered, if this stream is of the pipeline's current run
        (one read after a restart belongs to a run whose counts are gone)."""
        if self._run == self._pipe._run:
            self._pipe._handed(frame)

    def _end(self, exc: BaseException) -> None:
        self._cancelled = self._cancelled or isinstance(exc, asyncio.CancelledError)
        self._close()

    def _open(self) -> StreamRoute:
        pipe = self._pipe
        tg = pipe._check_running()
        self._loop = asyncio.get_running_loop()
        self._route = route = StreamRoute(pipe.capacity)
        self._run = pipe._run
        pipe._routes.add(route)
        pipe._streams.add(self)
        self._pump = tg.create_task(pipe._pump(self._source, route), name="partime-source")
        pipe._pumps.add(self._pump)
        return route

    def _close(self) -> None:
        self._closed = True
        if self._pump is not None:
            self._pump.cancel()
            self._pipe._pumps.discard(self._pump)
        if self._route is not None:  # opened: registered with the pipeline
            self._pipe._unread(self._route.out, counted=self._run == self._pipe._run)
            self._route.detach()
            self._pipe._routes.discard(self._route)
            self._pipe._streams.discard(self)

    async def aclose(self) -> None:
        """Stop reading: the source is closed, frames still in flight are discarded."""
        self._close()

    def __del__(self) -> None:
        # A reader that breaks out of ``async for`` without closing: CPython frees the stream at
        # once, and its pump must not keep the pipeline's egress waiting for it. Closed on the
        # loop's thread: a garbage collection may run this finaliser on any thread.
        if self._route is not None and not self._route.detached and self._loop is not None:
            try:
                if self._loop is _running_loop():
                    self._close()
                else:
                    self._loop.call_soon_threadsafe(self._close)
            except RuntimeError:  # the loop is already closed: nothing left to unblock
                pass

    async def __aenter__(self) -> OutputStream:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self._close()


class Pipeline:
    """Run ``model`` over streams, its layers split over ``devices`` and pipelined.

    Args:
        model: an ``nn.Sequential`` (or a list of modules); each child is a layer that may not
            be split further. Stage modules share the model's parameters (on CPU), or the
            model's layers are moved to their stage's GPU in place.
        devices: ``"auto"`` (every GPU, else one CPU device per core), a list of
            ``"cpu"``/``"cuda:N"``/``torch.device``/:class:`Device`, or :func:`cpu_devices`.
        balance: layer counts per device, ``"time"`` (profile, then the optimal contiguous
            split) or ``"params"``.
        input_spec: ``"first"`` (every frame must match the first one's structure, shapes,
            dtypes and device type), an :class:`InputSpec`, or ``None`` (only "tensors").
        check_finite: reject frames with NaN or Inf in floating tensors.
        output_spec: ``"first"``: each stage's first output fixes the structure, shapes,
            dtypes and device of its later outputs; a frame whose output differs gets a
            :class:`FrameError` naming the stage (a model whose output changes mid-stream is
            caught where it happens, not in the next stage or a sink). ``None``: no check,
            for models whose output shapes vary by design (e.g. a variable number of
            detections). ``"auto"``: ``"first"`` when ``input_spec="first"`` (every input
            has the same shapes), else ``None``.
        on_error: ``"raise"`` stops the pipeline on the first failing frame; ``"skip"`` skips
            that frame, counts it, and goes on.
        capacity: slots in each channel (memory and queueing latency are bounded by
            ``capacity`` frames per hop).
        policy: what the ingress does when full: ``"block"`` (backpressure on the source),
            ``"drop_oldest"``, ``"drop_newest"`` or ``"latest"``. Inner channels always block.
        window: frames a stage may have queued on its device beyond the one it finishes.
        learning: an :class:`OnlineLearning` to train the model online on frames with targets.
        metrics: record spans (each stage's compute, copies, backward and step, and each
            frame's delivery; see :mod:`partime_async.metrics`) for :meth:`metrics`,
            :meth:`export_trace` and :func:`partime_async.plot.timeline`. On by default: a
            tuple appended per span to a ring of the latest
            :data:`~partime_async.metrics.SPAN_CAPACITY` (about 1 000 instructions), lost in
            the noise for a real model; for stages that do next to nothing, 1-4% more
            modelled CPU cycles per frame, counted under cachegrind
            (``bench/metrics_overhead.py``). An
            int ``n`` keeps the latest ``n`` spans instead (longer traces; or a ring that
            stays in cache). ``False`` leaves only the counters of :meth:`stats`.
    """

    def __init__(
        self,
        model: nn.Module | Sequence[nn.Module],
        *,
        devices: str | Sequence[Device | str | torch.device] = "auto",
        balance: Balance = "time",
        input_spec: InputSpec | Literal["first"] | None = "first",
        check_finite: bool = False,
        output_spec: Literal["auto", "first"] | None = "auto",
        on_error: OnError = "raise",
        capacity: int = 2,
        policy: Policy = "block",
        window: int = 2,
        learning: OnlineLearning | None = None,
        metrics: bool | int = True,
    ) -> None:
        self.model = model
        self.layers = layers_of(model)
        # the layers' names in ``model`` (an nn.Sequential's child names; a list's indices):
        # a state_dict's keys are the model's own
        self.layer_names = (list(model._modules) if isinstance(model, nn.Sequential)  # a repeated module too
                            else [str(i) for i in range(len(self.layers))])
        self.devices = resolve_devices(devices, len(self.layers))
        if learning is not None:
            if not isinstance(learning, OnlineLearning):
                raise TypeError(f"learning must be an OnlineLearning, got {type(learning).__name__}")
            if learning.mode == "sequential" and len(self.devices) != 1:
                raise ValueError(f"mode='sequential' runs the whole model on one device, got {len(self.devices)} "
                                 "devices; pass devices=[one device] (or use mode='partime' / 'stashed')")
            if on_error == "skip":
                raise ValueError("on_error='skip' cannot be combined with learning: a skipped frame would leave "
                                 "a gradient owed forever; bad input is still rejected at the door with FrameError")
        if len(self.devices) > len(self.layers):
            raise ValueError(f"cannot split {len(self.layers)} layers over {len(self.devices)} devices; "
                             f"give at most {len(self.layers)} devices")
        if isinstance(balance, str):
            if balance not in ("time", "params"):
                raise ValueError(f"balance must be 'time', 'params' or a list of layer counts, got {balance!r}")
            self.balance = balance_by_params(self.layers, len(self.devices)) if balance == "params" else None
        else:
            self.balance = check_balance(balance, len(self.layers), len(self.devices))
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if output_spec not in ("auto", "first", None):
            raise ValueError(f"output_spec must be 'auto', 'first' or None, got {output_spec!r}")
        if input_spec not in ("first", None) and not isinstance(input_spec, InputSpec):
            raise ValueError(f"input_spec must be 'first', None or an InputSpec, got {input_spec!r}")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        if not isinstance(metrics, (bool, int)) or (not isinstance(metrics, bool) and metrics < 1):
            raise ValueError(f"metrics must be True, False or a span capacity >= 1, got {metrics!r}")
        Channel(capacity, policy)  # validates both, with the channel's own messages
        self.input_spec = input_spec
        self.check_finite = check_finite
        self.output_spec = ("first" if input_spec == "first" else None) if output_spec == "auto" else output_spec
        self.on_error: OnError = on_error
        self.capacity = capacity
        self.policy: Policy = policy
        self.window = window
        self.learning = learning
        self.metrics_enabled = metrics is not False
        # None: the ring's capacity at start (metrics.SPAN_CAPACITY, read then).
        self._span_capacity = None if isinstance(metrics, bool) else metrics
        self._spans: deque[tuple[int, str, int, float, float]] | None = None  # this run's span ring
        self.learners: list[StageLearner] = []
        self._checkpoint_periods: Counter[int] = Counter()  # of the open Checkpoint sinks
        self._orphan_cuts: set[int] = set()  # periods whose cut was dropped with its frame: due now
        self._pending_state: dict[str, Any] | None = None
        self.stages: list[nn.Sequential] = []
        self.executors: list[StageExecutor] = []
        self._task: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._error: PipelineError | None = None
        self._seq = itertools.count()
        self._t_start = self._t_end = 0.0
        self._delivered = self._discarded = 0
        self._latency_sum_s = 0.0  # over the delivered frames, since start (Prometheus' summary sum)
        self._position = 0
        self._run = 0  # which run (start) this is: a stream of an earlier one counts nowhere now

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Pipeline {state} {len(self.layers)} layers over {self.devices} balance={self.balance}>"

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self, sample: Payload | None = None) -> None:
        """Start the devices and the task group. With ``sample``, split the model now; if
        that fails (or the caller is cancelled meanwhile), the pipeline is stopped again
        before the error goes on."""
        if self._task is not None:
            raise RuntimeError("the pipeline is already started; stop() it first")
        if sample is not None:  # what a frame's payload must be, said before anything starts
            check_tensors(sample, None, finite=False)
        loop = asyncio.get_running_loop()
        self._error = None
        self._routes: set[Route] = set()
        self._streams: weakref.WeakSet[OutputStream] = weakref.WeakSet()  # being read
        self._pumps: set[asyncio.Task[None]] = set()
        self._built = False
        self.executors = []  # this run's are built with its first frame: stats() shows no old run's
        self._build_lock = asyncio.Lock()
        self._stop_requested: asyncio.Future[None] = loop.create_future()
        self._ingress: Channel[Job] = Channel(self.capacity, self.policy, name="ingress",
                                              on_drop=self._dropped_at_ingress)
        self._orphan_cuts.clear()
        self._skipped_input = 0
        self._admitted = 0
        self._keys = itertools.count()  # job keys, unique in this run
        self._spans = (deque(maxlen=self._span_capacity or _metrics.SPAN_CAPACITY)
                       if self.metrics_enabled else None)
        self._t_start = now()
        started: asyncio.Future[None] = loop.create_future()
        self._delivered = self._discarded = 0
        self._latency_sum_s = 0.0
        self._run += 1
        self._task = loop.create_task(self._serve(started), name="partime-pipeline")
        try:
            await started
            if sample is not None:
                await self._build(sample, None)
        except BaseException:  # a bad sample, a failed split, or the caller cancelled: nothing left running
            await self.cancel()
            raise

    async def _serve(self, started: asyncio.Future[None]) -> None:
        mine: list[Device] = []  # the devices this run started: those it closes (one may serve another pipeline)
        try:
            for device in self.devices:
                device.start(asyncio.get_running_loop())
                mine.append(device)
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                started.set_result(None)
                await self._stop_requested
        except BaseException as exc:  # recorded and re-raised by stop(); never lost here
            self._error = primary_error(exc)
            if not started.done():
                started.set_exception(self._error or PipelineClosed("the pipeline was cancelled while starting"))
        finally:
            self._tg = None
            self._t_end = now()
            closed = PipelineClosed("the pipeline stopped before this frame's output")
            self._ingress.abort(self._error or closed)
            for route in list(self._routes):
                route.fail(self._error or closed)
            for device in mine:
                device.close()
            if self._error is None:
                # A worker that died with no frame left to find it dead (after the last one):
                # every output is complete, so the run stands, but not in silence.
                for k, device in enumerate(self.devices):
                    if device in mine and device.died is not None:
                        warnings.warn(f"stage {k} ({device.name}): {device.died}; every frame had been "
                                      "delivered", RuntimeWarning, stacklevel=2)

    async def stop(self) -> None:
        """Admit no more frames, finish those in flight, stop. Re-raises a failure, once."""
        task = self._task
        if task is None:
            return
        for pump in list(self._pumps):
            pump.cancel()
        # A stream whose reader is the task stopping here (it broke out of ``async for``
        # without closing the stream) is read no more: closed, or stop would wait for it.
        # (Not one whose last reader task has ended: on Python 3.11 ``wait_for(anext(stream),
        # t)`` reads each frame from a task of its own, and that reader is not done with it.)
        me = asyncio.current_task()
        for stream in list(self._streams):
            if stream._reader is not None and stream._reader() is me:
                stream._close()
        self._ingress.close()
        if not self._stop_requested.done():
            self._stop_requested.set_result(None)
        try:
            # A caller cancelled meanwhile stops the pipeline now (frames in flight abandoned);
            # it has ended when the cancellation goes on.
            await to_the_end(asyncio.wait({task}), on_cancel=task.cancel)
        finally:
            error = self._forget(task)
        if error is not None:
            raise error

    async def cancel(self) -> None:
        """Stop now: frames in flight are abandoned (their waiters get PipelineClosed)."""
        task = self._task
        if task is None:
            return
        task.cancel()
        try:
            await to_the_end(asyncio.wait({task}))  # ended, even if the caller is cancelled meanwhile
        finally:
            self._forget(task)

    def _forget(self, task: asyncio.Task[None]) -> PipelineError | None:
        """Forget the run of ``task`` once it has ended; its error, once. A later run (another
        task called stop() and start() meanwhile) is not this caller's to forget."""
        if self._task is not task or not task.done():
            return None
        self._task = None
        error, self._error = self._error, None
        return error

    async def __aenter__(self) -> Pipeline:
        await self.start()
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            await self.stop()
        else:  # the body failed or was cancelled: do not drain, do not mask its exception
            await self.cancel()

    def _check_running(self) -> asyncio.TaskGroup:
        if self._error is not None:
            raise self._error
        if self._tg is None:
            raise PipelineClosed("the pipeline is not running; use `async with pipe:` or `await pipe.start()`")
        return self._tg

    # -- building ----------------------------------------------------------------------------
    async def _build(self, sample: Payload, seq: int | None) -> None:
        async with self._build_lock:
            if self._built:
                return
            try:
                await self._split(sample)
            except (LayerFailed, StageFailed) as exc:  # the model raised on this frame
                if isinstance(exc, LayerFailed):  # profiling: the split is not known yet, the layer is
                    cause, what, component = exc.__cause__, "profiling the model", str(exc)
                else:
                    cause, what = exc.error, "timing the stage"
                    component = f"stage {exc.stage} ({self.devices[exc.stage].name})"
                error = PipelineError(f"{type(cause).__name__}: {cause} (while {what} on its first frame)",
                                      component=component, seq=seq)
                error.__cause__ = cause
                if self.on_error == "skip" and seq is not None:  # a streamed frame: skipped like any other
                    raise _SkipFrame(error) from cause
                raise error from cause
            except Exception as exc:
                raise PipelineError(f"{type(exc).__name__}: {exc} (while splitting the model on its first frame)",
                                    component="pipeline set-up", seq=seq) from exc
            self._spec = InputSpec.like(sample) if self.input_spec == "first" else self.input_spec
            tg = self._check_running()
            last = len(self.stages) - 1
            boxes = [GradBox(f"stage {k}") for k in range(len(self.stages))]
            between: list[Channel[Job]] = [Channel(self.capacity, name=f"after stage {k}") for k in range(last)]
            inboxes, outboxes = [self._ingress, *between], [*between, Egress(self)]
            self.executors = []
            for k, (stage, device) in enumerate(zip(self.stages, self.devices)):
                learner = self.learners[k] if self.learners else None
                if learner is not None:
                    learner.new_run()
                self.executors.append(StageExecutor(
                    k, stage, device, inboxes[k], outboxes[k], window=self.window, on_error=self.on_error,
                    download=(k == last and not isinstance(device, CpuDevice)), learner=learner,
                    grads_in=boxes[k] if learner is not None and k < last else None,
                    grads_out=boxes[k - 1] if learner is not None and k > 0 else None, spans=self._spans,
                    check_outputs=self.output_spec == "first"))
            for runner in _runners(self.executors):
                tg.create_task(runner.run(), name=f"partime-{runner.name}")
            self._built = True
            self._t_start = now()  # throughput counts from here, not from set-up and profiling

    async def _split(self, sample: Payload) -> None:
        """Choose the balance (profiling if asked), place the stages, choose inline stages."""
        if self.balance is None:
            costs = await self._profile(self.layers, sample)
            self.balance = min_max_partition(costs, len(self.devices))
        self.stages = split(self.layers, self.balance)
        check_unshared(self.layers, self.layer_names, self.balance, learning=self.learning is not None,
                       one_device=len({d.torch_device for d in self.devices}) == 1)
        for stage, device in zip(self.stages, self.devices):
            stage.to(device.torch_device)
        if self.learning is not None:
            if not self.learners:  # a restarted pipeline keeps its optimisers' state
                n, learning = len(self.stages), self.learning
                # Off the loop: the first optimiser a process makes imports torch._dynamo
                # (1-2 s, during which the loop would serve nothing else).
                self.learners = await in_thread(
                    lambda: [StageLearner(learning, stage, k, n) for k, stage in enumerate(self.stages)])
            if self._pending_state is not None:
                self._load_learners(self._pending_state)
                self._pending_state = None
            for device in self.devices:
                device.inline = False  # a learning stage keeps graphs between its own calls
        else:
            await self._choose_inline(sample)
        # Weights moved and buffers restored on whatever stream each step used: done before
        # the stages' own streams read them (set-up only; streaming never synchronises).
        for device in {d.torch_device for d in self.devices if isinstance(d, CudaDevice)}:
            torch.cuda.synchronize(device)

    async def _profile(self, layers: Sequence[nn.Module], sample: Payload) -> list[list[float]]:
        """Per-device rows of per-layer seconds; devices of one kind are profiled once.

        Buffers are restored (profile_layers). The random-number generators are not: a model
        with random layers draws from them here as in any forward. Restoring them after
        these awaits would rewind the draws that other tasks and threads made meanwhile.
        """
        rows: dict[tuple[Any, ...], list[float]] = {}
        for device in self.devices:
            key = _device_kind(device)
            if key not in rows:
                for layer in layers:
                    layer.to(device.torch_device)
                # To its end, even for a cancelled caller: the layers are not to be moved
                # or used again while the worker still profiles them.
                rows[key], _ = await to_the_end(device.submit(lambda x: profile_layers(layers, x), sample))
        return [rows[_device_kind(d)] for d in self.devices]

    async def _choose_inline(self, sample: Payload) -> None:
        """Run on the loop thread the CPU stages cheaper than a measured thread hand-off."""
        auto = [k for k, d in enumerate(self.devices) if isinstance(d, CpuDevice) and d.inline_mode == "auto"]
        for k, device in enumerate(self.devices):
            device.inline = isinstance(device, CpuDevice) and device.inline_mode is True
        if not auto:
            return
        handoff = await _handoff_seconds(self.devices[auto[0]])
        x = sample
        for k, (stage, device) in enumerate(zip(self.stages, self.devices)):
            try:
                (seconds, x), ready = await to_the_end(device.submit(lambda v, s=stage: _time_stage(s, v), x))
            except Exception as exc:
                cause = exc.__cause__ if isinstance(exc, LayerFailed) else exc
                raise StageFailed(k, cause) from cause
            if k in auto:
                # After a GPU stage the input's event is waited for off the loop, which
                # costs a thread hop anyway: run on the worker thread.
                after_gpu = k > 0 and isinstance(self.devices[k - 1], CudaDevice)
                device.inline = seconds < handoff and not after_gpu
            if isinstance(device, CudaDevice) and k + 1 < len(self.devices):
                x = await device.download(x, ready)

    # -- admitting frames ---------------------------------------------------------------------
    def _prepare(self, frame: Frame, route: Route) -> Job | None:
        """Check a frame and count it on its route; None if it was skipped as bad input."""
        try:
            check_tensors(frame.data, frame.seq, finite=False)
            if self._spec is not None:
                self._spec.check(frame.data, frame.seq)
            if self.check_finite:  # after the spec: it reads the values, which must be there
                check_tensors(frame.data, frame.seq, finite=True)
        except FrameError as error:
            if self.on_error != "skip":
                raise
            self._skip_input(frame, route, error)
            return None
        route.admitted += 1
        self._admitted += 1
        if self._checkpoint_periods:
            due = frozenset(every for every in self._checkpoint_periods if self._admitted % every == 0)
            if due:
                self._cut(frame, due)
        return Job(frame, route, next(self._keys))

    def _dropped_at_ingress(self, job: Job) -> None:
        job.route.drop(job.frame, "ingress")
        if job.frame.checkpoint is not None:  # no stage saw it: see _place_orphan_cuts
            self._orphan_cuts |= job.frame.checkpoint.periods

    def _place_orphan_cuts(self) -> None:
        """Cuts whose frame the ingress dropped go to the frame queued last (a drop policy
        drops only when the ingress is full, so there is one): no stage has seen it yet, so
        the cut stays consistent, and it is not lost at the end of the stream."""
        newest = self._ingress.newest()
        if newest is None:
            return
        periods = self._orphan_cuts & self._checkpoint_periods.keys()
        self._orphan_cuts.clear()
        if periods:
            old = newest.frame.checkpoint
            self._cut(newest.frame, periods | (old.periods if old is not None else frozenset()))

    def _cut(self, frame: Frame, periods: frozenset[int]) -> None:
        """Take a checkpoint cut at ``frame`` for the sinks of ``periods``."""
        frame.checkpoint = Snapshot(frame.seq, frozenset(periods), len(self.stages) if self.learners else 0)

    async def _first(self, frame: Frame, route: Route) -> bool:
        """Split the model on the first good frame; False if ``frame`` was skipped as bad."""
        try:
            check_tensors(frame.data, frame.seq, finite=self.check_finite)
        except FrameError as error:
            if self.on_error != "skip":
                raise
            self._skip_input(frame, route, error)
            return False
        try:
            await self._build(frame.data, frame.seq)
        except _SkipFrame as skip:  # the model failed on it; the next frame tries the split again
            self._skip_input(frame, route, skip.error)
            return False
        return True

    def _skip_input(self, frame: Frame, route: Route, error: PipelineError) -> None:
        self._skipped_input += 1
        route.admitted += 1
        route.skip(frame, error)

    async def _admit(self, frame: Frame, route: Route) -> None:
        self._check_running()
        if not self._built and not await self._first(frame, route):
            return
        job = self._prepare(frame, route)
        if job is None:
            return
        try:
            if not self._ingress.send_nowait(job):  # fast path: room in the channel
                await self._ingress.send(job)
            if self._orphan_cuts:
                self._place_orphan_cuts()
        except BaseException:  # not queued after all (stop(), or the reader went away)
            route.admitted -= 1
            self._admitted -= 1
            raise

    async def submit(self, x: Payload | Frame, *, target: Payload | None = None,
                     meta: dict[str, Any] | None = None) -> Payload:
        """Run one input through the pipeline and return its output (on the host).

        Safe to call from many tasks at once (e.g. web handlers): requests are pipelined
        and each caller gets its own output. A bad input raises :class:`FrameError` to this
        caller only; the pipeline keeps running. ``x`` may be a :class:`Frame` (its capture
        time, target and meta travel with it; ``target`` and ``meta`` given here replace its
        target and add to its meta); its seq is replaced by the pipeline's own count.
        """
        self._check_running()
        if isinstance(x, Frame):
            frame = _own_frame(x, next(self._seq))
            if target is not None:
                frame.target = target
            frame.meta.update(meta or {})
        else:
            frame = Frame(next(self._seq), x, target, dict(meta or {}))
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        route = FutureRoute(future)
        self._routes.add(route)
        try:
            await self._admit(frame, route)
            return (await future).data
        except ChannelClosed:  # stop() closed the ingress while this caller waited for room
            raise PipelineClosed("the pipeline stopped before this frame was admitted") from None
        finally:
            self._routes.discard(route)
            if future.done() and not future.cancelled():
                future.exception()  # this caller learnt its outcome already (say, from the ingress)

    def stream(self, source: Iterable[Any] | AsyncIterable[Any]) -> OutputStream:
        """Feed ``source`` through the pipeline; iterate the result for its outputs, in order.

        ``source`` is any iterable or async iterable of :class:`Frame` objects or payloads
        (payloads get seq 0, 1, 2, …). Nothing starts until the first ``__anext__``. A source
        that raises fails the pipeline with a :class:`PipelineError` naming the source. To
        stop reading early, close the stream (``async with pipe.stream(src) as outputs:``
        or ``await outputs.aclose()``): the source is closed (whatever has ``aclose()``: an
        async generator, a :class:`~partime_async.sources.Source`; a generator by ``close()``;
        another sync iterator is the caller's and left open) and the frames still in flight
        are discarded without blocking the pipeline. A stream left unclosed is closed when it
        is garbage-collected, or by :meth:`stop` when the task stopping is the one that read
        it (``break`` out of ``async for``, then leave ``async with pipe:``). A stream object
        kept alive after its reader stopped reading must be closed: :meth:`stop` finishes
        every frame in flight and would wait for that stream's reader. A read that is
        cancelled closes the stream; to wait for a frame with a timeout and read on, use
        :meth:`OutputStream.next` (``await outputs.next(timeout=t)``).
        """
        if not _is_source(source):
            raise TypeError(f"a source must be an iterable or async iterable of frames or tensors, got "
                            f"{type(source).__name__} (for one tensor, use `await pipe.submit(x)`)")
        return OutputStream(self, source)

    async def _pump(self, source: Iterable[Any] | AsyncIterable[Any], route: StreamRoute) -> None:
        name = getattr(source, "name", type(source).__name__)
        is_async = hasattr(source, "__aiter__")
        items = aiter(source) if is_async else iter(source)  # type: ignore[arg-type]
        seq = 0
        try:
            while True:
                try:
                    item = (await anext(items)) if is_async else next(items)
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
                frame = _own_frame(item) if isinstance(item, Frame) else Frame(seq, item)
                seq = frame.seq + 1
                await self._admit(frame, route)
                if self.policy != "block":
                    # A drop policy never blocks, and a source (sync, or async without a real
                    # wait) may never suspend either: let the stages run between frames.
                    await asyncio.sleep(0)
        except (asyncio.CancelledError, ChannelClosed):
            pass  # stop() or the reader went away: admission ends, not an error of the graph
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

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Weights, per-stage optimiser and scheduler state, and the stream position.

        Take it before start, after stop, or (learning) before the first frame of a run: a
        learning pipeline that streams applies each frame's update on its stages' threads
        after the frame's output left, so a copy taken meanwhile would be torn; it raises
        then (stream through :class:`partime_async.sinks.Checkpoint` for consistent cuts
        while frames flow). Unlike ``nn.Module.state_dict`` it is a snapshot (tensors are
        copied): learning that goes on afterwards does not change it, and loading it never
        aliases live state.
        """
        self._check_quiet("state_dict()")
        state: dict[str, Any] = {
            "model": self._named_layers().state_dict(),  # keyed as the model's own state_dict
            "balance": list(self.balance) if self.balance is not None else None,
            "next_seq": self._next_seq_value(),
            "position": self._position,  # 1 + the last delivered frame's seq: where a resumed source starts
        }
        if self.learners:
            state["learners"] = [learner.state_dict() for learner in self.learners]
        elif self._pending_state is not None and "learners" in self._pending_state:
            state["learners"] = self._pending_state["learners"]
        return copy.deepcopy(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (when :meth:`state_dict` may be taken)."""
        self._check_quiet("load_state_dict()")
        saved = state.get("balance")
        if self.learning is not None and state.get("learners") is not None and saved is not None \
                and self.balance is not None and list(saved) != list(self.balance):
            # Optimiser states are per stage: they fit only the stages they were saved from.
            raise ValueError(f"the state was saved from stages split {list(saved)} but this pipeline splits "
                             f"{list(self.balance)}: its optimiser states fit only that split; create the "
                             f"pipeline with balance={list(saved)} on {len(saved)} devices")
        state = copy.deepcopy(state)  # ours from here on: the caller's dict is never aliased
        named, numbered = self._named_layers(), nn.Sequential(*self.layers)
        if state["model"].keys() == numbered.state_dict().keys() != named.state_dict().keys():
            numbered.load_state_dict(state["model"])  # saved before states took the model's names
        else:
            named.load_state_dict(state["model"])
        if state.get("balance") is not None and self.balance is None:
            self.balance = check_balance(state["balance"], len(self.layers), len(self.devices))
        self._seq = itertools.count(state.get("next_seq", 0))
        self._position = state.get("position", 0)
        if self.learners:
            self._load_learners(state)
        else:
            self._pending_state = state  # optimisers are made when the stages are

    def _unread(self, out: Channel[Frame], *, counted: bool = True) -> None:
        """The frames a closing stream's reader never took: discarded (``counted``: the stream
        is of this run)."""
        while len(out):
            out.receive_nowait()
            if counted:
                self._discarded += 1

    def _handed(self, frame: Frame) -> None:
        """``frame`` reached its reader (a stream's, or a submitter): delivered. Counted then,
        not when it left the last stage, so that the counters only grow (Prometheus' rate()
        needs it: a stream closed with frames unread turns those into discarded ones)."""
        self._delivered += 1
        self._latency_sum_s += frame.t_done - frame.t_capture

    def _named_layers(self) -> nn.Sequential:
        """A new ``nn.Sequential`` of the layers themselves (no copies) under their names in
        the model: its ``state_dict`` is keyed as the model's."""
        return nn.Sequential(OrderedDict(zip(self.layer_names, self.layers)))

    def _ask_checkpoints(self, every: int) -> None:
        """A :class:`~partime_async.sinks.Checkpoint` sink opened: cut every ``every`` admitted frames."""
        self._checkpoint_periods[every] += 1

    def _stop_checkpoints(self, every: int) -> None:
        """That sink closed."""
        self._checkpoint_periods[every] -= 1
        if self._checkpoint_periods[every] <= 0:
            del self._checkpoint_periods[every]

    def _check_quiet(self, what: str) -> None:
        if self.running and self.learning is not None and self._admitted > 0:
            raise RuntimeError(f"{what} of a learning pipeline while it streams: its stages may still be applying "
                               "the updates of frames already delivered, on their own threads (a torn state). Call "
                               "it after `await pipe.stop()`, or stream through "
                               "partime_async.sinks.Checkpoint(pipe, path, every=N), which takes consistent cuts "
                               "while frames flow")

    def _load_learners(self, state: dict[str, Any]) -> None:
        saved = state.get("learners")
        if saved is None:
            return
        if len(saved) != len(self.learners):
            raise ValueError(f"the state has {len(saved)} learning stages but this pipeline has {len(self.learners)}; "
                             "load it into a pipeline with the same devices and balance")
        for learner, learner_state in zip(self.learners, saved):
            learner.load_state_dict(learner_state)

    def _next_seq_value(self) -> int:
        """The seq that submit() will use next, without consuming it."""
        value = next(self._seq)
        self._seq = itertools.count(value)
        return value

    # -- composition and introspection -----------------------------------------------------------
    # ``array >> pipe``: numpy would otherwise apply ``>>`` element by element (an array of
    # graphs); with this, it leaves the operator to __rrshift__ and the array is the source.
    __array_ufunc__ = None

    def __rrshift__(self, source: Any) -> Any:
        from .graph import Graph

        return Graph(source, self)

    def __rshift__(self, sinks: Any) -> Any:
        from .graph import Graph

        return Graph(None, self) >> sinks

    def stats(self) -> PipelineStats:
        """Counts and per-stage timings so far (also after the pipeline stopped): a snapshot,
        which the running pipeline no longer changes."""
        ingress = getattr(self, "_ingress", None)
        end = now() if self.running else self._t_end
        return PipelineStats(
            balance=list(self.balance) if self.balance is not None else None,
            admitted=getattr(self, "_admitted", 0),
            delivered=self._delivered,
            discarded=self._discarded,
            skipped_input=getattr(self, "_skipped_input", 0),
            dropped=ingress.dropped if ingress is not None else 0,
            stages=[e.stats.snapshot() for e in self.executors],
            elapsed_s=end - self._t_start,
        )

    def spans(self) -> list[Span]:
        """The spans of the current (or last) run still in the ring, in start order; empty with
        ``metrics=False``. See :mod:`partime_async.metrics`."""
        return as_spans(self._span_tuples())

    def _span_tuples(self) -> list[tuple[int, str, int, float, float]]:
        """A copy of the ring as it holds them (one C-level copy: worker threads that append
        meanwhile need the GIL, so it is consistent)."""
        return list(self._spans) if self._spans is not None else []

    def metrics(self) -> Report:
        """Per-stage busy %, compute and wait times, frame counts and queue depths; latency
        percentiles and throughput (running or stopped). ``str()`` of it is a table."""
        return report(self)

    def export_trace(self, path: str | Path) -> Path:
        """Write the spans as a Chrome trace-event / Perfetto JSON file (open it in
        https://ui.perfetto.dev): a track per stage, per copy stream and for deliveries, a
        slice per span and one flow per frame through the stages. Returns the path."""
        from .trace import write_trace

        return write_trace(self, path)


class Egress:
    """After the last stage: each finished job goes straight to its route, in order, from the
    last stage's own task (an egress task behind one more channel would cost the loop a task
    switch per frame). It stamps ``Frame.t_done``, records the frame's ``deliver`` span (or
    ``discard``: its reader went away) and settles it: an answer to a ``submit()`` is counted
    as delivered now (:meth:`Pipeline._handed`), a stream's frame when its reader takes it (or
    as discarded if the stream closes first). The sending half of a
    channel (:class:`~partime_async.executor.Outbox`): a reader that is behind makes the last
    stage wait, as a full channel would."""

    def __init__(self, pipe: Pipeline) -> None:
        self._pipe = pipe
        self._record = pipe._spans.append if pipe._spans is not None else None

    def send_nowait(self, job: Job) -> bool:
        frame, route = job.frame, job.route
        frame.t_done = now()
        gone = route.gone
        if not route.offer(frame):
            return False
        self._settled(frame, route, gone)
        return True

    async def send(self, job: Job) -> None:
        await job.route.deliver(job.frame)
        self._settled(job.frame, job.route, job.route.gone)  # a reader that left while we waited did not get it

    def close(self) -> None:
        """Nothing to do: each route closes itself once all its frames have settled."""

    def _settled(self, frame: Frame, route: Route, gone: bool) -> None:
        # Every frame that leaves the last stage gets its stage -1 span here, in order (what
        # tells frames of a repeated seq apart): deliver, or discard if its reader had gone.
        if self._record is not None:
            self._record((-1, "discard" if gone else "deliver", frame.seq, frame.t_capture, frame.t_done))
        pipe = self._pipe
        if gone:  # its reader went away: not delivered to anyone
            pipe._discarded += 1
        elif not isinstance(route, StreamRoute):  # a stream's frame is delivered when read
            pipe._handed(frame)
        pipe._position = frame.seq + 1


# -- helpers ---------------------------------------------------------------------------------------
def _is_source(source: object) -> bool:
    return hasattr(source, "__aiter__") or (hasattr(source, "__iter__") and not isinstance(source, torch.Tensor))


class _SkipFrame(Exception):
    """Raised by the build, with ``on_error="skip"``, when the model failed on the streamed
    frame it was splitting on: that frame is skipped (``error`` says why), not the pipeline."""

    def __init__(self, error: PipelineError) -> None:
        super().__init__(error)
        self.error = error


def _runners(executors: list[StageExecutor]) -> list[StageExecutor | ThreadChain]:
    """What runs the stages: runs of consecutive threaded CPU inference stages become one
    :class:`ThreadChain` (worker-to-worker hand-off); every other stage runs on its own."""
    runners: list[StageExecutor | ThreadChain] = []
    run: list[StageExecutor] = []

    def flush() -> None:
        if len(run) > 1:
            runners.append(ThreadChain(list(run)))
        else:
            runners.extend(run)
        run.clear()

    for executor in executors:
        if isinstance(executor.device, CpuDevice) and not executor.device.inline and executor.learner is None:
            run.append(executor)
        else:
            flush()
            runners.append(executor)
    flush()
    return runners


def _own_frame(frame: Frame, seq: int | None = None) -> Frame:
    """A private copy whose ``data`` the stages may replace, leaving the caller's frame as it was."""
    return Frame(frame.seq if seq is None else seq, frame.data, frame.target, dict(frame.meta), frame.t_capture)


def _device_kind(device: Device) -> tuple[Any, ...]:
    if isinstance(device, CpuDevice):
        return ("cpu", device.threads)
    return (device.torch_device.type, device.torch_device.index)


def _time_stage(stage: nn.Module, x: Payload, repeats: int = 5) -> tuple[float, Payload]:
    """Median seconds of one stage on ``x`` (buffers restored, ``x`` left as it was), and its output."""
    times = profile_layers([stage], x, repeats=repeats)
    with torch.no_grad():
        saved = {k: b.clone() for k, b in stage.named_buffers()}
        y = stage(clone(x))
        for k, b in stage.named_buffers():
            b.copy_(saved[k])
    return times[0], y


async def _handoff_seconds(device: Device, repeats: int = 41) -> float:
    """Median round trip of an empty job through ``device``'s worker thread and the loop."""
    samples = []
    for _ in range(repeats):
        t0 = now()
        await device.submit(_noop, None)
        samples.append(now() - t0)
    return statistics.median(samples)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _noop(x: Any) -> Any:
    return x
