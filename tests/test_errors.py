"""Failures: one PipelineError naming the component and the frame, and everything cleaned up."""
from __future__ import annotations

import asyncio
import contextlib
import gc

import pytest
import torch
from torch import nn

import partime_async as pa
from partime_async.sinks import CallbackSink, Collect
from partime_async.sources import from_async_iterable, from_iterable
from pa_helpers import FailOn, Sleep, assert_clean, assert_outputs, mark_of, marked, partime_threads, run_stream


class ClosingCollect(Collect):
    """A Collect that counts open() and close() calls."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.opened = 0
        self.closed = 0

    async def open(self):
        self.opened += 1

    async def close(self):
        self.closed += 1


def failing_model(n_stages: int, fail_stage: int, *marks: int, slow: bool = False) -> list[nn.Module]:
    layers: list[nn.Module] = [Sleep(0.0005) if slow else nn.Identity() for _ in range(n_stages)]
    layers[fail_stage] = FailOn(*marks)
    return layers


STAGE_CASES = [(n, s) for n in (1, 2, 3) for s in range(n)]


# -- a stage fails ---------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 3])
@pytest.mark.parametrize("inline", [True, False], ids=["inline", "thread"])
@pytest.mark.parametrize("n_stages, fail_stage", STAGE_CASES)
async def test_stage_failure_in_stream(n_stages, fail_stage, inline, k):
    xs = [marked(i) for i in range(8)]
    pipe = pa.Pipeline(failing_model(n_stages, fail_stage, k, slow=True),
                       devices=pa.cpu_devices(n_stages, inline=inline), balance=[1] * n_stages)
    seen = []
    raised_by_iteration = None
    with pytest.raises(pa.PipelineError) as info:
        async with pipe:
            try:
                async for frame in pipe.stream(xs):
                    seen.append(frame.seq)
            except pa.PipelineError as e:
                raised_by_iteration = e
                raise
    error = info.value
    assert raised_by_iteration is error  # the reader of stream() gets it, not only __aexit__
    assert error.component.startswith(f"stage {fail_stage}")
    assert error.seq == k
    assert f"frame {k}" in str(error)
    assert isinstance(error.__cause__, ValueError) and str(error.__cause__) == f"bad frame {k}"
    assert seen == list(range(len(seen))) and len(seen) <= k
    assert not pipe.running
    await assert_clean()


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "thread"])
@pytest.mark.parametrize("n_stages, fail_stage", STAGE_CASES)
async def test_stage_failure_in_run(n_stages, fail_stage, inline):
    k = 4
    sink, other = ClosingCollect(), ClosingCollect(policy="latest")
    pipe = pa.Pipeline(failing_model(n_stages, fail_stage, k), devices=pa.cpu_devices(n_stages, inline=inline),
                       balance=[1] * n_stages)
    with pytest.raises(pa.PipelineError) as info:
        await pa.run([marked(i) for i in range(10)] >> pipe >> [sink, other])
    assert info.value.component.startswith(f"stage {fail_stage}")
    assert info.value.seq == k
    assert [f.seq for f in sink.frames] == list(range(len(sink.frames)))
    assert all(f.seq < k for f in sink.frames)
    assert (sink.opened, sink.closed) == (1, 1) and (other.opened, other.closed) == (1, 1)
    await assert_clean()


@pytest.mark.parametrize("balance, inline", [("time", False), ([1, 1], "auto")])
async def test_stage_failure_on_the_first_frame_names_the_stage(balance, inline):
    pipe = pa.Pipeline([nn.Identity(), FailOn(0)], devices=pa.cpu_devices(2, inline=inline), balance=balance)
    with pytest.raises(pa.PipelineError) as info:
        await run_stream(pipe, [marked(i) for i in range(3)])
    assert info.value.seq == 0
    assert isinstance(info.value.__cause__, ValueError)
    assert "stage" in info.value.component or "layer" in info.value.component


async def test_stage_failure_on_the_first_frame_while_profiling_still_names_the_frame():
    pipe = pa.Pipeline([nn.Identity(), FailOn(0)], devices=pa.cpu_devices(2), balance="time")
    with pytest.raises(pa.PipelineError) as info:
        await run_stream(pipe, [marked(i) for i in range(3)])
    assert info.value.seq == 0
    assert isinstance(info.value.__cause__, ValueError)
    await assert_clean()


async def test_stage_failure_reaches_every_waiting_submitter():
    pipe = pa.Pipeline([Sleep(0.001), FailOn(3)], devices=pa.cpu_devices(2, inline=False), balance=[1, 1])
    await pipe.start()
    results = await asyncio.wait_for(
        asyncio.gather(*[pipe.submit(marked(i)) for i in range(8)], return_exceptions=True), 20)
    with pytest.raises(pa.PipelineError) as info:  # stop() reports the failure (once)
        await pipe.stop()
    assert info.value.seq == 3
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors, "the failing frame must fail"
    assert all(isinstance(e, (pa.PipelineError, pa.PipelineClosed)) for e in errors)
    failing = results[3]
    assert isinstance(failing, pa.PipelineError) and failing.seq == 3 and failing.component.startswith("stage 1")
    for i, r in enumerate(results):
        if isinstance(r, torch.Tensor):
            assert mark_of(r) == i
    await assert_clean()


# -- on_error="skip" -------------------------------------------------------------------------------
@pytest.mark.parametrize("inline", [True, False], ids=["inline", "thread"])
@pytest.mark.parametrize("n_stages, fail_stage", STAGE_CASES)
async def test_skip_stage_failures(n_stages, fail_stage, inline):
    n = 9
    bad = [1, 4, 8]
    xs = [marked(i) for i in range(n)]
    pipe = pa.Pipeline(failing_model(n_stages, fail_stage, *bad), devices=pa.cpu_devices(n_stages, inline=inline),
                       balance=[1] * n_stages, on_error="skip")
    frames = await run_stream(pipe, xs)
    good = [i for i in range(n) if i not in bad]
    assert_outputs(frames, [xs[i] for i in good], seqs=good)
    stats = pipe.stats()
    assert stats.stages[fail_stage].skipped == len(bad)
    assert list(stats.stages[fail_stage].skipped_seqs) == bad
    assert all(s.skipped == 0 for k, s in enumerate(stats.stages) if k != fail_stage)
    assert stats.delivered == len(good)
    assert stats.skipped == len(bad)
    assert stats.admitted == stats.delivered + sum(s.skipped for s in stats.stages)
    await assert_clean()


async def test_skip_stage_failure_raises_to_that_submitter_only():
    pipe = pa.Pipeline([nn.Identity(), FailOn(2)], devices=pa.cpu_devices(2, inline=False), balance=[1, 1],
                       on_error="skip")
    xs = [marked(i) for i in range(5)]
    async with pipe:
        results = await asyncio.gather(*[pipe.submit(x) for x in xs], return_exceptions=True)
        after = await pipe.submit(marked(7))
    assert isinstance(results[2], pa.PipelineError) and results[2].component.startswith("stage 1")
    assert isinstance(results[2].__cause__, ValueError)
    assert all(torch.equal(r, x) for i, (r, x) in enumerate(zip(results, xs)) if i != 2)
    assert mark_of(after) == 7
    assert pipe.stats().stages[1].skipped == 1


@pytest.mark.parametrize("balance", ["time", [1, 1]])
async def test_skip_applies_to_the_first_frame_too(balance):
    """The first frame is the one the model is split on (profiled, stages timed): when the
    model fails on it, on_error="skip" skips it like any other, and the next frame splits."""
    pipe = pa.Pipeline([nn.Identity(), FailOn(0, 1)], devices=pa.cpu_devices(2), balance=balance, on_error="skip")
    xs = [marked(i) for i in range(6)]
    out = await run_stream(pipe, xs)
    assert [f.seq for f in out] == [2, 3, 4, 5]
    assert all(torch.equal(f.data, xs[f.seq]) for f in out)
    stats = pipe.stats()
    assert stats.skipped_input == 2 and stats.skipped == 2 and stats.delivered == 4
    async with pipe:  # submit: the error goes to that caller only
        with pytest.raises(pa.PipelineError, match="on its first frame") as failed:
            await pipe.submit(marked(1))
        assert isinstance(failed.value.__cause__, ValueError)
        assert mark_of(await pipe.submit(marked(9))) == 9
    await assert_clean()


# -- a source fails ---------------------------------------------------------------------------------
class CameraUnplugged(OSError):
    pass


def failing_generator(k: int, error: Exception):
    for i in range(10):
        if i == k:
            raise error
        yield marked(i)


async def failing_async_generator(k: int, error: Exception):
    for i in range(10):
        await asyncio.sleep(0)
        if i == k:
            raise error
        yield marked(i)


SOURCES = {
    "generator": lambda k, e: failing_generator(k, e),
    "async generator": lambda k, e: failing_async_generator(k, e),
    "named": lambda k, e: from_iterable(failing_generator(k, e), name="camera"),
    "named async": lambda k, e: from_async_iterable(failing_async_generator(k, e), name="camera"),
}


@pytest.mark.parametrize("k", [0, 4])
@pytest.mark.parametrize("kind", list(SOURCES))
async def test_source_failure_in_stream(kind, k):
    error = CameraUnplugged("unplugged")
    pipe = pa.Pipeline([nn.Identity(), Sleep(0.0005)], devices=pa.cpu_devices(2, inline=False), balance=[1, 1])
    seen = []
    with pytest.raises(pa.PipelineError) as info:
        async with pipe:
            async for frame in pipe.stream(SOURCES[kind](k, error)):
                seen.append(frame.seq)
    assert info.value.component.startswith("source")
    if kind.startswith("named"):
        assert info.value.component == "source camera"
    assert info.value.seq == k
    assert info.value.__cause__ is error
    assert seen == list(range(len(seen))) and len(seen) <= k
    await assert_clean()


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "thread"])
async def test_source_failure_in_run(inline):
    error = CameraUnplugged("unplugged")
    sink = ClosingCollect()
    pipe = pa.Pipeline([nn.Identity(), nn.Identity()], devices=pa.cpu_devices(2, inline=inline), balance=[1, 1])
    with pytest.raises(pa.PipelineError) as info:
        await pa.run(from_iterable(failing_generator(5, error), name="camera") >> pipe >> sink)
    assert info.value.component == "source camera"
    assert info.value.seq == 5
    assert isinstance(error, CameraUnplugged)
    assert sink.closed == 1
    await assert_clean()


async def test_a_source_that_is_not_iterable_is_refused_to_its_caller_alone():
    """``stream(tensor)`` raises at once, to that caller: the pipeline others use goes on."""
    pipe = pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1))
    async with pipe:
        with pytest.raises(TypeError, match="source must be an iterable.*pipe.submit"):
            pipe.stream(torch.zeros(3))
        assert torch.equal(await pipe.submit(torch.ones(3)), torch.ones(3))
    await assert_clean()


async def test_a_cancelled_error_raised_by_the_source_itself_fails_the_run():
    """A source that raises CancelledError of its own (not a cancellation of the run) must
    not pass for the end of the stream."""
    async def source():
        for i in range(10):
            if i == 5:
                raise asyncio.CancelledError("a future the source awaited was cancelled")
            yield marked(i)

    pipe = pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1))
    with pytest.raises(pa.PipelineError, match="CancelledError raised by the source") as info:
        await pa.run(source() >> pipe >> Collect())
    assert info.value.component.startswith("source") and info.value.seq == 5
    await assert_clean()


async def test_a_cancelled_error_raised_by_a_sink_itself_fails_the_run_instead_of_hanging():
    async def write(frame: pa.Frame) -> None:
        if frame.seq == 3:
            raise asyncio.CancelledError("an upload the sink awaited was cancelled")

    pipe = pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1))
    run = pa.run(from_iterable(marked(i) for i in range(20)) >> pipe >> CallbackSink(write, capacity=1, name="up"))
    with pytest.raises(pa.PipelineError, match="CancelledError raised by the sink") as info:
        await asyncio.wait_for(run, 60)  # a guard: before, the run waited for this sink forever
    assert info.value.component == "sink up" and info.value.seq == 3
    await assert_clean()


class _CloseFails(Collect):
    def __init__(self, *, fail_write_at: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fail_write_at = fail_write_at

    async def write(self, frame: pa.Frame) -> None:
        if frame.seq == self.fail_write_at:
            raise ValueError(f"server rejected frame {frame.seq}")
        await super().write(frame)

    async def close(self) -> None:
        raise ConnectionError("flush to server failed")


async def test_a_sink_whose_close_fails_is_named_and_does_not_hide_an_earlier_failure():
    pipe = pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1))
    with pytest.raises(pa.PipelineError, match=r"ConnectionError while closing") as info:
        await pa.run(from_iterable(marked(i) for i in range(5)) >> pipe >> _CloseFails(name="uploader"))
    assert info.value.component == "sink uploader" and isinstance(info.value.__cause__, ConnectionError)

    pipe = pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1))
    with pytest.raises(pa.PipelineError, match="server rejected frame 3") as info:
        await pa.run(from_iterable(marked(i) for i in range(5)) >> pipe >> _CloseFails(fail_write_at=3, name="uploader"))
    assert info.value.component == "sink uploader" and info.value.seq == 3
    assert any("ConnectionError while closing" in note for note in info.value.__notes__)
    await assert_clean()


async def test_submit_waiting_for_room_when_the_pipeline_stops_gets_pipeline_closed(caplog):
    """A caller waiting for room in the ingress when stop() closes it gets PipelineClosed
    (not the channel's internal error), and no future is left with an unretrieved error."""
    pipe = pa.Pipeline([Sleep(0.01)], devices=pa.cpu_devices(1, inline=False), capacity=1)
    for stop in (pipe.stop, pipe.cancel):
        await pipe.start(marked(0))  # split now: the callers below wait for room in the ingress
        calls = [asyncio.create_task(pipe.submit(marked(i))) for i in range(12)]
        await asyncio.sleep(0.02)
        await stop()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        assert errors and all(isinstance(e, pa.PipelineClosed) for e in errors), errors
        assert len(errors) + sum(isinstance(o, torch.Tensor) for o in outcomes) == 12
    del calls, outcomes, errors
    gc.collect()  # an unretrieved future exception is logged when the future is freed
    assert "never retrieved" not in caplog.text
    await assert_clean()


# -- a sink fails -----------------------------------------------------------------------------------
@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("k", [0, 5])
async def test_sink_failure(k, use_async):
    original = RuntimeError("disk full")

    def write(frame):
        if frame.seq == k:
            raise original

    async def awrite(frame):
        await asyncio.sleep(0)
        write(frame)

    class Failing(CallbackSink):
        closed = 0

        async def close(self):
            Failing.closed += 1

    failing = Failing(awrite if use_async else write, name="writer")
    other = ClosingCollect()
    pipe = pa.Pipeline([nn.Identity(), nn.Identity()], devices=pa.cpu_devices(2, inline=False), balance=[1, 1])
    with pytest.raises(pa.PipelineError) as info:
        await pa.run([marked(i) for i in range(20)] >> pipe >> [other, failing])
    assert info.value.component == "sink writer"
    assert info.value.component.startswith("sink")
    assert info.value.seq == k
    assert "disk full" in str(info.value)
    assert failing.written == k
    assert Failing.closed == 1 and other.closed == 1
    await assert_clean()


async def test_sink_open_failure():
    class Unopenable(Collect):
        name = "db"

        async def open(self):
            raise ConnectionError("no database")

    with pytest.raises(pa.PipelineError) as info:
        await pa.run([torch.zeros(2)] * 3 >> pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1)) >> Unopenable())
    assert info.value.component == "sink db"
    assert "no database" in str(info.value)
    await assert_clean()


