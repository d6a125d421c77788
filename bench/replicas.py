"""Replicas of a bottleneck stage: one replica against two, in one run.

Two pipelines of two stages whose stage 1 takes twice as long as stage 0, batch-1 frames:

* ``waiting``: stage 0 waits 2 ms, stage 1 waits 4 ms per frame (``time.sleep``, which releases
  the GIL and needs no core: work that waits on a device or on I/O). Two replicas of stage 1
  make it as fast as stage 0, so the pipeline can run up to 2x faster (goal >= 1.8x).
* ``compute``: stage 0 is 2 x (Linear(1024, 1024) + ReLU), stage 1 is 4 x, one intra-op thread
  per replica. It needs cores: with 2 cores for 3 busy threads, two replicas can give at most
  the cores there are (stated with the result).

For each, ``devices=[CpuDevice(0), CpuDevice(1)]`` (one replica) against ``[CpuDevice(0),
[CpuDevice(1), CpuDevice(2)]]`` (two), the same layers and frames, interleaved repeats
(order alternating), medians. The last line printed is the waiting case's ratio.

    python bench/replicas.py [--quick] [--repeats N] [--frames N] [--no-record | --record]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

import partime_async as pa

WAIT_S = 0.002


class Wait(nn.Module):
    """Waits ``seconds`` (GIL released, no core used), then passes the frame on."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x


def waiting_model() -> nn.Sequential:
    return nn.Sequential(Wait(WAIT_S), Wait(2 * WAIT_S))


def compute_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(1024, 1024), nn.ReLU())]).eval()


def devices(replicas: int) -> list:
    second = [pa.CpuDevice(1 + k, threads=1) for k in range(replicas)]
    return [pa.CpuDevice(0, threads=1), second[0] if replicas == 1 else second]


def timed(model: nn.Module, balance: list[int], replicas: int, frames: list[torch.Tensor],
          runner: asyncio.Runner) -> float:
    async def run() -> float:
        pipe = pa.Pipeline(model, devices=devices(replicas), balance=balance, metrics=False)
        return await C.time_stream(pipe, frames)

    return runner.run(run())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, default_repeats=3)
    parser.add_argument("--frames", type=int, default=None, help="frames per run (default 400; quick: 40)")
    args = parser.parse_args(argv)
    n_frames = args.frames or (40 if args.quick else 400)
    repeats = args.repeats or (2 if args.quick else 3)
    if repeats < 1 or n_frames < 2:
        parser.error("--repeats must be >= 1 and --frames >= 2")
    cases = {"waiting": (waiting_model(), [1, 1], torch.zeros(1, 16)),
             "compute": (compute_model(), [4, 8], torch.randn(1, 1024))}
    print(f"replicas: {n_frames} batch-1 frames, stage 1 twice stage 0, one replica against two, {C.cores()} cores, "
          f"{repeats} interleaved repeats (medians)", flush=True)
    with C.runner("auto") as runner, torch.no_grad():
        variants = {f"{case}_{n}": (lambda m=model, b=balance, x=x, n=n: timed(m, b, n, [x] * n_frames, runner))
                    for case, (model, balance, x) in cases.items() for n in (1, 2)}
        seconds = C.interleaved(variants, repeats)
    fps = {name: C.throughput(n_frames, C.median(values)) for name, values in seconds.items()}
    for name, value in fps.items():
        print(f"  {name:<10} {value:8.1f} frames/s", flush=True)
    waiting = fps["waiting_2"] / fps["waiting_1"]
    compute = fps["compute_2"] / fps["compute_1"]
    print(f"  compute-bound: two replicas / one = {compute:.2f} with {C.cores()} cores for stage 0 and two "
          f"replicas (3 busy threads)", flush=True)
    numbers = {**{f"{k}_fps": round(v, 1) for k, v in fps.items()}, "compute_ratio": round(compute, 3),
               "cores": C.cores()}
    C.record_run("replicas", args, argv, numbers,
                 f"waiting stage: two replicas / one = {waiting:.2f} (goal >= 1.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
