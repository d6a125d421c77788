"""Video in and out (PyAV): clips made here, round trips through a pipeline, broken files, live
inputs that drop and reconnect, real-time pacing, FFmpeg's resize / format / skipping, no
partial file on failure, and the install hint without PyAV."""
from __future__ import annotations

import asyncio
import importlib.util
import re
import runpy
import sys
import threading
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import partime_async as pa

av = pytest.importorskip("av")

from partime_async.sinks import Collect, VideoSink  # noqa: E402
from partime_async.sources import SyntheticVideo, VideoSource, from_iterable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FPS = 25


def identity_pipe(**kwargs) -> pa.Pipeline:
    return pa.Pipeline([nn.Identity(), nn.Identity()], devices=pa.cpu_devices(2), balance=[1, 1], **kwargs)


def listing(directory: Path) -> list[str]:
    """Every entry of a folder, hidden (temporary) files included."""
    return sorted(p.name for p in directory.iterdir())


def images(n: int, height: int = 48, width: int = 64) -> list[torch.Tensor]:
    """``n`` distinct, smooth (H, W, 3) uint8 images."""
    video = SyntheticVideo(n, height=height, width=width, dtype=torch.uint8, speed=0.05)
    return [video.render(t)[0].permute(1, 2, 0).contiguous() for t in range(n)]


def lossless_codec() -> str:
    for name in ("libx264rgb", "ffv1"):
        try:
            av.codec.Codec(name, "w")
        except Exception:
            continue
        return name
    pytest.skip("this FFmpeg build has neither libx264rgb nor ffv1 (lossless RGB)")


def make_clip(path: Path, frames: list[torch.Tensor], *, fps: int = FPS, lossless: bool = True) -> Path:
    """Encode (H, W, 3) uint8 images with PyAV itself (not with VideoSink): lossless RGB in a
    Matroska file, or lossy MPEG-4 part 2 (every FFmpeg has it)."""
    codec = lossless_codec() if lossless else "mpeg4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options={"crf": "0"} if codec == "libx264rgb" else {})
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = {"libx264rgb": "rgb24", "ffv1": "bgr0"}.get(codec, "yuv420p")
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image.numpy(), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


async def collect(source) -> list[pa.Frame]:
    return [frame async for frame in source]


# -- in ----------------------------------------------------------------------------------------------
async def test_a_file_decodes_to_its_frames_in_order_with_their_presentation_times(tmp_path):
    xs = images(8)
    clip = make_clip(tmp_path / "clip.mkv", xs)
    source = VideoSource(clip)
    assert not source.live and source.attempts == 1  # a file: one try, its end ends the stream
    info = await source.probe()
    assert (info.width, info.height, info.rate) == (64, 48, FPS)
    frames = await collect(source)
    assert [f.seq for f in frames] == list(range(8))
    assert [f.meta["time"] for f in frames] == pytest.approx([k / FPS for k in range(8)])
    assert all(f.meta["pts"] is not None for f in frames)
    for frame, x in zip(frames, xs, strict=True):
        assert frame.data.shape == (1, 3, 48, 64) and frame.data.dtype == torch.uint8
        assert torch.equal(frame.data, x.permute(2, 0, 1)[None])  # lossless clip: bit for bit
        frame.data += 1  # each frame owns writable memory
    assert source.info == info and source.errors == 0 and source.dropped == 0


