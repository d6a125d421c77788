"""Devices: where a stage runs, and how the event loop waits for it without blocking.

One small abstraction hides CPU and CUDA from the stage executor:

``device.submit(fn, payload, ready, seq=, kind=) -> Ticket``
    Start ``fn(payload)`` on this device, after the work of every earlier ``submit``
    (FIFO). ``payload`` may live on another device; ``ready`` is the event that says it is
    complete there (``None`` for host tensors). The ticket is awaited on the event loop and
    gives ``(result, ready)``: the result stays on this device, with the event that marks
    it complete (``None`` when it already is), so the next device can take it over without a
    host synchronisation. ``ready`` may still be pending: whoever reads the result waits for
    it first (a device's ``submit`` and ``download`` do, on the GPU or off the loop thread).
    ``seq`` and ``kind`` label the work for metrics (see :mod:`partime_async.metrics`).
``device.download(payload, ready, seq=) -> awaitable`` a host copy of a result (for sinks).

:class:`CpuDevice` owns one worker thread. Submitted work is queued to that thread, which
runs it back to back (torch releases the GIL inside ops, so several CPU devices compute on
several cores at once) and posts each result to the loop; a busy stage therefore never waits
for the loop between two frames. Stages whose compute costs less than a thread hand-off can
run ``inline`` on the loop thread instead (the pipeline measures both and decides).

:class:`CudaDevice` launches from the loop thread onto its own compute stream, copies in on
a copy stream (host tensors through page-locked memory from PyTorch's caching host allocator,
device tensors device-to-device after waiting on the producer's event on the GPU), and hands
its result on with its ready-event at once. An :class:`EventWaiter` thread per stream sleeps
until events complete and tells the loop in batches, so the loop never polls and one loop
keeps many GPUs and their copy engines busy.

Spans (metrics): on a CPU device the stage executor times its own work on the thread that
runs it, and reads the frame's seq from :attr:`CpuDevice.seq`. A CUDA device times its copies
and kernels itself with timing events (host clocks around asynchronous launches would time
the launches), once the work is complete, into its ``spans`` ring when the executor set one.
"""
from __future__ import annotations

import asyncio
import os
import queue
import threading
from abc import ABC, abstractmethod
from collections import deque
from typing import Any, Awaitable, Callable, Iterable, Sequence

import torch

from .frame import Payload, leaves, now, to_device, tree_map
from .threads import LoopNotifier, resolve

Ticket = Awaitable[tuple[Payload, Any]]
"""Awaitable result of :meth:`Device.submit`: ``(result, ready_event_or_None)``."""


def available_cores() -> int:
    """Cores this process may run on (respects CPU affinity and cgroup pinning)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Device(ABC):
    """A place where one stage runs. Created unstarted; the pipeline starts and closes it."""

    torch_device: torch.device
    inline: bool = False
    died: BaseException | None = None
    """What ended one of this device's threads while it served (None: nothing did). A frame
    that finds the thread gone fails the run; if none did (it died after the last one), the
    pipeline warns when it stops."""

    @abstractmethod
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Acquire the resources (threads, streams); called on the loop thread."""

    @abstractmethod
    def submit(self, fn: Callable[[Payload], Payload], payload: Payload, ready: Any = None, *,
               seq: int = -1, kind: str = "compute") -> Ticket:
        """Run ``fn(payload)`` here after all earlier submissions; see the module docstring.

        ``seq`` (the frame, -1 for none) and ``kind`` (``"compute"`` or ``"backward"``) label
        the work in the spans this device records."""

    @abstractmethod
    async def download(self, payload: Payload, ready: Any, *, seq: int = -1) -> Payload:
        """A host (CPU, pageable) copy of a payload produced on this device (``seq`` labels
        its span, where the device records one)."""

    @abstractmethod
    def close(self) -> None:
        """Release everything; joins threads. Pending tickets fail. Idempotent."""

    @property
    def name(self) -> str:
        """How errors, statistics and traces name this device (``"cpu:1"``, ``"cuda:0"``)."""
        return str(self.torch_device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.torch_device})"


# ---------------------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------------------
_STOP = object()


class WorkerDied(RuntimeError):
    """A device's worker thread has left while the pipeline still runs (an error in the
    thread's own machinery, not in a stage: those are delivered to the stage). Work queued
    to it fails with this; the stage executor stops the pipeline, whatever ``on_error``."""

    def __init__(self, device: Device, what: str) -> None:
        super().__init__(f"the worker thread of {device.name} {what}")
        self.device = device


