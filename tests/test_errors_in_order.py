"""Errors come in frame order, and nothing vanishes uncounted.

With ``on_error="raise"``, a frame that fails (at the door, in a stage, or because its source
raised) stops admission at once, but every frame before it that can still complete does and is
delivered, then the error is raised; the frames after it are abandoned and counted, so that
``admitted == delivered + discarded + dropped + skipped + abandoned`` always holds.
"""
from __future__ import annotations

import asyncio

import pytest
import torch
from torch import nn

import partime_async as pa
from partime_async.sinks import Collect
from pa_helpers import FailOn, marked

N = 40
POSITIONS = (0, 1, 7, 29)
SHAPES = [(1, True), (2, False), (3, "auto")]  # (stages, inline)


def frames(n: int = N) -> list[torch.Tensor]:
    return [marked(i) for i in range(n)]


def pipeline(n_stages: int, inline: bool | str, *layers: nn.Module, **kwargs) -> pa.Pipeline:
    model = list(layers) + [nn.Identity() for _ in range(n_stages - len(layers))]
    return pa.Pipeline(model, devices=pa.cpu_devices(n_stages, inline=inline, threads=1), balance=[1] * n_stages,
                       **kwargs)


def accounted(stats: pa.PipelineStats) -> bool:
    return stats.admitted == (stats.delivered + stats.discarded + stats.dropped + sum(s.skipped for s in stats.stages)
                              + stats.abandoned)


async def read(pipe: pa.Pipeline, source) -> tuple[list[int], BaseException | None]:
    """The seqs read from ``pipe.stream(source)`` and the error that ended the stream."""
    got: list[int] = []
    try:
        async with pipe:
            async for out in pipe.stream(source):
                got.append(out.seq)
    except pa.PipelineError as exc:
        return got, exc
    return got, None


@pytest.mark.parametrize("n_stages, inline", SHAPES)
@pytest.mark.parametrize("at", POSITIONS)
async def test_a_bad_input_fails_the_stream_after_every_frame_before_it(at, n_stages, inline):
    xs = frames()
    xs[at] = [1, 2, 3]  # not a tensor (a wrong shape would fail too, but not as the first frame, which sets it)
    pipe = pipeline(n_stages, inline)
    got, error = await read(pipe, xs)
    assert got == list(range(at))
    assert isinstance(error, pa.FrameError) and error.seq == at and error.component == "input"
    stats = pipe.stats()
    assert stats.admitted == stats.delivered == at and stats.abandoned == 0 and accounted(stats)


@pytest.mark.parametrize("n_stages, inline", SHAPES)
@pytest.mark.parametrize("at", POSITIONS)
async def test_a_stage_that_fails_fails_the_stream_after_every_frame_before_it(at, n_stages, inline):
    fail_stage = n_stages - 1 if at % 2 else 0
    layers = [FailOn(at) if k == fail_stage else nn.Identity() for k in range(n_stages)]
    pipe = pipeline(n_stages, inline, *layers)
    got, error = await read(pipe, frames())
    assert got == list(range(at))
    assert error.seq == at and error.component == f"stage {fail_stage} (cpu:{fail_stage})"
    assert isinstance(error.__cause__, ValueError)
    stats = pipe.stats()
    assert stats.delivered == at and stats.abandoned == stats.admitted - at and accounted(stats)


@pytest.mark.parametrize("at", POSITIONS)
async def test_a_source_that_fails_fails_the_stream_after_every_frame_before_it(at):
    def source():
        for i in range(N):
            if i == at:
                raise OSError("the camera went away")
            yield marked(i)

    pipe = pipeline(2, False)
    got, error = await read(pipe, source())
    assert got == list(range(at))
    assert error.component.startswith("source") and error.seq == at and isinstance(error.__cause__, OSError)
    assert accounted(pipe.stats()) and pipe.stats().abandoned == 0


@pytest.mark.parametrize("where", ["input", "stage"])
@pytest.mark.parametrize("at", POSITIONS)
async def test_in_a_graph_every_sink_writes_the_frames_before_the_failure(where, at):
    xs = frames()
    if where == "input":
        xs[at] = [1, 2, 3]
    pipe = pipeline(2, False, FailOn(at) if where == "stage" else nn.Identity())
    sinks = [Collect(), Collect(capacity=1)]
    with pytest.raises(pa.PipelineError) as info:
        await pa.run(xs >> pipe >> sinks)
    assert info.value.seq == at
    assert all([f.seq for f in sink.frames] == list(range(at)) for sink in sinks)
    assert accounted(pipe.stats())


