"""Graphs: ``source >> pipeline >> [sinks]``, run() and run_sync(), sources and sinks."""
from __future__ import annotations

import asyncio

import pytest
import torch
from torch import nn

import partime_async as pa
from partime_async.sinks import CallbackSink, Collect, NullSink, Sink
from partime_async.sources import Source, SyntheticVideo, from_async_iterable, from_iterable
from pa_helpers import FailOn, Sleep, assert_clean, assert_outputs, marked, partime_threads, reference


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.Flatten())


def video(n: int = 10) -> SyntheticVideo:
    return SyntheticVideo(n, height=12, width=12, seed=1)


class Tracking(Collect):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.events: list[str] = []

    async def open(self):
        self.events.append("open")

    async def close(self):
        self.events.append("close")


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "thread"])
async def test_every_sink_gets_every_frame_in_order(inline):
    model = small_model()
    src = video(12)
    expected = reference(model, [src.render(t) for t in range(12)])
    collect = Collect()
    sync_seen, async_seen = [], []

    def on_frame(frame):
        sync_seen.append(frame)

    async def on_frame_async(frame):
        await asyncio.sleep(0)
        async_seen.append(frame)

    pipe = pa.Pipeline(model, devices=pa.cpu_devices(2, inline=inline))
    stats = await pa.run(src >> pipe >> [collect, CallbackSink(on_frame), CallbackSink(on_frame_async), NullSink()])
    assert_outputs(collect.frames, expected)
    assert_outputs(sync_seen, expected)
    assert_outputs(async_seen, expected)
    assert [torch.equal(a, b) for a, b in zip(collect.outputs, expected)] == [True] * 12
    assert isinstance(stats, pa.PipelineStats)
    assert stats.delivered == 12 and stats.dropped == 0
    await assert_clean()


async def test_callback_returning_an_awaitable_is_awaited():
    seen = []

    async def record(frame):
        seen.append(frame.seq)

    sink = CallbackSink(lambda frame: record(frame))  # a sync lambda returning a coroutine
    await pa.run([torch.zeros(1, 2)] * 4 >> pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1)) >> sink)
    assert seen == [0, 1, 2, 3]
    assert sink.written == 4


async def test_graph_composition_forms():
    xs = [torch.randn(1, 3) for _ in range(5)]
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    expected = reference(model, xs)
    a, b = Collect(), Collect()
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(2))
    graph = pipe >> a            # sinks first, source later
    graph = graph >> b           # add another sink
    graph = xs >> graph          # then the source
    assert isinstance(graph, pa.Graph)
    await pa.run(graph)
    assert_outputs(a.frames, expected)
    assert_outputs(b.frames, expected)
    c = Collect()
    await pa.run(from_iterable(xs) >> pipe >> (c,))  # the same pipeline, run again, tuple of sinks
    assert_outputs(c.frames, expected)


def test_a_numpy_array_is_a_source_not_an_array_of_graphs():
    import numpy as np

    pipe = pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1))
    graph = np.zeros((3, 4), dtype=np.float32) >> pipe
    assert isinstance(graph, pa.Graph) and graph.source.shape == (3, 4)


async def test_run_sync_inside_a_running_loop_says_to_await_run():
    graph = [torch.zeros(1)] >> pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1)) >> Collect()
    with pytest.raises(RuntimeError, match=r"await pa.run\(graph\)"):
        pa.run_sync(graph)


class OpensToTheEnd(Collect):
    """A sink whose open() finishes even when cancelled (as an open that must not be
    abandoned half-way does, see partime_async.threads.to_the_end)."""

    def __init__(self) -> None:
        super().__init__()
        self.opening = asyncio.Event()
        self.closed = False

    async def open(self) -> None:
        self.opening.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass  # swallowed on purpose: the open completes

    async def close(self) -> None:
        self.closed = True


async def test_cancelling_a_run_while_a_sink_opens():
    """run() waits for every sink to open before reading frames; cancelled during that wait,
    it ends cancelled and closes the sink, whichever way the sink's open() ends."""
    sink = OpensToTheEnd()
    run = asyncio.create_task(pa.run([marked(i) for i in range(5)] >> pa.Pipeline(
        [nn.Identity()], devices=pa.cpu_devices(1)) >> sink))
    await sink.opening.wait()
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert sink.closed
    await assert_clean()


def test_graph_composition_errors():
    pipe = pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1))
    with pytest.raises(TypeError, match="not a Sink"):
        [torch.zeros(1)] >> pipe >> [print]
    with pytest.raises(TypeError, match="already has a source"):
        [torch.zeros(1)] >> ([torch.zeros(1)] >> pipe)
    sink = Collect()
    for twice in (lambda: pipe >> [sink, sink], lambda: pipe >> sink >> sink):
        with pytest.raises(ValueError, match="in this graph twice.*make a second sink"):
            twice()


