"""Sources: frame counts, order and content; files; queues; real-time pacing; sensors."""
from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import partime_async as pa
from partime_async.sinks import Collect
from partime_async.sources import (END, NpyDirectory, NpzVideo, PanZoomCamera, QueueSource, RealTime, SensorSource,
                                   Source, SyntheticVideo, from_async_iterable, from_iterable, from_queue)


def identity_pipe() -> pa.Pipeline:
    return pa.Pipeline([nn.Identity(), nn.Identity()], devices=pa.cpu_devices(2), balance=[1, 1])


async def collect(source) -> list[pa.Frame]:
    return [frame async for frame in source]


# -- deterministic sources ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
async def test_synthetic_video_frames_are_deterministic(dtype):
    video = SyntheticVideo(6, height=16, width=20, channels=2, dtype=dtype, seed=3)
    first, again = await collect(video), await collect(video)
    twin = await collect(SyntheticVideo(6, height=16, width=20, channels=2, dtype=dtype, seed=3))
    other = await collect(SyntheticVideo(6, height=16, width=20, channels=2, dtype=dtype, seed=4))
    assert [f.seq for f in first] == list(range(6))
    for t, frame in enumerate(first):
        assert frame.data.shape == (1, 2, 16, 20) and frame.data.dtype == dtype
        assert torch.equal(frame.data, video.render(t))
        assert torch.equal(frame.data, again[t].data) and torch.equal(frame.data, twin[t].data)
    assert not all(torch.equal(a.data, b.data) for a, b in zip(first, other))
    assert not torch.equal(first[0].data, first[5].data)  # it moves


async def test_pan_zoom_camera_frames_are_deterministic():
    camera = PanZoomCamera(5, height=24, width=32, speed=0.05)
    frames = await collect(camera)
    assert [f.seq for f in frames] == list(range(5))
    for t, frame in enumerate(frames):
        assert frame.data.shape == (1, 3, 24, 32) and frame.data.dtype == torch.float32
        assert torch.equal(frame.data, camera.render(t))
    again = await collect(PanZoomCamera(5, height=24, width=32, speed=0.05))
    assert all(torch.equal(a.data, b.data) for a, b in zip(frames, again))
    resumed = await collect(PanZoomCamera(5, height=24, width=32, speed=0.05, start=3))
    assert [f.seq for f in resumed] == [3, 4] and torch.equal(resumed[0].data, frames[3].data)
    assert (await collect(PanZoomCamera(2, height=8, width=8, dtype=torch.uint8)))[0].data.dtype == torch.uint8


async def test_iterable_sources_number_payloads_and_keep_frames():
    xs = [torch.full((2,), float(i)) for i in range(4)]
    frames = await collect(from_iterable(xs))
    assert [f.seq for f in frames] == [0, 1, 2, 3] and all(f.data is x for f, x in zip(frames, xs))

    async def agen():
        for i in (7, 9):
            yield pa.Frame(i, torch.tensor([i]))
    frames = await collect(from_async_iterable(agen()))
    assert [f.seq for f in frames] == [7, 9]


async def test_a_consumer_that_stops_early_closes_the_async_generator_at_once():
    closed = []

    async def agen():
        try:
            for i in range(100):
                yield torch.tensor([i])
        finally:
            closed.append(True)

    async with pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1)) as pipe:
        async with pipe.stream(from_async_iterable(agen())) as outputs:
            async for frame in outputs:
                if frame.seq == 2:
                    break
        await asyncio.sleep(0)
    assert closed == [True]