def _boom_source():
    yield marked(0)
    raise CameraUnplugged("unplugged")


async def _boom_sink(frame):
    raise RuntimeError("disk full")


@pytest.mark.parametrize("where", ["stage", "source", "sink"])
async def test_run_keeps_the_original_exception_as_cause(where):
    stage = FailOn(1) if where == "stage" else nn.Identity()
    source = _boom_source() if where == "source" else [marked(i) for i in range(3)]
    sink = CallbackSink(_boom_sink) if where == "sink" else Collect()
    pipe = pa.Pipeline([stage], devices=pa.cpu_devices(1, inline=False), balance=[1])
    with pytest.raises(pa.PipelineError) as info:
        await pa.run(source >> pipe >> sink)
    assert info.value.component.startswith(where)
    assert isinstance(info.value.__cause__, (ValueError, CameraUnplugged, RuntimeError))


# -- cancellation from outside ----------------------------------------------------------------------
async def endless_source(delay: float = 0.0):
    i = 0
    while True:
        await asyncio.sleep(delay)
        yield marked(i)
        i += 1


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "thread"])
async def test_cancelling_run_mid_stream(inline):
    got_some = asyncio.Event()
    seen = []

    def on_frame(frame):
        seen.append(frame.seq)
        if len(seen) >= 3:
            got_some.set()

    sink = CallbackSink(on_frame)
    other = ClosingCollect()
    pipe = pa.Pipeline([Sleep(0.0005), nn.Identity()], devices=pa.cpu_devices(2, inline=inline), balance=[1, 1])
    task = asyncio.create_task(pa.run(endless_source() >> pipe >> [sink, other]))
    await asyncio.wait_for(got_some.wait(), 20)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert other.closed == 1
    assert seen == list(range(len(seen)))
    assert not pipe.running
    await assert_clean()