async def test_layouts_dtypes_and_pixel_formats(tmp_path):
    xs = images(3)
    clip = make_clip(tmp_path / "clip.mkv", xs)
    hwc = await collect(VideoSource(clip, layout="hwc"))
    assert all(torch.equal(f.data, x) for f, x in zip(hwc, xs, strict=True))
    floats = await collect(VideoSource(clip, dtype=torch.float32))
    assert floats[0].data.dtype == torch.float32
    assert torch.equal(floats[0].data, xs[0].permute(2, 0, 1)[None].float() / 255)
    bgr = await collect(VideoSource(clip, layout="hwc", pixel_format="bgr24"))
    assert torch.equal(bgr[1].data, xs[1].flip(-1))
    rgba = await collect(VideoSource(clip, pixel_format="rgba"))
    assert rgba[0].data.shape == (1, 4, 48, 64) and bool((rgba[0].data[0, 3] == 255).all())
    gray = await collect(VideoSource(clip, pixel_format="gray", layout="hwc"))
    luma = xs[2].float() @ torch.tensor([0.299, 0.587, 0.114])  # BT.601 luma, full range
    assert gray[2].data.shape == (48, 64, 1) and (gray[2].data[..., 0].float() - luma).abs().max() <= 2


async def test_ffmpeg_resizes_converts_and_skips_frames(tmp_path):
    xs = images(10)
    clip = make_clip(tmp_path / "clip.mkv", xs)
    source = VideoSource(clip, every=3, width=32, pixel_format="gray")
    assert source.filters() == [("select", r"not(mod(n\,3))"), ("scale", "32:-1"), ("format", "gray")]
    frames = await collect(source)
    assert [f.seq for f in frames] == [0, 1, 2, 3]  # frames 0, 3, 6, 9 of the file
    assert [f.meta["time"] for f in frames] == pytest.approx([0, 3 / FPS, 6 / FPS, 9 / FPS])
    assert all(f.data.shape == (1, 1, 24, 32) for f in frames)  # the aspect ratio kept
    sized = await collect(VideoSource(clip, every=3, width=40, height=20, layout="hwc"))
    assert all(f.data.shape == (20, 40, 3) for f in sized)
    for frame, x in zip(sized, xs[::3], strict=True):  # near a plain resize of the same frame
        reference = nn.functional.interpolate(x.permute(2, 0, 1)[None].float(), size=(20, 40), mode="area")
        assert (frame.data.permute(2, 0, 1)[None].float() - reference).abs().mean() < 8


async def test_decoding_runs_on_the_source_thread_never_on_the_loop(tmp_path, monkeypatch):
    clip = make_clip(tmp_path / "clip.mkv", images(4))
    threads = set()
    real = VideoSource._tensor

    def recording(self, frame):
        threads.add(threading.current_thread().name)
        return real(self, frame)

    monkeypatch.setattr(VideoSource, "_tensor", recording)
    assert len(await collect(VideoSource(clip, name="clip"))) == 4
    assert threads == {"partime-clip"} and threading.current_thread().name not in threads


async def test_a_broken_file_fails_at_once_with_a_clear_error(tmp_path):
    good = make_clip(tmp_path / "good.mp4", images(10), lossless=False)
    data = good.read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])  # the index (moov) is at the end: gone
    (tmp_path / "noise.mkv").write_bytes(bytes(range(256)) * 16)
    for name in ("truncated.mp4", "noise.mkv"):
        source = VideoSource(tmp_path / name)
        with pytest.raises(ValueError, match=f"video {name}: FFmpeg cannot read .* as a video .*a broken or truncated"):
            await collect(source)
        assert source.errors == 1 and source.reconnects == 0  # a file is not retried
    source = VideoSource(tmp_path / "truncated.mp4")
    with pytest.raises(pa.PipelineError) as info:
        await pa.run(source >> identity_pipe() >> Collect())
    assert info.value.component == "source video truncated.mp4" and isinstance(info.value.__cause__, ValueError)
    with pytest.raises(FileNotFoundError, match="no such file or device"):
        await collect(VideoSource(tmp_path / "missing.mp4"))