async def test_a_source_whose_frames_is_a_plain_async_iterator():
    """frames() may return any AsyncIterator (no aclose): the stream ends, or stops early, cleanly."""
    class Counter:
        def __init__(self, n: int) -> None:
            self.i, self.n = 0, n

        def __aiter__(self):
            return self

        async def __anext__(self) -> pa.Frame:
            if self.i >= self.n:
                raise StopAsyncIteration
            self.i += 1
            return pa.Frame(self.i - 1, torch.zeros(2))

    class Counting(Source):
        def frames(self):
            return Counter(4)

    assert [f.seq for f in await collect(Counting())] == [0, 1, 2, 3]
    async with contextlib.aclosing(aiter(Counting())) as frames:
        assert (await anext(frames)).seq == 0  # then closed before its end
    sink = Collect()
    stats = await pa.run(Counting() >> identity_pipe() >> sink)
    assert stats.delivered == 4 and [f.seq for f in sink.frames] == [0, 1, 2, 3]


# -- files -----------------------------------------------------------------------------------------------
def save(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)


async def test_npy_directory_in_name_order(tmp_path):
    arrays = {name: np.random.default_rng(i).standard_normal((1, 3, 4, 4)).astype(np.float32)
              for i, name in enumerate(["b.npy", "a.npy", "c.npy"])}
    for name, array in arrays.items():
        save(tmp_path / name, array)
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / ".frame.npy.x1y2.tmp").write_bytes(b"half a frame")  # a writer's temporary file
    save(tmp_path / ".hidden.npy", np.zeros(1))
    frames = await collect(NpyDirectory(tmp_path))
    assert [f.seq for f in frames] == [0, 1, 2]
    assert [f.meta["path"].rsplit("/", 1)[-1] for f in frames] == ["a.npy", "b.npy", "c.npy"]
    for frame, name in zip(frames, ["a.npy", "b.npy", "c.npy"]):
        assert torch.equal(frame.data, torch.from_numpy(arrays[name]))
        frame.data += 1  # frames own writable memory


async def test_npy_directory_in_index_order_keeps_the_numbers_as_seqs(tmp_path):
    for i in (10, 2, 1):
        save(tmp_path / f"frame_{i}.npy", np.full((2,), i, dtype=np.int64))
    name_order = [int(f.data[0]) for f in await collect(NpyDirectory(tmp_path))]
    assert name_order == [1, 10, 2]  # lexicographic
    frames = await collect(NpyDirectory(tmp_path, order="index"))
    assert [f.seq for f in frames] == [1, 2, 10] and [int(f.data[0]) for f in frames] == [1, 2, 10]


async def test_npy_directory_errors(tmp_path):
    with pytest.raises(ValueError, match="order must be"):
        NpyDirectory(tmp_path, order="time")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        await collect(NpyDirectory(tmp_path / "missing"))
    save(tmp_path / "a1.npy", np.zeros(1))
    save(tmp_path / "b01.npy", np.zeros(1))
    with pytest.raises(ValueError, match="same index 1"):
        await collect(NpyDirectory(tmp_path, order="index"))
    save(tmp_path / "x" / "nodigits.npy", np.zeros(1))
    with pytest.raises(ValueError, match="has no number in its name"):
        await collect(NpyDirectory(tmp_path / "x", order="index"))


async def test_npy_directory_through_a_pipeline_names_the_source_on_bad_files(tmp_path):
    save(tmp_path / "0.npy", np.zeros((1, 2), np.float32))
    (tmp_path / "1.npy").write_bytes(b"not numpy")
    with pytest.raises(pa.PipelineError) as info:
        await pa.run(NpyDirectory(tmp_path, name="recorded") >> identity_pipe() >> Collect())
    assert info.value.component == "source recorded" and info.value.seq == 1
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize("batch", [True, False])
async def test_npz_video_frames_along_the_first_axis(tmp_path, batch):
    video = np.random.default_rng(0).integers(0, 255, (5, 3, 6, 6), dtype=np.uint8)
    np.savez_compressed(tmp_path / "v.npz", frames=video)
    frames = await collect(NpzVideo(tmp_path / "v.npz", batch=batch))
    assert [f.seq for f in frames] == list(range(5))
    for t, frame in enumerate(frames):
        want = torch.from_numpy(video[t:t + 1] if batch else video[t])
        assert frame.data.dtype == torch.uint8 and torch.equal(frame.data, want)
    np.save(tmp_path / "v.npy", video)
    assert len(await collect(NpzVideo(tmp_path / "v.npy"))) == 5