async def test_cancelling_a_stream_reader():
    pipe = pa.Pipeline([Sleep(0.0005), nn.Identity()], devices=pa.cpu_devices(2, inline=False), balance=[1, 1])
    started = asyncio.Event()

    async def reader():
        async with pipe:
            async for frame in pipe.stream(endless_source()):
                started.set()

    task = asyncio.create_task(reader())
    await asyncio.wait_for(started.wait(), 20)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not pipe.running
    await assert_clean()


# -- a stopped pipeline -----------------------------------------------------------------------------
async def test_submit_after_stop_raises_pipeline_closed():
    pipe = pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1))
    with pytest.raises(pa.PipelineClosed):
        await pipe.submit(torch.zeros(2))  # never started
    async with pipe:
        assert torch.equal(await pipe.submit(torch.ones(2)), torch.ones(2))
    with pytest.raises(pa.PipelineClosed):
        await pipe.submit(torch.zeros(2))
    with pytest.raises(pa.PipelineClosed):
        async for _ in pipe.stream([torch.zeros(2)]):
            pass


async def test_submit_after_a_failure_raises_pipeline_closed():
    pipe = pa.Pipeline([FailOn(1)], devices=pa.cpu_devices(1, inline=False), balance=[1])
    with pytest.raises(pa.PipelineError):
        await run_stream(pipe, [marked(i) for i in range(3)])
    with pytest.raises(pa.PipelineClosed):
        await pipe.submit(marked(5))
    assert partime_threads() == []


