"""A CPU stage: one worker thread with its own intra-op thread count.

The worker thread's contract (who makes it, what it reads, what it writes, how it stops):

* :meth:`CpuDevice.start` creates it, on the loop thread; :meth:`CpuDevice.close` stops it
  and joins it.
* It reads ``(task, future, seq)`` items from its queue, in order, and runs each ``task()``
  back to back (torch releases the GIL inside ops, so several CPU devices compute on several
  cores at once). Items are queued by :meth:`CpuDevice.post`, from the loop or from another
  worker (a :class:`~partime_async.transport.chain.ThreadChain` hands frames on that way).
* A task resolves its own ``future`` on the loop, through :meth:`CpuDevice.notify` (batched:
  a busy stage never waits for the loop between two frames, and wakes it once per batch).
  An exception of the work is delivered through that future, never lost in the thread.
* It stops at a stop item; items queued after a close are cancelled. If the thread itself
  dies (an error in its own machinery, not in a stage's work), every queued future fails
  with :class:`WorkerDied`, and so does every later :meth:`post`: no stage waits forever.

Stages whose compute costs less than a thread hand-off can run ``inline`` on the loop thread
instead (the pipeline measures both at start and decides, for ``inline="auto"``).
"""
from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Hashable
from typing import Any

import torch

from ..aio.threads import LoopNotifier
from ..core.errors import StageLost
from ..core.frame import Payload, to_device
from .base import Device, InlineMode, Ticket, Work

_STOP = object()
_CPU = torch.device("cpu")


class WorkerDied(StageLost):
    """A device's worker thread has left while the pipeline still runs (an error in the
    thread's own machinery, not in a stage: those are delivered to the stage). Work queued
    to it fails with this; the stage stops the pipeline, whatever ``on_error``."""

    def __init__(self, device: Device, what: str) -> None:
        super().__init__(f"the worker thread of {device.name} {what}", device)


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

    on_host = True
    chainable = True

    def __init__(self, index: int = 0, *, threads: int | None = None, inline: InlineMode = "auto") -> None:
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        if inline not in (True, False, "auto"):
            raise ValueError(f"inline must be True, False or 'auto', got {inline!r}")
        self.index = index
        self.threads = threads
        self.inline_mode = inline
        self.torch_device = torch.device("cpu")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._dead = False  # the worker has left: nothing queued from now on would ever run
        self._lock = threading.Lock()  # orders post() against the worker's last drain
        self._notifier: LoopNotifier  # made by start(): nothing is posted before
        self._running = -1  # the frame the worker runs now (for the message if it dies)

    def __repr__(self) -> str:
        return f"CpuDevice({self.index}, threads={self.threads})"

    @property
    def name(self) -> str:
        return f"cpu:{self.index}"

    @property
    def profile_key(self) -> Hashable:
        return ("cpu", self.threads)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        # The workers' torch.set_num_threads also moves the process-wide default that a thread
        # takes at its first parallel op: fix the calling thread's own count before that.
        torch.get_num_threads()
        if self._thread is not None:
            raise RuntimeError(f"{self.name} is already started; a device serves one pipeline at a time")
        self._loop = loop
        self._notifier = notifier = LoopNotifier(loop)
        self._closing = self._dead = False
        self.died = None
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, args=(loop, notifier), name=f"partime-{self.name}",
                                        daemon=True)
        self._thread.start()

    def submit(self, fn: Work, payload: Payload, ready: Any = None, *, seq: int = -1,
               kind: str = "compute") -> Ticket:
        future = self._loop.create_future() if self._loop is not None else None
        if future is None:
            raise RuntimeError(f"{self.name} is not running")

        def task() -> None:
            try:
                result = (fn(self.host_input(payload, ready), seq), None)
            except BaseException as exc:  # delivered to the awaiting stage, never lost here
                self.notify(future, None, exc)
            else:
                self.notify(future, result, None)

        self.post(task, future, seq)
        return future

    def post(self, task: Callable[[], None], future: asyncio.Future[Any], seq: int = -1) -> None:
        """Queue ``task`` (frame ``seq``) for the worker thread, FIFO. Callable from any thread
        (a worker of another device hands frames on this way, without the loop). ``future`` is
        what the task will resolve: if the task never runs (shutdown, or the thread died), it
        is cancelled or failed instead, so nobody waits forever."""
        if self._thread is None or self._closing:
            raise RuntimeError(f"{self.name} is not running")
        with self._lock:
            if self._dead:
                raise WorkerDied(self, "has died; the pipeline must stop")
            self._queue.put((task, future, seq))

    def notify(self, future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
        """Resolve ``future`` on the loop, from the worker thread (batched: a busy pipeline
        wakes the loop once per batch of results, see :class:`~partime_async.aio.threads.LoopNotifier`)."""
        self._notifier.notify(future, result, exc)

    def adopt_thread(self) -> None:
        if self.threads is not None:
            torch.get_num_threads()  # see _work: query first, so that the setting holds
            torch.set_num_threads(self.threads)

    def run_inline(self, fn: Work, payload: Payload, ready: Any = None, *, seq: int = -1) -> Payload:
        return fn(self.host_input(payload, ready), seq)

    def host_input(self, payload: Payload, ready: Any) -> Payload:
        """``payload`` on the host; a GPU producer's event is waited for here, off the loop
        thread (on the worker that is about to use it)."""
        if ready is not None:
            ready.synchronize()
        if isinstance(payload, torch.Tensor):
            return payload if payload.is_cpu else payload.cpu()
        return to_device(payload, _CPU)

    @property
    def queued(self) -> int:
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

    def _work(self, loop: asyncio.AbstractEventLoop, notifier: LoopNotifier) -> None:
        item = None
        try:
            if self.threads is not None:
                # ATen sets a new thread's intra-op count lazily, from the process-wide value,
                # at its first parallel op; query first so that our setting is not overwritten.
                torch.get_num_threads()
                torch.set_num_threads(self.threads)
            while (item := self._queue.get()) is not _STOP:
                if self._closing:  # shutting down: whoever waited is being cancelled too
                    loop.call_soon_threadsafe(item[1].cancel)
                    continue
                self._running = item[2]
                item[0]()
                item = None
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more
        except BaseException as exc:
            if not self._closing:
                self.died = WorkerDied(self, f"died after frame {self._running} ({type(exc).__name__}: {exc})")
            raise
        finally:
            # The thread is leaving (stopped, or dying from an error in itself): fail whatever
            # is still queued so that no stage waits forever.
            self._fail_pending(item, loop, notifier)

    def _fail_pending(self, current: Any, loop: asyncio.AbstractEventLoop, notifier: LoopNotifier) -> None:
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
        for (_, future, _), what in pending:
            try:
                if self._closing:
                    loop.call_soon_threadsafe(future.cancel)
                else:
                    notifier.notify(future, None, WorkerDied(self, what))
            except RuntimeError:
                return