async def test_npz_video_key_selection(tmp_path):
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 1)), b=np.ones((3, 1)))
    assert [float(f.data.sum()) for f in await collect(NpzVideo(tmp_path / "two.npz", key="b"))] == [1.0] * 3
    with pytest.raises(ValueError, match="holds 2 arrays"):
        await collect(NpzVideo(tmp_path / "two.npz"))
    with pytest.raises(KeyError, match="no array 'c'"):
        await collect(NpzVideo(tmp_path / "two.npz", key="c"))


# -- queues --------------------------------------------------------------------------------------------
async def test_from_queue_ends_at_the_sentinel_after_every_queued_item():
    queue: asyncio.Queue = asyncio.Queue(maxsize=2)
    xs = [torch.tensor([float(i)]) for i in range(6)]

    async def producer():
        for x in xs:
            await queue.put(x)
        await queue.put(END)

    task = asyncio.create_task(producer())
    sink = Collect()
    stats = await pa.run(from_queue(queue) >> identity_pipe() >> sink)
    await task
    assert stats.delivered == 6 and [f.seq for f in sink.frames] == list(range(6))
    assert all(torch.equal(f.data, x) for f, x in zip(sink.frames, xs))
    await asyncio.wait_for(queue.join(), 1)  # task_done() for every item, the sentinel included


async def test_queue_source_close_and_custom_sentinel():
    source = QueueSource(maxsize=1)
    frames = []

    async def consume():
        async for frame in source:
            frames.append(frame)

    task = asyncio.create_task(consume())
    await source.put(pa.Frame(5, torch.zeros(1)))
    await source.put(torch.ones(1))
    await source.close()
    await task
    assert [f.seq for f in frames] == [5, 0]

    queue: asyncio.Queue = asyncio.Queue()
    for item in (torch.zeros(1), "stop", torch.ones(1)):
        queue.put_nowait(item)
    assert len(await collect(from_queue(queue, sentinel="stop"))) == 1


# -- real time ---------------------------------------------------------------------------------------
class FakeClock:
    """A clock that only moves when slept on; each sleep also yields to the loop once."""

    def __init__(self) -> None:
        self.t = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds
        await asyncio.sleep(0)


async def test_real_time_after_a_late_frame_waits_a_period_not_a_burst(monkeypatch):
    clock = FakeClock()
    import partime_async.sources.realtime as realtime

    monkeypatch.setattr(realtime, "now", clock)  # the capture stamps, on the same clock

    async def frames():
        for i in range(6):
            if i == 2:
                clock.t += 0.35  # the camera stalls before frame 2
            yield torch.tensor([i])

    source = RealTime(frames(), fps=10, clock=clock, sleep=clock.sleep)
    emitted = [f.t_capture for f in await collect(source)]
    gaps = [b - a for a, b in zip(emitted, emitted[1:])]
    assert gaps == pytest.approx([0.1, 0.35, 0.1, 0.1, 0.1], abs=1e-6)  # before: 0.0 after the late frame


async def test_real_time_emits_on_the_clock_with_a_fast_consumer():
    clock = FakeClock()
    source = RealTime(SyntheticVideo(8, height=4, width=4), fps=25, clock=clock, sleep=clock.sleep)
    frames = await collect(source)
    assert [f.seq for f in frames] == list(range(8))
    # frame k is due at t0 + k / fps: the producer waits one period before each frame after the first
    assert clock.sleeps == pytest.approx([1 / 25] * 7) and clock() == pytest.approx(100.0 + 7 / 25)
    assert source.produced == source.delivered == 8 and source.dropped == 0