async def test_stop_reraises_a_failure_once():
    pipe = pa.Pipeline([FailOn(0)], devices=pa.cpu_devices(1, inline=False), balance=[1])
    await pipe.start()
    with pytest.raises(pa.PipelineError):
        await pipe.submit(marked(0))
    with pytest.raises(pa.PipelineError) as info:
        await pipe.stop()
    assert info.value.seq == 0
    await pipe.stop()  # the error was reported; stopping again is a no-op
    await assert_clean()


async def test_a_cancelled_submitter_does_not_disturb_the_pipeline():
    pipe = pa.Pipeline([Sleep(0.01), nn.Identity()], devices=pa.cpu_devices(2, inline=False), balance=[1, 1])
    async with pipe:
        task = asyncio.create_task(pipe.submit(marked(0)))
        await asyncio.sleep(0.002)  # in flight
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert mark_of(await pipe.submit(marked(1))) == 1
    await assert_clean()


async def test_an_error_in_the_readers_own_code_propagates_unchanged():
    pipe = pa.Pipeline([Sleep(0.0005), nn.Identity()], devices=pa.cpu_devices(2, inline=False), balance=[1, 1])
    with pytest.raises(KeyError, match="user code"):
        async with pipe:
            async for frame in pipe.stream([marked(i) for i in range(20)]):
                if frame.seq == 2:
                    raise KeyError("user code")
    assert not pipe.running
    await assert_clean()