async def test_of_two_failures_the_stream_raises_the_one_earliest_in_frame_order():
    """Stage 0 fails on frame 6 before stage 2 (slower) fails on frame 3: the frames before 3
    are delivered, then frame 3's error, which the pipeline reports too."""
    class Slow(nn.Module):
        def forward(self, x):
            import time
            time.sleep(0.003)
            return x

    pipe = pipeline(3, False, FailOn(6), Slow(), FailOn(3))
    got, error = await read(pipe, frames())
    assert got == [0, 1, 2] and error.seq == 3 and error.component == "stage 2 (cpu:2)"
    assert accounted(pipe.stats())


async def test_submits_before_a_failing_one_complete_and_the_rest_learn_why():
    pipe = pipeline(2, False, FailOn(5))
    xs = frames(12)
    with pytest.raises(pa.PipelineError, match="bad frame 5"):  # stop() raises the failure too
        async with pipe:
            results = await asyncio.gather(*(pipe.submit(x) for x in xs), return_exceptions=True)
    assert all(isinstance(r, torch.Tensor) for r in results[:5])
    assert isinstance(results[5], pa.PipelineError) and "bad frame 5" in str(results[5])
    assert all(isinstance(r, (pa.PipelineError, pa.PipelineClosed)) for r in results[6:])
    stats = pipe.stats()
    assert stats.delivered == 5 and accounted(stats)


async def test_stop_after_a_failure_in_order_raises_it_once():
    pipe = pipeline(2, False, FailOn(3))
    await pipe.start()
    outputs = pipe.stream(frames())
    got = []
    with pytest.raises(pa.PipelineError):
        async for out in outputs:
            got.append(out.seq)
    assert got == [0, 1, 2]
    with pytest.raises(pa.PipelineError, match="bad frame 3"):
        await pipe.stop()
    await pipe.stop()  # once


async def test_submits_are_named_as_requests_apart_from_the_streams_frames():
    """A stream's frames and submit()'s count apart (both from 0): errors and statistics say
    which is which, and a request never moves the stream position a resume starts from."""
    pipe = pipeline(2, False, FailOn(7, 100), on_error="skip")
    async with pipe:
        got = [f.seq async for f in pipe.stream(frames(10))]  # frame 7 fails
        with pytest.raises(pa.PipelineError, match=r"failed on request 0: ValueError: bad frame 100"):
            await pipe.submit(marked(100))  # request 0 fails
        for i in (1, 2):
            await pipe.submit(marked(i))
        with pytest.raises(pa.PipelineError) as info:
            await pipe.submit(marked(100))  # request 3
    assert got == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    error = info.value
    assert error.request and error.seq == 3 and str(error).startswith("stage 0 (cpu:0) failed on request 3:")
    stage = pipe.stats().stages[0]
    assert list(stage.skipped_seqs) == [7] and list(stage.skipped_requests) == [0, 3]
    assert pipe.state_dict()["position"] == 10  # after the stream's last frame, whatever the requests
    with pytest.raises(pa.FrameError, match=r"^input failed on request 0: payload is a str"):  # at the door too
        async with pipeline(2, False) as fresh:
            await fresh.submit("not a tensor")


def test_naming_an_error_as_a_request_leaves_the_original_as_it_was():
    """The run's error is given to every waiter: one of them naming it as its request must
    not rename it for the others."""
    cause = ValueError("bad")
    error = pa.PipelineError("ValueError: bad", component="stage 0 (cpu:0)", seq=3)
    error.__cause__ = cause
    renamed = error.of_request()
    assert renamed is not error and type(renamed) is type(error) and renamed.__cause__ is cause
    assert str(renamed) == "stage 0 (cpu:0) failed on request 3: ValueError: bad" and renamed.request
    assert str(error) == "stage 0 (cpu:0) failed on frame 3: ValueError: bad" and not error.request
    assert renamed.of_request() is renamed


async def test_a_submit_waiting_for_the_build_gets_the_runs_error_as_it_is():
    """A submit() that waits while another frame's build runs, and the run fails meanwhile,
    gets the run's error (naming the stream's frame), and builds nothing."""
    def failing_source():
        raise OSError("camera unplugged")
        yield

    pipe = pipeline(2, False)
    async with pipe:
        lock = pipe._run.build_lock
        await lock.acquire()  # another frame is building
        submit = asyncio.create_task(pipe.submit(marked(0)))
        await asyncio.sleep(0.01)
        with pytest.raises(pa.PipelineError, match="failed on frame 0: OSError: camera unplugged") as read:
            async for _ in pipe.stream(failing_source()):
                pass
        lock.release()
        with pytest.raises(pa.PipelineError) as submitted:
            await submit
        assert submitted.value is read.value and not pipe._run.stages
        with pytest.raises(pa.PipelineError, match="failed on frame 0"):
            await pipe.stop()
