"""Learning on a live camera: when frames come faster than a sequential learner takes them,
how many does each learner answer and learn from, how late are its answers, and how good is
its model at the end?

The task and net are the demo's (next-frame prediction on the pan-zoom camera over the shipped
photograph, 64 x 64, MSE, Adam 1e-3; :func:`partime_async.cli.demo_model`), the frames made
before any clock starts. At the start of the run, on the same frames:

* the best sequential learner's rate: plain PyTorch online SGD on the unsplit model (forward,
  loss, backward, step per frame), the better of 1 and 2 intra-op threads;
* the pipeline's rate: ``Pipeline(model, devices=cpu_devices(2, threads=1), balance="time",
  learning=OnlineLearning(mode="partime"))`` streaming the frames as fast as it can.

Then a live camera: :class:`~partime_async.sources.RealTime` plays the frames at the
pipeline's rate with the ``latest`` policy, so a learner that falls behind drops frames as it
would with a real camera (each frame's target is still the camera's next frame). Learners,
each from the same initial weights, repeats interleaved (medians):

* ``sequential_1t`` / ``sequential_2t``: the plain online SGD loop above with 1 and 2
  intra-op threads on the main thread, reading the camera as a clock with the ``latest``
  policy (:func:`live_sequential`); ``sequential`` below is the one that answered more;
* ``partime`` / ``stashed``: the pipeline, and ``partime_dlr`` / ``stashed_dlr`` with
  delay-aware rates (``OnlineLearning(delay_lr=20)``, as in bench/learning.py).

For each: frames answered (outputs), frames learnt from (updates that reached every stage:
stage 0's optimiser steps), frames dropped by the camera, answer latency p50 / p99 (capture to
answer), the loss over the frames it answered (each frame's loss when it was answered), and
the held-out loss of its final weights on the camera's next ``frames // 3`` frames (no
learning). Whether the live path wastes anything is::

    (frames answered, best pipelined / sequential) / (throughput, pipeline / best sequential)

(1.0: the pipeline answers as many more frames as its throughput allows), the last line's
figure (goal >= 0.95). A PNG in docs/.

    python bench/realtime_learning.py [--quick] [--repeats N] [--frames N] [--no-record | --record]
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench._common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

import partime_async as pa
from bench import _common as C
from bench.learning import DELAY_LR, heldout_loss, make_frames
from partime_async.cli import Unsplit, demo_learning, demo_model, intra_op_threads, run_unsplit
from partime_async.sources import RealTime

PLOT = C.BENCH_DIR.parent / "docs" / "realtime_learning.png"
SEQUENTIAL = {"sequential_1t": 1, "sequential_2t": 2}  # name: intra-op threads
PIPELINED = ("partime", "stashed", "partime_dlr", "stashed_dlr")


@dataclasses.dataclass
class Live:
    """One learner on the live camera."""

    answered: int
    learnt: int
    dropped: int
    latencies: list[float]          # seconds, per answered frame
    losses: list[tuple[int, float]]  # (frame seq, loss when answered)
    heldout: float

    def latency(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    @property
    def answered_loss(self) -> float:
        return statistics.fmean(loss for _, loss in self.losses) if self.losses else float("nan")


def sequential_rate(initial: nn.Module, frames: Sequence[pa.Frame], threads: int) -> float:
    seconds, _ = run_unsplit(copy.deepcopy(initial), frames, threads, demo_learning("sequential"))
    return C.throughput(len(frames), seconds)


async def pipeline_rate(initial: nn.Module, frames: Sequence[pa.Frame]) -> tuple[float, list[int]]:
    pipe = pa.Pipeline(copy.deepcopy(initial), devices=pa.cpu_devices(2, threads=1), balance="time",
                       learning=demo_learning("partime"))
    await pipe.start(sample=frames[0].data)  # built (profiled, balanced) before the clock starts
    try:
        t0 = time.perf_counter()
        async for _ in pipe.stream(_copies(frames)):
            pass
        seconds = time.perf_counter() - t0
    finally:
        await pipe.stop()
    return C.throughput(len(frames), seconds), list(pipe.balance)


def live_sequential(model: nn.Module, frames: Sequence[pa.Frame], fps: float, threads: int,
                    heldout: Sequence[pa.Frame]) -> Live:
    """The plain online SGD loop on a live camera, at its best: on this thread (where 2
    intra-op threads are fast: an OpenMP team on a second thread contends with this one's), with
    the camera as a clock (frame k is out at ``t0 + k / fps``) that it reads with the ``latest``
    policy: after each step it takes the newest frame out, the ones it missed are dropped, and
    it waits only when it is ahead. No loop, no thread hand-off: nothing charged that the
    unsplit model itself does not do."""
    learning = demo_learning("sequential")
    unsplit = Unsplit(model, learning)
    latencies, losses, dropped, k_next = [], [], 0, 0
    with intra_op_threads(threads):
        t0 = time.perf_counter()
        while k_next < len(frames):
            k = min(len(frames) - 1, int((time.perf_counter() - t0) * fps))
            if k < k_next:  # ahead of the camera: wait for the next frame
                time.sleep(max(0.0, t0 + k_next / fps - time.perf_counter()))
                k = k_next
            dropped += k - k_next
            unsplit.step(frames[k])
            latencies.append(time.perf_counter() - (t0 + k / fps))
            losses.append((frames[k].seq, unsplit.losses[-1]))
            k_next = k + 1
    return Live(len(losses), len(losses), dropped, latencies, losses, heldout_loss(model, heldout))


async def live_pipeline(model: nn.Module, frames: Sequence[pa.Frame], fps: float, mode: str, balance: list[int],
                        heldout: Sequence[pa.Frame]) -> Live:
    base, _, dlr = mode.partition("_")
    learning = dataclasses.replace(demo_learning(base), delay_lr=DELAY_LR if dlr else None)
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(2, threads=1), balance=balance, learning=learning)
    await pipe.start(sample=frames[0].data)  # built before the camera starts (no target: nothing learnt)
    camera = RealTime(_copies(frames), fps=fps)
    latencies, losses = [], []
    try:
        async for out in pipe.stream(camera):
            latencies.append(out.t_done - out.t_capture)
            losses.append((out.seq, out.meta["loss"]))
    finally:
        await pipe.stop()
    return Live(len(losses), pipe.learners[0].steps, camera.dropped, latencies, losses, heldout_loss(model, heldout))


def _copies(frames: Sequence[pa.Frame]) -> list[pa.Frame]:
    """Fresh frames over the same tensors (the camera stamps each one's capture time)."""
    return [pa.Frame(f.seq, f.data, target=f.target) for f in frames]


def plot(runs: dict[str, Live], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    for name, run in runs.items():
        seqs = [s for s, _ in run.losses]
        values = [v for _, v in run.losses]
        window = 10
        smooth = [statistics.fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]
        left.plot(seqs, smooth, label=name, linewidth=1.3)
    left.set_xlabel("camera frame")
    left.set_ylabel("loss of the frames answered (running mean of 10)")
    left.set_yscale("log")
    left.set_title("Learning on a live camera (paced at the pipeline's rate)")
    left.legend(fontsize=8)
    names = list(runs)
    x = range(len(names))
    right.bar([i - 0.2 for i in x], [runs[n].answered for n in names], width=0.4, label="answered")
    right.bar([i + 0.2 for i in x], [runs[n].learnt for n in names], width=0.4, label="learnt from")
    right.set_xticks(list(x), names, rotation=30, fontsize=8)
    right.set_ylabel("frames")
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(parser, default_repeats=3)
    parser.add_argument("--frames", type=int, default=None, help="camera frames per run (default 600; quick: 24)")
    parser.add_argument("--size", type=int, default=64, help="frame height and width")
    args = parser.parse_args(argv)
    n = args.frames or (24 if args.quick else 600)
    repeats = args.repeats or (1 if args.quick else 3)

    torch.manual_seed(0)
    initial = demo_model()
    frames = make_frames(n, args.size)
    heldout = make_frames(n + max(1, n // 3), args.size)[n:]
    rate_frames = frames[:max(8, min(n, 200))]

    seq_rates = {t: sequential_rate(initial, rate_frames, t) for t in (1, 2)}
    threads = max(seq_rates, key=seq_rates.__getitem__)
    pipe_fps, balance = asyncio.run(pipeline_rate(initial, rate_frames))
    print(f"rates at the start: sequential {seq_rates[1]:.1f} (1 thread) / {seq_rates[2]:.1f} (2 threads) frames/s; "
          f"pipeline {pipe_fps:.1f} frames/s (split {balance}): the camera plays at {pipe_fps:.1f} frames/s")

    results: dict[str, list[Live]] = {name: [] for name in (*SEQUENTIAL, *PIPELINED)}
    for _ in range(repeats):
        for name in results:
            model = copy.deepcopy(initial)
            if name in SEQUENTIAL:
                run = live_sequential(model, frames, pipe_fps, SEQUENTIAL[name], heldout)
            else:
                run = asyncio.run(live_pipeline(model, frames, pipe_fps, name, balance, heldout))
            results[name].append(run)

    def med(name: str, value: str) -> float:
        return C.median([getattr(r, value) if not callable(getattr(r, value)) else getattr(r, value)()
                         for r in results[name]])

    numbers: dict[str, object] = {"frames": n, "repeats": repeats, "camera_fps": pipe_fps, "balance": balance,
                                  "seq_1t_fps": seq_rates[1], "seq_2t_fps": seq_rates[2], "seq_threads": threads}
    seq = max(SEQUENTIAL, key=lambda name: med(name, "answered"))
    seq_heldout = med(seq, "heldout")
    print(f"{'learner':13s} {'answered':>8s} {'learnt':>7s} {'dropped':>7s} {'p50 ms':>7s} {'p99 ms':>7s} "
          f"{'answered loss':>13s} {'held-out / seq':>14s}")
    for name, runs in results.items():
        p50 = C.median([r.latency(0.5) for r in runs]) * 1e3
        p99 = C.median([r.latency(0.99) for r in runs]) * 1e3
        answered, learnt, dropped = (med(name, v) for v in ("answered", "learnt", "dropped"))
        loss, held = med(name, "answered_loss"), med(name, "heldout")
        numbers.update({f"{name}_answered": answered, f"{name}_learnt": learnt, f"{name}_dropped": dropped,
                        f"{name}_p50_ms": p50, f"{name}_p99_ms": p99, f"{name}_answered_loss": loss,
                        f"{name}_heldout_over_seq": held / seq_heldout})
        print(f"{name:13s} {answered:8.0f} {learnt:7.0f} {dropped:7.0f} {p50:7.1f} {p99:7.1f} {loss:13.5f} "
              f"{held / seq_heldout:14.3f}")
    best = max(PIPELINED, key=lambda m: med(m, "answered"))
    answered_ratio = med(best, "answered") / med(seq, "answered")
    throughput_ratio = pipe_fps / seq_rates[threads]
    quotient = answered_ratio / throughput_ratio
    numbers.update({"best_sequential": seq, "best_pipelined": best, "answered_ratio": answered_ratio,
                    "throughput_ratio": throughput_ratio, "quotient": quotient})
    print(f"frames answered, {best} / {seq}: {answered_ratio:.2f}; throughput at the start, pipeline / best "
          f"sequential ({threads} thread(s)): {throughput_ratio:.2f}; held-out losses relative to {seq}'s")
    if not args.quick:
        plot({name: runs[0] for name, runs in results.items()}, PLOT)
        print(f"plot written to {PLOT}")
    C.record_run("realtime_learning", args, argv, numbers,
                 f"realtime_learning: (answered {best}/{seq}) / (throughput pipeline/best sequential) = "
                 f"{quotient:.2f} (goal >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
