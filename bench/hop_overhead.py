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

``--device cuda`` (issue 7): the same per-hop cost with GPU stages, recorded as
``hop_overhead_cuda``. Frames ``torch.zeros(1, 16)`` are made on the GPU beforehand (and
synchronised), so no hop is a host copy. S stages are S ``pa.CudaDevice(0)`` on one GPU
(each its own streams), for two stage ops: ``identity`` (``nn.Identity``: no kernel at all,
so only the machinery is timed: streams, events, polling, queues; this is the per-hop cost
proper) and ``add`` (``x + 1``: one tiny elementwise kernel per stage, out of place, so that
every hop really crosses streams behind pending GPU work). Variants, all in the same run:

* ``sync_loop``    the plain synchronous loop a user would write first, on the default stream:
                   ``for x in frames: y = model(x); torch.cuda.synchronize()`` (``model`` the
                   S stage ops in an ``nn.Sequential``), under ``torch.no_grad()``;
* ``bare_streams`` the bare asyncio chain a user would otherwise write: S coroutines joined by
                   bounded ``asyncio.Queue`` s, each stage launching its op on its own
                   ``torch.cuda.Stream`` (``x.record_stream(stream)`` first: x was made on
                   another stream), recording an event on that stream after the op, and
                   awaiting completion by polling ``event.query()`` with
                   ``await asyncio.sleep(0)`` -- the simplest correct non-blocking wait (no
                   thread, no blocking ``synchronize`` on the loop). The result is handed on
                   only once complete, so the next stage needs no event of its own to wait on;
                   each stage reuses one event (it waits for it before recording it again);
* ``ours``         ``Pipeline`` on ``[pa.CudaDevice(0) for _ in range(S)]``, ``balance=[1] * S``,
                   ``input_spec=None``, metrics on (the default);
* ``ours_nometrics`` the same with ``metrics=False`` (no spans: no timing events for the copies;
                   the compute's two timing events, for the stage's busy time, remain).

Ours delivers every output to host memory (the pipeline's last CUDA stage downloads it for the
sinks), the baselines leave it on the GPU: a constant per frame that ``per_hop`` cancels (it is
in the S=1 figures). Outputs are checked (``add``, S=4: every value 4) for every variant before
timing. 2000 frames per run by default (quick: 200). The last line printed is ours /
bare_streams per hop for ``identity`` (goal <= 1.5, the CPU inline goal); the ``add`` ratio is
the line before. Without CUDA,
``--device cuda --quick`` says so and exits 0 (nothing measured or recorded); a full run exits
with an error, as ``bench/gpu_overlap.py --device cuda`` does.

    python bench/hop_overhead.py [--quick] [--device cpu|cuda] [--repeats N] [--frames N]
        [--loop asyncio|uvloop] [--no-record | --record]
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
async def produce(queue: asyncio.Queue, frames: Sequence[torch.Tensor], end: object) -> None:
    """A bare chain's source: every frame, then ``end``."""
    for x in frames:
        await queue.put(x)
    await queue.put(end)


async def bare_queue(frames: Sequence[torch.Tensor], stages: int, capacity: int) -> float:
    mods = [nn.Identity() for _ in range(stages)]
    queues: list[asyncio.Queue] = [asyncio.Queue(capacity) for _ in range(stages + 1)]
    end = None

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
    tasks = [asyncio.create_task(produce(queues[0], frames, end))]
    tasks += [asyncio.create_task(stage(k)) for k in range(stages)]
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
        tasks = [asyncio.create_task(produce(queues[0], frames, end))]
        tasks += [asyncio.create_task(stage(k)) for k in range(stages)]
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


# -- --device cuda: GPU stages (issue 7) --------------------------------------------------------
CUDA_VARIANTS = ("sync_loop", "bare_streams", "ours", "ours_nometrics")
CUDA_OPS = ("identity", "add")
CUDA_LABELS = {
    "sync_loop": "sync loop (model(x); synchronize())",
    "bare_streams": "bare chain (stream + event.query())",
    "ours": "ours (CudaDevice, metrics on)",
    "ours_nometrics": "ours (CudaDevice, metrics=False)",
}