@pytest.mark.parametrize("kind", ["file", "lavfi"])
async def test_a_live_input_that_ends_is_reopened_with_backoff_and_numbered_on(tmp_path, kind):
    xs = images(5)
    # A live input never waits for its consumer; with room for a whole connection's 5 frames,
    # none is dropped, however fast FFmpeg decodes them.
    live = {"live": True, "frames": 12, "backoff": 0.001, "buffer": 5}
    if kind == "file":  # a file read as a live stream: each end is a dropped connection
        source = VideoSource(make_clip(tmp_path / "clip.mkv", xs), **live)
    else:  # FFmpeg's own test pattern, 5 frames per connection
        if "lavfi" not in av.formats_available:
            pytest.skip("this FFmpeg build has no lavfi input")
        source = VideoSource(f"testsrc=size=64x48:rate={FPS}:duration={5 / FPS}", input_format="lavfi", **live)
    assert source.live and source.attempts == 8
    sink = Collect()
    stats = await pa.run(source >> identity_pipe() >> sink)
    assert stats.delivered == 12 and [f.seq for f in sink.frames] == list(range(12))
    for frame in sink.frames:  # frame k is frame k % 5 of a connection: nothing lost or repeated
        assert torch.equal(frame.data, sink.frames[frame.seq % 5].data)
    if kind == "file":
        assert torch.equal(sink.frames[7].data, xs[2].permute(2, 0, 1)[None])
    assert source.reconnects == 2 and source.errors == 2
    assert isinstance(source.last_error, ConnectionError)
    assert "the live input ended after 5 frame(s) on this connection" in str(source.last_error)


async def test_a_live_input_that_cannot_be_reopened_gives_up_after_its_attempts(tmp_path):
    clip = make_clip(tmp_path / "clip.mkv", images(5))
    source = VideoSource(clip, live=True, attempts=3, backoff=0.001, buffer=5, name="camera")
    seen = []
    with pytest.raises(FileNotFoundError, match="no such file or device") as info:
        async for frame in source:
            seen.append(frame.seq)
            if frame.seq == 4:
                clip.unlink()  # the camera goes away: the stream ends, and every reopening fails
    assert seen == [0, 1, 2, 3, 4]
    assert "camera: gave up after 3 failed attempt(s) to read frame 5" in "\n".join(info.value.__notes__)
    assert source.errors == 3 and source.reconnects == 2


async def test_realtime_emits_each_frame_no_sooner_than_its_presentation_time(tmp_path):
    clip = make_clip(tmp_path / "clip.mkv", images(6), fps=100)
    source = VideoSource(clip, realtime=True)
    frames = await collect(source)
    assert len(frames) + source.dropped == 6 and [f.seq for f in frames] == sorted({f.seq for f in frames})
    first = frames[0]
    for frame in frames[1:]:  # paced by the presentation times, never ahead of them
        assert frame.t_capture - first.t_capture >= frame.meta["time"] - first.meta["time"] - 1e-3


async def test_realtime_never_waits_for_the_consumer_and_keeps_the_newest_frames(tmp_path):
    clip = make_clip(tmp_path / "clip.mkv", images(10), fps=200)
    source = VideoSource(clip, realtime=True, buffer=2)
    frames = aiter(source)
    first = await anext(frames)
    while source.produced < 10:  # noqa: ASYNC110 (a count of the decoding thread's) -- the consumer takes nothing
        await asyncio.sleep(0.005)
    rest = [frame async for frame in frames]
    assert first.seq == 0 and [f.seq for f in rest] == [8, 9]  # the newest two; the gap shows the drops
    assert source.dropped == 7


def test_realtime_pacing_waits_for_each_frame_and_restarts_after_a_stall(monkeypatch):
    from partime_async.sources import video

    clock = [100.0]
    waits: list[float] = []

    class Stop:
        def wait(self, seconds: float) -> bool:
            waits.append(round(seconds, 9))
            clock[0] += seconds
            return False

    monkeypatch.setattr(video, "now", lambda: clock[0])
    pacer = video._Pacer(Stop(), SimpleNamespace(average_rate=Fraction(10), guessed_rate=None))
    assert pacer.wait(5.0) == 100.0 and waits == []  # the first frame at once, whatever its time
    pacer.wait(5.1)
    clock[0] += 0.05  # decoding took half a period: the schedule holds
    pacer.wait(5.2)
    assert waits == [0.1, 0.05]
    clock[0] += 0.5  # a stall of five periods: no burst, the schedule restarts here
    pacer.wait(5.3)
    pacer.wait(5.4)
    assert waits == [0.1, 0.05, 0.1]
    pacer.wait(0.0)  # timestamps that go back (a new clip): at once, a new schedule
    pacer.wait(None)  # no timestamp: a period after the previous frame
    assert waits == [0.1, 0.05, 0.1, 0.1]


