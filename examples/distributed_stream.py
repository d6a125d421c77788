"""Stages in several processes: one stage per rank of a torchrun job, the stream on rank 0.

    torchrun --nproc-per-node 2 examples/distributed_stream.py [--frames N] [--learn] [--save PATH]

Several hosts: the same command on each, with ``--nnodes N --node-rank K --rdzv-endpoint
HOST:PORT`` (see torchrun's docs). Every rank runs this same script. Rank 0, the driving rank,
holds the source and the sinks and runs stage 0; rank r runs stage r and serves it for each
run of rank 0 (``pa.run`` and ``async with pipe:`` serve on a serving rank). Frames and their
targets travel between the processes over ``torch.distributed`` (gloo on CPU); the outputs
come back to rank 0 in order, equal to the unsplit model's. With ``--learn``, the model
learns online (``partime``) across the ranks, and rank 0's ``state_dict()`` holds what every
stage learnt (``--save`` writes it; load it on any number of ranks with the same split).
"""
from __future__ import annotations

import argparse
import asyncio

import torch
from torch import nn

import partime_async as pa
from partime_async.sinks import Collect
from partime_async.sources import SyntheticVideo


def make_model() -> nn.Sequential:
    torch.manual_seed(0)  # every rank builds the same model (rank 0's weights are sent anyway)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()),
        nn.Conv2d(16, 3, 1),
    )


async def main(frames: int, learn: bool, save: str | None) -> None:
    model = make_model()
    video = SyntheticVideo(frames, height=32, width=32)
    learning = pa.OnlineLearning(mode="partime", optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01),
                                 loss=nn.functional.mse_loss) if learn else None
    devices = pa.ranks.one_stage_per_rank("cpu")  # ["rank0:cpu", "rank1:cpu", ...]
    pipe = pa.Pipeline(model, devices=devices, learning=learning)
    # Learning: each frame's target is the frame itself (an auto-encoder), travelling with it.
    source = (pa.Frame(seq=t, data=video.render(t), target=video.render(t)) for t in range(frames)) if learn \
        else video
    collected = Collect()
    stats = await pa.run(source >> pipe >> collected)  # on a serving rank: serves, returns at the end
    if not pipe.driving:
        return
    print(f"rank 0: {stats.delivered} frames over {len(devices)} ranks, balance {pipe.balance}, "
          f"{stats.throughput:.0f} frames/s")
    for stage in stats.stages:
        print(f"  {stage.name}: {stage.frames} frames, busy {stage.busy_s * 1e3:.1f} ms")
    if learn:
        print(f"learnt: {sum(learner.steps for learner in pipe.learners)} steps over the stages; "
              f"last loss {stats.stages[-1].loss:.4f}")
        if save:
            torch.save(pipe.state_dict(), save)
            print(f"saved to {save}")
    else:
        model.eval()
        with torch.no_grad():
            exact = all(torch.equal(f.data, model(video.render(f.seq))) for f in collected.frames)
        print(f"outputs equal the unsplit model's: {exact}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--learn", action="store_true", help="learn online (partime) across the ranks")
    parser.add_argument("--save", default=None, help="with --learn: where rank 0 saves the learnt state")
    args = parser.parse_args()
    asyncio.run(main(args.frames, args.learn, args.save))
