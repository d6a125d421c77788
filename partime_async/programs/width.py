"""A width-split stage: the K blocks of a :func:`~partime_async.width.repurpose` plan on K workers.

The stage's module is (a run of layers of) :attr:`WidthPlan.model
<partime_async.width.WidthPlan.model>`: :class:`~partime_async.width.SplitLinear` /
:class:`~partime_async.width.SplitConv2d` layers with elementwise (or, after a ``Conv2d``,
per-channel) modules between them. :class:`WidthProgram` runs worker ``w``'s block of every
split layer on worker ``w``: today a CPU thread that the program owns (started in
:meth:`~WidthProgram.attach`, joined in :meth:`~WidthProgram.detach`, each with its own
intra-op thread count). Per frame, in the stage's own :attr:`forward` (on the stage's device
thread):

1. the modules before the first split layer run on the device thread, and the result is
   handed to every worker (the input is broadcast: the first layer reads all of it);
2. each worker computes its block of each split layer from its own activations plus the
   kept cross activations it receives, applies the modules that follow the layer to its own
   slice, and publishes the result; a worker waits only for the workers it receives from
   (with a budget of 0 the blocks never wait for each other);
3. the device thread gathers the workers' last outputs (in the original order, when the
   stage ends with the plan's last layer) and runs the modules after the last split layer.

Only the kept cross activations are read from another worker: their number (scalars, batch
and positions included) is added to ``stats.counters["exchanged_activations"]``, and
``stats.counters["exchanges"]`` counts the (layer, sender, receiver) transfers that carried
them. The whole forward is timed as :class:`~partime_async.programs.infer.InferProgram`
times its stage (busy time, one ``compute`` span per frame, output checks).

Workers on other devices (a GPU each, or ranks) fit the same shape: a worker's block, its
inbox of received activations and its published outputs are all it touches; the ``devices``
argument is where they will be named. Only CPU workers are implemented.
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.frame import Payload
from ..core.stats import StageStats
from ..partition import StagePlan
from ..width import CHANNELWISE, ELEMENTWISE, SplitLayer
from .base import StageProgram, calls, timed_inference

_STOP = object()


class _Frame:
    """One frame in flight through the workers: what they publish, and how it ended."""

    __slots__ = ("x", "outputs", "error", "remaining", "lock", "finished", "received", "transfers")

    def __init__(self, x: torch.Tensor, workers: int) -> None:
        self.x = x
        self.outputs: list[torch.Tensor | None] = [None] * workers
        self.error: BaseException | None = None
        self.remaining = workers
        self.lock = threading.Lock()
        self.finished = threading.Event()
        self.received = 0
        self.transfers = 0


class WidthProgram(StageProgram):
    """Runs a width-split stage on K worker threads (see the module docstring).

    Args:
        plan: the stage's plan; its module holds split layers of one
            :func:`~partime_async.width.repurpose` plan (all with the same K).
        stats: the stage's counters: busy time, and ``counters["exchanged_activations"]`` /
            ``counters["exchanges"]``.
        spans: the run's span ring (None: metrics off).
        check_outputs: check each output against the first one's structure.
        threads: intra-op threads of each worker (default 1).
        devices: where each worker runs: None (CPU threads; the only kind today).
    """

    def __init__(self, plan: StagePlan, stats: StageStats, *, spans: deque[Any] | None = None,
                 check_outputs: bool = True, threads: int = 1, devices: Sequence[torch.device] | None = None) -> None:
        super().__init__(plan)
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an int >= 1, got {threads!r}")
        if not plan.device.on_host:
            raise ValueError(f"{plan.name}: a width-split stage runs on CPU workers today, not on {plan.device.name}")
        layers = calls(plan.module)
        where = [i for i, m in enumerate(layers) if isinstance(m, SplitLayer)]
        if not where:
            raise ValueError(f"{plan.name}: the stage holds no SplitLinear/SplitConv2d layer (make its model with "
                             "partime_async.width.repurpose)")
        split = [m for m in layers if isinstance(m, SplitLayer)]
        k = split[0].workers
        if any(layer.workers != k for layer in split):
            raise ValueError(f"{plan.name}: the split layers disagree on the number of workers")
        if devices is not None:
            devices = [torch.device(d) for d in devices]
            if len(devices) != k or any(d.type != "cpu" for d in devices):
                raise ValueError(f"devices must name {k} CPU devices (workers on GPUs are not implemented yet)")
        head, tail = layers[:where[0]], layers[where[-1] + 1:]
        after: list[tuple[nn.Module, ...]] = []
        for n, i in enumerate(where[:-1]):
            between = layers[i + 1:where[n + 1]]
            for module in between:
                if not isinstance(module, ELEMENTWISE + CHANNELWISE + (nn.Flatten,)):
                    raise ValueError(f"{plan.name}: {type(module).__name__} between two split layers does not act "
                                     "on each worker's activations alone")
            after.append(tuple(between))
        after.append(())
        self.workers = k
        self.threads = threads
        self.split = split
        # What worker w receives from whom before each split layer (none before the first
        # when it reads the broadcast input).
        self._sources = [[layer.sources(w) for w in range(k)] for layer in split]
        self._queues: list[queue.SimpleQueue[Any]] = []
        self._threads: list[threading.Thread] = []
        self._events = [[threading.Event() for _ in range(k)] for _ in split]
        self._published: list[list[torch.Tensor | None]] = [[None] * k for _ in split]
        counters = stats.counters
        counters.setdefault("exchanged_activations", 0.0)
        counters.setdefault("exchanges", 0.0)
        last = split[-1]
        dim = last.dim
        events, program = self._events, self
        self._after = after
        one_at_a_time = threading.Lock()  # the workers' per-layer events serve one frame at a time

        def run(x: Payload, seq: int) -> Payload:
            for module in head:
                x = module(x)
            frame = _Frame(x, k)
            with one_at_a_time:
                for row in events:
                    for event in row:
                        event.clear()
                # The workers this frame went to: if the run detaches them meanwhile (it
                # ended with frames still queued here), they leave and the wait ends.
                threads, inboxes = program._running()
                for inbox in inboxes:
                    inbox.put(frame)
                while not frame.finished.wait(1.0):
                    program._check_alive(threads)
            if frame.error is not None:
                raise frame.error
            y = torch.cat(frame.outputs, dim)  # type: ignore[arg-type]
            if last.order is not None:
                y = y.index_select(dim, last.order)
            for module in tail:
                y = module(y)
            counters["exchanged_activations"] += frame.received
            counters["exchanges"] += frame.transfers
            return y

        self.forward = timed_inference(plan, stats, spans, check_outputs, run)

    # -- the workers ---------------------------------------------------------------------------
    def attach(self) -> None:
        """Start the K worker threads (the run starts)."""
        if self._threads:
            return
        self._queues = [queue.SimpleQueue() for _ in range(self.workers)]
        self._threads = [threading.Thread(target=self._work, args=(w, self._queues[w]), daemon=True,
                                          name=f"partime-{self.plan.name}-width-{w}") for w in range(self.workers)]
        for thread in self._threads:
            thread.start()

    def detach(self) -> None:
        """Stop and join the worker threads (the run has ended)."""
        threads, self._threads = self._threads, []
        for q in self._queues:
            q.put(_STOP)
        for row in self._events:  # a worker still waiting for a peer that left (never in a good run)
            for event in row:
                event.set()
        for thread in threads:
            thread.join()
        self._queues = []

    def _running(self) -> tuple[list[threading.Thread], list[queue.SimpleQueue[Any]]]:
        threads, queues = self._threads, self._queues  # detach() replaces both lists, never changes them
        if not threads:
            raise RuntimeError(f"{self.plan.name}: the width-split stage is not attached (its workers are not running)")
        return threads, queues

    def _check_alive(self, threads: list[threading.Thread]) -> None:
        dead = [t.name for t in threads if not t.is_alive()]
        if dead:
            raise RuntimeError(f"{self.plan.name}: width worker thread(s) {', '.join(dead)} left")

    def _work(self, w: int, inbox: queue.SimpleQueue[Any]) -> None:
        torch.get_num_threads()  # see CpuDevice._work: fix this thread's count after ATen's lazy default
        torch.set_num_threads(self.threads)
        torch.set_grad_enabled(False)
        while (frame := inbox.get()) is not _STOP:
            try:
                self._run(w, frame)
            except BaseException as exc:  # delivered to the device thread, never lost here
                with frame.lock:
                    if frame.error is None:
                        frame.error = exc
                for row in self._events:  # nobody waits for this worker any more
                    row[w].set()
            finally:
                with frame.lock:
                    frame.remaining -= 1
                    done = frame.remaining == 0
                if done:
                    frame.finished.set()

    def _run(self, w: int, frame: _Frame) -> None:
        split, sources, after, events, published = self.split, self._sources, self._after, self._events, self._published
        x = frame.x
        h = x
        received_total = transfers = 0
        for n, layer in enumerate(split):
            received = None
            if n == 0:
                if layer.broadcast:
                    own = x
                else:  # a stage that starts inside the plan: the whole input is here
                    start, stop = layer.in_range(w)
                    own = x.narrow(layer.dim, start, stop - start)
                    index = layer.cross_index(w)
                    if index.numel():
                        received = x.index_select(layer.dim, index)
                        transfers += len(sources[n][w])
            else:
                own = h
                parts = []
                for s, positions in sources[n][w]:
                    events[n - 1][s].wait()
                    if frame.error is not None:
                        return
                    given = published[n - 1][s]
                    assert given is not None  # published before its event was set
                    parts.append(given.index_select(layer.dim, positions))
                if parts:
                    received = parts[0] if len(parts) == 1 else torch.cat(parts, layer.dim)
                    transfers += len(parts)
            if received is not None:
                received_total += received.numel()
            h = layer.block(w, own, received)
            for module in after[n]:
                h = module(h)
            if n + 1 < len(split):
                published[n][w] = h
                events[n][w].set()
        frame.outputs[w] = h
        with frame.lock:
            frame.received += received_total
            frame.transfers += transfers