def test_video_source_checks_its_arguments():
    with pytest.raises(ValueError, match="layout must be 'nchw'"):
        VideoSource("x.mp4", layout="chw")
    with pytest.raises(ValueError, match="pixel_format must be one of rgb24"):
        VideoSource("x.mp4", pixel_format="yuv420p")
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        VideoSource("x.mp4", every=0)
    with pytest.raises(ValueError, match="width must be an int >= 1"):
        VideoSource("x.mp4", width=0)
    with pytest.raises(ValueError, match="dtype must be"):
        VideoSource("x.mp4", dtype=torch.float16)
    assert VideoSource("rtsp://user:secret@cam.local:554/live").name == "video rtsp://cam.local:554/live"
    assert VideoSource("rtsp://cam.local/live").live and VideoSource("/dev/video0").input_format == "v4l2"
    assert not VideoSource("https://example.com/clip.mp4").live  # maybe a file: live=True says otherwise


# -- out -----------------------------------------------------------------------------------------------
async def test_round_trip_source_pipeline_sink_source_is_exact_when_lossless(tmp_path):
    xs = images(12)
    clip = make_clip(tmp_path / "in.mkv", xs)
    sink = VideoSink(tmp_path / "out" / "out.mkv", fps=FPS, lossless=True)
    stats = await pa.run(VideoSource(clip) >> identity_pipe() >> sink)
    assert stats.delivered == sink.written == sink.frames == 12
    assert sink.committed == tmp_path / "out" / "out.mkv" and listing(tmp_path / "out") == ["out.mkv"]
    back = await collect(VideoSource(sink.committed, layout="hwc"))
    assert [f.seq for f in back] == list(range(12))
    assert all(torch.equal(f.data, x) for f, x in zip(back, xs, strict=True))
    assert [f.meta["time"] for f in back] == pytest.approx([k / FPS for k in range(12)])


async def test_round_trip_with_the_default_lossy_codec_is_near_and_in_order(tmp_path):
    xs = [x.permute(2, 0, 1)[None] for x in images(12, height=47, width=63)]  # odd sides too
    sink = VideoSink(tmp_path / "out.mp4", fps=FPS)
    assert sink.codec in ("libx264", "libopenh264", "mpeg4")
    await pa.run(from_iterable(xs) >> identity_pipe() >> sink)
    back = await collect(VideoSource(tmp_path / "out.mp4"))
    assert [f.seq for f in back] == list(range(12))
    errors = torch.tensor([[(f.data.float() - x.float()).abs().mean() for x in xs] for f in back])
    assert bool((errors.diagonal() < 8).all()), errors.diagonal()
    assert errors.argmin(dim=1).tolist() == list(range(12))  # each frame nearest its own original


