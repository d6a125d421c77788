"""Online learning on the real-image stream: pipelined modes against sequential online SGD.

The stream: a camera panning and zooming over a real photograph (matplotlib's sample
photograph, :class:`partime_async.sources.PanZoomCamera`), 64 x 64 frames; the task:
next-frame prediction (frame t's target is frame t+1), mean squared error, Adam (lr 1e-3) —
the demo's job. The model: the demo's 9-layer conv net. Frames are generated before timing,
and every variant starts from the same weights and sees the same frames.

Variants, in the same run with interleaved repeats (medians):

* ``sequential_1t``: plain PyTorch online SGD on the unsplit model (forward, loss, backward,
  step per frame) with ``torch.set_num_threads(1)`` — PARTIME's baseline;
* ``sequential_2t``: the same with 2 intra-op threads;
* ``partime`` / ``stashed``: ``Pipeline(model, devices=cpu_devices(2, threads=1),
  learning=OnlineLearning(mode=...))``, built (profiled, balanced) before the clock starts, on
  the event loop ``pa.run`` picks (``--loop auto``: uvloop when installed).

* ``ceiling`` (a reference, not a competitor): the two stages' learning work (forward,
  backward, Adam step per frame; the second stage on the first's outputs computed beforehand,
  the first with a stand-in output gradient) on two plain threads at the same time, no
  hand-off, split where ``balance="time"`` split the pipeline: frames / the slower thread's
  time bounds what any two-stage pipeline can reach on this machine now.

* ``partime_dlr`` / ``stashed_dlr``: the same pipelines with delay-aware learning rates
  (``OnlineLearning(delay_lr=DELAY_LR)``: stage k's rate / (1 + c * d_k)); losses only, run
  once outside the timed loop (the rates change no compute, so their throughput is that of
  the plain mode).
* ``lag1`` (a reference for the losses, not timed): sequential online SGD on the unsplit
  model with every update one frame late (frame t's gradient, taken at the weights frame t
  saw, applied after frame t+1's forward; the owed ones after the last frame). A bubble-free
  pipeline cannot avoid lag: its first stage starts frame t+1 before frame t's gradient is
  back (PARTIME's rule and weight stashing delay the first stage's updates 2(S-1) frames, the
  last stage's none). What a uniform one-frame lag alone costs on this task shows here.

Besides the running loss, each mode's final weights are scored on the next ``frames // 3``
frames of the same camera without learning (``held-out``): the quality of the model learnt,
apart from what recency adds to the running loss (a learner whose last step fitted frame t
predicts frame t+1 well from memory).

Printed: frames/s of each, throughput ratios (goals: >= 1.7x over sequential_1t, >= 1.3x over
the best sequential), the final running loss of each mode (mean over the last quarter of the
frames) relative to sequential's (goal <= 1.10x), the same for ``lag1``, the held-out loss of
each mode's final weights relative to sequential's, and a PNG of loss against frames
(``bench/learning_loss.png``). Last line: the better pipelined mode's throughput over the best
sequential.

    python bench/learning.py [--quick] [--repeats N] [--frames N] [--loop auto|uvloop|asyncio]
        [--no-record | --record]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import copy
import dataclasses
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):  # run as a script: make `bench._common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

import partime_async as pa
from bench import _common as C
from partime_async.cli import demo_learning, demo_model, run_unsplit
from partime_async.sources import PanZoomCamera

PLOT = C.BENCH_DIR / "learning_loss.png"
# c of delay_lr for the *_dlr variants: the best of c in {0.5, 1, 2, 5, 10, 20, 50} on this
# stream (300 frames, split [4, 5]); the loss ratio is not monotonic in c (see the README).
DELAY_LR = 20.0


def make_frames(n: int, size: int) -> list[pa.Frame]:
    camera = PanZoomCamera(n + 1, height=size, width=size)
    images = [camera.render(t) for t in range(n + 1)]
    return [pa.Frame(t, images[t], target=images[t + 1]) for t in range(n)]


def sequential(model: nn.Module, frames: Sequence[pa.Frame], threads: int) -> tuple[float, list[float]]:
    """Plain online SGD on the unsplit model: seconds and per-frame losses (no warm-up step, so
    that it learns from exactly the frames the pipelines learn from)."""
    return run_unsplit(model, frames, threads, demo_learning("sequential"), warmup=False)


def pipelined(model: nn.Module, frames: Sequence[pa.Frame], mode: str, delay_lr: float | None = None,
              loop: str = "auto") -> tuple[float, list[float], list[int]]:
    """Our pipeline with two CPU stages, on the event loop ``loop``: seconds, per-frame losses, balance."""
    learning = dataclasses.replace(demo_learning(mode), delay_lr=delay_lr)

    async def go() -> tuple[float, list[float], list[int]]:
        pipe = pa.Pipeline(model, devices=pa.cpu_devices(2, threads=1), balance="time", learning=learning)
        # Build on an unlabelled copy of frame 0 (profiling only; a frame without target does
        # not learn), so that the clock below times the stream alone.
        await pipe.start(sample=frames[0].data)
        try:
            t0 = time.perf_counter()
            losses = [f.meta["loss"] async for f in pipe.stream(frames)]
            seconds = time.perf_counter() - t0
        finally:
            await pipe.stop()
        return seconds, losses, list(pipe.balance)

    with C.runner(loop) as runner:
        return runner.run(go())


def ceiling(model: nn.Sequential, frames: Sequence[pa.Frame], balance: Sequence[int]) -> float:
    """Both stages' learning work at once on two threads (see the module docstring): seconds."""
    first, second = model[:balance[0]], model[balance[0]:]
    with torch.no_grad():
        middles = [first(f.data) for f in frames]
    grad = torch.full_like(middles[0], 1e-4)  # stands in for the gradient the second stage sends
    learning = demo_learning("sequential")

    def stage(k: int) -> None:
        module = (first, second)[k]
        optimizer = learning.optimizer(module.parameters())
        for x, f in zip(middles, frames):
            if k == 0:
                first(f.data).backward(grad)
            else:
                learning.loss(second(x.detach().requires_grad_()), f.target).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return C.on_threads([lambda: stage(0), lambda: stage(1)])