async def test_a_generator_source_is_closed_when_its_consumer_stops():
    """A plain generator's finally blocks (releasing a camera, a file) run when the graph or
    stream using it ends early, not whenever the garbage collector finalises it."""
    closed = []

    def camera(name: str):
        try:
            for i in range(100):
                yield torch.full((1, 2), float(i))
        finally:
            closed.append(name)

    async for frame in from_iterable(camera("loop")):
        if frame.seq == 2:
            break
    async with pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1)) as pipe:
        async with pipe.stream(camera("stream")) as outputs:
            async for frame in outputs:
                if frame.seq == 2:
                    break

    async def fail(frame: pa.Frame) -> None:
        if frame.seq == 3:
            raise ValueError("disk full")

    with pytest.raises(pa.PipelineError, match="disk full"):
        await pa.run(camera("graph") >> pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1)) >> CallbackSink(fail))
    assert closed == ["loop", "stream", "graph"]

    class Camera:  # an iterator of the caller's, with a close() of its own: left open
        closed = False

        def __iter__(self):
            return self

        def __next__(self):
            return torch.zeros(1, 2)

        def close(self):
            self.closed = True

    camera = Camera()
    async with pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1)) as pipe:
        async with pipe.stream(camera) as outputs:
            async for frame in outputs:
                if frame.seq == 2:
                    break
    assert not camera.closed
    await assert_clean()


async def test_run_needs_a_source():
    with pytest.raises(ValueError, match="no source"):
        await pa.run(pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1)) >> Collect())


async def test_sources_of_every_kind():
    xs = [torch.full((1, 2), float(i)) for i in range(5)]

    async def agen():
        for x in xs:
            await asyncio.sleep(0)
            yield x

    class Counter(Source):
        name = "counter"

        async def frames(self):
            for i, x in enumerate(xs):
                yield pa.Frame(i, x)

    for source in (xs, iter(xs), (x for x in xs), agen(), from_iterable(xs), from_async_iterable(agen()), Counter()):
        sink = Collect()
        await pa.run(source >> pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1)) >> sink)
        assert_outputs(sink.frames, xs)


def test_synthetic_video_is_deterministic():
    a = SyntheticVideo(4, height=8, width=10, seed=3)
    b = SyntheticVideo(4, height=8, width=10, seed=3)
    c = SyntheticVideo(4, height=8, width=10, seed=4)
    assert a.render(2).shape == (1, 3, 8, 10) and a.render(2).dtype == torch.float32
    assert torch.equal(a.render(2), b.render(2))
    assert not torch.equal(a.render(2), c.render(2))
    u = SyntheticVideo(2, height=8, width=8, dtype=torch.uint8).render(0)
    assert u.dtype == torch.uint8
    with pytest.raises(ValueError):
        SyntheticVideo(2, dtype=torch.float64)
    with pytest.raises(ValueError):
        Source(fps=0)


async def test_synthetic_video_frames_match_render():
    src = video(5)
    frames = [f async for f in src]
    assert [f.seq for f in frames] == list(range(5))
    assert all(torch.equal(f.data, src.render(f.seq)) for f in frames)
    again = [f async for f in src]  # iterating again restarts the stream
    assert all(torch.equal(f.data, g.data) for f, g in zip(frames, again))


# -- run_sync (called from synchronous tests: it owns its event loop) ------------------------------
@pytest.mark.parametrize("loop", ["uvloop", "asyncio", "auto"])
def test_run_sync(loop):
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    model = small_model()
    src = video(6)
    expected = reference(model, [src.render(t) for t in range(6)])
    sink = Collect()
    stats = pa.run_sync(src >> pa.Pipeline(model, devices=pa.cpu_devices(2)) >> [sink, NullSink()], loop=loop)
    assert_outputs(sink.frames, expected)
    assert stats.delivered == 6
    assert partime_threads() == []


def test_run_sync_rejects_an_unknown_loop():
    with pytest.raises(ValueError, match="loop must be"):
        pa.run_sync([torch.zeros(1)] >> pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1)) >> Collect(),
                    loop="trio")


def test_run_sync_failure_is_raised_and_cleaned_up():
    sink = Tracking()
    pipe = pa.Pipeline([FailOn(2)], devices=pa.cpu_devices(1, inline=False), balance=[1])
    with pytest.raises(pa.PipelineError) as info:
        pa.run_sync([marked(i) for i in range(5)] >> pipe >> sink, loop="asyncio")
    assert info.value.seq == 2 and info.value.component.startswith("stage 0")
    assert sink.events == ["open", "close"]
    assert partime_threads() == []


# -- sinks on failure and with their own policies ---------------------------------------------------
async def test_sinks_are_closed_when_a_stage_fails():
    sinks = [Tracking(), Tracking(policy="latest"), Tracking(policy="drop_newest", capacity=2)]
    pipe = pa.Pipeline([Sleep(0.0005), FailOn(6)], devices=pa.cpu_devices(2, inline=False), balance=[1, 1])
    with pytest.raises(pa.PipelineError):
        await pa.run([marked(i) for i in range(20)] >> pipe >> sinks)
    assert all(s.events == ["open", "close"] for s in sinks)
    await assert_clean()