async def test_skip_when_every_frame_fails_ends_the_stream():
    pipe = pa.Pipeline([FailOn(0, 1, 2)], devices=pa.cpu_devices(1, inline=False), balance=[1], on_error="skip")
    assert await run_stream(pipe, [marked(i) for i in range(3)]) == []
    assert pipe.stats().stages[0].skipped == 3 and pipe.stats().delivered == 0


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "thread"])
@pytest.mark.parametrize("k", [0, 2])
async def test_stream_iteration_raises_when_the_source_fails(k, inline):
    error = CameraUnplugged("unplugged")
    read = asyncio.Event()

    async def source():
        for i in range(5):
            if i == k:
                await asyncio.wait_for(read.wait(), 10)  # the reader has caught up
                raise error
            yield marked(i)

    pipe = pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1, inline=inline), balance=[1])
    await pipe.start()
    seen = []
    try:
        with pytest.raises(pa.PipelineError) as info:
            async for frame in pipe.stream(source()) if k else pipe.stream(failing_generator(0, error)):
                seen.append(frame.seq)
                if frame.seq == k - 1:
                    read.set()
        assert info.value.component.startswith("source") and info.value.seq == k
    finally:
        with contextlib.suppress(pa.PipelineError):
            await pipe.stop()
    assert seen == list(range(k))