def lagged(model: nn.Module, frames: Sequence[pa.Frame], lag: int = 1) -> list[float]:
    """The ``lag1`` reference: online SGD on the unsplit model, frame t's gradient
    applied after frame t+lag's forward. Per-frame losses; ``model`` learns in place."""
    learning = demo_learning("sequential")
    params = list(model.parameters())
    optimizer = learning.optimizer(params)
    pending: collections.deque[tuple[torch.Tensor, ...]] = collections.deque()
    losses = []

    def step() -> None:
        for p, g in zip(params, pending.popleft()):
            p.grad = g
        optimizer.step()

    for f in frames:
        loss = learning.loss(model(f.data), f.target)
        losses.append(loss.item())
        pending.append(torch.autograd.grad(loss, params))
        if len(pending) > lag:
            step()
    while pending:  # the owed updates land after the last frame, as sequential's all do
        step()
    return losses


def heldout_loss(model: nn.Module, frames: Sequence[pa.Frame]) -> float:
    """Mean loss of ``model`` as it is (no learning) on ``frames``."""
    loss = demo_learning("sequential").loss
    with torch.no_grad():
        return sum(loss(model(f.data), f.target).item() for f in frames) / len(frames)


def split_of(model: nn.Module, frame: pa.Frame, mode: str) -> list[int]:
    """The balance ``balance="time"`` picks for a learning pipeline (built, not run)."""
    async def build() -> list[int]:
        pipe = pa.Pipeline(model, devices=pa.cpu_devices(2, threads=1), balance="time", learning=demo_learning(mode))
        await pipe.start(sample=frame.data)
        await pipe.stop()
        return list(pipe.balance)

    return asyncio.run(build())


