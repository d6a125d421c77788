"""The worker-thread chain: consecutive threaded CPU stages hand each frame from worker thread
to worker thread, without the event loop.

Contract (who runs what, where it goes, how it stops, what happens to an exception):

* :meth:`ThreadChain.submit` is called on the loop thread, once per frame, in frame order. It
  queues the frame's first step on the first stage's worker (``device.post``) and returns a
  future of the loop.
* Each worker runs its stage's step on the frame and queues the next step onto the next
  stage's worker; only the last one tells the loop, through the future (batched: see
  :meth:`~partime_async.devices.cpu.CpuDevice.notify`). In steady state no stage pays a
  loop round trip per frame, and the loop thread, which shares the cores with the workers,
  stays idle. Order is kept by the FIFO worker queues.
* A step that raises ends the frame's way: its future fails with
  :class:`~partime_async.core.errors.StageFailed` naming the stage, and the runner applies
  that stage's error rule. A worker that is gone (stopped, or died) fails the futures of
  the frames it held (:class:`~partime_async.devices.cpu.WorkerDied`); a step whose next
  worker is gone fails its frame with ``StageFailed`` for that next stage. Nothing waits
  forever, and a worker thread never dies of a frame's error.
* It holds no thread of its own: the devices own the workers and stop them when the
  pipeline closes them.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.errors import StageFailed
from ..core.frame import Payload
from ..core.stats import StageStats
from ..devices import Device, Work


@dataclass(frozen=True)
class Step:
    """One stage of a chain: its device (``chainable``: it has a worker thread that takes
    ``post``), its work ``work(x, seq)``, its statistics."""

    worker: Device
    work: Work
    stats: StageStats


class ThreadChain:
    """Runs a frame through ``steps`` on their workers in turn; see the module docstring."""

    def __init__(self, steps: Sequence[Step]) -> None:
        self.steps = tuple(steps)
        self._loop = asyncio.get_running_loop()

    def submit(self, payload: Payload, ready: Any, *, seq: int) -> asyncio.Future[tuple[Payload, None]]:
        """The output of the last step for ``payload`` (frame ``seq``, complete on its device
        once ``ready`` is), as a future of the loop that gives ``(output, None)``, as a
        device's ticket does (a host result needs no ready event). Raises
        :class:`~partime_async.devices.cpu.WorkerDied` if the first worker is gone."""
        future = self._loop.create_future()
        self.steps[0].worker.post(self._task(0, seq, payload, future, ready), future, seq)
        return future

    def _task(self, k: int, seq: int, x: Payload, future: asyncio.Future[Any], ready: Any = None) -> Callable[[], None]:
        step = self.steps[k]
        last = k == len(self.steps) - 1

        def task() -> None:  # runs on stage k's worker thread
            worker = step.worker
            try:
                y = step.work(worker.host_input(x, ready) if k == 0 else x, seq)
            except BaseException as exc:
                worker.notify(future, None, StageFailed(k, exc))
                return
            step.stats.frames += 1
            if last:
                worker.notify(future, (y, None), None)
                return
            try:
                self.steps[k + 1].worker.post(self._task(k + 1, seq, y, future), future, seq)
            except RuntimeError as exc:  # the next worker is gone (or stopping): the frame fails, not this thread
                worker.notify(future, None, StageFailed(k + 1, exc))

        return task