async def test_hwc_frames_batches_gray_and_encoding_on_the_sink_thread(tmp_path, monkeypatch):
    xs = images(4)
    threads = set()
    real = VideoSink._encode

    def recording(self, seq, data):
        threads.add(threading.current_thread().name)
        return real(self, seq, data)

    monkeypatch.setattr(VideoSink, "_encode", recording)
    hwc = VideoSink(tmp_path / "hwc.mkv", lossless=True)
    await pa.run(from_iterable(xs) >> identity_pipe() >> hwc)
    assert all(torch.equal(f.data, x) for f, x in zip(await collect(VideoSource(hwc.committed, layout="hwc")), xs,
                                                      strict=True))
    assert len(threads) == 1 and threads.pop().startswith("partime-video-sink")
    batches = VideoSink(tmp_path / "batches.mkv", lossless=True)  # (2, 3, H, W): two video frames each
    await pa.run(from_iterable([torch.stack([x.permute(2, 0, 1) for x in xs[i:i + 2]]) for i in (0, 2)])
                 >> identity_pipe() >> batches)
    back = await collect(VideoSource(batches.committed, layout="hwc"))
    assert batches.frames == 4 and all(torch.equal(f.data, x) for f, x in zip(back, xs, strict=True))
    gray = VideoSink(tmp_path / "gray.mkv", lossless=True)
    await pa.run(from_iterable([x[..., :1] for x in xs]) >> identity_pipe() >> gray)
    back = await collect(VideoSource(gray.committed, layout="hwc", pixel_format="gray"))
    assert all(torch.equal(f.data, x[..., :1]) for f, x in zip(back, xs, strict=True))


async def test_floats_are_refused_unless_a_value_range_says_how_to_convert_them(tmp_path):
    floats = SyntheticVideo(4, height=16, width=16)  # float32 in [0, 1]
    with pytest.raises(pa.PipelineError, match=r"frame 0 is torch.float32; .*pass value_range=\(0, 1\)") as info:
        await pa.run(floats >> identity_pipe() >> VideoSink(tmp_path / "refused.mkv"))
    assert info.value.component == "sink video" and isinstance(info.value.__cause__, TypeError)
    sink = VideoSink(tmp_path / "floats.mkv", lossless=True, value_range=(0, 1))
    await pa.run(floats >> identity_pipe() >> sink)
    back = await collect(VideoSource(sink.committed))
    expected = SyntheticVideo(4, height=16, width=16, dtype=torch.uint8)  # the same frames, * 255 rounded
    assert all(torch.equal(f.data, expected.render(f.seq)) for f in back)
    assert listing(tmp_path) == ["floats.mkv"]


class FailOnFrame(nn.Module):
    """Identity, except that it raises on the frame equal to ``bad``."""

    def __init__(self, bad: torch.Tensor) -> None:
        super().__init__()
        self.bad = bad

    def forward(self, x):
        if torch.equal(x, self.bad):
            raise RuntimeError("a bad frame")
        return x


async def test_no_partial_file_when_the_graph_fails_or_is_cancelled(tmp_path):
    path = tmp_path / "out.mp4"
    path.write_bytes(b"the previous run")
    frames = SyntheticVideo(12, height=16, width=16, dtype=torch.uint8)
    sink = VideoSink(path)
    with pytest.raises(pa.PipelineError, match="a bad frame"):
        await pa.run(frames >> pa.Pipeline([FailOnFrame(frames.render(5))], devices=pa.cpu_devices(1)) >> sink)
    assert sink.written == sink.frames == 5 and sink.committed is None  # frames 0-4 encoded, then thrown away
    assert listing(tmp_path) == ["out.mp4"] and path.read_bytes() == b"the previous run"

    third = asyncio.Event()

    def select(frame):
        if frame.seq == 3:
            third.set()
        return frame.data

    sink = VideoSink(path, select=select)
    run = asyncio.create_task(pa.run(SyntheticVideo(None, height=16, width=16, dtype=torch.uint8) >> identity_pipe()
                                     >> sink))
    await third.wait()
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert sink.written >= 3 and listing(tmp_path) == ["out.mp4"] and path.read_bytes() == b"the previous run"


