"""The framework's own cost per hop, against bare asyncio baselines in the same run.

Identity stages (one ``nn.Identity`` per stage) and tiny frames (``torch.zeros(1, 16)``), so
that what is timed is the machinery between stages, not compute. For S = 1 and S = 4 stages:

* ``bare_queue``   S coroutines joined by bounded ``asyncio.Queue`` s (same capacity), each
                   ``x = await q_in.get(); y = stage(x)`` under ``torch.no_grad()``;
                   ``await q_out.put(y)``; a producer task and a consumer;
* ``ours_inline``  ``Pipeline`` on ``cpu_devices(S, inline=True)``, ``input_spec=None``;
* ``ours_inline_spec``  the same with the default ``input_spec="first"`` (validation on);
* ``bare_executor`` the queue chain, but each stage does
                   ``y = await loop.run_in_executor(pool_k, fn, x)`` on its own single-thread
                   ``ThreadPoolExecutor``;
* ``ours_thread``  ``Pipeline`` on ``cpu_devices(S, inline=False, threads=1)``.

Timed: the stream only (first frame in to last frame out); start/stop of pipelines and
thread pools is left out for all. Definition of the per-hop cost (the same for everyone):

    per_hop = (t(S=4) - t(S=1)) / 3 / frames

computed within each repeat (the two runs are close in time) and then the median taken. The
S=1 figure, t(S=1) / frames, is the whole per-frame cost of a one-stage chain (admission,
one hop, delivery). Goals: ours_inline / bare_queue <= 1.5, ours_thread / bare_executor <= 1.0.
The last line printed is the inline ratio.

    python bench/hop_overhead.py [--quick] [--repeats N] [--loop asyncio|uvloop] [--no-record | --record]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):  # run as a script: make `bench._common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

import partime_async as pa
from bench import _common as C

STAGE_COUNTS = (1, 4)
VARIANTS = ("bare_queue", "ours_inline", "ours_inline_spec", "bare_executor", "ours_thread")
LABELS = {
    "bare_queue": "bare asyncio.Queue chain",
    "ours_inline": "ours inline (input_spec=None)",
    "ours_inline_spec": "ours inline (input_spec='first')",
    "bare_executor": "bare run_in_executor chain",
    "ours_thread": "ours thread (threads=1)",
}


# -- the variants: each returns the seconds from first frame in to last frame out ---------------
async def bare_queue(frames: Sequence[torch.Tensor], stages: int, capacity: int) -> float:
    mods = [nn.Identity() for _ in range(stages)]
    queues: list[asyncio.Queue] = [asyncio.Queue(capacity) for _ in range(stages + 1)]
    end = None

    async def producer() -> None:
        q = queues[0]
        for x in frames:
            await q.put(x)
        await q.put(end)

    async def stage(k: int) -> None:
        q_in, q_out, mod = queues[k], queues[k + 1], mods[k]
        while True:
            x = await q_in.get()
            if x is end:
                await q_out.put(end)
                return
            with torch.no_grad():
                y = mod(x)
            await q_out.put(y)

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(producer())] + [asyncio.create_task(stage(k)) for k in range(stages)]
    q_last, n = queues[-1], 0
    while (await q_last.get()) is not end:
        n += 1
    dt = time.perf_counter() - t0
    await asyncio.gather(*tasks)
    assert n == len(frames), (n, len(frames))
    return dt


async def bare_executor(frames: Sequence[torch.Tensor], stages: int, capacity: int) -> float:
    mods = [nn.Identity() for _ in range(stages)]
    queues: list[asyncio.Queue] = [asyncio.Queue(capacity) for _ in range(stages + 1)]
    pools = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"bare-{k}") for k in range(stages)]
    loop = asyncio.get_running_loop()
    end = None

    def make_fn(mod: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return mod(x)
        return fn

    fns = [make_fn(m) for m in mods]
    for pool in pools:  # start the worker threads before timing, as a pipeline's start() does
        await loop.run_in_executor(pool, int)

    async def producer() -> None:
        q = queues[0]
        for x in frames:
            await q.put(x)
        await q.put(end)

    async def stage(k: int) -> None:
        q_in, q_out, pool, fn = queues[k], queues[k + 1], pools[k], fns[k]
        while True:
            x = await q_in.get()
            if x is end:
                await q_out.put(end)
                return
            y = await loop.run_in_executor(pool, fn, x)
            await q_out.put(y)

    try:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(producer())] + [asyncio.create_task(stage(k)) for k in range(stages)]
        q_last, n = queues[-1], 0
        while (await q_last.get()) is not end:
            n += 1
        dt = time.perf_counter() - t0
        await asyncio.gather(*tasks)
    finally:
        for pool in pools:
            pool.shutdown(wait=True)
    assert n == len(frames), (n, len(frames))
    return dt


async def ours(frames: Sequence[torch.Tensor], stages: int, capacity: int, *, inline: bool,
               input_spec: str | None, window: int) -> float:
    model = nn.Sequential(*[nn.Identity() for _ in range(stages)])
    devices = pa.cpu_devices(stages, inline=inline, threads=None if inline else 1)
    pipe = pa.Pipeline(model, devices=devices, balance=[1] * stages, input_spec=input_spec,
                       capacity=capacity, window=window)
    dt = await C.time_stream(pipe, frames)
    stats = pipe.stats()
    assert [s.inline for s in stats.stages] == [inline] * stages, [s.inline for s in stats.stages]
    assert all(s.frames == len(frames) for s in stats.stages)
    return dt


def make_variant(name: str, frames: Sequence[torch.Tensor], stages: int, capacity: int, window: int):
    if name == "bare_queue":
        return lambda: bare_queue(frames, stages, capacity)
    if name == "bare_executor":
        return lambda: bare_executor(frames, stages, capacity)
    if name == "ours_inline":
        return lambda: ours(frames, stages, capacity, inline=True, input_spec=None, window=window)
    if name == "ours_inline_spec":
        return lambda: ours(frames, stages, capacity, inline=True, input_spec="first", window=window)
    if name == "ours_thread":
        return lambda: ours(frames, stages, capacity, inline=False, input_spec=None, window=window)
    raise ValueError(name)


def loop_factory(kind: str):
    if kind == "asyncio":
        return None
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError as exc:  # pragma: no cover - uvloop is a dependency off Windows
            raise SystemExit(f"--loop uvloop needs uvloop installed ({exc})")
        return uvloop.new_event_loop
    raise SystemExit(f"unknown loop {kind!r}")


# -- main ---------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, default_repeats=5)
    parser.add_argument("--frames", type=int, default=None, help="frames per run (default 20000; quick: 1000)")
    parser.add_argument("--capacity", type=int, default=4, help="channel / queue capacity (default 4)")
    parser.add_argument("--window", type=int, default=2, help="pipeline window (default 2)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="event loop (default asyncio)")
    args = parser.parse_args(argv)
    n_frames = args.frames or (1000 if args.quick else 20000)
    repeats = args.repeats or (2 if args.quick else 5)
    if repeats < 1 or n_frames < 2:
        parser.error("--repeats must be >= 1 and --frames >= 2")

    frames = [torch.zeros(1, 16) for _ in range(n_frames)]
    warm = frames[:min(len(frames), 200)]
    print(f"hop overhead: {n_frames} frames of (1, 16), identity stages, capacity {args.capacity}, "
          f"window {args.window}, loop {args.loop}, {repeats} interleaved repeats (medians)", flush=True)

    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        def timed(factory):
            return lambda: runner.run(factory())

        for s in STAGE_COUNTS:  # warm-up: imports, allocator, code paths; not timed
            for name in VARIANTS:
                runner.run(make_variant(name, warm, s, args.capacity, args.window)())
        variants = {(name, s): timed(make_variant(name, frames, s, args.capacity, args.window))
                    for name in VARIANTS for s in STAGE_COUNTS}
        raw = C.interleaved({f"{n}@{s}": v for (n, s), v in variants.items()}, repeats)

    us = 1e6 / n_frames
    s_lo, s_hi = STAGE_COUNTS
    per_frame = {(n, s): C.median(raw[f"{n}@{s}"]) * us for n in VARIANTS for s in STAGE_COUNTS}
    per_hop = {n: C.median([(b - a) / (s_hi - s_lo) * us for a, b in zip(raw[f"{n}@{s_lo}"], raw[f"{n}@{s_hi}"])])
               for n in VARIANTS}
    noise = max(C.spread(v) for v in raw.values())

    print(f"\nper_hop = (t(S={s_hi}) - t(S={s_lo})) / {s_hi - s_lo} / frames, paired within each repeat, "
          f"median over repeats; S={s_lo}: t / frames")
    print(f"{'variant':36s} {'S=1 us/frame':>13s} {'S=4 us/frame':>13s} {'per-hop us':>11s}  spread S=1/S=4")
    for n in VARIANTS:
        print(f"{LABELS[n]:36s} {per_frame[n, s_lo]:13.2f} {per_frame[n, s_hi]:13.2f} {per_hop[n]:11.2f}"
              f"  {C.spread(raw[f'{n}@{s_lo}']):.0%}/{C.spread(raw[f'{n}@{s_hi}']):.0%}")
    print("(spread: (max - min) / median of a variant's repeats; large spreads mean a busy machine: rerun)")

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else float("inf")

    r_inline = ratio(per_hop["ours_inline"], per_hop["bare_queue"])
    r_spec = ratio(per_hop["ours_inline_spec"], per_hop["bare_queue"])
    r_thread = ratio(per_hop["ours_thread"], per_hop["bare_executor"])
    r_inline_s1 = ratio(per_frame["ours_inline", s_lo], per_frame["bare_queue", s_lo])
    r_spec_s1 = ratio(per_frame["ours_inline_spec", s_lo], per_frame["bare_queue", s_lo])
    r_thread_s1 = ratio(per_frame["ours_thread", s_lo], per_frame["bare_executor", s_lo])
    print(f"\nS=1 per-frame ratios: ours_inline/bare_queue {r_inline_s1:.2f}, "
          f"ours_inline_spec/bare_queue {r_spec_s1:.2f}, ours_thread/bare_executor {r_thread_s1:.2f}")
    print(f"per-hop ratio ours_inline_spec/bare_queue = {r_spec:.2f}")
    print(f"per-hop ratio ours_thread/bare_executor = {r_thread:.2f} (goal <= 1.0)")

    numbers: dict[str, object] = {"loop": args.loop, "frames": n_frames, "repeats": repeats,
                                  "capacity": args.capacity, "window": args.window}
    for n in VARIANTS:
        numbers[f"{n}_s1_us"] = per_frame[n, s_lo]
        numbers[f"{n}_s4_us"] = per_frame[n, s_hi]
        numbers[f"{n}_hop_us"] = per_hop[n]
    numbers.update(ratio_thread_hop=r_thread, ratio_inline_spec_hop=r_spec, ratio_inline_s1=r_inline_s1,
                   ratio_thread_s1=r_thread_s1, noise=noise)
    headline = f"per-hop ratio ours_inline/bare_queue = {r_inline:.2f} (goal <= 1.5)"
    C.record_run("hop_overhead", args, argv, numbers, headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
