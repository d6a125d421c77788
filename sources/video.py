"""Real video in: files, network streams and capture devices, decoded by FFmpeg (PyAV).

:class:`VideoSource` reads an ``.mp4`` / ``.mkv`` / ``.webm`` file, an ``rtsp://`` or
``http(s)://`` stream, or a camera (``/dev/video0`` through FFmpeg's ``v4l2`` input) as frames
of uint8 tensors. FFmpeg decodes, skips frames, resizes and converts pixels on a worker thread
of the source's own, never on the event loop; the loop only takes finished tensors.

PyAV is an optional dependency: ``pip install 'partime-async[video]'`` (or ``pip install av``).
This module imports it only when a :class:`VideoSource` is made, so the rest of
:mod:`partime_async.sources` works without it.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import Any, Literal
from urllib.parse import urlsplit

import torch

from partime_async.aio.threads import aclose_to_the_end, in_thread
from partime_async.core.frame import Frame, now

from .sensor import SensorSource

Layout = Literal["nchw", "hwc"]

PIXEL_FORMATS: dict[str, int] = {"rgb24": 3, "bgr24": 3, "rgba": 4, "bgra": 4, "gray": 1}
"""The pixel formats a :class:`VideoSource` delivers, with their channel counts."""

LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "rtp", "srt", "udp", "tcp")
"""URL schemes read as live streams by default (``live=None``)."""

DEVICE_FORMATS = ("v4l2", "video4linux2", "avfoundation", "dshow", "x11grab", "gdigrab", "kmsgrab")
"""FFmpeg input formats of capture devices, read as live by default."""

INSTALL_HINT = "pip install 'partime-async[video]' (or pip install av)"


def require_av(what: str = "VideoSource") -> ModuleType:
    """PyAV, imported now; an ``ImportError`` that says how to install it if it is missing."""
    try:
        import av
    except ImportError as exc:
        raise ImportError(f"{what} decodes and encodes video with PyAV (FFmpeg's bindings), which is not "
                          f"installed: {INSTALL_HINT}") from exc
    return av


@dataclass(frozen=True)
class VideoInfo:
    """What an input's header says about its first video stream (see :meth:`VideoSource.probe`).

    ``width`` and ``height`` are the decoded size (before any resize), ``rate`` the average
    frame rate (frames per second; None if the stream does not say), ``frames`` the frame
    count the container states (None if it does not: live streams, some files), ``duration``
    in seconds (None if unknown), ``codec`` the decoder's name.
    """

    width: int
    height: int
    rate: float | None
    frames: int | None
    duration: float | None
    codec: str


class VideoSource(SensorSource):
    """Frames of a video file, a network stream or a capture device, decoded by FFmpeg.

    ::

        VideoSource("clip.mp4")                                   # a file: ends at its end
        VideoSource("rtsp://camera.local/stream", options={"rtsp_transport": "tcp"})
        VideoSource("/dev/video0", options={"video_size": "640x480", "framerate": "30"})
        VideoSource("testsrc=size=320x240:rate=30", input_format="lavfi")   # FFmpeg's test pattern

    **Frames.** Frame k is a uint8 tensor: ``(1, C, H, W)`` with ``layout="nchw"`` (a batch of
    one, as :class:`~partime_async.sources.SyntheticVideo` gives) or ``(H, W, C)`` with
    ``layout="hwc"`` (as cameras and OpenCV give), C the channels of ``pixel_format``
    (``rgb24``, ``bgr24``: 3; ``rgba``, ``bgra``: 4; ``gray``: 1); ``dtype=torch.float32``
    gives floats in [0, 1] instead. Each tensor owns its memory (a model may change it in
    place). ``frame.meta["time"]`` is the frame's presentation time in seconds and
    ``meta["pts"]`` its presentation timestamp, in the stream's time base, as the stream
    counts them (a file usually from 0); ``t_capture`` is when the source produced the frame
    (the ``now()`` clock: when it was decoded, or with ``realtime=True`` when it was due).
    Seqs are 0, 1, 2, … in stream order; a frame dropped by a full buffer (below) leaves a gap.

    **FFmpeg does the pixel work**, in one filter graph per connection, on the decoding
    thread: ``every=N`` keeps one decoded frame in N (``select``), ``width`` / ``height``
    resize (``scale``; give one of them to keep the aspect ratio), and ``pixel_format`` converts
    (``format``). A stream whose frame size or pixel format changes midway gets a new graph.

    **Threads.** Each connection has one decoding thread (named ``partime-`` and the source's
    name) that opens the input, demuxes, decodes (with FFmpeg's own decoder threads), filters and makes
    the tensors, into a buffer of ``buffer`` frames that the event loop reads. Reading a file
    as fast as it is consumed, the thread waits while the buffer is full (no frame lost). A
    live input or ``realtime=True`` never waits for the consumer: when the buffer is full the
    oldest frame in it is dropped (so the consumer gets the newest frames) and counted in
    :attr:`dropped`. :meth:`close` stops the thread and waits for it; the input is opened and
    closed on that thread only. Counters (reset when an iteration starts), besides
    :class:`SensorSource`'s: :attr:`produced` frames decoded and handed over (dropped ones
    included), :attr:`dropped`; :attr:`info` describes the input once it is open
    (:meth:`probe` reads it without streaming: its size and frame rate, say).

    **Live inputs and reconnects.** ``live=None`` treats network streams (``rtsp``, ``rtmp``,
    ``srt``, ``udp``, ``tcp``, ``rtp``) and capture devices (``/dev/video*``, an
    ``input_format`` such as ``v4l2``) as live, and files and ``http(s)`` URLs (which may be
    files) as not; pass ``live=True`` for an HLS or MJPEG camera over HTTP. A live input that
    fails, stalls past ``read_timeout``, or ends is reopened with exponential back-off
    (``attempts`` tries per frame, ``backoff`` … ``backoff_max`` seconds apart; defaults 8
    tries, 0.1 to 5 s: about 11 s), as :class:`SensorSource` does; after the last try the last
    error is raised. A file with ``live=True`` plays again from its start after each end (a
    stand-in for a camera in tests; FFmpeg decodes it as fast as it can, dropping what the
    consumer does not take: add ``realtime=True`` to play it at its frame rate, as a camera
    would). A file that is not live has one try by default: a missing file raises
    ``FileNotFoundError``, one FFmpeg cannot read (broken, truncated, not a video) a
    ``ValueError`` that says so, and its end ends the stream.

    **Pacing.** ``realtime=True`` emits each frame at its presentation time (relative to the
    first frame), as a camera would deliver the file, whatever the consumer does (with the
    dropping buffer above); a frame a frame-interval or more late (a slow decoder) restarts
    the schedule from it, with no burst to catch up. Without it, a file is read as fast as it
    is consumed.

    Args:
        path_or_url: a file, a URL, a device (``/dev/video0``), or what ``input_format`` reads
            (a ``lavfi`` filter description).
        layout: ``"nchw"`` (default) or ``"hwc"``.
        pixel_format: the channels: ``"rgb24"`` (default), ``"bgr24"``, ``"rgba"``,
            ``"bgra"`` or ``"gray"``.
        dtype: ``torch.uint8`` (default) or ``torch.float32`` (values / 255).
        width, height: resize to this (None: the input's size).
        every: keep one decoded frame in ``every`` (1: all).
        realtime: pace to the presentation times (above).
        live: treat as a live input (None: guess from the path, above).
        input_format: FFmpeg's input format (``"v4l2"``, ``"lavfi"``, ``"mjpeg"``, …; None:
            FFmpeg probes; ``/dev/video*`` defaults to ``v4l2``).
        options: FFmpeg's options for the input (``{"rtsp_transport": "tcp"}``,
            ``{"video_size": "1280x720", "input_format": "mjpeg"}``), strings.
        stream: which video stream of the input (0: the first).
        buffer: decoded frames held ahead of the consumer (>= 1).
        timeout: seconds FFmpeg may block opening or reading a network input before it gives
            up (None: no limit); a read error then, and a reconnect if live.
        frames: stop after this many frames (None: at the end of the input).
        attempts, backoff, backoff_max, read_timeout: as for :class:`SensorSource` (above).
        name: the source's name in errors (default ``video <file name or URL>``).

    Raises ``ImportError`` naming ``pip install 'partime-async[video]'`` when PyAV is missing.
    """

    name = "video"

    def __init__(self, path_or_url: str | Path, *, layout: Layout = "nchw", pixel_format: str = "rgb24",
                 dtype: torch.dtype = torch.uint8, width: int | None = None, height: int | None = None,
                 every: int = 1, realtime: bool = False, live: bool | None = None, input_format: str | None = None,
                 options: Mapping[str, str] | None = None, stream: int = 0, buffer: int = 2,
                 timeout: float | None = 10.0, frames: int | None = None, attempts: int | None = None,
                 backoff: float = 0.1, backoff_max: float = 5.0, read_timeout: float | None = None,
                 name: str | None = None) -> None:
        self.av = require_av("VideoSource")
        self.url = str(path_or_url)
        if input_format is None and self.url.startswith("/dev/video"):
            input_format = "v4l2"
        self.input_format = input_format
        self.live = _guess_live(self.url, input_format) if live is None else bool(live)
        if attempts is None:
            attempts = 8 if self.live else 1
        super().__init__(frames=frames, attempts=attempts, backoff=backoff, backoff_max=backoff_max,
                         read_timeout=read_timeout, name=name or f"video {_short(self.url)}")
        if layout not in ("nchw", "hwc"):
            raise ValueError(f"layout must be 'nchw' (frames of (1, C, H, W)) or 'hwc' (frames of (H, W, C)), "
                             f"got {layout!r}")
        if pixel_format not in PIXEL_FORMATS:
            raise ValueError(f"pixel_format must be one of {', '.join(PIXEL_FORMATS)}, got {pixel_format!r}")
        if dtype not in (torch.uint8, torch.float32):
            raise ValueError(f"dtype must be torch.uint8 or torch.float32 (values / 255), got {dtype}")
        for side, value in (("width", width), ("height", height)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{side} must be an int >= 1 or None (the input's), got {value!r}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be an int >= 1 (keep one frame in `every`), got {every!r}")
        if not isinstance(buffer, int) or isinstance(buffer, bool) or buffer < 1:
            raise ValueError(f"buffer must be an int >= 1 (frames decoded ahead), got {buffer!r}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive or None, got {timeout!r}")
        if not isinstance(stream, int) or stream < 0:
            raise ValueError(f"stream must be an int >= 0 (which video stream), got {stream!r}")
        self.layout: Layout = layout
        self.pixel_format = pixel_format
        self.channels = PIXEL_FORMATS[pixel_format]
        self.dtype = dtype
        self.width = width
        self.height = height
        self.every = every
        self.realtime = realtime
        self.options = {str(k): str(v) for k, v in (options or {}).items()}
        self.stream_index = stream
        self.buffer = buffer
        self.timeout = timeout
        self.info: VideoInfo | None = None
        """The input's :class:`VideoInfo`, once it has been opened."""
        self._reader: _Reader | None = None
        self._dropped_before = 0  # by the readers of earlier connections, this iteration
        self._produced_before = 0
        self._seq_base = 0  # the seq of the current connection's first frame
        self._next_seq = 0  # one past the last seq delivered

    @property
    def dropped(self) -> int:
        """Frames dropped by a full buffer (live or ``realtime`` inputs) in this iteration."""
        return self._dropped_before + (self._reader.dropped if self._reader is not None else 0)

    @property
    def produced(self) -> int:
        """Frames the decoding threads handed over in this iteration (dropped ones included)."""
        return self._produced_before + (self._reader.produced if self._reader is not None else 0)

    def filters(self) -> list[tuple[str, str]]:
        """The FFmpeg filter chain, as ``(filter, arguments)`` pairs, that every decoded frame
        goes through."""
        chain = []
        if self.every > 1:
            chain.append(("select", f"not(mod(n\\,{self.every}))"))
        if self.width is not None or self.height is not None:
            chain.append(("scale", f"{self.width or -1}:{self.height or -1}"))
        chain.append(("format", self.pixel_format))
        return chain

    async def probe(self) -> VideoInfo:
        """Open the input (on a worker thread), read what its header says, close it."""
        def probe() -> VideoInfo:
            container = self._open_container()
            try:
                return _info(self._video_stream(container))
            finally:
                container.close()

        return await in_thread(probe)

    # -- SensorSource ---------------------------------------------------------------------------------
    async def frames(self) -> AsyncIterator[Frame]:
        self._dropped_before = self._produced_before = self._seq_base = self._next_seq = 0
        frames = super().frames()
        try:
            async for frame in frames:
                yield frame
        finally:  # now, not when the garbage collector finalises it: the input is closed at once
            await aclose_to_the_end(frames)

    async def open(self) -> None:
        """Start a decoding thread on the input and wait until it has opened it."""
        self._seq_base = self._next_seq
        reader = _Reader(self, asyncio.get_running_loop())
        reader.start()
        try:
            self.info = await reader.opened()
        except BaseException:  # a failed or cancelled open leaves no thread behind
            await reader.stop()
            raise
        self._reader = reader

    async def read(self) -> Frame | None:
        """The next decoded frame; None at the end of a file. A live input that ends raises
        ``ConnectionError`` (and is reconnected)."""
        reader = self._reader
        if reader is None:
            raise RuntimeError(f"{self.name}: read() before open()")
        item = await reader.get()
        if item is None:
            if self.live:
                raise ConnectionError(f"{self.name}: the live input ended after {reader.produced} frame(s) on this "
                                      "connection")
            return None
        index, data, meta, t_capture = item
        seq = self._seq_base + index
        self._next_seq = seq + 1
        return Frame(seq, data, meta=meta, t_capture=t_capture)

    async def close(self) -> None:
        """Stop the decoding thread and wait for it (it closes the input)."""
        reader, self._reader = self._reader, None
        if reader is not None:
            self._dropped_before += reader.dropped
            self._produced_before += reader.produced
            await reader.stop()

    # -- on the decoding thread ----------------------------------------------------------------------
    def _open_container(self) -> Any:
        av = self.av
        try:
            return av.open(self.url, format=self.input_format, options=self.options, timeout=self.timeout)
        except av.error.FileNotFoundError as exc:
            raise FileNotFoundError(f"{self.name}: no such file or device {self.url!r}") from exc
        except av.error.InvalidDataError as exc:
            raise ValueError(f"{self.name}: FFmpeg cannot read {self.url!r} as a video ({exc.strerror}): a broken "
                             "or truncated file, or not a video (mp4, mkv, webm, …)") from exc

    def _video_stream(self, container: Any) -> Any:
        streams = container.streams.video
        if len(streams) <= self.stream_index:
            raise ValueError(f"{self.name}: {self.url!r} has {len(streams)} video stream(s), so no stream "
                             f"{self.stream_index}" + ("" if streams else " (an audio file?)"))
        return streams[self.stream_index]

    def _tensor(self, frame: Any) -> torch.Tensor:
        """A filtered (packed, ``pixel_format``) frame as a tensor of its own memory."""
        array = frame.to_ndarray()
        pixels = torch.from_numpy(array if array.ndim == 3 else array[:, :, None])
        if self.layout == "nchw":
            data = pixels.permute(2, 0, 1).unsqueeze(0).contiguous()
        else:
            data = pixels.clone(memory_format=torch.contiguous_format)  # the frame's buffer stays FFmpeg's
        if self.dtype == torch.float32:
            return data.to(torch.float32).div_(255)
        return data


