"""Quick start: split a conv net over two CPU stages and stream a synthetic video through it.

    python examples/quickstart.py [--frames N]

Shows the three ways in: ``stream()`` over a source, ``submit()`` for one request, and
``run(source >> pipe >> sinks)`` with fan-out to two sinks.
"""
import argparse
import asyncio

import torch
from torch import nn

import partime_async as pa
from partime_async.sinks import CallbackSink, Collect
from partime_async.sources import SyntheticVideo


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()),
        nn.Conv2d(16, 3, 1),
    ).eval()


async def main(frames: int) -> None:
    model = make_model()
    video = SyntheticVideo(frames, height=32, width=32)

    # 1. A stream in, outputs out, in order.
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(2), balance="time")
    async with pipe:
        async for out in pipe.stream(video):
            assert torch.equal(out.data, model(video.render(out.seq)).detach())  # exact
        # 2. One request at a time (e.g. from a web handler), concurrently.
        ys = await asyncio.gather(*(pipe.submit(video.render(t)) for t in range(4)))
    print(f"streamed {frames} frames and answered {len(ys)} requests; balance {pipe.balance}")

    # 3. A graph with two sinks.
    collected = Collect()
    means: list[float] = []
    stats = await pa.run(video >> pa.Pipeline(model, devices=pa.cpu_devices(2)) >> [
        collected, CallbackSink(lambda frame: means.append(frame.data.mean().item()))])
    print(f"graph: {stats.delivered} frames, {len(collected.frames)} collected, "
          f"{len(means)} means, {stats.throughput:.0f} frames/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=200)
    asyncio.run(main(parser.parse_args().frames))
