"""Streaming throughput on one GPU: our Pipeline against the naive per-frame loop, and the bound.

Issue 7's first "must show". Frames are uint8 camera frames ``(1, 3, H, W)`` (default 1080p),
a pool of ``--pool`` distinct random frames in host memory, cycled to ``--frames`` per run.
The model is an image-to-image conv net whose first layer normalises on the device
(``x.float().div_(255)``) and whose last layer quantises back to uint8, so the output frame
is as large as the input one and both copies matter:

    [Normalise, 3x3 conv 3->C, ReLU] + (depth - 1) x [3x3 conv C->C, ReLU] + [1x1 conv C->3, to uint8]

``--depth auto`` (the default) takes the depth whose compute time on one frame is closest to
the slower copy (H2D or D2H, measured first): copies and compute balanced, the case that
overlapping them is for (``--depth N`` fixes it). Variants, all in the same run, interleaved
repeats (order alternating), medians:

* ``naive_pageable``  ``y = model(x.cuda()).cpu()`` per frame, x in pageable memory (the
                      literal baseline), under ``torch.inference_mode()``;
* ``naive_pinned``    the same with x in pinned memory and ``x.cuda(non_blocking=True)``,
                      as PyTorch's pinned-memory guide advises for host-to-device copies;
* ``ours_<mem>_s<S>[_graphs]_w<W>_<loop>``  ``pa.Pipeline(model, devices=[pa.CudaDevice(0,
                      graphs=G)] * S, window=W)`` (S stages on one GPU, separate streams;
                      ``--stages 1,2``; ``_graphs``: each stage replayed as a CUDA graph,
                      captured on a first frame streamed before the clock, ``--graphs off,on``)
                      over the same pageable or pinned frames, timed by
                      ``bench/_common.time_stream`` (first frame in to last frame out, every
                      output delivered as a host tensor), on the asyncio and the uvloop event
                      loop (a CUDA stage never polls: a waiter thread per stream tells the
                      loop when events complete, so the loop should not matter; this checks).

The naive loop delivers ordinary (pageable) host tensors, ours page-locked ones (what its D2H
copy lands in; no extra copy). cuDNN's autotuner is on for every variant (static shapes);
TF32 is PyTorch's default.

The parts, each measured alone with CUDA events, median of ``--part-repeats`` single-frame
operations queued behind a ``torch.cuda._sleep`` so that launch gaps are not timed: ``h2d``
(one pinned input frame to the GPU), ``compute`` (the whole model on one frame on the GPU),
``d2h`` (one output frame into pinned host memory). Ideal bound: a pipeline that overlaps the
three perfectly delivers ``1 / max(h2d, compute, d2h)`` frames/s; ``(h2d + compute + d2h) /
max(...)`` is the most any overlap can gain over a serial loop that has no other costs. Also
measured (host clock), to explain a gap: the host time to launch the model on one frame, and
the two host copies the library makes per frame (``host_stage_in``: a pageable input into a
pinned staging buffer; ``host_clone_out``: a pinned output into ordinary memory, which ours
no longer makes). One untimed extra run reads our pipeline's spans: how often the H2D of frame
t+1 overlapped the compute of frame t (stage 0), and the D2H of frame t-1 the compute of frame
t (last stage); and how the loop fares meanwhile (issue 7 part 3): the loop thread's CPU time
as a share of the run's wall time (``time.thread_time``), and the lateness of a coroutine that
sleeps 1 ms in a loop beside the stream (median, p99, max).

Goals: best ours / best naive >= 1.5 (the last line printed), best ours / ideal >= 0.9.

``--device cpu`` runs the same code end to end on CPU devices (tiny frames, host clocks in
place of CUDA events, no pinned memory): a smoke test, never a measurement. Without
``--device``, CUDA is used when available; without it only ``--quick`` runs (the CPU smoke
path), and a full run says it needs CUDA, records nothing and exits 0.

    python bench/gpu_overlap.py [--quick] [--device cuda|cpu] [--repeats N] [--frames N]
        [--depth auto|N] [--channels C] [--windows 2,4] [--stages 1,2] [--graphs off,on]
        [--loops asyncio,uvloop] [--json FILE]
        [--no-record | --record]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):  # run as a script: make `bench._common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

import partime_async as pa
from partime_async.graph import loop_factory
from bench import _common as C

NAIVE = ("naive_pageable", "naive_pinned")
MEMORIES = ("pageable", "pinned")
GOAL_NAIVE = 1.5
GOAL_IDEAL = 0.9


# -- the model ----------------------------------------------------------------------------------
class Normalise(nn.Module):
    """uint8 [0, 255] -> float [0, 1], on whatever device the frame now is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255)


