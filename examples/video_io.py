"""Video in and out: a video file (or a camera, or a network stream) through a pipeline into a
new video file.

    python examples/video_io.py [--input PATH_OR_URL] [--output out/video_io.mp4] [--frames N]
                                [--size N] [--realtime]

Without ``--input`` it first makes a clip of its own (synthetic frames encoded by a
``VideoSink``), so it runs anywhere PyAV does: ``pip install 'partime-async[video]'``.
``VideoSource`` decodes on its own worker thread and FFmpeg resizes the frames; a two-stage
pipeline blurs and inverts them; ``VideoSink`` encodes the outputs on its own thread, into a
temporary file renamed when the graph has ended well. The output is then read back and
compared with the model's outputs (H.264 and MPEG-4 are lossy: near, not equal).
"""
from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import torch
from partime_async.sinks import Collect, VideoSink
from partime_async.sources import SyntheticVideo, VideoSource
from torch import nn

import partime_async as pa


class Invert(nn.Module):
    """``1 - x``: images in [0, 1] stay in [0, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1 - x


def make_model() -> nn.Sequential:
    """Stage 0 blurs (a 5x5 box filter per channel), stage 1 inverts."""
    blur = nn.Conv2d(3, 3, 5, padding=2, groups=3, bias=False, padding_mode="replicate")
    with torch.no_grad():
        blur.weight.fill_(1 / 25)
    return nn.Sequential(blur, Invert()).eval()


async def make_clip(path: Path, frames: int, size: int) -> None:
    """A clip to read: deterministic synthetic frames, encoded by a VideoSink."""
    video = SyntheticVideo(frames, height=size, width=size, dtype=torch.uint8, speed=0.02)
    await pa.run(video >> pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1)) >> VideoSink(path, fps=25))


async def main(source_path: str | None, output: Path, frames: int, size: int, realtime: bool) -> None:
    if source_path is None:
        source_path = str(output.with_name("video_io_input.mp4"))
        await make_clip(Path(source_path), frames, size)
        print(f"made a clip of {frames} frames at {source_path}")
    source = VideoSource(source_path, width=size, height=size, dtype=torch.float32, frames=frames,
                         realtime=realtime)
    info = await source.probe()
    print(f"input: {source.name}, {info.width}x{info.height} {info.codec}, "
          f"{info.rate or 'unknown'} frames/s, resized to {size}x{size} by FFmpeg")

    model = make_model()
    inputs = Collect()  # the outputs kept in memory too, to check the file against them
    sink = VideoSink(output, fps=info.rate or 25, value_range=(0, 1))  # the model's floats in [0, 1] -> 0-255
    stats = await pa.run(source >> pa.Pipeline(model, devices=pa.cpu_devices(2), balance=[1, 1]) >> [sink, inputs])
    print(f"wrote {sink.frames} frames to {sink.committed} ({sink.codec}); "
          f"{source.dropped} dropped by the real-time source")
    assert stats.delivered == sink.frames == len(inputs.frames)

    back = [frame async for frame in VideoSource(output, dtype=torch.float32)]
    assert [f.seq for f in back] == list(range(len(inputs.frames))), "frames lost or out of order"
    error = max((b.data - o.data.clamp(0, 1)).abs().mean().item() for b, o in zip(back, inputs.frames, strict=True))
    assert error < 0.02, f"the video read back is far from the model's outputs: mean error {error:.4f}"
    print(f"read back {len(back)} frames in order; mean pixel error against the model's outputs at most "
          f"{255 * error:.2f} of 255 (lossy codec)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", metavar="PATH_OR_URL", help="a video file, URL or camera (default: make a clip)")
    parser.add_argument("--output", type=Path, default=Path("out/video_io.mp4"), help="the video to write")
    parser.add_argument("--frames", type=int, default=100, help="at most this many frames (default: 100)")
    parser.add_argument("--size", type=int, default=64, help="frames resized to SIZE x SIZE (default: 64)")
    parser.add_argument("--realtime", action="store_true", help="play the input at its own frame rate")
    args = parser.parse_args()
    if args.frames < 1 or args.size < 8:
        parser.error("--frames must be >= 1 and --size >= 8")
    asyncio.run(main(args.input, args.output, args.frames, args.size, args.realtime))