def final_loss(losses: Sequence[float]) -> float:
    tail = losses[-max(1, len(losses) // 4):]
    return sum(tail) / len(tail)


def plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        window = 10
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(smooth, label=name, linewidth=1.4)
    ax.set_xlabel("frame")
    ax.set_ylabel("next-frame MSE (running mean of 10)")
    ax.set_yscale("log")
    ax.set_title("Online learning on the pan-zoom camera stream")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(parser, default_repeats=3)
    parser.add_argument("--frames", type=int, default=None, help="frames per run (default 300; quick: 24)")
    parser.add_argument("--size", type=int, default=64, help="frame height and width")
    C.add_loop_arg(parser)
    args = parser.parse_args(argv)
    n = args.frames or (24 if args.quick else 300)
    repeats = args.repeats or (1 if args.quick else 3)

    torch.manual_seed(0)
    initial = demo_model()
    frames = make_frames(n, args.size)
    heldout = make_frames(n + max(1, n // 3), args.size)[n:]
    curves: dict[str, list[float]] = {}
    learnt: dict[str, nn.Module] = {}  # each variant's final weights
    balances: dict[str, list[int]] = {}
    ceiling_balance = split_of(copy.deepcopy(initial), frames[0], "partime")

    def variant(name: str, run: Callable[[nn.Module], tuple]) -> Callable[[], float]:
        def timed() -> float:
            model = copy.deepcopy(initial)
            seconds, losses, *rest = run(model)
            curves[name], learnt[name] = losses, model
            if rest:
                balances[name] = rest[0]
            return seconds
        return timed

    variants = {
        "sequential_1t": variant("sequential_1t", lambda m: sequential(m, frames, 1)),
        "sequential_2t": variant("sequential_2t", lambda m: sequential(m, frames, 2)),
        "partime": variant("partime", lambda m: pipelined(m, frames, "partime", loop=args.loop)),
        "stashed": variant("stashed", lambda m: pipelined(m, frames, "stashed", loop=args.loop)),
        "ceiling": lambda: ceiling(copy.deepcopy(initial), frames, ceiling_balance),
    }
    times = C.interleaved(variants, repeats)
    fps = {name: C.throughput(n, C.median(ts)) for name, ts in times.items()}
    best_seq = max(fps["sequential_1t"], fps["sequential_2t"])
    seq_loss = final_loss(curves["sequential_1t"])
    numbers: dict[str, object] = {"frames": n, "repeats": repeats, "size": args.size, "loop": C.loop_name(args.loop)}
    for name in variants:
        numbers[f"{name}_fps"] = fps[name]
        loss = f"   final running loss {final_loss(curves[name]):.5f}" if name in curves else ""
        print(f"{name:14s} {fps[name]:8.1f} frames/s{loss}")
    numbers["ceiling_balance"] = ceiling_balance
    numbers["ceiling_over_best_seq"] = fps["ceiling"] / best_seq
    for mode in ("partime", "stashed"):
        numbers[f"{mode}_over_seq1t"] = fps[mode] / fps["sequential_1t"]
        numbers[f"{mode}_over_best_seq"] = fps[mode] / best_seq
        numbers[f"{mode}_over_ceiling"] = fps[mode] / fps["ceiling"]
        numbers[f"{mode}_loss_over_seq"] = final_loss(curves[mode]) / seq_loss
        numbers[f"{mode}_balance"] = balances.get(mode)
        print(f"{mode}: {fps[mode] / fps['sequential_1t']:.2f}x sequential-1-thread (goal >= 1.7), "
              f"{fps[mode] / best_seq:.2f}x best sequential (goal >= 1.3), "
              f"final loss {final_loss(curves[mode]) / seq_loss:.3f}x sequential's (goal <= 1.10)")
    print(f"ceiling (split {ceiling_balance}): {fps['ceiling'] / best_seq:.2f}x best sequential: what two "
          f"stages can reach on this machine; partime {fps['partime'] / fps['ceiling']:.2f}x and stashed "
          f"{fps['stashed'] / fps['ceiling']:.2f}x of it")
    for mode in ("partime", "stashed"):  # delay-aware rates: losses only (same compute)
        name = f"{mode}_dlr"
        learnt[name] = copy.deepcopy(initial)
        _, curves[name], balance = pipelined(learnt[name], frames, mode, delay_lr=DELAY_LR, loop=args.loop)
        numbers[f"{name}_loss_over_seq"] = final_loss(curves[name]) / seq_loss
        numbers[f"{name}_balance"] = balance
        print(f"{name} (delay_lr={DELAY_LR:g}): final running loss {final_loss(curves[name]):.5f}, "
              f"{final_loss(curves[name]) / seq_loss:.3f}x sequential's (goal <= 1.10)")
    learnt["lag1"] = copy.deepcopy(initial)
    curves["lag1"] = lagged(learnt["lag1"], frames)
    numbers["lag1_loss_over_seq"] = final_loss(curves["lag1"]) / seq_loss
    print(f"lag1 (sequential, every update one frame late): final running loss {final_loss(curves['lag1']):.5f}, "
          f"{final_loss(curves['lag1']) / seq_loss:.3f}x sequential's")
    seq_heldout = heldout_loss(learnt["sequential_1t"], heldout)
    print(f"held-out loss (final weights on the next {len(heldout)} frames, no learning), relative to "
          f"sequential's {seq_heldout:.5f}:")
    for name in ("partime", "stashed", "partime_dlr", "stashed_dlr", "lag1"):
        numbers[f"{name}_heldout_over_seq"] = heldout_loss(learnt[name], heldout) / seq_heldout
        print(f"  {name:12s} {numbers[f'{name}_heldout_over_seq']:.3f}x")
    numbers["spread"] = max(C.spread(ts) for ts in times.values())
    if not args.quick:
        plot(curves, PLOT)
        print(f"loss plot written to {PLOT}")
    best = max(("partime", "stashed"), key=lambda m: fps[m])
    ratio = fps[best] / best_seq
    C.record_run("learning", args, argv, numbers,
                 f"learning: best pipelined ({best}) / best sequential = {ratio:.2f} (goal >= 1.3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
