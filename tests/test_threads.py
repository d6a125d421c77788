"""Threads and the loop: batched notices, and the CUDA devices' event waiter (with stand-in
events, so it runs here; tests/gpu runs it with real ones)."""
import asyncio
import threading
import time

import pytest

from partime_async.devices import CudaDevice, EventWaiter
from partime_async.aio.threads import LoopNotifier, to_the_end


class FakeEvent:
    """Stands in for a CUDA event: ``synchronize()`` blocks until ``complete()``."""

    def __init__(self, error: BaseException | None = None) -> None:
        self._done = threading.Event()
        self.error = error

    def complete(self) -> None:
        self._done.set()

    def synchronize(self) -> None:
        self._done.wait()
        if self.error is not None:
            raise self.error


async def test_notifier_wakes_the_loop_once_per_batch():
    loop = asyncio.get_running_loop()
    notifier = LoopNotifier(loop)
    wakeups = []
    original = loop.call_soon_threadsafe

    def counting(callback, *args):
        wakeups.append(callback)
        return original(callback, *args)

    loop.call_soon_threadsafe = counting
    try:
        futures = [loop.create_future() for _ in range(100)]
        # The loop does not run while the thread notifies: every result joins one batch.
        thread = threading.Thread(target=lambda: [notifier.notify(f, i, None) for i, f in enumerate(futures)])
        thread.start()
        thread.join()
        assert await asyncio.gather(*futures) == list(range(100))
        assert len(wakeups) == 1
        failed = loop.create_future()
        notifier.notify(failed, None, ValueError("boom"))
        with pytest.raises(ValueError, match="boom"):
            await failed
        assert len(wakeups) == 2
    finally:
        del loop.call_soon_threadsafe


async def test_event_waiter_resolves_in_order_and_keeps_the_loop_free():
    waiter = EventWaiter("partime-test-waiter")
    waiter.start(LoopNotifier(asyncio.get_running_loop()))
    try:
        events = [FakeEvent() for _ in range(5)]
        futures = [waiter.watch(e) for e in events]
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)  # the waiter is blocked in the first event: the loop goes on
        assert ticks > 5 and not any(f.done() for f in futures)
        for e in events[:3]:
            e.complete()
        await asyncio.wait_for(asyncio.gather(*futures[:3]), 5)
        assert not futures[3].done()
        events[4].complete()  # complete out of order: the FIFO waits for event 3 first
        await asyncio.sleep(0.05)
        assert not futures[4].done()
        events[3].complete()
        await asyncio.wait_for(asyncio.gather(*futures[3:]), 5)
        task.cancel()
    finally:
        for e in events:
            e.complete()
        waiter.close()


async def test_event_waiter_delivers_errors_and_closes_cleanly():
    waiter = EventWaiter("partime-test-waiter")
    waiter.start(LoopNotifier(asyncio.get_running_loop()))
    bad, good = FakeEvent(RuntimeError("CUDA error: an illegal memory access")), FakeEvent()
    bad_future, good_future = waiter.watch(bad), waiter.watch(good)
    bad.complete()
    good.complete()
    with pytest.raises(RuntimeError, match="illegal memory access"):
        await asyncio.wait_for(bad_future, 5)
    await asyncio.wait_for(good_future, 5)  # the waiter goes on after an error
    t0 = time.perf_counter()
    waiter.close()
    waiter.close()  # idempotent
    assert time.perf_counter() - t0 < 5
    assert not [t for t in threading.enumerate() if t.name == "partime-test-waiter"]
    with pytest.raises(RuntimeError, match="not running"):
        waiter.watch(FakeEvent())


async def test_event_waiter_runs_bookkeeping_on_its_thread_before_the_future_and_close():
    waiter = EventWaiter("partime-test-waiter")
    waiter.start(LoopNotifier(asyncio.get_running_loop()))
    done: list[tuple[str, BaseException | None]] = []
    ok, bad = FakeEvent(), FakeEvent(RuntimeError("sticky"))
    first = waiter.watch(ok, lambda error: done.append((threading.current_thread().name, error)))
    second = waiter.watch(bad, lambda error: done.append((threading.current_thread().name, error)))
    ok.complete()
    bad.complete()
    waiter.close()  # joined: the bookkeeping of every given event has run, even undelivered
    assert [name for name, _ in done] == ["partime-test-waiter"] * 2
    assert done[0][1] is None and str(done[1][1]) == "sticky"
    await asyncio.wait_for(first, 5)
    with pytest.raises(RuntimeError, match="sticky"):
        await asyncio.wait_for(second, 5)


def test_cuda_device_arguments_are_checked_without_a_gpu():
    with pytest.raises(ValueError, match="depth must be a positive int"):
        CudaDevice(0, depth=0)
    with pytest.raises(ValueError, match="needs a cuda device"):
        CudaDevice("cpu")
    with pytest.raises(ValueError, match="graphs must be True or False"):
        CudaDevice(0, graphs="yes")
    device = CudaDevice("cuda:1", depth=5, graphs=True)
    assert (device.depth, device.graphs, device.name) == (5, True, "cuda:1")


async def test_to_the_end_outlasts_repeated_cancellation_then_reraises_it():
    """The awaited work finishes even when its caller is cancelled twice meanwhile; the
    caller then ends with the cancellation; ``on_cancel`` runs once."""
    finished, asked = threading.Event(), []

    def work() -> None:
        time.sleep(0.2)
        finished.set()

    caller = asyncio.ensure_future(to_the_end(asyncio.to_thread(work), on_cancel=lambda: asked.append(1)))
    await asyncio.sleep(0.02)
    caller.cancel()
    await asyncio.sleep(0.02)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert finished.is_set() and asked == [1]
    assert await to_the_end(asyncio.sleep(0, result=7)) == 7


async def test_to_the_end_gives_up_after_its_grace_with_a_warning():
    """Work that hangs after a cancellation is left running once ``grace`` has passed: the
    caller can still be stopped, and says so."""
    release = threading.Event()
    work = asyncio.ensure_future(asyncio.to_thread(release.wait, 5))
    caller = asyncio.ensure_future(to_the_end(work, grace=0.1))
    await asyncio.sleep(0.02)
    caller.cancel()
    t0 = time.perf_counter()
    with pytest.warns(RuntimeWarning, match="still running 0.1 s after its task was cancelled"):
        with pytest.raises(asyncio.CancelledError):
            await caller
    assert time.perf_counter() - t0 < 2
    release.set()
    await work  # (left running by to_the_end: ended here, not leaked into the next test)