class ToUint8(nn.Module):
    """float [0, 1] -> uint8 [0, 255] (rounded, clamped): an image back out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0, 1).mul_(255).round_().to(torch.uint8)


def make_model(depth: int, channels: int) -> nn.Sequential:
    """``depth`` 3x3 conv layers (the first normalises the uint8 frame), then a 1x1 conv back
    to 3 channels and uint8. ``depth + 1`` layers for the split; same seed, same weights."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Sequential(Normalise(), nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(inplace=True))]
    layers += [nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
               for _ in range(depth - 1)]
    layers.append(nn.Sequential(nn.Conv2d(channels, 3, 1), ToUint8()))
    return nn.Sequential(*layers).eval()


# -- the device: CUDA, or the CPU smoke path through the same code -------------------------------
@dataclass
class Backend:
    kind: str  # "cuda" or "cpu"
    torch_device: torch.device = field(init=False)

    def __post_init__(self) -> None:
        self.torch_device = torch.device("cuda", 0) if self.kind == "cuda" else torch.device("cpu")

    @property
    def cuda(self) -> bool:
        return self.kind == "cuda"

    def devices(self, stages: int, graphs: bool) -> list[pa.Device]:
        """``stages`` pipeline stages: on one GPU that many CudaDevices (each its own streams;
        ``graphs``: each stage replayed as a CUDA graph); on the CPU smoke path CPU devices."""
        if self.cuda:
            return [pa.CudaDevice(0, graphs=graphs) for _ in range(stages)]
        return pa.cpu_devices(stages, threads=1)  # one thread each: the loop needs a core too

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        """A pinned copy on CUDA; on the CPU path there is no pinned memory: the tensor itself."""
        return t.pin_memory() if self.cuda else t

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time_ops(self, op: Callable[[], object], repeats: int, *, chunk: int = 10) -> list[float]:
        """Seconds of each of ``repeats`` calls of ``op``: on CUDA from events on the current
        stream around each call, queued ``chunk`` at a time behind a ``torch.cuda._sleep`` so
        that the GPU runs them back to back (device time, not launch gaps); on the CPU path
        perf_counter around each (synchronous) call."""
        if not self.cuda:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                op()
                times.append(time.perf_counter() - t0)
            return times
        times = []
        sleep = getattr(torch.cuda, "_sleep", None)
        for start in range(0, repeats, chunk):
            n = min(chunk, repeats - start)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
            torch.cuda.synchronize()
            if sleep is not None:
                sleep(50_000_000)  # ~25 ms at 2 GHz: the launches below get ahead of the GPU
            for begin, end in events:
                begin.record()
                op()
                end.record()
            torch.cuda.synchronize()
            times += [begin.elapsed_time(end) * 1e-3 for begin, end in events]
        return times


# -- the parts ----------------------------------------------------------------------------------
@dataclass
class Parts:
    h2d: float
    compute: float
    d2h: float
    launch: float          # host seconds to launch the model on one frame (no sync)
    host_stage_in: float   # pageable frame -> pinned buffer (host memcpy)
    host_clone_out: float  # pinned output -> ordinary memory (host memcpy)

    @property
    def bound(self) -> float:
        return max(self.h2d, self.compute, self.d2h)

    @property
    def serial(self) -> float:
        return self.h2d + self.compute + self.d2h


