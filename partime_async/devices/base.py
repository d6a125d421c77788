"""The device seam: where a stage runs, and every way a CPU and a GPU differ, behind one class.

The rest of the engine never asks which kind of device it holds. Each difference is a
method or attribute of :class:`Device` with a contract, in the manner of torchgpipe's
``stream.py`` (one small function per CUDA call, a no-op on CPU):

``submit(fn, payload, ready, seq=, kind=) -> Ticket``
    Start ``fn(payload, seq)`` here, after the work of every earlier ``submit`` (FIFO).
    ``payload`` may live on another device; ``ready`` is the event that says it is complete
    there (``None`` for host tensors). The ticket is awaited on the event loop and gives
    ``(result, ready)``: the result stays on this device, with the event that marks it
    complete (``None`` when it already is), so the next device can take it over without a
    host synchronisation. ``ready`` may still be pending: whoever reads the result waits for
    it first (a device's ``submit`` and ``download`` do, on the GPU or off the loop thread).
    ``seq`` is the frame (-1 for work that is not a frame's) and ``kind`` labels the work in
    the spans a device records itself (see :mod:`partime_async.observe`).
``download(payload, ready, seq=)``
    A host copy of a result (for sinks); the last stage's results are downloaded unless the
    device says they are host tensors already (:attr:`on_host`).
``synchronize()``
    Wait until the work launched here so far is complete (set-up only, never per frame).
``host_timed``
    Whether the host clock, read around the work on the thread that runs it, times it (CPU).
    If not (CUDA: the host only launches), the device times its own work and records it
    where :meth:`record_into` says.
``inline_mode``, ``run_inline``
    Whether the work may run on the event loop's thread itself (``True``, ``False`` or
    ``"auto"``: measured at start against a thread hand-off) and the call that does so.
``chainable``, ``post``, ``notify``, ``host_input``
    Whether consecutive stages here can hand frames from worker thread to worker thread
    without the loop (:class:`~partime_async.transport.chain.ThreadChain`), and the calls
    that do it.
``graph_inference(run, name=)``, ``graph_learning(module, name=)``
    The stage's work as this device replays it best (CUDA graphs where asked for).
``profile_key``, ``queued``
    Devices with one key run a layer equally fast (profiled once); work waiting here now.

A device is created unstarted; the pipeline starts it (:meth:`Device.start`) and closes it.
:func:`settle` waits, off the loop thread, for a ready event of any device.
"""
from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Literal

import torch
from torch import nn

from ..aio.threads import in_thread
from ..core.frame import Payload
from ..core.stats import StageStats

Ticket = Awaitable[tuple[Payload, Any]]
"""Awaitable result of :meth:`Device.submit`: ``(result, ready_event_or_None)``."""

Work = Callable[[Payload, int], Payload]
"""What a device runs: ``fn(payload, seq)``, ``seq`` the frame it is for (-1: none)."""

InlineMode = bool | Literal["auto"]


class Device(ABC):
    """A place where one stage runs. Created unstarted; the pipeline starts and closes it."""

    torch_device: torch.device
    died: BaseException | None = None
    """What ended one of this device's threads while it served (None: nothing did). A frame
    that finds the thread gone fails the run; if none did (it died after the last one), the
    pipeline warns when it stops."""
    host_timed: bool = True
    on_host: bool = False
    chainable: bool = False
    inline_mode: InlineMode = False
    graphs: bool = False
    """Whether the stage asked to run as CUDA graphs (see :meth:`graph_inference`)."""
    ahead: int = 0
    """Frames a runner keeps submitted here beyond the pipeline's ``window``: a device whose
    results come back from far (another rank) needs more in flight to stay busy."""

    @abstractmethod
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Acquire the resources (threads, streams); called on the loop thread."""

    @abstractmethod
    def submit(self, fn: Work, payload: Payload, ready: Any = None, *, seq: int = -1,
               kind: str = "compute") -> Ticket:
        """Run ``fn(payload, seq)`` here after all earlier submissions; see the module docstring."""

    @abstractmethod
    async def download(self, payload: Payload, ready: Any, *, seq: int = -1) -> Payload:
        """A host (CPU, pageable) copy of a payload produced on this device (``seq`` labels
        its span, where the device records one)."""

    @abstractmethod
    def close(self) -> None:
        """Release everything; joins threads. Pending tickets fail. Idempotent."""

    def synchronize(self) -> None:  # noqa: B027 (a hook: nothing to do by default, not abstract)
        """Wait for the work launched here so far (set-up: weights moved, buffers restored).
        Nothing to wait for where work completes before its ticket does."""

    def record_into(self, track: int, stats: StageStats, spans: deque[Any] | None) -> None:  # noqa: B027 (as above)
        """The stage this device serves in the current run: a device that times its own work
        (``host_timed`` False) adds it to ``stats.busy_s`` and, with ``spans``, records spans
        labelled ``track``. Others have nothing to record here."""

    def adopt_thread(self) -> None:  # noqa: B027 (a hook: nothing to do by default, not abstract)
        """Make the calling thread run this device's work as its own threads do (a serving
        rank runs its stages' work on the thread that receives it): a CPU device's intra-op
        thread count, a GPU's current device."""

    def run_inline(self, fn: Work, payload: Payload, ready: Any = None, *, seq: int = -1) -> Payload:
        """``fn(payload, seq)`` on the calling (loop) thread; only where :attr:`inline_mode`
        allows it."""
        raise NotImplementedError(f"{self.name} cannot run work on the event loop's thread")

    def post(self, task: Callable[[], None], future: asyncio.Future[Any], seq: int = -1) -> None:
        """Queue ``task`` (frame ``seq``) for this device's worker, from any thread; ``future``
        is what the task resolves (failed or cancelled if it never runs). Only where
        :attr:`chainable`."""
        raise NotImplementedError(f"{self.name} has no worker thread to hand frames to")

    def notify(self, future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
        """Resolve ``future`` on the loop, from this device's worker. Only where :attr:`chainable`."""
        raise NotImplementedError(f"{self.name} has no worker thread to hand frames from")

    def host_input(self, payload: Payload, ready: Any) -> Payload:
        """``payload`` on the host, ``ready`` waited for, on this device's worker. Only where
        :attr:`chainable`."""
        raise NotImplementedError(f"{self.name} has no worker thread")

    def graph_inference(self, run: Callable[[Payload], Payload], *, name: str) -> Callable[[Payload], Payload]:
        """``run`` (a stage's inference) as this device replays it best: itself, or as CUDA
        graphs where :attr:`graphs` asks for them."""
        return run

    def graph_learning(self, module: nn.Module, *, name: str) -> Callable[[Payload], Payload] | None:
        """``module(x)`` with autograd as CUDA graphs where :attr:`graphs` asks for them (for
        a stage whose every backward follows its forward before the next forward); None:
        eager."""
        return None

    @property
    def profile_key(self) -> Hashable:
        """Devices with equal keys run a layer equally fast: the model is profiled once per key."""
        return (self.torch_device.type, self.torch_device.index)

    @property
    def queued(self) -> int:
        """Work waiting for this device now (approximate while frames flow)."""
        return 0

    @property
    def name(self) -> str:
        """How errors, statistics and traces name this device (``"cpu:1"``, ``"cuda:0"``)."""
        return str(self.torch_device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.torch_device})"


async def settle(ready: Any) -> None:
    """Wait until ``ready`` (a device's ready event, anything with ``synchronize()``) is
    complete, on a thread: the loop never blocks on a device."""
    await in_thread(ready.synchronize)