async def test_a_failed_write_leaves_no_file_and_says_what_was_wrong(tmp_path):
    sizes = [torch.zeros(1, 3, 16, 16, dtype=torch.uint8)] * 3 + [torch.zeros(1, 3, 8, 8, dtype=torch.uint8)]
    with pytest.raises(pa.PipelineError, match="frame 3 is 8x8 but the video is 16x16") as info:
        await pa.run(from_iterable(sizes) >> identity_pipe(input_spec=None) >> VideoSink(tmp_path / "a.mp4"))
    assert info.value.component == "sink video" and info.value.seq == 3
    with pytest.raises(pa.PipelineError, match=r"\(C, H, W\) image\? add a batch axis"):
        await pa.run(from_iterable([torch.zeros(3, 16, 16, dtype=torch.uint8)]) >> identity_pipe()
                     >> VideoSink(tmp_path / "b.mp4"))
    with pytest.raises(pa.PipelineError, match=r"frame 0 is torch\.int64; VideoSink encodes uint8 pixels"):
        await pa.run(from_iterable([torch.zeros(1, 3, 16, 16, dtype=torch.int64)]) >> identity_pipe()
                     >> VideoSink(tmp_path / "c.mp4"))
    assert listing(tmp_path) == []


async def test_a_video_sink_aimed_at_a_folder_fails_before_the_stream_and_no_frame_makes_no_file(tmp_path):
    (tmp_path / "folder.mp4").mkdir()
    source = SyntheticVideo(3, height=16, width=16, dtype=torch.uint8)
    with pytest.raises(pa.PipelineError) as info:
        await pa.run(source >> identity_pipe() >> VideoSink(tmp_path / "folder.mp4"))
    assert isinstance(info.value.__cause__, IsADirectoryError) and info.value.seq is None
    empty = VideoSink(tmp_path / "empty.mp4")
    await pa.run(from_iterable([]) >> identity_pipe() >> empty)
    assert empty.committed is None and listing(tmp_path) == ["folder.mp4"]


def test_video_sink_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"VideoSink writes \.mp4, .* files; 'out\.gif' has none"):
        VideoSink(tmp_path / "out.gif")
    with pytest.raises(ValueError, match="fps must be positive"):
        VideoSink(tmp_path / "out.mp4", fps=0)
    with pytest.raises(ValueError, match="no 'no-such-codec' encoder"):
        VideoSink(tmp_path / "out.mp4", codec="no-such-codec")
    with pytest.raises(ValueError, match=r"lossless video goes in \.mp4, \.mov, \.mkv or \.avi"):
        VideoSink(tmp_path / "out.webm", lossless=True)
    with pytest.raises(ValueError, match="value_range must be"):
        VideoSink(tmp_path / "out.mp4", value_range=(1, 0))
    assert VideoSink(tmp_path / "out.mp4", fps=29.97).rate == Fraction(2997, 100)


# -- without PyAV, the README, the example -------------------------------------------------------------------
def test_without_pyav_the_modules_import_and_video_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed: `import av` raises
    for package, module, make in (("sources", "video", lambda m: m.VideoSource("clip.mp4")),
                                  ("sinks", "video", lambda m: m.VideoSink("out.mp4"))):
        path = ROOT / package / f"{module}.py"  # a fresh copy of the module, imported without PyAV
        spec = importlib.util.spec_from_file_location(f"partime_async.{package}._{module}_without_av", path)
        fresh = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, fresh)  # (dataclasses look their module up there)
        spec.loader.exec_module(fresh)
        with pytest.raises(ImportError, match=re.escape("pip install 'partime-async[video]'")) as info:
            make(fresh)
        assert str(info.value).startswith("VideoSource" if package == "sources" else "VideoSink")


def test_the_readme_video_snippet_runs(tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Video in and out", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert snippet is not None, "the README's video section has no python snippet"
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet.group(1), "README.md", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "50 frames ->" in out and "50 frames of (32, 32, 3) read back" in out


def test_the_video_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["video_io.py", "--frames", "12", "--output", str(tmp_path / "out.mp4")])
    runpy.run_path(str(ROOT / "examples" / "video_io.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "wrote 12 frames to" in out and "read back 12 frames in order" in out
    assert listing(tmp_path) == ["out.mp4", "video_io_input.mp4"]