def time_compute(backend: Backend, model: nn.Module, x_dev: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(3):  # warm-up (cuDNN autotuning, allocator)
            model(x_dev)
        return C.median(backend.time_ops(lambda: model(x_dev), repeats))


def time_copies(backend: Backend, frame: torch.Tensor, repeats: int) -> tuple[float, float, float, float]:
    """Median seconds of H2D (pinned), D2H (pinned), and the two host copies the library makes."""
    dev = backend.torch_device
    pinned_in = backend.pin(frame)
    x_dev = torch.empty_like(frame, device=dev)
    out_dev = torch.empty_like(frame, device=dev)  # the output is a uint8 frame of the same shape
    pinned_out = backend.pin(torch.empty_like(frame))
    h2d = C.median(backend.time_ops(lambda: x_dev.copy_(pinned_in, non_blocking=True), repeats))
    d2h = C.median(backend.time_ops(lambda: pinned_out.copy_(out_dev, non_blocking=True), repeats))
    backend.sync()
    cpu = Backend("cpu")  # host copies: host clock
    staging = backend.pin(torch.empty_like(frame))
    stage_in = C.median(cpu.time_ops(lambda: staging.copy_(frame), repeats))
    clone_out = C.median(cpu.time_ops(lambda: pinned_out.clone(), repeats))
    return h2d, d2h, stage_in, clone_out


def launch_time(backend: Backend, model: nn.Module, x_dev: torch.Tensor, repeats: int) -> float:
    """Host seconds to launch the model on one frame (the GPU may still be running it)."""
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            backend.sync()
            t0 = time.perf_counter()
            model(x_dev)
            times.append(time.perf_counter() - t0)
    backend.sync()
    return C.median(times)


def choose_depth(backend: Backend, frame: torch.Tensor, channels: int, target: float, max_depth: int,
                 repeats: int) -> tuple[int, list[tuple[int, float]]]:
    """The depth whose compute time is closest (in ratio) to ``target``; tried upwards from 1,
    stopping once a depth takes over twice the target."""
    x_dev = frame.to(backend.torch_device)
    tried: list[tuple[int, float]] = []
    for depth in range(1, max_depth + 1):
        model = make_model(depth, channels).to(backend.torch_device)
        tried.append((depth, time_compute(backend, model, x_dev, repeats)))
        if tried[-1][1] > 2 * target:
            break
    best = min(tried, key=lambda dt: abs(math.log(max(dt[1], 1e-12) / max(target, 1e-12))))
    return best[0], tried


# -- the variants: each returns the seconds from first frame in to last frame out ---------------
def naive(model: nn.Module, frames: Sequence[torch.Tensor], dev: torch.device, non_blocking: bool,
          outputs: list | None = None) -> float:
    with torch.inference_mode():
        t0 = time.perf_counter()
        for x in frames:
            y = model(x.to(dev, non_blocking=non_blocking)).cpu()  # .cpu(): synchronous, pageable
            if outputs is not None:
                outputs.append(y)
        return time.perf_counter() - t0


@dataclass(frozen=True)
class Setup:
    """One configuration of our pipeline."""

    memory: str   # "pageable" or "pinned" input frames
    stages: int   # CudaDevices on the one GPU
    graphs: bool  # CudaDevice(graphs=True)
    window: int
    loop: str     # "asyncio" or "uvloop"

    @property
    def name(self) -> str:
        return f"ours_{self.memory}_s{self.stages}{'_graphs' if self.graphs else ''}_w{self.window}_{self.loop}"

    def pipeline(self, backend: Backend, model: nn.Module, capacity: int) -> pa.Pipeline:
        return pa.Pipeline(model, devices=backend.devices(self.stages, self.graphs), window=self.window,
                           capacity=capacity)


async def ours(backend: Backend, model: nn.Module, frames: Sequence[torch.Tensor], setup: Setup, capacity: int) -> float:
    # A graphed stage captures on its first frame: streamed once before the clock starts.
    return await C.time_stream(setup.pipeline(backend, model, capacity), frames, preroll=1 if setup.graphs else 0)


async def ours_observed(backend: Backend, model: nn.Module, frames: Sequence[torch.Tensor], setup: Setup,
                        capacity: int) -> tuple[pa.Pipeline, dict[str, float]]:
    """One run of ours beside a ticker coroutine (sleeps 1 ms, records how late it wakes);
    the pipeline (for its spans) and the loop's numbers: its thread's CPU share of the wall
    time, and the ticker's lateness in microseconds."""
    pipe = setup.pipeline(backend, model, capacity)
    late: list[float] = []
    running = True
    clocks: list[float] = []  # loop thread CPU, wall: read when the stream starts (after set-up and capture)

    async def ticker() -> None:
        while running:
            t0 = time.perf_counter()
            await asyncio.sleep(1e-3)
            late.append(time.perf_counter() - t0 - 1e-3)

    tasks: list[asyncio.Task] = []

    def begin() -> None:
        clocks[:] = [time.thread_time(), time.perf_counter()]
        tasks.append(asyncio.create_task(ticker()))

    await C.time_stream(pipe, frames, preroll=1 if setup.graphs else 0, on_start=begin)
    cpu, wall = time.thread_time() - clocks[0], time.perf_counter() - clocks[1]
    running = False
    await tasks[0]
    late = sorted(late) or [float("nan")]  # (none if the stream took under 1 ms)
    return pipe, {"loop_cpu_share": cpu / wall, "ticker_late_median_us": statistics.median(late) * 1e6,
                  "ticker_late_p99_us": late[min(len(late) - 1, int(0.99 * len(late)))] * 1e6,
                  "ticker_late_max_us": late[-1] * 1e6}


async def ours_outputs(backend: Backend, model: nn.Module, frames: Sequence[torch.Tensor], setup: Setup,
                       capacity: int) -> list[torch.Tensor]:
    pipe = setup.pipeline(backend, model, capacity)
    async with pipe:
        return [f.data async for f in pipe.stream(frames)]


def span_overlaps(pipe: pa.Pipeline) -> dict[str, float]:
    """From a run's spans (CUDA: timed by events on each device's streams): the fraction of
    frames t whose H2D of t+1 overlapped stage 0's compute of t, and whose D2H of t-1 overlapped
    the last stage's compute of t (each pair on one device, so on one clock anchor), and the
    median durations in microseconds. NaN where the spans are absent (CPU devices)."""
    spans = pipe.spans()
    last = max((s.stage for s in spans), default=0)
    by = {(s.stage, s.kind, s.seq): s for s in spans}

    def fraction(kind: str, stage: int, shift: int) -> float:
        hits = total = 0
        for (st, k, seq), comp in by.items():
            if st != stage or k != "compute":
                continue
            other = by.get((stage, kind, seq + shift))
            if other is None:
                continue
            total += 1
            hits += other.t0 < comp.t1 and comp.t0 < other.t1
        return hits / total if total else float("nan")

    def median_us(stage: int, kind: str) -> float:
        d = [s.duration for s in spans if s.stage == stage and s.kind == kind]
        return statistics.median(d) * 1e6 if d else float("nan")

    return {"overlap_h2d_next": fraction("h2d", 0, +1), "overlap_d2h_prev": fraction("d2h", last, -1),
            "span_h2d_us": median_us(0, "h2d"), "span_compute0_us": median_us(0, "compute"),
            f"span_compute{last}_us": median_us(last, "compute"), "span_d2h_us": median_us(last, "d2h")}


# -- main ---------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, default_repeats=7)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="cuda (default when available) or cpu (smoke path: tiny frames, not a measurement)")
    parser.add_argument("--frames", type=int, default=None,
                        help="frames per run (default 1000; quick: 200 on CUDA, 40 on CPU)")
    parser.add_argument("--height", type=int, default=None, help="frame height (default 1080 on CUDA, 64 on CPU)")
    parser.add_argument("--width", type=int, default=None, help="frame width (default 1920 on CUDA, 64 on CPU)")
    parser.add_argument("--pool", type=int, default=None, help="distinct frames, cycled (default 16; CPU: 4)")
    parser.add_argument("--channels", type=int, default=8, help="conv channels C (default 8)")
    parser.add_argument("--depth", default="auto", help="3x3 conv layers, or 'auto' (default): compute ~ slower copy")
    parser.add_argument("--max-depth", type=int, default=12, help="largest depth 'auto' tries (default 12)")
    parser.add_argument("--windows", default="2,4", help="pipeline windows to run, comma-separated (default 2,4)")
    parser.add_argument("--stages", default="1,2", help="CudaDevices on the GPU, comma-separated (default 1,2)")
    parser.add_argument("--graphs", default="off,on",
                        help="CUDA graphs per stage: off, on or both (default off,on; on is skipped on CPU)")
    parser.add_argument("--loops", default="asyncio,uvloop",
                        help="event loops for our pipeline, comma-separated (default asyncio,uvloop; "
                             "uvloop is left out where it is not installed)")
    parser.add_argument("--capacity", type=int, default=2, help="pipeline channel capacity (default 2)")
    parser.add_argument("--part-repeats", type=int, default=None, help="operations timed per part (default 100; quick: 20)")
    parser.add_argument("--json", type=Path, default=None, help="also write every raw number to this JSON file")
    args = parser.parse_args(argv)

    kind = C.gpu_or_smoke("gpu_overlap", args.device, args.quick, "same code, tiny frames")
    backend = Backend(kind) if kind is not None else None
    if backend is None:
        return 0
    threads = torch.get_num_threads()
    if not backend.cuda:  # the smoke path: the naive loop gets one core, as each CPU stage does
        torch.set_num_threads(1)
    try:
        return run(args, argv, parser, backend)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, argv: Sequence[str] | None, parser: argparse.ArgumentParser,
        backend: Backend) -> int:
    cuda = backend.cuda
    n_frames = args.frames or (1000 if not args.quick else (200 if cuda else 40))
    repeats = args.repeats or (2 if args.quick else 7)
    height = args.height or (1080 if cuda else 64)
    width = args.width or (1920 if cuda else 64)
    pool = args.pool or (16 if cuda else 4)
    part_repeats = args.part_repeats or (20 if args.quick else 100)
    try:
        windows = [int(w) for w in args.windows.split(",") if w.strip()]
    except ValueError:
        parser.error("--windows takes integers, e.g. 2,4")
    if repeats < 1 or n_frames < 2 or pool < 1 or not windows or min(windows) < 1 or part_repeats < 1:
        parser.error("--repeats, --pool, --part-repeats and the windows must be >= 1, --frames >= 2")
    try:
        stage_counts = [int(k) for k in args.stages.split(",") if k.strip()]
    except ValueError:
        parser.error("--stages takes integers, e.g. 1,2")
    if not stage_counts or min(stage_counts) < 1:
        parser.error("--stages must be >= 1")
    graph_modes = [mode.strip() for mode in args.graphs.split(",") if mode.strip()]
    if not graph_modes or any(mode not in ("off", "on") for mode in graph_modes):
        parser.error("--graphs takes off and/or on")
    graph_flags = [mode == "on" for mode in graph_modes if mode == "off" or cuda]  # no graphs on CPU devices
    loops = [name.strip() for name in args.loops.split(",") if name.strip()]
    if not loops or any(name not in ("asyncio", "uvloop") for name in loops):
        parser.error("--loops takes asyncio and/or uvloop")
    if "uvloop" in loops and importlib.util.find_spec("uvloop") is None:
        print("gpu_overlap: uvloop is not installed: our pipeline runs on asyncio only", flush=True)
        loops = [name for name in loops if name != "uvloop"] or ["asyncio"]
    if args.depth != "auto" and not (args.depth.isdigit() and int(args.depth) >= 1):
        parser.error("--depth is 'auto' or a positive integer")
    if not cuda and not args.record:
        args.no_record = True  # the CPU path is a smoke test: never a result line unless asked for

    dev = backend.torch_device
    if cuda:
        torch.backends.cudnn.benchmark = True  # static shapes: the fastest algorithms, for every variant
        gpu = torch.cuda.get_device_name(0)
    else:
        gpu = "none (CPU smoke path)"
    print(f"gpu overlap: device {backend.kind} ({gpu}), {n_frames} uint8 frames (1, 3, {height}, {width}) "
          f"from a pool of {pool}, {repeats} interleaved repeats (medians)", flush=True)

    gen = torch.Generator().manual_seed(0)
    pageable = [torch.randint(0, 256, (1, 3, height, width), dtype=torch.uint8, generator=gen) for _ in range(pool)]
    pinned = [backend.pin(x) for x in pageable]
    stream_pageable = [pageable[i % pool] for i in range(n_frames)]
    stream_pinned = [pinned[i % pool] for i in range(n_frames)]

    # -- the parts, and the depth ----------------------------------------------------------------
    h2d, d2h, stage_in, clone_out = time_copies(backend, pageable[0], part_repeats)
    tried: list[tuple[int, float]] = []
    if args.depth == "auto":
        depth, tried = choose_depth(backend, pageable[0], args.channels, max(h2d, d2h), args.max_depth,
                                    max(5, part_repeats // 4))
        print("depth auto: " + ", ".join(f"{d}: {t * 1e6:.0f} us" for d, t in tried)
              + f" -> {depth} (target: slower copy {max(h2d, d2h) * 1e6:.0f} us)", flush=True)
    else:
        depth = int(args.depth)
    model = make_model(depth, args.channels).to(dev)
    x_dev = pageable[0].to(dev)
    compute = time_compute(backend, model, x_dev, part_repeats)
    parts = Parts(h2d, compute, d2h, launch_time(backend, model, x_dev, max(5, part_repeats // 4)),
                  stage_in, clone_out)
    with torch.inference_mode():
        out_shape = tuple(model(x_dev).shape)
    print(f"model: depth {depth}, {args.channels} channels, {depth + 1} layers, output {out_shape} uint8", flush=True)
    timer = "CUDA events, device time" if cuda else "host clock (CPU smoke path)"
    print(f"parts ({timer}, median of {part_repeats}): h2d {parts.h2d * 1e6:.0f} us, compute "
          f"{parts.compute * 1e6:.0f} us, d2h {parts.d2h * 1e6:.0f} us -> ideal {1 / parts.bound:.1f} frames/s; "
          f"serial sum / max = {parts.serial / parts.bound:.2f} (the most overlap can gain over a serial loop)")
    print(f"host per frame: launch the model {parts.launch * 1e6:.0f} us, stage a pageable input into pinned "
          f"{parts.host_stage_in * 1e6:.0f} us, clone a pinned output to ordinary memory "
          f"{parts.host_clone_out * 1e6:.0f} us", flush=True)

    # -- the variants --------------------------------------------------------------------------------
    configs = {setup.name: setup for setup in (Setup(mem, k, g, w, lp) for lp in loops for w in windows
                                               for g in graph_flags or [False] for k in stage_counts for mem in MEMORIES)}
    ours_names = list(configs)
    with contextlib.ExitStack() as stack:
        runners = {lp: stack.enter_context(asyncio.Runner(loop_factory=loop_factory(lp))) for lp in loops}
        runner = runners[loops[0]]

        def make(name: str, frames_pageable, frames_pinned):
            if name == "naive_pageable":
                return lambda: naive(model, frames_pageable, dev, False)
            if name == "naive_pinned":
                return lambda: naive(model, frames_pinned, dev, True)
            setup = configs[name]
            frames = frames_pinned if setup.memory == "pinned" else frames_pageable
            return lambda: runners[setup.loop].run(ours(backend, model, frames, setup, args.capacity))

        warm = min(n_frames, 50)
        print(f"warm-up: every variant on {warm} frames (not timed)", flush=True)
        for name in (*NAIVE, *ours_names):  # warm-up: cuDNN, allocators, pinned pools; not timed
            make(name, stream_pageable[:warm], stream_pinned[:warm])()

        # the same frames through both: ours must give the naive loop's outputs
        check = stream_pinned[:min(n_frames, 2 * pool)]
        expected: list[torch.Tensor] = []
        naive(model, check, dev, True, expected)
        got = [y for setup in configs.values() if setup.memory == "pinned" and setup.loop == loops[0]
               and setup.window == windows[0]
               for y in runner.run(ours_outputs(backend, model, check, setup, args.capacity))]
        expected = expected * (len(got) // max(1, len(expected)))  # each setup's outputs, in turn
        max_diff = max(int((g.to(torch.int16) - e.to(torch.int16)).abs().max()) for g, e in zip(got, expected))
        if len(got) != len(expected) or max_diff > 1:
            print(f"WARNING: ours differs from the naive loop: {len(got)} vs {len(expected)} frames, "
                  f"max |diff| {max_diff}", flush=True)

        print(f"outputs: ours vs naive max |diff| = {max_diff} (uint8, {len(got)} frames)", flush=True)
        raw = C.interleaved({name: make(name, stream_pageable, stream_pinned) for name in (*NAIVE, *ours_names)},
                            repeats)

        fps = {name: n_frames / C.median(times) for name, times in raw.items()}
        best_ours = max(ours_names, key=fps.__getitem__)
        # untimed: one more run of the fastest setup, for its spans and the loop's numbers
        observed = configs[best_ours]
        observed_frames = stream_pinned if observed.memory == "pinned" else stream_pageable
        kept, loop_numbers = runners[observed.loop].run(
            ours_observed(backend, model, observed_frames[:min(n_frames, 500)], observed, args.capacity))
        overlaps = span_overlaps(kept)
        balance = list(kept.balance) if kept.balance is not None else None

    # -- report --------------------------------------------------------------------------------------
    best_naive = max(NAIVE, key=fps.__getitem__)
    ideal_fps = 1 / parts.bound
    r_naive = fps[best_ours] / fps[best_naive]
    r_ideal = fps[best_ours] / ideal_fps
    noise = max(C.spread(v) for v in raw.values())

    print(f"\n{'variant':28s} {'frames/s':>10s} {'ms/frame':>9s} {'spread':>7s}")
    for name in (*NAIVE, *ours_names):
        print(f"{name:28s} {fps[name]:10.1f} {1e3 / fps[name]:9.3f} {C.spread(raw[name]):7.0%}")
    print("(spread: (max - min) / median of a variant's repeats; large spreads mean a busy machine: rerun)")
    print(f"ours' spans ({best_ours}): H2D(t+1) overlapped compute(t) on stage 0 in "
          f"{overlaps['overlap_h2d_next']:.0%} of frames, D2H(t-1) overlapped compute(t) on the last stage in "
          f"{overlaps['overlap_d2h_prev']:.0%}; medians h2d {overlaps['span_h2d_us']:.0f} us, d2h "
          f"{overlaps['span_d2h_us']:.0f} us; balance {balance}")
    print(f"the loop meanwhile: its thread's CPU {loop_numbers['loop_cpu_share']:.0%} of the wall time; a 1 ms "
          f"sleeper woke late by {loop_numbers['ticker_late_median_us']:.0f} us (median), "
          f"{loop_numbers['ticker_late_p99_us']:.0f} us (p99), {loop_numbers['ticker_late_max_us']:.0f} us (max)")
    print(f"ours/ideal = {r_ideal:.2f} ({best_ours}; goal >= {GOAL_IDEAL})")

    numbers: dict[str, object] = {
        "device": backend.kind, "frames": n_frames, "repeats": repeats, "frame": f"{height}x{width}x3_uint8",
        "pool": pool, "depth": depth, "channels": args.channels, "capacity": args.capacity,
        "windows": "/".join(map(str, windows)), "stages": "/".join(map(str, stage_counts)),
        "graphs": "/".join("on" if g else "off" for g in graph_flags or [False]), "loops": "/".join(loops),
        "part_repeats": part_repeats,
    }
    numbers.update({f"{name}_fps": fps[name] for name in (*NAIVE, *ours_names)})
    numbers.update(h2d_us=parts.h2d * 1e6, compute_us=parts.compute * 1e6, d2h_us=parts.d2h * 1e6,
                   ideal_fps=ideal_fps, serial_over_max=parts.serial / parts.bound, launch_us=parts.launch * 1e6,
                   host_stage_in_us=parts.host_stage_in * 1e6, host_clone_out_us=parts.host_clone_out * 1e6)
    numbers.update(overlaps)
    numbers.update(loop_numbers)
    numbers.update(balance="/".join(map(str, balance)) if balance else "?", max_abs_diff=max_diff, best_naive=best_naive, best_ours=best_ours, ours_over_ideal=r_ideal,
                   ours_over_naive=r_naive, noise=noise)
    if args.json is not None:
        data = {"numbers": numbers, "raw_seconds": raw, "depth_tried": tried, "balance": balance,
                "machine": C.machine_line(), "command": C.command_line(argv)}
        args.json.write_text(json.dumps(data, indent=1, default=str))
        print(f"raw numbers in {args.json}", flush=True)
    suffix = "" if cuda else " [CPU smoke path: not a GPU measurement]"
    headline = (f"throughput ours/naive = {r_naive:.2f}x ({best_ours} vs {best_naive}; goal >= {GOAL_NAIVE})"
                + suffix)
    C.record_run("gpu_overlap", args, argv, numbers, headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