async def test_real_time_with_a_slow_consumer_keeps_the_newest_frames_and_counts_drops():
    clock = FakeClock()
    source = RealTime(from_iterable(torch.tensor([i]) for i in range(40)), fps=100, clock=clock, sleep=clock.sleep)
    seqs = []
    async for frame in source:
        assert int(frame.data) == frame.seq
        seqs.append(frame.seq)
        for _ in range(5):  # a slow consumer: the clock ticks several times per frame taken
            await asyncio.sleep(0)
    assert source.produced == 40
    assert source.delivered == len(seqs) and source.delivered + source.dropped == source.produced
    assert source.dropped > 0
    assert seqs == sorted(set(seqs)) and seqs[-1] == 39  # increasing, and the newest frame is never lost


async def test_real_time_block_policy_drops_nothing_and_slows_down_instead():
    clock = FakeClock()
    source = RealTime(range(30), fps=1000, policy="block", clock=clock, sleep=clock.sleep)
    seqs = []
    async for frame in source:
        seqs.append(frame.seq)
        for _ in range(5):
            await asyncio.sleep(0)
    assert seqs == list(range(30)) and source.dropped == 0 and source.produced == 30


async def test_real_time_behind_schedule_emits_at_once_and_never_starves_the_loop():
    clock = FakeClock()
    fps = 100

    def slow_source():  # each frame costs two periods of the clock, and never awaits
        for i in range(10):
            clock.t += 2 / fps
            yield torch.tensor([i])

    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    source = RealTime(slow_source(), fps=fps, clock=clock, sleep=clock.sleep)
    await collect(source)
    task.cancel()
    await asyncio.wait([task])
    assert clock.sleeps == []  # always late: no pacing wait, and no burst to catch up later
    assert source.produced == 10 and source.delivered + source.dropped == 10
    assert ticks >= 10  # the producer yields to the loop once per frame even though it never waits


async def test_real_time_through_a_pipeline_accounts_for_every_frame():
    source = RealTime(SyntheticVideo(30, height=8, width=8), fps=2000)
    sink = Collect()
    stats = await pa.run(source >> identity_pipe() >> sink)
    seqs = [f.seq for f in sink.frames]
    assert stats.delivered == source.delivered == len(seqs)
    assert source.delivered + source.dropped == source.produced == 30
    assert seqs == sorted(set(seqs)) and seqs[-1] == 29


async def test_real_time_source_error_reaches_the_pipeline_after_earlier_frames():
    def frames():
        for i in range(3):
            yield torch.zeros(1)
        raise OSError("camera unplugged")

    sink = Collect()
    with pytest.raises(pa.PipelineError) as info:
        await pa.run(RealTime(frames(), fps=1000, policy="block", name="cam") >> identity_pipe() >> sink)
    assert info.value.component == "source cam"
    assert isinstance(info.value.__cause__, OSError) and str(info.value.__cause__) == "camera unplugged"


async def test_real_time_consumer_stopping_early_stops_the_producer_and_closes_the_source():
    device = FlakyDevice(total=None)  # an endless sensor (defined below)
    async with pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1)) as pipe:
        async with pipe.stream(RealTime(device, fps=10_000)) as outputs:
            async for frame in outputs:
                if frame.seq >= 3:
                    break
    assert device.opens == device.closes == 1
    # and the autouse fixture fails the test if the producer task were left running


def test_real_time_validates_its_arguments():
    with pytest.raises(ValueError, match="fps must be positive"):
        RealTime([], fps=0)
    with pytest.raises(ValueError, match="unknown channel policy"):
        RealTime([], fps=1, policy="newest")


# -- sensors --------------------------------------------------------------------------------------------
class FlakyDevice(SensorSource):
    """A simulated device: read k gives tensor [k]; the reads numbered in ``fail`` raise."""

    name = "flaky device"

    def __init__(self, *, fail: set[int] = frozenset(), fail_open: set[int] = frozenset(), total: int | None = 8,
                 **kwargs):
        kwargs.setdefault("backoff", 0.0)
        super().__init__(**kwargs)
        self.fail, self.fail_open = set(fail), set(fail_open)
        self.total = total
        self.reads = self.opens = self.closes = 0
        self.next_value = 0

    async def open(self):
        self.opens += 1
        if self.opens in self.fail_open:
            raise ConnectionRefusedError(f"open {self.opens} refused")

    async def read(self):
        self.reads += 1
        if self.reads in self.fail:
            raise ConnectionResetError(f"read {self.reads} failed")
        if self.total is not None and self.next_value >= self.total:
            return None
        self.next_value += 1
        return torch.tensor([float(self.next_value - 1)])

    async def close(self):
        self.closes += 1


