"""Video out: a graph's output frames encoded by FFmpeg (PyAV) into one video file.

:class:`VideoSink` writes to a temporary file next to the target and renames it when the whole
graph has ended well, as :class:`~partime_async.sinks.JsonlSink` does: a failure or a
cancellation anywhere in the graph leaves no partial file. Encoding runs on a worker thread of
the sink's own, never on the event loop.

PyAV is an optional dependency: ``pip install 'partime-async[video]'`` (or ``pip install av``).
This module imports it only when a :class:`VideoSink` is made.
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from partime_async.aio.threads import in_thread, to_the_end
from partime_async.checkpoint import create_temporary, fsync_folder
from partime_async.core.frame import Frame
from partime_async.sources.video import require_av

from .base import Sink

T = TypeVar("T")
InputLayout = Literal["auto", "nchw", "hwc"]


CONTAINERS: dict[str, str] = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm",
                              ".avi": "avi"}
"""File name suffixes :class:`VideoSink` writes, and FFmpeg's muxer for each."""

# Encoders tried in order, the first this FFmpeg build has wins: H.264, else MPEG-4 part 2
# (every FFmpeg has it); WebM takes VP9, VP8 or AV1 only. Lossless: x264's RGB mode (exact
# RGB, no YUV rounding) or FFV1 (Matroska and AVI).
_LOSSY = {"webm": ("libvpx-vp9", "libvpx", "libaom-av1", "libsvtav1")}
_LOSSY_DEFAULT = ("libx264", "libopenh264", "mpeg4")
_LOSSLESS = {"mp4": ("libx264rgb",), "mov": ("libx264rgb",), "matroska": ("libx264rgb", "ffv1"), "avi": ("ffv1",)}
_LOSSLESS_SETTINGS: dict[str, tuple[str, dict[str, str]]] = {"libx264rgb": ("rgb24", {"crf": "0"}),
                                                             "ffv1": ("bgr0", {})}
_INPUT_FORMATS = {1: "gray", 3: "rgb24", 4: "rgba"}
_CHANNELS = {"gray": 1, "rgb24": 3, "bgr24": 3, "rgba": 4, "bgra": 4}