class _Reader:
    """One connection: a thread that opens the input, decodes, filters and converts its frames,
    and a buffer through which the event loop takes them."""

    def __init__(self, source: VideoSource, loop: asyncio.AbstractEventLoop) -> None:
        self.source = source
        self.loop = loop
        self.produced = 0  # frames put into the buffer (dropped ones included)
        self.dropped = 0
        self._drops = source.live or source.realtime  # a full buffer drops its oldest frame
        self._cond = threading.Condition()
        self._items: deque[tuple[int, torch.Tensor, dict[str, Any], float]] = deque()
        self._info: VideoInfo | None = None
        self._finished = False
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._waiter: asyncio.Future[None] | None = None
        self._thread = threading.Thread(target=self._run, name=f"partime-{source.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # -- the loop's side ------------------------------------------------------------------------------
    async def opened(self) -> VideoInfo:
        """Wait until the input is open; raises what opening it raised."""
        await self._wait(lambda: self._info is not None or self._finished)
        if self._info is None:
            assert self._error is not None
            raise self._error
        return self._info

    async def get(self) -> tuple[int, torch.Tensor, dict[str, Any], float] | None:
        """The next frame, None at the end; raises the thread's error after the frames before it.
        Cancelled, it takes nothing out of the buffer."""
        await self._wait(lambda: bool(self._items) or self._finished)
        with self._cond:
            if self._items:
                item = self._items.popleft()
                self._cond.notify_all()  # room for the thread
                return item
        if self._error is not None:
            raise self._error
        return None

    async def stop(self) -> None:
        """Ask the thread to stop, and wait for it (to the end, even if cancelled meanwhile)."""
        with self._cond:
            self._stop.set()
            self._cond.notify_all()
        if self._thread.is_alive():
            await in_thread(self._thread.join)

    async def _wait(self, ready: Callable[[], bool]) -> None:
        while True:
            with self._cond:
                if ready():
                    return
                waiter = self._waiter = self.loop.create_future()
            try:
                await waiter
            finally:
                with self._cond:
                    if self._waiter is waiter:
                        self._waiter = None

    # -- the thread's side ------------------------------------------------------------------------------
    def _wake(self) -> None:
        """Wake the loop's waiter, if any. Call with the lock held."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
                self.loop.call_soon_threadsafe(_set_result, waiter)

    def _put(self, data: torch.Tensor, meta: dict[str, Any], t_capture: float) -> bool:
        """Hand a frame to the loop; False once asked to stop."""
        with self._cond:
            while not self._drops and len(self._items) >= self.source.buffer and not self._stop.is_set():
                self._cond.wait()
            if self._stop.is_set():
                return False
            if len(self._items) >= self.source.buffer:
                self._items.popleft()
                self.dropped += 1
            self._items.append((self.produced, data, meta, t_capture))
            self.produced += 1
            self._wake()
        return True

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            self._read_input()
        except BaseException as exc:  # handed to the loop, raised there
            error = exc
        with self._cond:
            self._finished = True
            self._error = error
            self._wake()

    def _read_input(self) -> None:
        source = self.source
        container = source._open_container()
        try:
            stream = source._video_stream(container)
            # FFmpeg's own decoder threads: across frames for files (faster), within each frame
            # for live inputs (frame threading would hold frames back, adding latency)
            stream.thread_type = "SLICE" if source.live else "AUTO"
            with self._cond:
                self._info = _info(stream)
                self._wake()
            filters = _Filters(source, stream)
            pacer = _Pacer(self._stop, stream) if source.realtime else None
            try:
                for decoded in container.decode(stream):
                    if self._stop.is_set():
                        return
                    for frame in filters.push(decoded):
                        if not self._emit(frame, pacer):
                            return
            except source.av.error.FFmpegError as exc:
                exc.add_note(f"{source.name}: decoding failed after {self.produced} frame(s)")
                raise
            for frame in filters.push(None):
                if not self._emit(frame, pacer):
                    return
        finally:
            container.close()

    def _emit(self, frame: Any, pacer: _Pacer | None) -> bool:
        data = self.source._tensor(frame)
        time = float(frame.time) if frame.time is not None else None
        t_capture = now() if pacer is None else pacer.wait(time)
        if self._stop.is_set():
            return False
        return self._put(data, {"pts": frame.pts, "time": time}, t_capture)


class _Filters:
    """The source's FFmpeg filter graph, rebuilt when the decoded frames change size or format."""

    def __init__(self, source: VideoSource, stream: Any) -> None:
        self.source = source
        self.av = source.av
        self.time_base = stream.time_base or Fraction(1, 1000)
        self.graph: Any = None
        self.key: tuple[int, int, str] | None = None

    def push(self, frame: Any) -> list[Any]:
        """The frames out of the graph after ``frame`` went in (None: the end, flush it)."""
        out: list[Any] = []
        if frame is not None:
            key = (frame.width, frame.height, frame.format.name)
            if key != self.key:
                if self.graph is not None:
                    out += self._pull(None)  # what the old graph still holds
                self.graph, self.key = self._build(frame), key
        if self.graph is None:  # (no frame at all)
            return out
        return out + self._pull(frame)

    def _build(self, frame: Any) -> Any:
        graph = self.av.filter.Graph()
        node = graph.add_buffer(width=frame.width, height=frame.height, format=frame.format.name,
                                time_base=self.time_base)
        for name, args in self.source.filters():
            following = graph.add(name, args)
            node.link_to(following)
            node = following
        node.link_to(graph.add("buffersink"))
        graph.configure()
        return graph

    def _pull(self, frame: Any) -> list[Any]:
        av, graph = self.av, self.graph
        graph.push(frame)
        out = []
        while True:
            try:
                out.append(graph.pull())
            except (av.error.BlockingIOError, av.error.EOFError):
                return out


class _Pacer:
    """Waits until each frame's presentation time comes, on the clock of the first frame."""

    def __init__(self, stop: threading.Event, stream: Any) -> None:
        self.stop = stop
        rate = stream.average_rate or stream.guessed_rate
        self.period = float(1 / rate) if rate else 1 / 30
        self.anchor: tuple[float, float] | None = None  # (clock, presentation time) the schedule starts from
        self.previous: float | None = None

    def wait(self, time: float | None) -> float:
        """Wait until ``time`` is due (or the reader is stopped); returns the clock then."""
        if time is None:  # no timestamp: a period after the previous frame
            time = 0.0 if self.previous is None else self.previous + self.period
        t = now()
        if self.anchor is None or self.previous is None or time < self.previous:  # first, or timestamps went back
            self.anchor = (t, time)
        else:
            due = self.anchor[0] + (time - self.anchor[1])
            if due > t:
                self.stop.wait(due - t)
            elif t - due >= max(time - self.previous, 1e-9):  # a frame interval or more late: restart here
                self.anchor = (t, time)
        self.previous = time
        return now()


def _set_result(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _info(stream: Any) -> VideoInfo:
    rate = stream.average_rate or stream.guessed_rate
    duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
    return VideoInfo(width=stream.codec_context.width, height=stream.codec_context.height,
                     rate=float(rate) if rate else None, frames=stream.frames or None, duration=duration,
                     codec=stream.codec_context.name)


def _guess_live(url: str, input_format: str | None) -> bool:
    if input_format is not None and input_format in DEVICE_FORMATS:
        return True
    if url.startswith("/dev/video"):
        return True
    return urlsplit(url).scheme.lower() in LIVE_SCHEMES


def _short(url: str) -> str:
    """A file's name, or a URL without its credentials."""
    parts = urlsplit(url)
    if parts.scheme and parts.netloc:
        host = parts.hostname or ""
        return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"
    return Path(url).name or url
