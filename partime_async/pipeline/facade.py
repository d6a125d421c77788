"""The pipeline: a model split over devices, one stage runner per device, on one event loop.

::

    ingress ──▶ stage 0 (dev0) ──link──▶ stage 1 (dev1) ── … ──▶ stage S-1 ──egress──▶ routes

Frames enter through :meth:`Pipeline.stream` (a whole source) or :meth:`Pipeline.submit` (one
request); each carries a route that its output goes back to, in order: the last stage hands
each finished frame through the egress straight to its route, from its own task. The stage
runners are tasks of one ``asyncio.TaskGroup`` owned by the run: the first failure cancels
them all, every worker thread is joined, and one :class:`PipelineError` naming the component
and the frame reaches whoever is waiting.

The facade holds what outlives a run (the devices, the split, the learners, the position:
:class:`~partime_async.pipeline.state.PipelineState`) and one :class:`~partime_async.pipeline.run.Run`
at a time; admission, delivery, building and streams are their own modules. The split is made
when the first frame arrives (``balance="time"`` profiles every layer on it) unless a
``sample`` is given to :meth:`start`.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..aio.channel import ChannelClosed, Policy
from ..aio.threads import to_the_end
from ..core.errors import PipelineClosed, PipelineError
from ..core.frame import Frame, Payload
from ..core.stats import PipelineStats
from ..core.validation import InputSpec, check_tensors
from ..devices import Device
from ..graph import Graph
from ..observe import Observation, Report, Span, as_spans, report, write_trace
from ..observe import spans as _spans
from ..partition import partitioner_for
from ..programs import OnlineLearning, StageLearner
from ..ranks.placement import DRIVING_RANK, rank
from ..stage import OnError
from .build import BuildSettings, build
from .config import (
    Balance,
    Depth,
    Width,
    check_learning,
    check_options,
    check_replicas,
    depth_by_stage,
    every_device,
    initial_balance,
    place,
    width_stages,
)
from .cuts import CutSchedule
from .routes import FutureRoute
from .run import Run
from .serving import serve_run
from .state import PipelineState, check_quiet
from .streams import OutputStream, is_source, request_frame


class Pipeline:
    """Run ``model`` over streams, its layers split over ``devices`` and pipelined.

    Args:
        model: an ``nn.Sequential`` (or a list of modules); each child is a layer that may not
            be split further. Stage modules share the model's parameters (on CPU), or the
            model's layers are moved to their stage's GPU in place.
        devices: ``"auto"`` (every GPU, else one CPU device per core), a list of
            ``"cpu"``/``"cuda:N"``/``torch.device``/:class:`Device`, or :func:`cpu_devices`.
            A list in the list replicates a stage: ``[d0, [d1, d2]]`` runs stage 1 on d1 and
            d2 at once, each frame on the least busy, outputs in frame order (inference only;
            ``balance="time"`` gives it the work of two). ``"rankN:cpu"`` places a stage in
            rank N's process of a ``torchrun`` job (:mod:`partime_async.ranks`; devices
            without a rank are rank 0's): every rank runs
            the same script, rank 0 (:attr:`driving`) streams and submits, the others serve
            their stages for each of its runs.
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
        depth: solve a stage's layers in parallel in depth instead of one after another
            (:mod:`partime_async.depth`): a solver class (``DeepPCR`` or ``Jacobi``) for every
            stage, or ``{stage: solver class}``; each frame's solve starts from the previous
            frame's states. For inference and learning; see ``programs/depth.py``.
        width: run a stage split in width: its K blocks of a :func:`~partime_async.width.repurpose`
            plan on K worker threads, exchanging only the kept activations. ``True``: every
            stage that holds width-split layers; or the stage indices. Inference only.
        metrics: record spans (see :mod:`partime_async.observe`) for :meth:`metrics`,
            :meth:`export_trace` and :func:`partime_async.observe.timeline`: on by default, a
            tuple per span into a ring of the latest :data:`~partime_async.observe.SPAN_CAPACITY`
            (1-4% more modelled CPU cycles for stages that do next to nothing:
            ``bench/metrics_overhead.py``); an int ``n`` keeps the latest ``n``; ``False``
            leaves only the counters of :meth:`stats`.
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
        depth: Depth = None,
        width: Width = False,
    ) -> None:
        self.model = model
        self._split = split = partitioner_for(model, input_spec)
        self.devices, self.replicas, self.driving, self._here = place(devices, split)
        check_learning(learning, self.devices)
        self._state = PipelineState(split, initial_balance(balance, split, self.devices), len(self.devices),
                                    requested=balance)
        check_options(on_error=on_error, output_spec=output_spec, input_spec=input_spec, window=window,
                      metrics=metrics, capacity=capacity, policy=policy)
        self.input_spec = input_spec
        self.check_finite = check_finite
        self.output_spec = ("first" if input_spec == "first" else None) if output_spec == "auto" else output_spec
        self.on_error: OnError = on_error
        self.capacity = capacity
        self.policy: Policy = policy
        self.window = window
        self.learning = learning
        self.depth = depth_by_stage(depth, len(self.devices))
        self.width = width_stages(width, len(self.devices), learning, self.depth)
        check_replicas(self.replicas, learning=learning, depth=self.depth, width=self.width)
        self.metrics_enabled = metrics is not False
        # None: the ring's capacity at start (observe.SPAN_CAPACITY, read then).
        self._span_capacity = None if isinstance(metrics, bool) else metrics
        self.cuts = CutSchedule(self._state)  # the checkpoint cuts the open Checkpoint sinks asked for
        self._task: asyncio.Task[None] | None = None
        self._run: Run | None = None  # the current run, or the last one (stats() reports it)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Pipeline {state} {len(self.layers)} layers over {self.devices} balance={self.balance}>"

    # -- what it holds ---------------------------------------------------------------------
    @property
    def layers(self) -> list[nn.Module]:
        """The units the model is split between (an ``nn.Sequential``'s children)."""
        return self._split.layers

    @property
    def layer_names(self) -> list[str]:
        """The layers' names in the model (a state's keys are the model's own)."""
        return self._split.names

    @property
    def balance(self) -> list[int] | None:
        """Layers per stage (None until the first frame chooses them, with ``balance="time"``)."""
        return self._state.balance

    @property
    def learners(self) -> list[StageLearner]:
        """One per stage once a learning pipeline has run (optimiser, steps, dropped gradients)."""
        return self._state.learners

    @property
    def stages(self) -> list[nn.Module]:
        """The stages' modules of the latest split (empty before the first)."""
        return self._state.modules

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self, sample: Payload | None = None) -> None:
        """Start the devices and the task group. With ``sample``, split the model now; if
        that fails (or the caller is cancelled meanwhile), the pipeline is stopped again
        before the error goes on. On a serving rank: serve this rank's stages for the
        driving rank's run (until :meth:`stop` sees it end)."""
        if self._task is not None:
            raise RuntimeError("the pipeline is already started; stop() it first")
        if sample is not None:  # what a frame's payload must be, said before anything starts
            check_tensors(sample, None, finite=False)
        loop = asyncio.get_running_loop()
        # A run's settings are the pipeline's attributes when it starts.
        settings = BuildSettings(self.devices, self.learning, self.input_spec, self.output_spec == "first",
                                 self.on_error, self.capacity, self.window, self.depth, self.width, self.replicas)
        if not self.driving:
            self._task = loop.create_task(serve_run(settings, self._state, self._here), name="partime-serving")
            return
        spans: deque[Any] | None = (deque(maxlen=self._span_capacity or _spans.SPAN_CAPACITY)
                                    if self.metrics_enabled else None)
        if self._run is not None:
            self._run.current = False  # its streams' reads count in no run now
        target_spec = self.learning.target_spec if self.learning is not None else None
        self._run = run = Run(loop, spans, partial(build, settings, self._state), self.cuts, capacity=self.capacity,
                              policy=self.policy, on_error=self.on_error, check_finite=self.check_finite,
                              targets=self.learning is not None,
                              target_spec=target_spec if isinstance(target_spec, InputSpec) else None)
        started: asyncio.Future[None] = loop.create_future()
        self._task = loop.create_task(run.serve(every_device(self.devices, self.replicas), started),
                                      name="partime-pipeline")
        try:
            await started
            if sample is not None:
                await build(settings, self._state, run, sample, None, False)
        except BaseException:  # a bad sample, a failed split, or the caller cancelled: nothing left running
            await self.cancel()
            raise

    async def stop(self) -> None:
        """Admit no more frames, finish those in flight, stop. Re-raises a failure, once.
        On a serving rank: wait until the driving rank's run has ended."""
        task = self._task
        if task is None:
            return
        if not self.driving:
            try:
                await asyncio.wait({task})
            finally:
                self._task = None
            return task.result()
        assert self._run is not None  # started with the task
        self._run.request_stop()
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
        if not self.driving:  # the session's thread waits on the driving rank: left behind
            self._task = None
            return
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
        assert self._run is not None  # started with the task
        error, self._run.error = self._run.error, None
        return error

    async def __aenter__(self) -> Pipeline:
        await self.start()
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            await self.stop()
        else:  # the body failed or was cancelled: do not drain, do not mask its exception
            await self.cancel()

    def _active(self) -> Run:
        """The running run; raises its error, or PipelineClosed, if there is none."""
        if not self.driving:
            raise RuntimeError(f"rank {rank()} serves its stages for rank {DRIVING_RANK}, which streams and submits: "
                               "call stream() and submit() where `pipe.driving` is true; here run `async with pipe:` "
                               "(or partime_async.run(graph), which serves on a serving rank) once per run of rank "
                               f"{DRIVING_RANK}")
        if self._run is None:
            raise PipelineClosed("the pipeline is not running; use `async with pipe:` or `await pipe.start()`")
        self._run.check_running()
        return self._run

    # -- frames in, outputs out ------------------------------------------------------------
    async def submit(self, x: Payload | Frame, *, target: Payload | None = None,
                     meta: dict[str, Any] | None = None) -> Payload:
        """Run one input through the pipeline and return its output (on the host).

        Safe to call from many tasks at once (e.g. web handlers): requests are pipelined
        and each caller gets its own output. A bad input raises :class:`FrameError` to this
        caller only; the pipeline keeps running. ``x`` may be a :class:`Frame` (its capture
        time, target and meta travel with it; ``target`` and ``meta`` given here replace its
        target and add to its meta); its seq is replaced by the pipeline's own count.
        """
        run = self._active()
        frame = request_frame(x, self._state.next_seq(), target, meta)
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        route = FutureRoute(future)
        run.routes.add(route)
        try:
            await run.admission.admit(frame, route)
            return (await future).data
        except ChannelClosed:  # stop() closed the ingress while this caller waited for room
            raise PipelineClosed("the pipeline stopped before this frame was admitted") from None
        finally:
            run.routes.discard(route)
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
        if not self.driving:
            self._active()  # raises: the driving rank streams
        if not is_source(source):
            raise TypeError(f"a source must be an iterable or async iterable of frames or tensors, got "
                            f"{type(source).__name__} (for one tensor, use `await pipe.submit(x)`)")
        return OutputStream(source, active=self._active, capacity=self.capacity, policy=self.policy)

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
        check_quiet("state_dict()", self._learnt_in_run())
        return self._state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (when :meth:`state_dict` may be taken)."""
        check_quiet("load_state_dict()", self._learnt_in_run())
        self._state.load_state_dict(state, learning=self.learning is not None)

    def _learnt_in_run(self) -> int:
        run = self._run  # frames admitted to the running run of a learning pipeline
        return run.admission.admitted if run is not None and self.running and self.learning is not None else 0

    # -- composition and introspection -----------------------------------------------------------
    # ``array >> pipe``: numpy would otherwise apply ``>>`` element by element (an array of
    # graphs); with this, it leaves the operator to __rrshift__ and the array is the source.
    __array_ufunc__ = None

    def __rrshift__(self, source: Any) -> Graph:
        return Graph(source, self)

    def __rshift__(self, sinks: Any) -> Graph:
        return Graph(None, self) >> sinks

    def stats(self) -> PipelineStats:
        """Counts and per-stage timings so far (also after the pipeline stopped): a snapshot,
        which the running pipeline no longer changes."""
        balance = list(self.balance) if self.balance is not None else None
        return self._run.stats(balance, self.running) if self._run is not None else PipelineStats(balance=balance)

    def observation(self) -> Observation:
        """The run as :mod:`partime_async.observe` reads it (counters, spans, queue depths)."""
        run = self._run
        queued, latency_sum_s, t_start, spans = ((run.queued(), run.latency_sum_s, run.t_start, run.span_tuples())
                                                 if run else ([], 0.0, 0.0, []))
        return Observation(stats=self.stats(), spans=spans, queued=queued, latency_sum_s=latency_sum_s,
                           metrics=self.metrics_enabled, learning=self.learning is not None, t_start=t_start)

    def spans(self) -> list[Span]:
        """The spans of the current (or last) run still in the ring, in start order; empty with
        ``metrics=False``. See :mod:`partime_async.observe`."""
        return as_spans(self._run.span_tuples() if self._run is not None else [])

    def metrics(self) -> Report:
        """Per-stage busy %, compute and wait times, frame counts and queue depths; latency
        percentiles and throughput (running or stopped). ``str()`` of it is a table."""
        return report(self)

    def export_trace(self, path: str | Path) -> Path:
        """Write the spans as a Chrome trace-event / Perfetto JSON file (open it in
        https://ui.perfetto.dev): a track per stage, per copy stream and for deliveries, a
        slice per span and one flow per frame through the stages. Returns the path."""
        return write_trace(self, path)

