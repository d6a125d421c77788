"""Devices: where a stage runs, and how the event loop waits for it without blocking.

One small abstraction hides CPU and CUDA from the stage executor:

``device.submit(fn, payload, ready, seq=, kind=) -> Ticket``
    Start ``fn(payload)`` on this device, after the work of every earlier ``submit``
    (FIFO). ``payload`` may live on another device; ``ready`` is the event that says it is
    complete there (``None`` for host tensors). The ticket is awaited on the event loop and
    gives ``(result, ready)``: the result stays on this device, with the event that marks
    it complete, so the next device can take it over without a host synchronisation.
    ``seq`` and ``kind`` label the work for metrics (see :mod:`partime_async.metrics`).
``device.download(payload, ready, seq=) -> awaitable`` a host copy of a result (for sinks).

:class:`CpuDevice` owns one worker thread. Submitted work is queued to that thread, which
runs it back to back (torch releases the GIL inside ops, so several CPU devices compute on
several cores at once) and posts each result to the loop; a busy stage therefore never waits
for the loop between two frames. Stages whose compute costs less than a thread hand-off can
run ``inline`` on the loop thread instead (the pipeline measures both and decides).

:class:`CudaDevice` launches from the loop thread onto its own compute stream, copies in on
a copy stream (host tensors through reused pinned staging buffers, device tensors
device-to-device after waiting on the producer's event), records events from a pool, and
polls ``event.query()`` with an adaptive back-off so that one loop keeps many GPUs and their
copy engines busy.

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
from typing import Any, Awaitable, Callable, Sequence

import torch

from .frame import Payload, leaves, now, to_device, tree_map

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
        self._done: deque[tuple[asyncio.Future[Any], Any, BaseException | None]] = deque()
        self._wake_pending = False
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
        self._closing = self._dead = self._wake_pending = False
        self._done.clear()
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
        """Resolve ``future`` on the loop, from the worker thread.

        Notices are batched: while the loop has not yet run the previous wake-up, new results
        only join the queue. A busy pipeline thus wakes the loop once per batch of results
        instead of once per result (a wake-up costs tens of microseconds of CPU).
        """
        self._done.append((future, result, exc))
        if not self._wake_pending:
            self._wake_pending = True
            self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        self._wake_pending = False  # first: a result appended from now on schedules a new wake-up
        done = self._done
        while done:
            _resolve(*done.popleft())

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
                    self._loop.call_soon_threadsafe(_resolve, future, None, WorkerDied(self, what))
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


def _resolve(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():  # the awaiting stage was cancelled
        return
    if exc is not None:
        future.set_exception(exc)
        # Whoever awaits the future still gets the error; one that nobody will await (its
        # stage is being cancelled because the pipeline already failed) is not logged again.
        future.exception()
    else:
        future.set_result(result)


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

    ``timing=True``: events that can be timed (``elapsed_time``), for spans.
    """

    def __init__(self, timing: bool = False) -> None:
        self._free: list[torch.cuda.Event] = []
        self.created = 0
        self.timing = timing

    def take(self) -> torch.cuda.Event:
        if self._free:
            return self._free.pop()
        self.created += 1
        return torch.cuda.Event(enable_timing=self.timing)

    def give(self, event: torch.cuda.Event) -> None:
        self._free.append(event)


class PinnedPool:
    """Page-locked host buffers by (shape, dtype), reused once the copy that read them is done."""

    def __init__(self) -> None:
        self._free: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        self._busy: deque[tuple[torch.cuda.Event, list[torch.Tensor]]] = deque()
        self.created = 0

    def take(self, like: torch.Tensor) -> torch.Tensor:
        self._reclaim()
        free = self._free.get((tuple(like.shape), like.dtype))
        if free:
            return free.pop()
        self.created += 1
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)

    def hold(self, event: torch.cuda.Event, buffers: list[torch.Tensor]) -> None:
        """Keep ``buffers`` busy until ``event`` completes."""
        if buffers:
            self._busy.append((event, buffers))

    def _reclaim(self) -> None:
        while self._busy and self._busy[0][0].query():
            _, buffers = self._busy.popleft()
            for b in buffers:
                self._free.setdefault((tuple(b.shape), b.dtype), []).append(b)

    @property
    def held(self) -> int:
        """Pinned buffers this pool keeps (free or still being read by a copy)."""
        return sum(len(b) for b in self._free.values()) + sum(len(b) for _, b in self._busy)

    def clear(self) -> None:
        """Let every buffer go (PyTorch's pinned-memory allocator keeps a buffer that a copy
        still reads until the copy's stream has passed it)."""
        self._free.clear()
        self._busy.clear()


async def wait_event(event: torch.cuda.Event, *, spin: int = 8, max_sleep: float = 1e-3) -> None:
    """Wait for a CUDA event without blocking the loop.

    Yields to the loop ``spin`` times (cheap, and right for short kernels), then sleeps with an
    exponential back-off capped at ``max_sleep`` so that an idle wait costs little CPU.
    """
    delay = 0.0
    polls = 0
    while not event.query():
        polls += 1
        if polls > spin:
            delay = min(max(delay * 2, 25e-6), max_sleep)
        await asyncio.sleep(delay)