class AddOne(nn.Module):
    """``x + 1``: one tiny elementwise kernel, out of place (the frames are reused by every run)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


def cuda_ops(op: str, stages: int) -> list[nn.Module]:
    if op == "identity":
        return [nn.Identity() for _ in range(stages)]
    if op == "add":
        return [AddOne() for _ in range(stages)]
    raise ValueError(op)


def sync_loop(frames: Sequence[torch.Tensor], stages: int, op: str, outputs: list | None = None) -> float:
    model = nn.Sequential(*cuda_ops(op, stages))
    torch.cuda.synchronize()
    with torch.no_grad():
        t0 = time.perf_counter()
        for x in frames:
            y = model(x)
            torch.cuda.synchronize()
            if outputs is not None:
                outputs.append(y)
        return time.perf_counter() - t0


async def bare_streams(frames: Sequence[torch.Tensor], stages: int, capacity: int, op: str,
                       outputs: list | None = None) -> float:
    mods = cuda_ops(op, stages)
    streams = [torch.cuda.Stream() for _ in range(stages)]
    events = [torch.cuda.Event() for _ in range(stages)]  # one per stage: reused once complete
    queues: list[asyncio.Queue] = [asyncio.Queue(capacity) for _ in range(stages + 1)]
    end = None

    async def stage(k: int) -> None:
        q_in, q_out, mod, stream, done = queues[k], queues[k + 1], mods[k], streams[k], events[k]
        while True:
            x = await q_in.get()
            if x is end:
                await q_out.put(end)
                return
            # x is complete (the frames were synchronised; an upstream stage hands on only
            # completed results), so the stream need not wait for anything before using it.
            with torch.no_grad(), torch.cuda.stream(stream):
                x.record_stream(stream)  # x was allocated on another stream: no early reuse
                y = mod(x)
                done.record(stream)
            while not done.query():
                await asyncio.sleep(0)
            await q_out.put(y)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(produce(queues[0], frames, end))]
    tasks += [asyncio.create_task(stage(k)) for k in range(stages)]
    q_last, n = queues[-1], 0
    while (y := await q_last.get()) is not end:
        n += 1
        if outputs is not None:
            outputs.append(y)
    dt = time.perf_counter() - t0
    await asyncio.gather(*tasks)
    assert n == len(frames), (n, len(frames))
    return dt


async def ours_cuda(frames: Sequence[torch.Tensor], stages: int, capacity: int, op: str, *, metrics: bool,
                    window: int, outputs: list | None = None) -> float:
    model = nn.Sequential(*cuda_ops(op, stages))
    pipe = pa.Pipeline(model, devices=[pa.CudaDevice(0) for _ in range(stages)], balance=[1] * stages,
                       input_spec=None, capacity=capacity, window=window, metrics=metrics)
    torch.cuda.synchronize()
    on_output = None if outputs is None else (lambda out: outputs.append(out.data))
    dt = await C.time_stream(pipe, frames, on_output)
    stats = pipe.stats()
    assert all(s.frames == len(frames) for s in stats.stages)
    return dt


def make_cuda_variant(name: str, frames: Sequence[torch.Tensor], stages: int, op: str, capacity: int,
                      window: int, outputs: list | None = None):
    """A coroutine factory (the asynchronous variants) or a plain callable (``sync_loop``)."""
    if name == "sync_loop":
        return lambda: sync_loop(frames, stages, op, outputs)
    if name == "bare_streams":
        return lambda: bare_streams(frames, stages, capacity, op, outputs)
    if name in ("ours", "ours_nometrics"):
        return lambda: ours_cuda(frames, stages, capacity, op, metrics=name == "ours", window=window,
                                 outputs=outputs)
    raise ValueError(name)


def main_cuda(args: argparse.Namespace, argv: Sequence[str] | None, parser: argparse.ArgumentParser) -> int:
    """``--device cuda``: the same per-hop definition, GPU stages, its own variants and record."""
    if not torch.cuda.is_available():
        if args.quick:
            print("hop_overhead: --device cuda: CUDA is not available here; nothing measured, nothing recorded",
                  flush=True)
            return 0
        raise SystemExit("hop_overhead: --device cuda given, but CUDA is not available here")
    n_frames = args.frames or (200 if args.quick else 2000)
    repeats = args.repeats or (2 if args.quick else 5)
    if repeats < 1 or n_frames < 2:
        parser.error("--repeats must be >= 1 and --frames >= 2")

    dev = torch.device("cuda", 0)
    frames = [torch.zeros(1, 16, device=dev) for _ in range(n_frames)]
    torch.cuda.synchronize()
    warm = frames[:min(len(frames), 200)]
    print(f"hop overhead (cuda): {n_frames} frames of (1, 16) on {torch.cuda.get_device_name(dev)}, "
          f"ops {'/'.join(CUDA_OPS)}, S = {'/'.join(map(str, STAGE_COUNTS))} CudaDevice(0) stages, "
          f"capacity {args.capacity}, window {args.window}, loop {args.loop}, {repeats} interleaved repeats "
          f"(medians)", flush=True)

    s_lo, s_hi = STAGE_COUNTS
    with C.runner(args.loop) as runner:
        def run_once(fn):
            result = fn()
            return runner.run(result) if asyncio.iscoroutine(result) else result

        def make(name: str, fr: Sequence[torch.Tensor], s: int, op: str, outputs: list | None = None):
            fn = make_cuda_variant(name, fr, s, op, args.capacity, args.window, outputs)
            return lambda: run_once(fn)

        for s in STAGE_COUNTS:  # warm-up: CUDA context, kernels, allocator, code paths; not timed
            for op in CUDA_OPS:
                for name in CUDA_VARIANTS:
                    make(name, warm, s, op)()
        # Correctness, untimed: S=4 "add" stages give 4 everywhere, for every variant.
        check = frames[:min(len(frames), 100)]
        bad = []
        for name in CUDA_VARIANTS:
            got: list[torch.Tensor] = []
            make(name, check, s_hi, "add", got)()
            values = torch.stack([g.to("cpu").reshape(-1) for g in got]) if got else torch.empty(0)
            if len(got) != len(check) or not bool((values == float(s_hi)).all()):
                bad.append(name)
                print(f"WARNING: {name} gave wrong outputs ({len(got)} of {len(check)} frames)", flush=True)
        print(f"outputs checked (add, S={s_hi}, {len(check)} frames): "
              f"{'all correct' if not bad else 'WRONG: ' + ', '.join(bad)}", flush=True)
        variants = {f"{n}/{op}@{s}": make(n, frames, s, op) for op in CUDA_OPS for n in CUDA_VARIANTS
                    for s in STAGE_COUNTS}
        raw = C.interleaved(variants, repeats)

    us = 1e6 / n_frames
    per_frame = {(n, op, s): C.median(raw[f"{n}/{op}@{s}"]) * us
                 for n in CUDA_VARIANTS for op in CUDA_OPS for s in STAGE_COUNTS}
    per_hop = {(n, op): C.median([(b - a) / (s_hi - s_lo) * us
                                  for a, b in zip(raw[f"{n}/{op}@{s_lo}"], raw[f"{n}/{op}@{s_hi}"])])
               for n in CUDA_VARIANTS for op in CUDA_OPS}
    noise = max(C.spread(v) for v in raw.values())

    def ratio(a: float, b: float) -> float:
        """a / b; NaN where either is not positive (a per-hop time <= 0 is noise, not speed)."""
        return a / b if a > 0 and b > 0 else float("nan")

    if any(v <= 0 for v in per_hop.values()):
        print("note: a per-hop time <= 0 is noise (the 4-stage run was not measurably slower than the 1-stage "
              "one on this machine now): its ratio is NaN; rerun with more --frames or --repeats")

    print(f"\nper_hop = (t(S={s_hi}) - t(S={s_lo})) / {s_hi - s_lo} / frames, paired within each repeat, "
          f"median over repeats; S={s_lo}: t / frames. Ours' figures include, at every S, the download of "
          f"each output to host memory (the baselines keep it on the GPU): per_hop cancels it")
    for op in CUDA_OPS:
        print(f"\nop {op}:")
        print(f"{'variant':38s} {'S=1 us/frame':>13s} {'S=4 us/frame':>13s} {'per-hop us':>11s}  spread S=1/S=4")
        for n in CUDA_VARIANTS:
            print(f"{CUDA_LABELS[n]:38s} {per_frame[n, op, s_lo]:13.2f} {per_frame[n, op, s_hi]:13.2f} "
                  f"{per_hop[n, op]:11.2f}  {C.spread(raw[f'{n}/{op}@{s_lo}']):.0%}/"
                  f"{C.spread(raw[f'{n}/{op}@{s_hi}']):.0%}")
    print("(spread: (max - min) / median of a variant's repeats; large spreads mean a busy machine: rerun)")

    ratios = {(n, base, op): ratio(per_hop[n, op], per_hop[base, op])
              for n in ("ours", "ours_nometrics") for base in ("bare_streams", "sync_loop") for op in CUDA_OPS}
    print()
    for op in CUDA_OPS:
        print(f"per-hop ratios ({op}): ours/bare_streams {ratios['ours', 'bare_streams', op]:.2f}, "
              f"ours_nometrics/bare_streams {ratios['ours_nometrics', 'bare_streams', op]:.2f}, "
              f"ours/sync_loop {ratios['ours', 'sync_loop', op]:.2f}")
    print(f"per-hop ratio ours/bare_streams (cuda, add) = {ratios['ours', 'bare_streams', 'add']:.2f}")

    numbers: dict[str, object] = {"device": "cuda", "loop": args.loop, "frames": n_frames, "repeats": repeats,
                                  "capacity": args.capacity, "window": args.window}
    for op in CUDA_OPS:
        for n in CUDA_VARIANTS:
            numbers[f"{n}_{op}_s1_us"] = per_frame[n, op, s_lo]
            numbers[f"{n}_{op}_s4_us"] = per_frame[n, op, s_hi]
            numbers[f"{n}_{op}_hop_us"] = per_hop[n, op]
    for op in CUDA_OPS:
        numbers[f"ratio_ours_bare_{op}_hop"] = ratios["ours", "bare_streams", op]
        numbers[f"ratio_nometrics_bare_{op}_hop"] = ratios["ours_nometrics", "bare_streams", op]
        numbers[f"ratio_ours_sync_{op}_hop"] = ratios["ours", "sync_loop", op]
    numbers.update(outputs_ok=not bad, noise=noise)
    headline = (f"per-hop ratio ours/bare_streams (cuda, identity) = {ratios['ours', 'bare_streams', 'identity']:.2f} "
                f"(goal <= 1.5, as for CPU inline stages)")
    C.record_run("hop_overhead_cuda", args, argv, numbers, headline)
    return 0


# -- main ---------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, default_repeats=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (default): CPU stages; cuda: CudaDevice stages on GPU 0 "
                             "(recorded as hop_overhead_cuda)")
    parser.add_argument("--frames", type=int, default=None,
                        help="frames per run (default 20000, cuda 2000; quick: 1000, cuda 200)")
    parser.add_argument("--capacity", type=int, default=4, help="channel / queue capacity (default 4)")
    parser.add_argument("--window", type=int, default=2, help="pipeline window (default 2)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="event loop (default asyncio)")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        return main_cuda(args, argv, parser)
    n_frames = args.frames or (1000 if args.quick else 20000)
    repeats = args.repeats or (2 if args.quick else 5)
    if repeats < 1 or n_frames < 2:
        parser.error("--repeats must be >= 1 and --frames >= 2")

    frames = [torch.zeros(1, 16) for _ in range(n_frames)]
    warm = frames[:min(len(frames), 200)]
    print(f"hop overhead: {n_frames} frames of (1, 16), identity stages, capacity {args.capacity}, "
          f"window {args.window}, loop {args.loop}, {repeats} interleaved repeats (medians)", flush=True)

    with C.runner(args.loop) as runner:
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
        """a / b; NaN where either is not positive (a per-hop time <= 0 is noise, not speed)."""
        return a / b if a > 0 and b > 0 else float("nan")

    if any(v <= 0 for v in per_hop.values()):
        print("note: a per-hop time <= 0 is noise (the 4-stage run was not measurably slower than the 1-stage "
              "one on this machine now): its ratio is NaN; rerun with more --frames or --repeats")

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
