"""Camera frames through a conv net on GPU stages: uint8 in, normalised on the GPU, uint8 out.

    python examples/gpu_stream.py [--frames N] [--height H] [--width W] [--graphs]

On a machine with CUDA the model is split over two ``CudaDevice`` stages (two GPUs, or two
stream sets on one): each frame is copied in on a copy stream while the previous one
computes, handed from stage to stage as a GPU tensor with its ready-event (no host round
trip), and copied out on a third stream while the next one computes. ``--graphs`` replays
each stage as a CUDA graph (one launch per frame; eager with a warning if a stage cannot be
captured). Without CUDA the same code runs on two CPU stages, so the example runs anywhere.
Every 10th output is checked against the unsplit model.
"""
import argparse
import asyncio
import sys

import torch
from torch import nn

import partime_async as pa
from partime_async.sinks import CallbackSink
from partime_async.sources import SyntheticVideo, from_iterable


class Normalise(nn.Module):
    """uint8 frames to floats in [0, 1], on whichever device the stage runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255)


class ToUint8(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0, 1).mul_(255).round_().to(torch.uint8)


def make_model(channels: int = 16, depth: int = 6) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Sequential(Normalise(), nn.Conv2d(3, channels, 3, padding=1), nn.ReLU())]
    layers += [nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()) for _ in range(depth - 1)]
    layers.append(nn.Sequential(nn.Conv2d(channels, 3, 1), nn.Sigmoid(), ToUint8()))
    return nn.Sequential(*layers).eval()


def devices(graphs: bool) -> list[pa.Device]:
    if not torch.cuda.is_available():
        return pa.cpu_devices(2)
    second = 1 if torch.cuda.device_count() > 1 else 0
    return [pa.CudaDevice(0, graphs=graphs), pa.CudaDevice(second, graphs=graphs)]


async def main(frames: int, height: int, width: int, graphs: bool, pool: int = 16) -> int:
    """Exit status: 0 if every frame came out and every checked one matched."""
    model = make_model()
    # A camera delivers frames ready-made: render a few once (rendering 1080p on the CPU takes
    # longer than the GPU's work) and cycle through them.
    video = SyntheticVideo(pool, height=height, width=width, dtype=torch.uint8)
    rendered = [video.render(t) for t in range(pool)]
    camera = (rendered[t % pool] for t in range(frames))
    where = devices(graphs)
    reference = model.to(where[0].torch_device if isinstance(where[0], pa.CudaDevice) else "cpu")
    mismatches = 0

    def check(frame: pa.Frame) -> None:  # every 10th frame: the check itself costs a model run
        nonlocal mismatches
        if frame.seq % 10:
            return
        x = rendered[frame.seq % pool].to(next(reference.parameters()).device)
        with torch.no_grad():
            expected = reference(x).cpu()
        # Different kernels (e.g. cuDNN's choices per stream) may round a value differently.
        mismatches += int((frame.data.to(torch.int16) - expected.to(torch.int16)).abs().max()) > 1

    pipe = pa.Pipeline(make_model(), devices=where, balance="time")
    stats = await pa.run(from_iterable(camera, name="camera") >> pipe >> CallbackSink(check))
    kind = "GPU" if isinstance(where[0], pa.CudaDevice) else "CPU (no CUDA here)"
    print(f"{kind} stages {[d.name for d in where]}, balance {pipe.balance}: {stats.delivered} frames of "
          f"{height}x{width} uint8 at {stats.throughput:.0f} frames/s; every 10th output checked against the "
          f"unsplit model's: {mismatches} of {len(range(0, frames, 10))} differ by more than 1")
    return int(mismatches > 0 or stats.delivered != frames)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--height", type=int, default=None, help="default 1080 with CUDA, 96 without")
    parser.add_argument("--width", type=int, default=None, help="default 1920 with CUDA, 128 without")
    parser.add_argument("--graphs", action="store_true", help="replay each GPU stage as a CUDA graph")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if args.graphs and not cuda:
        print("--graphs replays GPU stages as CUDA graphs; without CUDA the stages run on the CPU, eagerly")
    sys.exit(asyncio.run(main(args.frames, args.height or (1080 if cuda else 96),
                              args.width or (1920 if cuda else 128), args.graphs)))