async def test_start_with_a_sample_that_is_not_a_payload_says_what_a_payload_is():
    pipe = pa.Pipeline([nn.Conv2d(3, 3, 1)], devices=pa.cpu_devices(1))
    with pytest.raises(pa.FrameError, match="payload is a str, not a tensor; convert it with torch.as_tensor"):
        await pipe.start("not a tensor")
    assert not pipe.running
    await assert_clean()


@pytest.mark.parametrize("method, words", [("open", r"CancelledError raised by the sink itself \(not a cancel"),
                                           ("close", "CancelledError raised by the sink itself while closing")])
async def test_a_cancelled_error_raised_by_a_sinks_open_or_close_itself_is_a_failure_of_that_sink(method, words):
    """Not a cancellation of the graph: the sink's own (something it awaited was cancelled).
    An open() that raised it left the graph waiting for the sink to open, for ever."""
    async def cancelled(self) -> None:
        raise asyncio.CancelledError(f"something the sink's {method}() awaited was cancelled")

    sink = type("Own", (Collect,), {method: cancelled})(name="own")
    pipe = pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1))
    with pytest.raises(pa.PipelineError, match=words) as info:
        await asyncio.wait_for(pa.run(from_iterable(marked(i) for i in range(3)) >> pipe >> sink), 60)
    assert info.value.component == "sink own" and info.value.seq is None
    assert asyncio.current_task().cancelling() == 0
    await assert_clean()
