"""A custom sensor: a ``SensorSource`` subclass over a simulated camera that drops its
connection now and then, streamed through a pipeline.

    python examples/custom_sensor.py [--frames N] [--error-rate P] [--seed S]

The sensor reconnects with back-off on read errors and loses no frame; a camera that dies for
good ends the run with one ``PipelineError`` naming the sensor, its cause the last read error.
"""
from __future__ import annotations

import argparse
import asyncio
import random

import torch
from torch import nn

import partime_async as pa
from partime_async.sinks import Collect
from partime_async.sources import SensorSource, SyntheticVideo


class SimulatedDevice:
    """The device's driver: connect, read raw frames (uint8 HWC, as cameras deliver them),
    disconnect. Each read fails with probability ``error_rate`` (the link drops and the
    device must be reconnected), and after ``dies_after`` frames every read fails."""

    def __init__(self, *, error_rate: float, seed: int, fps: float = 500.0, dies_after: int | None = None) -> None:
        self.rng = random.Random(seed)
        self.error_rate = error_rate
        self.period = 1.0 / fps
        self.dies_after = dies_after
        self.video = SyntheticVideo(None, height=32, width=32, dtype=torch.uint8, seed=seed)
        self.connected = False
        self.t = 0  # the next frame the device will deliver

    async def connect(self) -> None:
        await asyncio.sleep(0)  # a handshake
        self.connected = True

    async def read_frame(self) -> torch.Tensor:
        if not self.connected:
            raise ConnectionError("not connected")
        await asyncio.sleep(self.period)  # the exposure
        if (self.dies_after is not None and self.t >= self.dies_after) or self.rng.random() < self.error_rate:
            self.connected = False
            raise ConnectionResetError(f"link to the camera dropped before frame {self.t}")
        frame = self.video.render(self.t)[0].permute(1, 2, 0).contiguous()  # HWC uint8
        self.t += 1
        return frame

    async def disconnect(self) -> None:
        self.connected = False


class SimulatedCamera(SensorSource):
    """The sensor: opens the device, turns its raw frames into (1, 3, H, W) float tensors."""

    name = "simulated camera"

    def __init__(self, device: SimulatedDevice, **kwargs) -> None:
        super().__init__(**kwargs)
        self.device = device

    async def open(self) -> None:
        await self.device.connect()

    async def read(self) -> torch.Tensor:
        raw = await self.device.read_frame()
        return raw.permute(2, 0, 1).unsqueeze(0).float().div_(255)

    async def close(self) -> None:
        await self.device.disconnect()


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()),
        nn.Conv2d(16, 3, 1),
    ).eval()


async def main(frames: int, error_rate: float, seed: int) -> None:
    model = make_model()

    # 1. A flaky camera: every dropped link is reconnected, no frame is lost or repeated.
    device = SimulatedDevice(error_rate=error_rate, seed=seed)
    camera = SimulatedCamera(device, frames=frames, attempts=5, backoff=0.001, backoff_max=0.01)
    outputs = Collect()
    devices = pa.cpu_devices(2)
    try:
        stats = await pa.run(camera >> pa.Pipeline(model, devices=devices) >> outputs)
    except pa.PipelineError as error:
        raise SystemExit(f"the flaky camera failed {camera.attempts} reads in a row, more than it retries "
                         f"({error}); try a lower --error-rate") from None
    assert [f.seq for f in outputs.frames] == list(range(frames)), "frames lost or out of order"
    # Frame k is the device's k-th capture: nothing skipped or read twice across reconnects. (The
    # reference uses the stages' intra-op thread count: oneDNN may round differently with another.)
    torch.set_num_threads(devices[0].threads)
    with torch.no_grad():
        for frame in outputs.frames:
            x = device.video.render(frame.seq).float().div_(255)
            assert torch.equal(frame.data, model(x)), f"frame {frame.seq} is not the device's capture {frame.seq}"
    print(f"streamed {stats.delivered} frames from the {camera.name}: {camera.errors} read errors, "
          f"{camera.reconnects} reconnects, every frame delivered in order and equal to the unsplit model's output")

    # 2. A camera that dies for good: the sensor gives up after its attempts, the run fails clearly.
    dead = SimulatedCamera(SimulatedDevice(error_rate=0.0, seed=seed, dies_after=3), frames=frames,
                           attempts=3, backoff=0.001)
    try:
        await pa.run(dead >> pa.Pipeline(model, devices=pa.cpu_devices(2)) >> Collect())
    except pa.PipelineError as error:
        print(f"dead camera: {error.component!r} gave up after {dead.attempts} attempts "
              f"({type(error.__cause__).__name__}: {error.__cause__})")
    else:
        raise AssertionError("the dead camera should have failed the run")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--error-rate", type=float, default=0.1,
                        help="probability that a read drops the link, 0 <= P < 1 (default: 0.1)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if not 0 <= args.error_rate < 1:
        parser.error(f"--error-rate: a probability 0 <= P < 1 (1 would never read a frame), got {args.error_rate}")
    asyncio.run(main(args.frames, args.error_rate, args.seed))
