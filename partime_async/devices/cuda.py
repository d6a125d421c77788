"""A GPU stage: its own streams, launches from the loop thread, completions seen by waiter threads.

:class:`CudaDevice` launches from the loop thread onto its own compute stream, copies in on
a copy stream (host tensors through page-locked memory from PyTorch's caching host allocator,
device tensors device-to-device after waiting on the producer's event on the GPU), and hands
its result on with its ready-event at once (the CUDA ready-event hand-off: the next device
waits on that event, on the GPU or off the loop thread). An :class:`EventWaiter` thread per
stream sleeps until events complete and tells the loop in batches, so the loop never polls
and one loop keeps many GPUs and their copy engines busy.

Spans (metrics): a CUDA device times its copies and kernels itself with timing events (host
clocks around asynchronous launches would time the launches), once the work is complete,
into the ring that :meth:`CudaDevice.record_into` gave it.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..aio.threads import LoopNotifier, resolve
from ..core.frame import Payload, leaves, now, tree_map
from ..core.stats import StageStats
from .base import Device, Ticket, Work
from .cuda_graphs import GraphedLearningStage, GraphedStage

_STOP = object()


class EventPool:
    """CUDA events reused across frames: the pool grows to the in-flight depth, never per frame.

    Events are created with ``blocking=True`` so that a thread waiting on one sleeps in the
    driver instead of spinning a core. ``timing=True``: events that can be timed
    (``elapsed_time``), for spans.

    ``take`` is called on the loop thread only, ``give`` from any thread (list appends are
    atomic). An event goes back to the pool only once the host has seen it complete. A consumer that
    waits on it after it was taken and recorded again therefore waits for later work of the
    same device: longer than needed, never too short (the new record completes after the old).
    """

    def __init__(self, timing: bool = False) -> None:
        self._free: list[torch.cuda.Event] = []
        self.created = 0
        self.timing = timing

    def take(self) -> torch.cuda.Event:
        if self._free:
            return self._free.pop()
        self.created += 1
        return torch.cuda.Event(enable_timing=self.timing, blocking=True)

    def give(self, *events: torch.cuda.Event) -> None:
        self._free.extend(events)


class EventWaiter:
    """A thread that waits for events, in the order given, and resolves a future for each on
    the loop (batched, through a :class:`~partime_async.aio.threads.LoopNotifier`).

    Why not poll ``event.query()`` from the loop: a loop's timers have a granularity of about a
    millisecond (epoll), so a poll either spins the loop thread or adds up to 1 ms to every
    wait. This thread sleeps in ``event.synchronize()``, which releases the GIL, and costs the
    loop one wake-up per batch of completions. Events recorded on one stream complete in
    order, so one FIFO per stream loses nothing to head-of-line blocking.

    ``event`` is anything with ``synchronize()`` (a CUDA event, or a test double). An error it
    raises (a CUDA error surfaces at the next synchronisation) goes to that event's future.
    ``then(error)``, when given, runs on the waiter thread once the event is complete, before
    the future is resolved: bookkeeping that must be done by the time :meth:`close` returns.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._notifier: LoopNotifier | None = None

    def start(self, notifier: LoopNotifier) -> None:
        self._notifier = notifier
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, args=(notifier,), name=self.name, daemon=True)
        self._thread.start()

    def watch(self, event: Any, then: Callable[[BaseException | None], None] | None = None) -> asyncio.Future[None]:
        """A future of the loop that completes when ``event`` does. Call on the loop thread."""
        if self._thread is None:
            raise RuntimeError(f"{self.name} is not running")
        assert self._notifier is not None  # set by start(), with the thread
        future = self._notifier.loop.create_future()
        self._queue.put((event, then, future))
        return future

    def close(self) -> None:
        """Stop the thread once the events already given are complete (their futures are
        still resolved while the loop runs). Idempotent."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(_STOP)
        thread.join()

    def _work(self, notifier: LoopNotifier) -> None:
        while (item := self._queue.get()) is not _STOP:
            event, then, future = item
            try:
                event.synchronize()
            except BaseException as exc:  # delivered to whoever waits for this event
                error: BaseException | None = exc
            else:
                error = None
            if then is not None:
                try:
                    then(error)
                except BaseException as exc:  # reported with the event, never kills the waiter
                    error = error or exc
            try:
                notifier.notify(future, None, error)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return


def _pass_on(gate: asyncio.Future[None] | None, ticket: asyncio.Future[Any], result: Any) -> None:
    """Resolve ``ticket`` with ``result`` once ``gate`` (an earlier frame's completion) is done,
    or with the gate's error (a CUDA error surfaces at the next synchronisation)."""
    if gate is not None and gate.cancelled():
        ticket.cancel()
    elif gate is not None and gate.exception() is not None:
        resolve(ticket, None, gate.exception())
    else:
        resolve(ticket, result, None)


async def _completed(finished: asyncio.Future[None]) -> None:
    """Wait for an event's future without cancelling it when the caller is cancelled (the
    device still needs its completion to recycle the event), and raise its error."""
    await asyncio.wait({finished})
    finished.result()


class CudaDevice(Device):
    """A GPU (or one stream set on a GPU: several CudaDevices on one GPU are several stages).

    Work is launched from the loop thread onto this device's compute stream; inputs arrive on
    a separate copy stream so that the copy of frame t+1 overlaps the compute of frame t, and
    downloads use a third stream.

    Hand-off: a ticket resolves as soon as the frame's work is *launched*, with the device
    tensor and the event that marks it complete; the next stage's copy stream waits on that
    event on the GPU, so no host round trip sits between two GPU stages. So that the host
    cannot run arbitrarily far ahead of the GPU, the ticket of frame t also waits until frame
    t - ``depth`` of this device is complete. Completions are seen by an
    :class:`EventWaiter` thread (no polling on the loop); they recycle the events and turn
    the compute's timing events into the stage's busy time and, with metrics on, into spans.

    Host memory: pageable inputs are copied into page-locked memory from PyTorch's caching
    host allocator (``Tensor.pin_memory``), which keeps each block until the copy that reads
    it is done and then reuses it; downloads land in page-locked tensors from the same
    allocator and are handed over as they are (no extra copy): the block returns to the cache
    when the caller drops the tensor.

    With ``spans`` given (:meth:`record_into`, metrics on), each copy, compute and download is
    bracketed by timing events on its stream and recorded, once complete, as a span on the host
    clock (:func:`~partime_async.core.frame.now`), labelled with ``track`` (the stage index).

    Args:
        index: the GPU (``0``, ``"cuda:1"``, a ``torch.device``).
        depth: frames this device may have launched and not yet finished (at least 1).
        graphs: run the stage as CUDA graphs (one launch per frame, however many layers):
            inference as one graph, a learning stage's forward and backward as two (not a
            delayed ``stashed`` stage: eager, with a warning); the optimiser step stays eager.
            See :mod:`partime_async.devices.cuda_graphs` for what can be captured and the eager
            fallback.
    """

    def __init__(self, index: int | str | torch.device = 0, *, depth: int = 3, graphs: bool = False) -> None:
        dev = torch.device(index if not isinstance(index, int) else f"cuda:{index}")
        if dev.type != "cuda":
            raise ValueError(f"CudaDevice needs a cuda device, got {dev}")
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        self.torch_device = torch.device("cuda", dev.index if dev.index is not None else 0)
        if not isinstance(graphs, bool):
            raise ValueError(f"graphs must be True or False, got {graphs!r}")
        self.depth = depth
        self.graphs = graphs
        self.events = EventPool()
        self.timing = EventPool(timing=True)
        self.compute: torch.cuda.Stream | None = None
        self.copy_in: torch.cuda.Stream | None = None
        self.copy_out: torch.cuda.Stream | None = None
        self.spans: deque[tuple[int, str, int, float, float]] | None = None
        self.track = -1
        self.stats: StageStats | None = None  # the stage's (record_into): busy_s from GPU time
        self._computed = EventWaiter(f"partime-{self.name}-compute")
        self._downloaded = EventWaiter(f"partime-{self.name}-download")
        self._launched: deque[asyncio.Future[None]] = deque(maxlen=depth)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._anchor: torch.cuda.Event | None = None  # a completed event at host time _t_anchor
        self._t_anchor = 0.0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not None:
            raise RuntimeError(f"{self.name} is already started; a device serves one pipeline at a time")
        if not torch.cuda.is_available():
            raise RuntimeError(f"{self.name} requested but CUDA is not available; use cpu_devices() instead")
        if self.torch_device.index >= torch.cuda.device_count():
            raise RuntimeError(f"{self.name} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
        with torch.cuda.device(self.torch_device):
            self.compute = torch.cuda.Stream()
            self.copy_in = torch.cuda.Stream()
            self.copy_out = torch.cuda.Stream()
            # Event times are relative; one synchronised event ties them to the host clock.
            self._anchor = torch.cuda.Event(enable_timing=True)
            self._anchor.record(self.compute)
            self._anchor.synchronize()
            self._t_anchor = now()
        self._loop = loop
        self._launched.clear()
        notifier = LoopNotifier(loop)
        self._computed.start(notifier)
        self._downloaded.start(notifier)

    host_timed = False  # the host only launches: timing events time the work

    def record_into(self, track: int, stats: StageStats, spans: deque[Any] | None) -> None:
        self.track, self.stats, self.spans = track, stats, spans

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.torch_device)

    def adopt_thread(self) -> None:
        torch.cuda.set_device(self.torch_device)

    def graph_inference(self, run: Callable[[Payload], Payload], *, name: str) -> Callable[[Payload], Payload]:
        return GraphedStage(run, name=name) if self.graphs else run

    def graph_learning(self, module: nn.Module, *, name: str) -> Callable[[Payload], Payload] | None:
        return GraphedLearningStage(module, name=name) if self.graphs else None

    def _mark(self, stream: torch.cuda.Stream) -> torch.cuda.Event:
        """A timing event recorded on ``stream`` now (spans)."""
        event = self.timing.take()
        event.record(stream)
        return event

    def _span(self, spans: deque[Any], kind: str, seq: int, start: torch.cuda.Event, end: torch.cuda.Event) -> None:
        """Record into ``spans`` the span between two completed timing events."""
        anchor, t = self._anchor, self._t_anchor
        assert anchor is not None  # set by start()
        spans.append((self.track, kind, seq,
                      t + anchor.elapsed_time(start) * 1e-3, t + anchor.elapsed_time(end) * 1e-3))

    def _upload(self, payload: Payload, ready: Any) -> tuple[Payload, torch.cuda.Event, Any]:
        """Enqueue the copy of ``payload`` to this device on the copy stream; return its event,
        and for spans ``(kind, start, end)`` timing events of the copies (None if untimed or
        nothing was copied)."""
        kind: str | None = None  # "h2d" or "d2d", from the first tensor copied
        copy_in = self.copy_in
        assert copy_in is not None  # set by start(); submit() checked that it ran
        if ready is not None:
            copy_in.wait_event(ready)
        else:
            # A GPU tensor without an event (the caller's own): it was made on its device's
            # current stream, which the copy stream must follow (our streams do not).
            gpus = {t.device for t in leaves(payload) if isinstance(t, torch.Tensor) and t.is_cuda}
            for gpu in gpus:
                copy_in.wait_stream(torch.cuda.current_stream(gpu))

        def move(t: Any) -> Any:
            nonlocal kind
            if not isinstance(t, torch.Tensor) or t.device == self.torch_device:
                return t
            kind = kind or ("h2d" if t.device.type == "cpu" else "d2d")
            if t.device.type == "cpu":
                # An asynchronous copy needs page-locked memory; the caching host allocator
                # keeps this block until the copy below has read it.
                t = t if t.is_pinned() else t.pin_memory()
            else:
                t.record_stream(copy_in)  # producer's allocator must not reuse it early
            return t.to(self.torch_device, non_blocking=True)

        timed = self.spans is not None
        with torch.cuda.stream(copy_in):
            start = self._mark(copy_in) if timed else None
            try:
                moved = tree_map(move, payload)
            except BaseException:
                if start is not None:
                    self.timing.give(start)
                raise
        copy = None
        if start is not None:  # timed
            if kind is None:
                self.timing.give(start)
            else:  # the end mark before the event that the compute waits for: complete with it
                copy = (kind, start, self._mark(copy_in))
        event = self.events.take()
        event.record(copy_in)
        return moved, event, copy

    def submit(self, fn: Work, payload: Payload, ready: Any = None, *, seq: int = -1,
               kind: str = "compute") -> Ticket:
        loop = self._loop
        if loop is None:
            raise RuntimeError(f"{self.name} is not running")
        compute = self.compute
        assert compute is not None  # set with the loop by start()
        spans = self.spans
        copied = copy = start = None
        ticket = loop.create_future()
        try:
            with torch.cuda.device(self.torch_device):
                x, copied, copy = self._upload(payload, ready)
                compute.wait_event(copied)
                with torch.cuda.stream(compute):
                    # Always timed on the GPU: the stage's busy time (spans or not) is the
                    # compute stream's time from the first kernel to the last, not the time
                    # the host took to launch them (which includes gaps when launches lag).
                    start = self._mark(compute)
                    for t in leaves(x):
                        if isinstance(t, torch.Tensor) and t.is_cuda:
                            t.record_stream(compute)
                    y = fn(x, seq)
                    end = self._mark(compute)
                done = self.events.take()
                done.record(compute)
        except Exception as exc:  # the stage's error, delivered through its ticket
            # Work already enqueued completes later; a recorded event may be taken again at
            # once (a later record completes later still, see EventPool).
            if copied is not None:
                self.events.give(copied)
            self.timing.give(*[e for e in (start, *(copy[1:] if copy else ())) if e is not None])
            resolve(ticket, None, exc)
            return ticket
        marks = (spans, seq, kind, copy, start, end)
        finished = self._computed.watch(done, lambda error: self._retire(error, (copied, done), marks))
        gate = self._launched[0] if len(self._launched) == self.depth else None
        self._launched.append(finished)
        # Handed on at once, unless frame t - depth is not complete yet: that bounds the GPU's queue.
        if gate is None or gate.done():
            _pass_on(gate, ticket, (y, done))
        else:
            gate.add_done_callback(lambda g: _pass_on(g, ticket, (y, done)))
        return ticket

    def _retire(self, error: BaseException | None, events: tuple[torch.cuda.Event, ...],
                marks: tuple[deque[Any] | None, int, str, Any, Any, Any]) -> None:
        """A frame's work is complete (or failed): add its compute stream's time (between the
        two marks) to the stage's busy time, record its spans, recycle its events. Runs on the
        waiter thread (the only writer of ``stats.busy_s`` on a CUDA stage), so it is done for
        every frame by the time the device closes."""
        spans, seq, kind, copy, start, end = marks
        if error is None and seq >= 0:  # (seq -1: not a frame's work, e.g. a checkpoint's copy)
            if self.stats is not None:
                self.stats.busy_s += start.elapsed_time(end) * 1e-3
            if spans is not None:  # the copy completed before the compute began, the compute before done
                if copy is not None:
                    self._span(spans, copy[0], seq, copy[1], copy[2])
                self._span(spans, kind, seq, start, end)
        self.timing.give(start, end, *(copy[1:] if copy is not None else ()))
        self.events.give(*events)

    async def download(self, payload: Payload, ready: Any, *, seq: int = -1) -> Payload:
        spans = self.spans
        timed = spans is not None
        copy_out = self.copy_out
        if copy_out is None:
            raise RuntimeError(f"{self.name} is not running")
        with torch.cuda.device(self.torch_device):
            if ready is not None:
                copy_out.wait_event(ready)

            def fetch(t: Any) -> Any:
                if not isinstance(t, torch.Tensor) or not t.is_cuda:
                    return t
                t.record_stream(copy_out)
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                return host

            with torch.cuda.stream(copy_out):
                start = self._mark(copy_out) if timed else None
                host = tree_map(fetch, payload)
                end = self._mark(copy_out) if timed else None
            event = self.events.take()
            event.record(copy_out)

        def retire(error: BaseException | None) -> None:  # on the waiter thread
            if spans is not None and start is not None and end is not None:  # timed: all three are
                if error is None and seq >= 0:
                    self._span(spans, "d2h", seq, start, end)
                self.timing.give(start, end)
            self.events.give(event)

        await _completed(self._downloaded.watch(event, retire))
        return host

    def close(self) -> None:
        self._computed.close()
        self._downloaded.close()
        self._launched.clear()
        self._loop = None
        self.compute = self.copy_in = self.copy_out = None
        self.spans = self.stats = None  # the run's; the next run's stage sets its own
