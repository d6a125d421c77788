"""Any nn.Module: torchvision's ResNet-18 split over two CPU stages, exact.

    python examples/any_model.py [--frames N] [--stages S] [--cut NAME ...]

The model is not an ``nn.Sequential``: the pipeline captures it with ``torch.export`` on the
first frame and cuts its graph between top-level submodules (``conv1``, ``layer1`` …
``fc``); a value that crosses a cut travels with the frame. ``--cut layer3`` names where
stage 1 starts instead of balancing by measured time. ``torchvision`` is the ``vision``
extra (``pip install 'partime-async[vision]'``; ``weights=None``: nothing is downloaded).
Without it, the example builds the same ResNet-18 (basic blocks, [2, 2, 2, 2]) itself.
"""
from __future__ import annotations

import argparse
import asyncio

import torch
from torch import nn

import partime_async as pa


def resnet18() -> tuple[nn.Module, str]:
    """torchvision's ResNet-18 when torchvision is installed, else the same architecture here."""
    torch.manual_seed(0)
    try:
        from torchvision.models import resnet18 as torchvision_resnet18
    except ImportError:
        return ResNet18(), "a ResNet-18 built here (torchvision is not installed)"
    return torchvision_resnet18(weights=None), "torchvision's resnet18(weights=None)"


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)) for cin, cout, stride in widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


async def main(frames: int, stages: int, cuts: list[str] | None) -> None:
    model, which = resnet18()
    model.eval()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, 3, 64, 64, generator=g) for _ in range(frames)]
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(stages, threads=1), balance=cuts or "time")
    async with pipe:
        outs = [f.data async for f in pipe.stream(xs)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-exact at the stages' intra-op thread count
    with torch.no_grad():
        exact = all(torch.equal(out, model(x)) for out, x in zip(outs, xs, strict=True))
    torch.set_num_threads(threads)
    stats = pipe.stats()
    print(f"{which}: {frames} frames over {stages} stages, units {pipe.layer_names}")
    print(f"balance {pipe.balance} (units per stage), {stats.throughput:.0f} frames/s, exact: {exact}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--cut", action="append", default=None, help="the unit where a stage starts (repeat)")
    args = parser.parse_args()
    asyncio.run(main(args.frames, args.stages, args.cut))