async def test_sensor_reconnects_after_read_errors_and_loses_nothing():
    device = FlakyDevice(fail={2, 3, 7}, attempts=3)
    sink = Collect()
    stats = await pa.run(device >> identity_pipe() >> sink)
    assert stats.delivered == 8
    assert [f.seq for f in sink.frames] == list(range(8))
    assert [float(f.data) for f in sink.frames] == [float(i) for i in range(8)]
    assert device.errors == 3 and device.reconnects == 3 and device.read_count == 8
    assert device.opens == 4 and device.closes == 4  # every open is closed, the last one at the end
    assert isinstance(device.last_error, ConnectionResetError)


async def test_sensor_retries_a_refused_open():
    device = FlakyDevice(fail_open={1, 2}, attempts=3, total=3)
    assert [float(f.data) for f in await collect(device)] == [0.0, 1.0, 2.0]
    assert device.opens == 3 and device.closes == 1 and device.reconnects == 2


async def test_sensor_gives_up_after_the_configured_attempts():
    device = FlakyDevice(fail=set(range(4, 100)), attempts=3, name="camera 7")
    sink = Collect()
    with pytest.raises(pa.PipelineError) as info:
        await pa.run(device >> identity_pipe() >> sink)
    error = info.value
    assert error.component == "source camera 7" and error.seq == 3
    cause = error.__cause__
    assert isinstance(cause, ConnectionResetError) and str(cause) == "read 6 failed"
    assert "gave up after 3 failed attempt(s) to read frame 3" in "\n".join(cause.__notes__)
    assert "ConnectionResetError: read 6 failed; camera 7: gave up after 3 failed attempt(s)" in str(error)
    assert device.reads == 6 and device.errors == 3 and device.reconnects == 2
    assert device.opens == device.closes == 3
    seqs = [f.seq for f in sink.frames]  # frames still in flight at the failure are abandoned
    assert seqs == list(range(len(seqs))) and len(seqs) <= 3


async def test_sensor_with_one_attempt_does_not_reconnect():
    device = FlakyDevice(fail={1}, attempts=1)
    with pytest.raises(ConnectionResetError):
        await collect(device)
    assert device.opens == device.closes == 1 and device.reconnects == 0


async def test_sensor_read_timeout_counts_as_a_failed_read():
    class Hangs(SensorSource):
        async def read(self):
            await asyncio.Event().wait()

    with pytest.raises(TimeoutError, match=r"read\(\) took longer than read_timeout=0.001s"):
        await collect(Hangs(attempts=2, backoff=0, read_timeout=0.001))


async def test_sensor_frame_limit_returned_frames_and_close_on_early_stop():
    class Numbered(FlakyDevice):
        async def read(self):
            x = await super().read()
            return None if x is None else pa.Frame(100 + int(x), x)

    device = Numbered(frames=3, total=None)
    assert [f.seq for f in await collect(device)] == [100, 101, 102]
    assert device.opens == device.closes == 1

    endless = FlakyDevice(total=None)
    async with pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1)) as pipe:
        async with pipe.stream(endless) as outputs:
            async for frame in outputs:
                if frame.seq == 1:
                    break
        for _ in range(10):  # a few loop turns: the source pump's cancellation, then the source's close, run
            await asyncio.sleep(0)
        assert endless.opens == endless.closes == 1  # closed at once, not by the garbage collector