class CpuDevice(Device):
    """A CPU stage with its own worker thread and intra-op thread count.

    Args:
        index: a label that tells CPU devices apart in names and traces.
        threads: intra-op threads for this stage's ops (``torch.set_num_threads`` is per
            thread under OpenMP, so each stage keeps its own). Default: the process's cores
            divided by the number of CPU stages, at least 1 (set by the pipeline).
        inline: run on the event-loop thread instead of the worker thread. ``"auto"`` lets the
            pipeline decide by measuring the stage against a thread hand-off.
    """

    def __init__(self, index: int = 0, *, threads: int | None = None, inline: bool | str = "auto") -> None:
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        if inline not in (True, False, "auto"):
            raise ValueError(f"inline must be True, False or 'auto', got {inline!r}")
        self.index = index
        self.threads = threads
        self.inline_mode = inline
        self.inline = inline is True
        self.torch_device = torch.device("cpu")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._dead = False  # the worker has left: nothing queued from now on would ever run
        self._lock = threading.Lock()  # orders post() against the worker's last drain
        self._notifier: LoopNotifier | None = None
        self.seq = -1  # the frame whose work runs now, set on the thread that runs it (for spans)

    def __repr__(self) -> str:
        return f"CpuDevice({self.index}, threads={self.threads})"

    @property
    def name(self) -> str:
        return f"cpu:{self.index}"

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        # The workers' torch.set_num_threads also moves the process-wide default that a thread
        # takes at its first parallel op: fix the calling thread's own count before that.
        torch.get_num_threads()
        if self._thread is not None:
            raise RuntimeError(f"{self.name} is already started; a device serves one pipeline at a time")
        self._loop = loop
        self._notifier = LoopNotifier(loop)
        self._closing = self._dead = False
        self.died = None
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=f"partime-{self.name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[Payload], Payload], payload: Payload, ready: Any = None, *,
               seq: int = -1, kind: str = "compute") -> Ticket:
        future = self._loop.create_future() if self._loop is not None else None
        if future is None:
            raise RuntimeError(f"{self.name} is not running")

        def task() -> None:
            self.seq = seq
            try:
                result = (fn(_host_input(payload, ready)), None)
            except BaseException as exc:  # delivered to the awaiting stage, never lost here
                self.notify(future, None, exc)
            else:
                self.notify(future, result, None)

        self.post(task, future)
        return future

    def post(self, task: Callable[[], None], future: asyncio.Future[Any]) -> None:
        """Queue ``task`` for the worker thread, FIFO. Callable from any thread (a worker of
        another device hands frames on this way, without the loop). ``future`` is what the
        task will resolve: if the task never runs (shutdown, or the thread died), it is
        cancelled or failed instead, so nobody waits forever."""
        if self._thread is None or self._closing:
            raise RuntimeError(f"{self.name} is not running")
        with self._lock:
            if self._dead:
                raise WorkerDied(self, "has died; the pipeline must stop")
            self._queue.put((task, future))

    def notify(self, future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
        """Resolve ``future`` on the loop, from the worker thread (batched: a busy pipeline
        wakes the loop once per batch of results, see :class:`~partime_async.threads.LoopNotifier`)."""
        self._notifier.notify(future, result, exc)

    def run_inline(self, fn: Callable[[Payload], Payload], payload: Payload, ready: Any = None, *,
                   seq: int = -1) -> Payload:
        """Run ``fn`` on the calling (loop) thread; for stages cheaper than a hand-off."""
        self.seq = seq
        return fn(_host_input(payload, ready))

    @property
    def queued(self) -> int:
        """Work waiting for the worker thread (approximate while frames flow)."""
        return self._queue.qsize()

    async def download(self, payload: Payload, ready: Any, *, seq: int = -1) -> Payload:
        return payload

    def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._closing = True
        self._queue.put(_STOP)
        thread.join()

    def _work(self) -> None:
        item = None
        try:
            if self.threads is not None:
                # ATen sets a new thread's intra-op count lazily, from the process-wide value,
                # at its first parallel op; query first so that our setting is not overwritten.
                torch.get_num_threads()
                torch.set_num_threads(self.threads)
            while (item := self._queue.get()) is not _STOP:
                if self._closing:  # shutting down: whoever waited is being cancelled too
                    self._loop.call_soon_threadsafe(item[1].cancel)
                    continue
                item[0]()
                item = None
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more
        except BaseException as exc:
            if not self._closing:
                self.died = WorkerDied(self, f"died after frame {self.seq} ({type(exc).__name__}: {exc})")
            raise
        finally:
            # The thread is leaving (stopped, or dying from an error in itself): fail whatever
            # is still queued so that no stage waits forever.
            self._fail_pending(item)

    def _fail_pending(self, current: Any) -> None:
        pending = [(current, "died while running this frame")] if current not in (None, _STOP) else []
        with self._lock:
            self._dead = True
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP:
                    pending.append((item, "died before running this frame"))
        for (_, future), what in pending:
            try:
                if self._closing:
                    self._loop.call_soon_threadsafe(future.cancel)
                else:
                    self._notifier.notify(future, None, WorkerDied(self, what))
            except RuntimeError:
                return


def _host_input(payload: Payload, ready: Any) -> Payload:
    """``payload`` on the host; a GPU producer's event is waited for here, off the loop thread."""
    if ready is not None:
        ready.synchronize()
    if isinstance(payload, torch.Tensor):
        return payload if payload.is_cpu else payload.cpu()
    return to_device(payload, _CPU)


_CPU = torch.device("cpu")


def cpu_devices(n: int | None = None, *, threads: int | None = None, inline: bool | str = "auto") -> list[CpuDevice]:
    """``n`` CPU devices (default: one per available core), each with its own worker thread.

    ``threads`` is the intra-op thread count of each; by default the cores are shared out
    evenly, at least one each.
    """
    cores = available_cores()
    n = cores if n is None else n
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"cpu_devices needs n >= 1, got {n!r}")
    threads = threads if threads is not None else max(1, cores // n)
    return [CpuDevice(i, threads=threads, inline=inline) for i in range(n)]


# ---------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------
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
    the loop (batched, through a :class:`~partime_async.threads.LoopNotifier`).

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
        self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
        self._thread.start()

    def watch(self, event: Any, then: Callable[[BaseException | None], None] | None = None) -> asyncio.Future[None]:
        """A future of the loop that completes when ``event`` does. Call on the loop thread."""
        if self._thread is None:
            raise RuntimeError(f"{self.name} is not running")
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

    def _work(self) -> None:
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
                self._notifier.notify(future, None, error)
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

    With ``spans`` set (by the stage executor, metrics on), each copy, compute and download is
    bracketed by timing events on its stream and recorded, once complete, as a span on the host
    clock (:func:`~partime_async.frame.now`), labelled with ``track`` (the stage index).

    Args:
        index: the GPU (``0``, ``"cuda:1"``, a ``torch.device``).
        depth: frames this device may have launched and not yet finished (at least 1).
        graphs: run the stage as CUDA graphs (one launch per frame, however many layers):
            inference as one graph, a learning stage's forward and backward as two (not a
            delayed ``stashed`` stage: eager, with a warning); the optimiser step stays eager.
            See :mod:`partime_async.cuda_graphs` for what can be captured and the eager
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
        self.seq = -1  # the frame whose work is being launched (for the stage's output check)
        self.stats: Any = None  # the stage's StageStats, set by its executor: busy_s from GPU time
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

    def _mark(self, stream: torch.cuda.Stream) -> torch.cuda.Event:
        """A timing event recorded on ``stream`` now (spans)."""
        event = self.timing.take()
        event.record(stream)
        return event

    def _span(self, spans: deque[Any], kind: str, seq: int, start: torch.cuda.Event, end: torch.cuda.Event) -> None:
        """Record into ``spans`` the span between two completed timing events."""
        anchor, t = self._anchor, self._t_anchor
        spans.append((self.track, kind, seq, t + anchor.elapsed_time(start) * 1e-3, t + anchor.elapsed_time(end) * 1e-3))

    def _upload(self, payload: Payload, ready: Any) -> tuple[Payload, torch.cuda.Event, Any]:
        """Enqueue the copy of ``payload`` to this device on the copy stream; return its event,
        and for spans ``(kind, start, end)`` timing events of the copies (None if untimed or
        nothing was copied)."""
        kind: str | None = None  # "h2d" or "d2d", from the first tensor copied
        if ready is not None:
            self.copy_in.wait_event(ready)
        else:
            # A GPU tensor without an event (the caller's own): it was made on its device's
            # current stream, which the copy stream must follow (our streams do not).
            gpus = {t.device for t in leaves(payload) if isinstance(t, torch.Tensor) and t.is_cuda}
            for gpu in gpus:
                self.copy_in.wait_stream(torch.cuda.current_stream(gpu))

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
                t.record_stream(self.copy_in)  # producer's allocator must not reuse it early
            return t.to(self.torch_device, non_blocking=True)

        timed = self.spans is not None
        with torch.cuda.stream(self.copy_in):
            start = self._mark(self.copy_in) if timed else None
            try:
                moved = tree_map(move, payload)
            except BaseException:
                if start is not None:
                    self.timing.give(start)
                raise
        copy = None
        if timed:
            if kind is None:
                self.timing.give(start)
            else:  # the end mark before the event that the compute waits for: complete with it
                copy = (kind, start, self._mark(self.copy_in))
        event = self.events.take()
        event.record(self.copy_in)
        return moved, event, copy

    def submit(self, fn: Callable[[Payload], Payload], payload: Payload, ready: Any = None, *,
               seq: int = -1, kind: str = "compute") -> Ticket:
        loop = self._loop
        if loop is None:
            raise RuntimeError(f"{self.name} is not running")
        spans = self.spans
        copied = copy = start = None
        ticket = loop.create_future()
        try:
            with torch.cuda.device(self.torch_device):
                x, copied, copy = self._upload(payload, ready)
                self.compute.wait_event(copied)
                with torch.cuda.stream(self.compute):
                    # Always timed on the GPU: the stage's busy time (spans or not) is the
                    # compute stream's time from the first kernel to the last, not the time
                    # the host took to launch them (which includes gaps when launches lag).
                    start = self._mark(self.compute)
                    for t in leaves(x):
                        if isinstance(t, torch.Tensor) and t.is_cuda:
                            t.record_stream(self.compute)
                    self.seq = seq
                    y = fn(x)
                    end = self._mark(self.compute)
                done = self.events.take()
                done.record(self.compute)
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
        two marks) to the stage's busy time, record its spans, recycle its events. Runs on the waiter thread (the only writer
        of ``stats.busy_s`` on a CUDA stage), so it is done for every frame by the time the
        device closes."""
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
        with torch.cuda.device(self.torch_device):
            if ready is not None:
                self.copy_out.wait_event(ready)

            def fetch(t: Any) -> Any:
                if not isinstance(t, torch.Tensor) or not t.is_cuda:
                    return t
                t.record_stream(self.copy_out)
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                return host

            with torch.cuda.stream(self.copy_out):
                start = self._mark(self.copy_out) if timed else None
                host = tree_map(fetch, payload)
                end = self._mark(self.copy_out) if timed else None
            event = self.events.take()
            event.record(self.copy_out)

        def retire(error: BaseException | None) -> None:  # on the waiter thread
            if timed:
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
        self.spans = self.stats = None  # the run's; the next run's executor sets its own


# ---------------------------------------------------------------------------------------
def as_device(spec: Device | str | torch.device) -> Device:
    """A :class:`Device` from a Device, ``"cpu"``, ``"cpu:1"``, ``"cuda:0"`` or a torch.device."""
    if isinstance(spec, Device):
        return spec
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"cannot use {spec!r} as a device; give 'cpu', 'cuda:N', a torch.device or a Device") from exc
    if dev.type == "cpu":
        return CpuDevice(dev.index or 0)
    if dev.type == "cuda":
        return CudaDevice(dev)
    raise ValueError(f"device type {dev.type!r} is not supported yet; use 'cpu' or 'cuda:N'")


def resolve_devices(devices: str | Sequence[Device | str | torch.device], n_layers: int) -> list[Device]:
    """The device list of a pipeline. ``"auto"``: every GPU, else one CPU device per core."""
    if isinstance(devices, str) and devices == "auto":
        if torch.cuda.is_available():
            devices = [CudaDevice(i) for i in range(torch.cuda.device_count())]
        else:
            devices = cpu_devices(max(1, min(available_cores(), n_layers)))
    elif isinstance(devices, (str, torch.device, Device)):
        devices = [devices]
    elif not isinstance(devices, Iterable):
        raise TypeError(f"devices must be 'auto', a device or a list of devices, got {devices!r}; for n CPU stages "
                        "pass devices=pa.cpu_devices(n), for GPUs e.g. devices=['cuda:0', 'cuda:1']")
    result = [as_device(d) for d in devices]
    if not result:
        raise ValueError("a pipeline needs at least one device")
    if len({id(d) for d in result}) != len(result):
        raise ValueError("the same Device object appears twice; create one per stage (e.g. cpu_devices(n))")
    cpus = [d for d in result if isinstance(d, CpuDevice)]
    for d in cpus:
        if d.threads is None:
            d.threads = max(1, available_cores() // len(cpus))
    return result
