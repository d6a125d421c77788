"""A 100-layer narrow conv stage, eager vs CUDA graphs, inference and learning: per-frame time ratios.

Issue 7's CUDA-graph "must show": per-frame launch cost O(1) in the number of layers. The
stage is ``--depth`` x [3x3 conv C->C, ReLU] (default 100 layers, C = 16) on small frames
``(1, C, S, S)`` (default S = 32), batch 1: the GPU work per layer is tiny, so eager time is
the host launching some 2 x depth kernels one by one. Frames are already on the GPU (a pool
of ``--pool`` distinct frames, cycled to ``--frames``); both variants run on the same side
stream (as a CudaDevice's compute stream), and each run is timed with perf_counter around
the loop of frames followed by ``torch.cuda.synchronize()``:

* ``eager``    the plain layer loop under ``torch.no_grad()``, as the inference program runs it;
* ``graphed``  ``partime_async.devices.cuda_graphs.GraphedStage`` around that same loop: per frame,
               a copy into the static input, one graph replay, a clone of the static output
               (captured before timing, on the warm-up frames);
* ``learn_eager``    one online-learning step per frame on a copy of the stage (training
                     mode), as a partime stage does it: forward with autograd, backward
                     (``torch.autograd.grad`` w.r.t. the input and the parameters, from a fixed
                     output gradient), an Adam step (PyTorch's default multi-tensor kernels);
* ``learn_graphed``  the same with the forward and backward as
                     ``partime_async.devices.cuda_graphs.GraphedLearningStage`` replays (the Adam step
                     stays eager in both).

Interleaved repeats (order alternating), medians; the last line printed is the ratio
eager / graphed of the inference per-frame times (the learning ratio is printed and recorded
beside it). Outputs are compared (max |diff| printed; cuDNN in
deterministic mode, no autotuner, so they should be equal). Goal: > 1.

Without CUDA, only ``--quick`` (or ``--device cpu``) runs, on the CPU smoke path: the same
code on CPU tensors, where GraphedStage falls back to eager with its warning (printed); not
a measurement, never recorded unless ``--record``. A full run without CUDA says it needs
CUDA, records nothing and exits 0.

    python bench/gpu_graphs.py [--quick] [--device cuda|cpu] [--repeats N] [--frames N]
        [--depth N] [--channels C] [--size S] [--pool N] [--no-record | --record]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):  # run as a script: make `bench._common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from partime_async.devices.cuda_graphs import GraphedLearningStage, GraphedStage
from bench import _common as C

GOAL = 1.0


def make_layers(depth: int, channels: int, device: torch.device) -> list[nn.Module]:
    """``depth`` x (3x3 conv, ReLU): ``2 * depth`` modules; same seed, same weights."""
    torch.manual_seed(0)
    layers = [m for _ in range(depth) for m in (nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())]
    return list(nn.Sequential(*layers).to(device).eval())


def eager_stage(layers: list[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for layer in layers:
                x = layer(x)
        return x
    return run


def learning_step(stage: Callable[[torch.Tensor], torch.Tensor], params: list[nn.Parameter],
                  optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
    """One learning step per frame: forward with autograd, backward from a fixed output
    gradient into the input and the parameters, an optimiser step."""
    def step(x: torch.Tensor) -> None:
        x = x.detach().requires_grad_()
        out = stage(x)
        grads = torch.autograd.grad(out, [x, *params], torch.ones_like(out))
        for p, g in zip(params, grads[1:]):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def on(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
    """``stream`` current in the block (nothing to select on the CPU smoke path)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def timed(fn: Callable[[torch.Tensor], torch.Tensor], frames: Sequence[torch.Tensor],
          stream: torch.cuda.Stream | None) -> float:
    """Seconds to run ``fn`` over ``frames`` on ``stream``, until the GPU is done."""
    cuda = stream is not None
    if cuda:
        torch.cuda.synchronize()
    with on(stream):
        t0 = time.perf_counter()
        for x in frames:
            fn(x)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, default_repeats=7)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="cuda (default when available) or cpu (smoke path: not a measurement)")
    parser.add_argument("--frames", type=int, default=None,
                        help="frames per run (default 2000; quick: 200 on CUDA, 5 on CPU)")
    parser.add_argument("--depth", type=int, default=100, help="conv+ReLU blocks in the stage (default 100)")
    parser.add_argument("--channels", type=int, default=16, help="conv channels C (default 16)")
    parser.add_argument("--size", type=int, default=32, help="frame height and width S (default 32)")
    parser.add_argument("--pool", type=int, default=None, help="distinct frames, cycled (default 8; CPU: 2)")
    args = parser.parse_args(argv)
    kind = C.gpu_or_smoke("gpu_graphs", args.device, args.quick, "same code, GraphedStage falls back to eager")
    if kind is None:
        return 0
    dev = torch.device(kind, 0) if kind == "cuda" else torch.device("cpu")
    threads = torch.get_num_threads()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    if dev.type == "cpu":  # the smoke path: one core, as a CPU stage has (oversubscribed threads crawl)
        torch.set_num_threads(1)
    try:
        return run(args, argv, parser, dev)
    finally:  # `partime-async bench` runs the next benchmark in this process
        torch.set_num_threads(threads)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def run(args: argparse.Namespace, argv: Sequence[str] | None, parser: argparse.ArgumentParser,
        dev: torch.device) -> int:
    cuda = dev.type == "cuda"
    n_frames = args.frames or (2000 if not args.quick else (200 if cuda else 5))
    repeats = args.repeats or (2 if args.quick else 7)
    n_pool = args.pool or (8 if cuda else 2)
    if min(n_frames, repeats, args.depth, args.channels, args.size, n_pool) < 1:
        parser.error("--frames, --repeats, --depth, --channels, --size and --pool must be >= 1")
    if not cuda and not args.record:
        args.no_record = True  # the CPU path is a smoke test: never a result line unless asked for

    if cuda:
        # deterministic kernels, no autotuner: both variants run the same kernels, outputs comparable bit for bit
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    gpu = torch.cuda.get_device_name(dev) if cuda else "none (CPU smoke path)"
    print(f"gpu graphs: device {dev} ({gpu}), stage {args.depth} x [3x3 conv {args.channels}->{args.channels}, ReLU], "
          f"frames (1, {args.channels}, {args.size}, {args.size}) from a pool of {n_pool}, {n_frames} frames per "
          f"run, {repeats} interleaved repeats (medians)", flush=True)

    stage = eager_stage(make_layers(args.depth, args.channels, dev))
    gen = torch.Generator().manual_seed(0)
    pool = [torch.randn(1, args.channels, args.size, args.size, generator=gen).to(dev) for _ in range(n_pool)]
    stream_frames = [pool[i % n_pool] for i in range(n_frames)]
    stream = torch.cuda.Stream(dev) if cuda else None

    graphed = GraphedStage(stage, name=f"{args.depth}-layer conv stage")
    with warnings.catch_warnings(record=True) as caught:  # the fallback's warning: reported below
        warnings.simplefilter("always", RuntimeWarning)
        timed(stage, pool, stream)  # warm-up, not timed: cuDNN, allocator
        timed(graphed, pool, stream)  # the capture happens here, not in the timing
        with on(stream):
            expected = [stage(x) for x in pool]
            got = [graphed(x) for x in pool]
        if cuda:
            torch.cuda.synchronize()
    for w in caught:
        print(f"graphed: {w.message}", flush=True)
    max_diff = max(float((g - e).abs().max()) for g, e in zip(got, expected))
    print(f"graphed: captured={graphed.captured}, replays={graphed.replays}, outputs vs eager max |diff| = "
          f"{max_diff:g}", flush=True)

    # Learning: two copies of the stage with the same weights, each with its own Adam.
    learners = {}
    for name in ("learn_eager", "learn_graphed"):
        module = nn.Sequential(*make_layers(args.depth, args.channels, dev)).train()
        params = list(module.parameters())
        run = module if name == "learn_eager" else GraphedLearningStage(module, name="learning stage")
        learners[name] = (run, learning_step(run, params, torch.optim.Adam(params, lr=1e-4)))
    learn_graphed = learners["learn_graphed"][0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for _, step in learners.values():
            timed(step, pool, stream)  # warm-up and capture, not timed
        if cuda:
            torch.cuda.synchronize()
    for w in caught:
        print(f"learn_graphed: {w.message}", flush=True)
    print(f"learn_graphed: captured={learn_graphed.captured}, replays={learn_graphed.replays}", flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # already reported
        raw = C.interleaved({"eager": lambda: timed(stage, stream_frames, stream),
                             "graphed": lambda: timed(graphed, stream_frames, stream),
                             **{name: (lambda step=step: timed(step, stream_frames, stream))
                                for name, (_, step) in learners.items()}}, repeats)

    per_frame_us = {name: C.median(times) / n_frames * 1e6 for name, times in raw.items()}
    ratio = per_frame_us["eager"] / per_frame_us["graphed"]
    learn_ratio = per_frame_us["learn_eager"] / per_frame_us["learn_graphed"]
    print(f"\n{'variant':14s} {'us/frame':>10s} {'spread':>7s}")
    for name, us in per_frame_us.items():
        print(f"{name:14s} {us:10.1f} {C.spread(raw[name]):7.0%}")
    print("(spread: (max - min) / median of a variant's repeats; large spreads mean a busy machine: rerun)")

    numbers: dict[str, object] = {
        "device": dev.type, "frames": n_frames, "repeats": repeats, "depth": args.depth, "channels": args.channels,
        "frame": f"1x{args.channels}x{args.size}x{args.size}", "pool": n_pool,
        "eager_us": per_frame_us["eager"], "graphed_us": per_frame_us["graphed"], "captured": graphed.captured,
        "max_abs_diff": max_diff, "learn_eager_us": per_frame_us["learn_eager"],
        "learn_graphed_us": per_frame_us["learn_graphed"], "learn_captured": learn_graphed.captured,
        "learn_eager_over_graphed": learn_ratio, "noise": max(C.spread(v) for v in raw.values()),
        "eager_over_graphed": ratio,
    }
    print(f"learning step (forward + backward graphed, Adam eager): eager/graphed = {learn_ratio:.2f}x")
    suffix = "" if cuda else " [CPU smoke path: not a GPU measurement]"
    headline = (f"per-frame time eager/graphed = {ratio:.2f}x ({args.depth} conv+ReLU layers, "
                f"{args.channels} channels; goal > {GOAL:g})" + suffix)
    C.record_run("gpu_graphs", args, argv, numbers, headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