def test_sensor_backoff_doubles_up_to_its_maximum_and_arguments_are_checked():
    device = FlakyDevice(backoff=0.1, backoff_max=0.5)
    assert [device.backoff_delay(k) for k in (1, 2, 3, 4, 5)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    with pytest.raises(ValueError, match="attempts must be"):
        FlakyDevice(attempts=0)
    with pytest.raises(ValueError, match="backoff"):
        FlakyDevice(backoff=1.0, backoff_max=0.5)
    with pytest.raises(NotImplementedError, match="must implement"):
        asyncio.run(collect(SensorSource(attempts=1)))


async def test_a_paced_source_keeps_its_period_after_a_slow_start_a_stall_and_a_restart(monkeypatch):
    """Pacing starts at the first frame (not before a slow open), restarts after a late frame
    instead of bursting to catch up, and goes on where the seqs go back (a looping clip)."""
    import partime_async.sources.base as base

    clock = FakeClock()
    monkeypatch.setattr(base, "now", clock)
    monkeypatch.setattr(base, "asyncio", SimpleNamespace(sleep=clock.sleep))

    class Clip(Source):
        async def frames(self):
            clock.t += 0.5  # opening the file
            for i, seq in enumerate([0, 1, 2, 3, 4, 0, 1]):
                if i == 3:
                    clock.t += 0.35  # the disk stalls before frame 3
                yield pa.Frame(seq, torch.zeros(1))

    stamps = [f.t_capture for f in await collect(Clip(fps=10))]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    # before: the slow open released frames 0-4 at once, and the restarted clip was not paced
    assert gaps == pytest.approx([0.1, 0.1, 0.35, 0.1, 0.1, 0.1], abs=1e-6)


async def test_pacing_keeps_its_rate_through_small_delays(monkeypatch):
    """A sleep that wakes late, or a consumer a little (less than a period) late, does not move
    the schedule: the rate stays fps (a restart on every late wake-up made it drift slow)."""
    import partime_async.sources.base as base
    import partime_async.sources.realtime as realtime

    class Oversleeping(FakeClock):
        async def sleep(self, seconds: float) -> None:
            await super().sleep(seconds + 0.002)  # the loop wakes 2 ms late

    clock = Oversleeping()
    monkeypatch.setattr(realtime, "now", clock)
    emitted = [f.t_capture for f in await collect(RealTime(range(50), fps=100, clock=clock, sleep=clock.sleep))]
    assert emitted[-1] - emitted[0] == pytest.approx(49 / 100, abs=0.0021)  # before: 49 x 2 ms slower

    clock = FakeClock()
    monkeypatch.setattr(base, "now", clock)
    monkeypatch.setattr(base, "asyncio", SimpleNamespace(sleep=clock.sleep))
    stamps = []
    async for frame in from_iterable([torch.zeros(1)] * 7, fps=10):
        stamps.append(frame.t_capture)
        if frame.seq == 3:
            clock.t += 0.15  # the consumer holds frame 3 for 1.5 periods: frame 4 is half a period late
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert gaps == pytest.approx([0.1, 0.1, 0.1, 0.15, 0.05, 0.1], abs=1e-6)  # before: [..., 0.15, 0.1, 0.1]


async def test_a_paced_source_resumed_at_a_later_seq_starts_at_once(monkeypatch):
    # Pacing is relative to the stream's first frame: a camera resumed at frame 300 must not
    # wait 300 / fps seconds before its first frame. The waits it asks for are recorded.
    import partime_async.sources.base as base

    waits: list[float] = []

    async def sleep(delay: float) -> None:
        waits.append(delay)

    monkeypatch.setattr(base, "asyncio", SimpleNamespace(sleep=sleep))  # this module's view only
    frames = await collect(PanZoomCamera(305, height=8, width=8, fps=1, start=300))
    assert [f.seq for f in frames] == [300, 301, 302, 303, 304]
    # frames 301..304 are due 1..4 s after the first (this sleep does not move the clock);
    # paced by absolute seq they were due 301..304 s after it
    assert len(waits) == 4 and max(waits) <= 4