async def test_sinks_are_closed_when_another_sink_fails():
    tracking = Tracking()

    def explode(frame):
        if frame.seq == 3:
            raise OSError("broken pipe")

    with pytest.raises(pa.PipelineError) as info:
        await pa.run([marked(i) for i in range(10)] >> pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1))
                     >> [tracking, CallbackSink(explode, name="socket")])
    assert info.value.component == "sink socket" and info.value.seq == 3
    assert tracking.events == ["open", "close"]
    await assert_clean()


async def test_slow_latest_sink_drops_for_itself_only():
    """The slow sink is held on its first frame until the fast one has everything: with policy
    "latest" it then writes only the newest frame, and counts the rest as dropped."""
    n = 25
    everything = asyncio.Event()
    fast = Collect()

    def fast_write(frame):
        fast.frames.append(frame)
        if frame.seq == n - 1:
            everything.set()

    written = []

    async def slow_write(frame):
        await asyncio.wait_for(everything.wait(), 20)
        written.append(frame.seq)

    slow = CallbackSink(slow_write, policy="latest", name="slow")
    pipe = pa.Pipeline([nn.Identity(), nn.Identity()], devices=pa.cpu_devices(2, inline=False), balance=[1, 1])
    stats = await pa.run([marked(i) for i in range(n)] >> pipe >> [CallbackSink(fast_write), slow])
    assert [f.seq for f in fast.frames] == list(range(n))
    assert slow.written + slow.dropped == n
    assert slow.written == len(written)
    assert written == sorted(set(written)) and written[-1] == n - 1
    assert slow.dropped > 0
    assert stats.delivered == n and stats.dropped == 0  # the pipeline itself lost nothing


@pytest.mark.parametrize("policy", ["latest", "drop_oldest", "drop_newest"])
async def test_slow_sink_drop_counts(policy):
    n = 30
    fast = Collect()
    slow_seen = []

    async def slow_write(frame):
        await asyncio.sleep(0.001)
        slow_seen.append(frame.seq)

    slow = CallbackSink(slow_write, policy=policy, capacity=2)
    pipe = pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1))
    await pa.run([marked(i) for i in range(n)] >> pipe >> [fast, slow])
    assert [f.seq for f in fast.frames] == list(range(n))
    assert slow.written + slow.dropped == n
    assert slow_seen == sorted(set(slow_seen))
    if policy != "drop_newest":
        assert slow_seen[-1] == n - 1


async def test_block_sink_throttles_but_loses_nothing():
    seen = []

    async def slow_write(frame):
        await asyncio.sleep(0.0005)
        seen.append(frame.seq)

    sink = CallbackSink(slow_write, capacity=1)
    await pa.run([marked(i) for i in range(20)] >> pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1)) >> sink)
    assert seen == list(range(20)) and sink.dropped == 0 and sink.written == 20


def test_sink_rejects_unknown_policy():
    with pytest.raises(ValueError, match="unknown sink policy"):
        Collect(policy="sometimes")
    assert isinstance(NullSink(), Sink)


async def test_empty_sources():
    pipe = pa.Pipeline([nn.Identity(), nn.Identity()], devices=pa.cpu_devices(2))
    async with pipe:
        assert [f async for f in pipe.stream([])] == []
    sink = Tracking()
    stats = await pa.run([] >> pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1)) >> sink)
    assert stats.delivered == 0 and sink.frames == [] and sink.events == ["open", "close"]
    await assert_clean()


async def test_paced_source_delivers_everything_in_order():
    xs = [torch.full((1, 2), float(i)) for i in range(5)]
    sink = Collect()
    await pa.run(from_iterable(xs, fps=1000) >> pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1)) >> sink)
    assert_outputs(sink.frames, xs)
    captures = [f.t_capture for f in sink.frames]
    assert captures == sorted(captures)


async def test_breaking_out_of_a_stream_then_leaving_the_pipeline_does_not_hang():
    """A reader that breaks out of ``async for`` (keeping the stream in a variable, never
    closing it) and then leaves ``async with pipe:``: stop() closes that stream, whose frames
    nobody will read, instead of waiting for them."""
    pipe = pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1, inline=False), balance=[1])
    async with asyncio.timeout(10):  # (the same task: wait_for would run stop() in another)
        async with pipe:
            outputs = pipe.stream([torch.zeros(1, 2)] * 50)
            async for frame in outputs:
                if frame.seq == 1:
                    break
    assert outputs is not None and not pipe.running  # still referenced: not closed by the garbage collector


async def test_a_stream_of_a_pipeline_not_started_says_what_to_do():
    pipe = pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1))
    await pipe.stream([torch.zeros(1)]).aclose()  # never opened: nothing to close
    with pytest.raises(pa.PipelineClosed, match="async with pipe"):
        async with pipe.stream([torch.zeros(1)]) as outputs:
            async for _ in outputs:
                pass


async def test_a_graph_without_sinks_runs():
    """``source >> pipe``: the frames run (a learning pipeline learns) and nothing is written."""
    pipe = pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1))
    stats = await pa.run([torch.zeros(2)] * 3 >> pipe)
    assert stats.delivered == 3