class CudaDevice(Device):
    """A GPU (or one stream set on a GPU: several CudaDevices on one GPU are several stages).

    Work is launched from the loop thread onto this device's compute stream; inputs arrive on
    a separate copy stream so that the copy of frame t+1 overlaps the compute of frame t, and
    downloads use a third stream.

    With ``spans`` set (by the stage executor, metrics on), each copy, compute and download is
    bracketed by timing events on its stream and recorded, once complete, as a span on the host
    clock (:func:`~partime_async.frame.now`), labelled with ``track`` (the stage index).
    """

    def __init__(self, index: int | str | torch.device = 0) -> None:
        dev = torch.device(index if not isinstance(index, int) else f"cuda:{index}")
        if dev.type != "cuda":
            raise ValueError(f"CudaDevice needs a cuda device, got {dev}")
        self.torch_device = torch.device("cuda", dev.index if dev.index is not None else 0)
        self.events = EventPool()
        self.staging = PinnedPool()
        self.compute: torch.cuda.Stream | None = None
        self.copy_in: torch.cuda.Stream | None = None
        self.copy_out: torch.cuda.Stream | None = None
        self.timing = EventPool(timing=True)
        self.spans: deque[tuple[int, str, int, float, float]] | None = None
        self.track = -1
        self._anchor: torch.cuda.Event | None = None  # a completed event at host time _t_anchor
        self._t_anchor = 0.0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
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

    def _mark(self, stream: torch.cuda.Stream) -> torch.cuda.Event:
        """A timing event recorded on ``stream`` now (spans)."""
        event = self.timing.take()
        event.record(stream)
        return event

    def _span(self, spans: deque[Any], kind: str, seq: int, start: torch.cuda.Event, end: torch.cuda.Event) -> None:
        """Record into ``spans`` the span between two completed timing events; they go back to
        the pool."""
        anchor, t = self._anchor, self._t_anchor
        spans.append((self.track, kind, seq, t + anchor.elapsed_time(start) * 1e-3, t + anchor.elapsed_time(end) * 1e-3))
        self.timing.give(start)
        self.timing.give(end)

    def _upload(self, payload: Payload, ready: Any) -> tuple[Payload, torch.cuda.Event, Any]:
        """Enqueue the copy of ``payload`` to this device on the copy stream; return its event,
        and for spans ``(kind, start, end)`` timing events of the copies (None if untimed or
        nothing was copied)."""
        staged: list[torch.Tensor] = []
        kind: str | None = None  # "h2d" or "d2d", from the first tensor copied
        if ready is not None:
            self.copy_in.wait_event(ready)

        def move(t: Any) -> Any:
            nonlocal kind
            if not isinstance(t, torch.Tensor) or t.device == self.torch_device:
                return t
            kind = kind or ("h2d" if t.device.type == "cpu" else "d2d")
            if t.device.type == "cpu":
                if not t.is_pinned():
                    buf = self.staging.take(t)
                    buf.copy_(t)
                    staged.append(buf)
                    t = buf
            else:
                t.record_stream(self.copy_in)  # producer's allocator must not reuse it early
            return t.to(self.torch_device, non_blocking=True)

        timed = self.spans is not None
        with torch.cuda.stream(self.copy_in):
            start = self._mark(self.copy_in) if timed else None
            moved = tree_map(move, payload)
        event = self.events.take()
        event.record(self.copy_in)
        self.staging.hold(event, staged)
        copy = None
        if timed:
            if kind is None:
                self.timing.give(start)
            else:
                copy = (kind, start, self._mark(self.copy_in))
        return moved, event, copy

    def submit(self, fn: Callable[[Payload], Payload], payload: Payload, ready: Any = None, *,
               seq: int = -1, kind: str = "compute") -> Ticket:
        spans = self.spans
        timed = spans is not None
        with torch.cuda.device(self.torch_device):
            x, copied, copy = self._upload(payload, ready)
            self.compute.wait_event(copied)
            with torch.cuda.stream(self.compute):
                start = self._mark(self.compute) if timed else None
                for t in leaves(x):
                    if isinstance(t, torch.Tensor) and t.is_cuda:
                        t.record_stream(self.compute)
                y = fn(x)
                end = self._mark(self.compute) if timed else None
            done = self.events.take()
            done.record(self.compute)
        return self._finish(y, copied, done, (spans, seq, kind, copy, start, end) if timed else None)

    async def _finish(self, y: Payload, copied: torch.cuda.Event, done: torch.cuda.Event,
                      marks: tuple[deque[Any], int, str, Any, Any, Any] | None) -> tuple[Payload, Any]:
        await wait_event(done)
        # Both events are complete, so they go straight back to the pool, and the result
        # needs no ready-event: the consumer's copy stream may read it at once.
        self.events.give(copied)
        self.events.give(done)
        if marks is not None:  # the copy completed before the compute began, the compute before done
            spans, seq, kind, copy, start, end = marks
            if copy is not None:
                self._span(spans, copy[0], seq, copy[1], copy[2])
            self._span(spans, kind, seq, start, end)
        return y, None

    async def download(self, payload: Payload, ready: Any, *, seq: int = -1) -> Payload:
        spans = self.spans
        timed = spans is not None
        with torch.cuda.device(self.torch_device):
            if ready is not None:
                self.copy_out.wait_event(ready)
            pinned: list[torch.Tensor] = []

            def fetch(t: Any) -> Any:
                if not isinstance(t, torch.Tensor) or not t.is_cuda:
                    return t
                t.record_stream(self.copy_out)
                buf = self.staging.take(t)
                buf.copy_(t, non_blocking=True)
                pinned.append(buf)
                return buf

            with torch.cuda.stream(self.copy_out):
                start = self._mark(self.copy_out) if timed else None
                host = tree_map(fetch, payload)
                end = self._mark(self.copy_out) if timed else None
            event = self.events.take()
            event.record(self.copy_out)
        await wait_event(event)
        self.events.give(event)
        if timed:
            self._span(spans, "d2h", seq, start, end)
        # Pinned buffers go back to the pool; the user gets ordinary memory that is theirs.
        out = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, host)
        self.staging.hold(event, pinned)
        return out

    def close(self) -> None:
        self.staging.clear()
        self.compute = self.copy_in = self.copy_out = None
        self.spans = None  # the run's ring; the next run's executor sets its own


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