class VideoSink(Sink):
    """Encodes the output frames into one video file at ``path``, ``fps`` frames per second.

    **Frames.** Each frame's payload (or ``select(frame)``) is a tensor or NumPy array of
    uint8 pixels: ``(N, C, H, W)`` (N images, written in order: a batch of one is one video
    frame) or ``(H, W, C)``, or ``(H, W)`` for gray; ``layout="auto"`` tells them apart by
    their number of dimensions. C is 1 (gray), 3 (RGB) or 4 (RGBA); ``pixel_format="bgr24"``
    or ``"bgra"`` reads 3 or 4 channels as BGR(A). Every frame must have the first frame's
    size. **Floats** are refused with a ``TypeError`` unless ``value_range=(lo, hi)`` is given:
    then ``lo`` maps to 0 and ``hi`` to 255, rounded and clamped (``(0, 1)`` for a model that
    outputs images in [0, 1]). Other dtypes are refused.

    **Encoding.** ``codec=None`` takes H.264 (``libx264``, else ``libopenh264``) where this
    FFmpeg build has an encoder for it, else MPEG-4 part 2 (``mpeg4``), in ``yuv420p``
    (``yuv444p`` with x264 when the width or height is odd, which ``yuv420p`` cannot hold);
    ``.webm`` takes VP9 (else VP8 or AV1). These are lossy: pixels come back near, not equal.
    ``lossless=True`` takes x264's lossless RGB mode (``libx264rgb``, ``crf=0``; ``.mp4``,
    ``.mov``, ``.mkv``) or FFV1 (``.mkv``, ``.avi``): uint8 RGB pixels come back bit for bit.
    ``codec=`` names any FFmpeg encoder, ``options=`` its options (``{"crf": "18",
    "preset": "fast"}``). Frames are ``1 / fps`` apart (their own timestamps are not used).
    The container comes from ``path``'s suffix: ``.mp4``, ``.m4v``, ``.mov``, ``.mkv``,
    ``.webm`` or ``.avi``. Encoding runs on the sink's own worker thread (``partime-video …``).

    **Atomic.** :meth:`open` creates a hidden temporary file in ``path``'s folder (a folder
    where the file should go fails there, before the stream runs); :meth:`close` finishes the
    video, fsyncs it (``fsync=True``) and renames it over ``path``, unless a write failed;
    :meth:`abort` (a failure or cancellation anywhere in the graph) removes it: no partial
    file is ever left, and an older file at ``path`` stays untouched until the rename. A graph
    that delivered no frame leaves no file (a video needs a frame size): :attr:`committed`
    is then None, else ``path``; :attr:`frames` counts the video frames written.
    """

    name = "video"

    def __init__(self, path: str | Path, *, fps: float = 30.0, codec: str | None = None, lossless: bool = False,
                 options: Mapping[str, str] | None = None, layout: InputLayout = "auto",
                 pixel_format: str | None = None, value_range: tuple[float, float] | None = None,
                 select: Callable[[Frame], torch.Tensor | np.ndarray] | None = None, fsync: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.av = av = require_av("VideoSink")
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in CONTAINERS:
            raise ValueError(f"VideoSink writes {', '.join(CONTAINERS)} files; {self.path.name!r} has none of these "
                             "suffixes")
        self.container_format = CONTAINERS[suffix]
        if not fps or fps <= 0:
            raise ValueError(f"fps must be positive, got {fps!r}")
        if layout not in ("auto", "nchw", "hwc"):
            raise ValueError(f"layout must be 'auto', 'nchw' or 'hwc', got {layout!r}")
        if pixel_format is not None and pixel_format not in _CHANNELS:
            raise ValueError(f"pixel_format must be one of {', '.join(_CHANNELS)} or None (by the channel count), "
                             f"got {pixel_format!r}")
        if value_range is not None and not value_range[1] > value_range[0]:
            raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range!r}")
        self.fps = fps
        self.rate = Fraction(fps).limit_denominator(1_000_000)
        self.layout: InputLayout = layout
        self.pixel_format = pixel_format
        self.value_range = value_range
        self.select = select
        self.fsync = fsync
        self.lossless = lossless
        self.codec, self.encoder_format, self.options = self._choose_codec(av, codec, lossless)
        self.options.update({str(k): str(v) for k, v in (options or {}).items()})
        self.committed: Path | None = None
        self.frames = 0
        self._tmp: Path | None = None
        self._container: Any = None
        self._stream: Any = None
        self._size: tuple[int, int] | None = None  # (height, width) of the first frame
        self._thread: ThreadPoolExecutor | None = None
        self._failed = False

    def _choose_codec(self, av: ModuleType, codec: str | None,
                      lossless: bool) -> tuple[str, str | None, dict[str, str]]:
        """``(encoder, its pixel format or None to pick by size, default options)``."""
        if codec is not None:
            try:
                av.codec.Codec(codec, "w")
            except Exception as exc:
                raise ValueError(f"this FFmpeg build has no {codec!r} encoder; leave codec=None to pick one") from exc
            if not lossless:
                return codec, None, {}
            if codec not in _LOSSLESS_SETTINGS:
                raise ValueError(f"lossless=True knows how to make {' and '.join(_LOSSLESS_SETTINGS)} lossless, not "
                                 f"{codec!r}: leave codec=None, or drop lossless and give the codec's own options=")
            pix, options = _LOSSLESS_SETTINGS[codec]
            return codec, pix, dict(options)
        if lossless:
            candidates = _LOSSLESS.get(self.container_format, ())
        else:
            candidates = _LOSSY.get(self.container_format, _LOSSY_DEFAULT)
        for name in candidates:
            if _has_encoder(av, name):
                if lossless:
                    pix, options = _LOSSLESS_SETTINGS[name]
                    return name, pix, dict(options)
                return name, None, {}
        kind = "lossless " if lossless else ""
        raise ValueError(f"this FFmpeg build has no {kind}encoder for {self.path.suffix} files (tried "
                         f"{', '.join(candidates) or 'none'})" +
                         ("; lossless video goes in .mp4, .mov, .mkv or .avi" if lossless else "; pass codec="))

    async def open(self) -> None:
        if self._tmp is not None:
            raise RuntimeError(f"{self.name} sink {self.path} is already open; a sink writes one graph's frames "
                               "(make another sink for another graph)")
        self.committed = None
        self.frames = 0
        self._failed = False
        self._size = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = create_temporary(self.path)  # the mode a plain open() gives; a folder at path fails here
        os.close(fd)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"partime-{self.name}-sink")

    async def write(self, frame: Frame) -> None:
        if self._thread is None:
            raise RuntimeError(f"{self.name}: open() the sink before writing")
        data = self.select(frame) if self.select is not None else frame.data
        try:
            await self._on_thread(self._encode, frame.seq, data)
        except BaseException:
            self._failed = True
            raise

    async def close(self) -> None:
        """Finish the video and rename it to ``path`` (see the class docstring)."""
        if self._tmp is None:
            return
        if self._failed or self._container is None:  # a write failed, or no frame came: no file
            await self.abort()
            return
        try:
            await self._on_thread(self._finish)
            os.replace(self._tmp, self.path)  # on the loop: nothing can fall between it and the record
            self._tmp = None
            self.committed = self.path
            if self.fsync:
                await in_thread(fsync_folder, self.path.parent)
        finally:
            await self.abort()  # the thread ends; after a failed finish, the temporary goes

    async def abort(self) -> None:
        """Drop what was written; ``path`` is left as it was."""
        try:
            if self._container is not None and self._thread is not None:
                await self._on_thread(self._discard)
        finally:
            thread, self._thread = self._thread, None
            if thread is not None:
                await in_thread(thread.shutdown)
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)
                self._tmp = None
            self._container = self._stream = None

    async def _on_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the encoding thread, waited for to its end even if cancelled meanwhile."""
        assert self._thread is not None
        return await to_the_end(asyncio.wrap_future(self._thread.submit(fn, *args)))

    # -- on the encoding thread -------------------------------------------------------------------------
    def _encode(self, seq: int, data: Any) -> None:
        images, pixel_format = self._images(seq, data)
        for image in images:
            if self._container is None:
                self._start(image)
            if image.shape[:2] != self._size:
                h, w = self._size  # type: ignore[misc]
                raise ValueError(f"frame {seq} is {image.shape[1]}x{image.shape[0]} but the video is {w}x{h}: every "
                                 "frame of a video has the first frame's size")
            video_frame = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format=pixel_format)
            video_frame.pts = self.frames
            for packet in self._stream.encode(video_frame):
                self._container.mux(packet)
            self.frames += 1

    def _images(self, seq: int, data: Any) -> tuple[list[np.ndarray], str]:
        """``data`` as (H, W, C) or (H, W) uint8 arrays, and their pixel format."""
        if isinstance(data, torch.Tensor):
            tensor = data.detach().cpu()
        elif isinstance(data, np.ndarray):
            tensor = torch.from_numpy(data)
        else:
            raise TypeError(f"VideoSink encodes one tensor per frame, but frame {seq} holds {type(data).__name__}; "
                            "pass select=lambda frame: <the image tensor>")
        tensor = self._to_uint8(seq, tensor)
        layout: str = self.layout
        if layout == "auto":
            layout = {4: "nchw", 3: "hwc", 2: "hwc"}.get(tensor.dim(), "auto")
        if layout == "nchw" and tensor.dim() == 4:
            images = list(tensor.permute(0, 2, 3, 1).numpy())
        elif layout == "hwc" and tensor.dim() in (2, 3):
            images = [tensor.numpy()]
        else:
            raise ValueError(f"frame {seq} has shape {tuple(tensor.shape)}; VideoSink takes (N, C, H, W), (H, W, C) "
                             f"or (H, W) images (layout={self.layout!r})")
        channels = 1 if images and images[0].ndim == 2 else (images[0].shape[2] if images else 3)
        if self.pixel_format is not None:
            if _CHANNELS[self.pixel_format] != channels:
                raise ValueError(f"frame {seq} has {channels} channel(s), but pixel_format={self.pixel_format!r} "
                                 f"takes {_CHANNELS[self.pixel_format]}")
            pixel_format = self.pixel_format
        elif channels in _INPUT_FORMATS:
            pixel_format = _INPUT_FORMATS[channels]
        else:
            hint = " (a (C, H, W) image? add a batch axis: frame.data[None])" if tensor.dim() == 3 else ""
            raise ValueError(f"frame {seq} has shape {tuple(tensor.shape)}: {channels} channels, where a video frame "
                             f"has 1 (gray), 3 (RGB) or 4 (RGBA){hint}")
        if pixel_format == "gray":
            images = [image[:, :, 0] if image.ndim == 3 else image for image in images]
        return images, pixel_format

    def _to_uint8(self, seq: int, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype == torch.uint8:
            return tensor
        if tensor.is_floating_point() and self.value_range is not None:
            lo, hi = self.value_range
            scaled = (tensor.to(torch.float32) - lo) * (255.0 / (hi - lo))
            return scaled.round_().clamp_(0, 255).to(torch.uint8)
        if tensor.is_floating_point():
            raise TypeError(f"frame {seq} is {tensor.dtype}; VideoSink encodes uint8 pixels (0-255): pass "
                            "value_range=(0, 1) to map floats in [0, 1] to 0-255 (rounded and clamped), or convert "
                            "them in select=")
        raise TypeError(f"frame {seq} is {tensor.dtype}; VideoSink encodes uint8 pixels (0-255), or floats with "
                        "value_range=(lo, hi)")

    def _start(self, image: np.ndarray) -> None:
        """Open the container on the temporary file, with a stream of ``image``'s size."""
        height, width = image.shape[:2]
        container = self.av.open(str(self._tmp), mode="w", format=self.container_format)
        try:
            stream = container.add_stream(self.codec, rate=self.rate, options=self.options)
            stream.width, stream.height = width, height
            stream.pix_fmt = self.encoder_format or self._pixel_format_for(stream, width, height)
            stream.codec_context.time_base = 1 / self.rate
        except BaseException:
            container.close()
            raise
        self._container, self._stream, self._size = container, stream, (height, width)

    def _pixel_format_for(self, stream: Any, width: int, height: int) -> str:
        formats = [f.name for f in (stream.codec_context.codec.video_formats or ())]
        if "yuv420p" in formats or not formats:
            if (width % 2 or height % 2) and "yuv444p" in formats:
                return "yuv444p"  # 4:2:0 halves odd sides; x264 refuses them
            return "yuv420p"
        return formats[0]

    def _finish(self) -> None:
        """Flush the encoder, write the container's trailer, close it, fsync the file."""
        container, self._container = self._container, None
        try:
            for packet in self._stream.encode(None):
                container.mux(packet)
        finally:
            container.close()
        if self.fsync and self._tmp is not None:
            fd = os.open(self._tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _discard(self) -> None:
        container, self._container = self._container, None
        if container is not None:
            try:
                container.close()
            except Exception:  # the file is being removed; what matters is the error that got us here
                pass


def _has_encoder(av: ModuleType, name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:
        return False
    return True
