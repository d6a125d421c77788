"""Online learning on a camera stream: next-frame prediction, pipelined over two CPU stages,
checkpointed while it runs, then resumed from the last checkpoint.

    python examples/online_learning.py [--frames N] [--mode partime|stashed] [--dir DIR]
"""
import argparse
import asyncio
import tempfile
from pathlib import Path

import torch
from torch import nn

import partime_async as pa
from partime_async.checkpoint import load
from partime_async.sinks import Checkpoint, Collect
from partime_async.sources import PanZoomCamera, next_frame_targets


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()),
        nn.Conv2d(16, 3, 1),
    )


def make_pipeline(mode: str) -> pa.Pipeline:
    learning = pa.OnlineLearning(loss=nn.MSELoss(), optimizer=lambda params: torch.optim.Adam(params, 2e-3), mode=mode)
    return pa.Pipeline(make_model(), devices=pa.cpu_devices(2), balance="time", learning=learning)


async def main(frames: int, mode: str, folder: Path) -> None:
    camera = PanZoomCamera(frames + 1, height=32, width=32)
    pipe = make_pipeline(mode)
    outputs = Collect()
    every = max(1, frames // 4)
    stats = await pa.run(next_frame_targets(camera) >> pipe >> [outputs, Checkpoint(pipe, folder / "latest.pt", every=every)])
    losses = [f.meta["loss"] for f in outputs.frames]
    print(f"{mode}: {stats.delivered} frames, {stats.throughput:.0f} frames/s, "
          f"loss {losses[0]:.4f} -> {sum(losses[-5:]) / 5:.4f}; "
          f"steps per stage {[learner.steps for learner in pipe.learners]}")

    # Resume elsewhere from the last checkpoint: same weights and optimiser state, and the
    # camera restarts where the checkpoint says the stream was.
    state = load(folder / "latest.pt")
    resumed = make_pipeline(mode)
    resumed.load_state_dict(state)
    more = PanZoomCamera(state["position"] + every + 1, height=32, width=32, start=state["position"])
    stats = await pa.run(next_frame_targets(more) >> resumed >> Collect())
    print(f"resumed at frame {state['position']}: {stats.delivered} more frames, "
          f"last loss {resumed.stats().stages[-1].loss:.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--mode", choices=["partime", "stashed"], default="partime")
    parser.add_argument("--dir", type=Path, default=None, help="where checkpoints go (default: a temporary folder)")
    args = parser.parse_args()
    if args.dir is not None:
        asyncio.run(main(args.frames, args.mode, args.dir))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(main(args.frames, args.mode, Path(tmp)))
