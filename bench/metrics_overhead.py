"""What recording metrics costs: throughput with ``metrics=True`` against ``metrics=False``.

Both variants run in the same process, alternating (interleaved repeats, medians), on three
workloads:

* ``tiny``    4 identity stages inline on the loop thread, frames ``torch.zeros(1, 16)`` (each
              made as it is read, as a camera makes its frames: :class:`FreshFrames`): the
              framework's machinery only, where a span's tuple append weighs the most;
* ``thread``  the same on worker threads (``threads=1``), handing frames worker to worker;
* ``conv``    the demo's conv net (``partime_async.cli.demo_model``) on 64x64 frames over 2 CPU
              stages, with the balance that ``balance="time"`` chose once in the warm-up.

Timed: the stream only (first frame in to last frame out); each pipeline is started with a
sample first, so splitting and thread start-up are left out. Per workload,
``loss = 1 - median over repeats of (t_off / t_on)``: the on and off runs of one repeat are
adjacent in time, so their ratio is little disturbed by a machine whose load drifts. The goal
is a loss of at most 3% on every workload. The last line printed is the worst workload's loss.

On a shared 2-vCPU VM the tiny and thread workloads' run-to-run spread (40-80%) is far above
3%, so the measured loss of those can come out anywhere in about +-10%. Printed beside it, as a
noise-robust cross-check (not a replacement): ``model`` = spans per frame (counted in a run) x
the cost of one span append (timed alone, ``timeit``, best of 7) / the off run's time per frame.

``--valgrind`` measures the same without noise, as work instead of time: each of ``tiny`` and
``thread``, metrics on and off, streams N1 and N2 frames in a child process under
cachegrind (valgrind's cache simulator); per-frame counts are the differences between the two
runs divided by N2 - N1 (start-up, import and set-up cancel out; N1 fills the span ring, so
its evictions are included). Printed per workload: instructions per frame and their loss,
and the loss in *modelled cycles* = instructions + 10 x first-level cache misses + 100 x
last-level cache misses (a rough model of a modern core). From run to run the instruction
loss repeats within about 0.2 points (timers and the loop's wake-ups still vary a little; for
``thread``, also the threads' interleaving); modelled cycles move more, with simulated misses.
``--ll-cache BYTES`` simulates a smaller last-level cache (a machine whose cache other work
holds), ``--capacity N`` a span ring of N (``Pipeline(metrics=N)``), ``--workloads`` a subset.
About 10 minutes on 2 cores for both workloads; needs ``valgrind`` on the PATH.

    python bench/metrics_overhead.py [--quick] [--repeats N] [--no-record | --record]
    python bench/metrics_overhead.py --valgrind [--frames N2-N1] [--workloads tiny,thread]
        [--ll-cache BYTES] [--capacity N] [--no-record | --record]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import timeit
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Mapping, Sequence

if __package__ in (None, ""):  # run as a script: make `bench._common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

import partime_async as pa
from bench import _common as C
from partime_async.cli import demo_model

WORKLOADS = ("tiny", "thread", "conv")
COUNTED = ("tiny", "thread")  # --valgrind: the conv net's kernels would take hours under valgrind
GOAL = 0.03
CACHEGRIND_EVENTS = ("Ir", "I1mr", "ILmr", "Dr", "D1mr", "DLmr", "Dw", "D1mw", "DLmw")


def span_cost_s() -> float:
    """Seconds one span append costs, as a stage makes it: a tuple into a full ring, whose
    oldest span is freed. An upper bound: the two floats are made here too (a stage has them
    from the clock reads it makes anyway)."""
    setup = ("from collections import deque; from partime_async.observe import SPAN_CAPACITY\n"
             "ring = deque(((1, 'compute', i, i * 1.0, i * 1.0) for i in range(SPAN_CAPACITY)), "
             "maxlen=SPAN_CAPACITY)\nrecord = ring.append\n"
             "class Device: seq = 7\ndevice = Device(); index = 1; t0 = 1.0; t1 = 2.0")
    n = 200_000
    stmt = "record((index, 'compute', device.seq, t0 * 1.0, t1 * 1.0))"
    return min(timeit.repeat(stmt, setup, number=n, repeat=7)) / n


def spans_per_frame(make: Callable[[bool], pa.Pipeline], frames: Sequence[torch.Tensor]) -> float:
    """Spans a metrics-on run records per frame (counted on a run short enough for the ring)."""
    frames = frames[:1000]
    pipe = make(True)
    asyncio.run(C.time_stream(pipe, frames))
    return len(pipe.spans()) / len(frames)


async def timed_stream(make: Callable[[bool], pa.Pipeline], frames: Sequence[torch.Tensor], metrics: bool) -> float:
    """Seconds from the first frame in to the last frame out of one pipeline run."""
    pipe = make(metrics)
    dt = await C.time_stream(pipe, frames)
    assert bool(pipe.spans()) == metrics
    return dt


class FreshFrames(Sequence[torch.Tensor]):
    """``n`` frames ``torch.zeros(1, 16)``, each made when it is read, as a camera makes its
    frames: each frame's making and freeing falls in the stream, and a run's set-up is the same
    however many frames it streams (what ``--valgrind``'s difference of two runs needs; a list
    made up front put the longer run's extra tensors, and the garbage collections they cause,
    in its set-up)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return torch.zeros(1, 16)


def workload(name: str, n_frames: int, conv_balance: list[int] | None) -> tuple[Callable[[bool], pa.Pipeline], Sequence]:
    """A pipeline factory (metrics on/off) and the frames of one workload."""
    if name in ("tiny", "thread"):
        inline = name == "tiny"

        def make(metrics: bool) -> pa.Pipeline:
            model = nn.Sequential(*[nn.Identity() for _ in range(4)])
            return pa.Pipeline(model, devices=pa.cpu_devices(4, inline=inline, threads=None if inline else 1),
                               balance=[1] * 4, input_spec=None, capacity=4, metrics=metrics)

        return make, FreshFrames(n_frames)
    torch.manual_seed(0)
    model = demo_model().eval()

    def make_conv(metrics: bool) -> pa.Pipeline:
        return pa.Pipeline(model, devices=pa.cpu_devices(2), balance=conv_balance or "time", metrics=metrics)

    return make_conv, [torch.rand(1, 3, 64, 64) for _ in range(n_frames)]


def cachegrind_summary(path: Path) -> dict[str, int]:
    """The totals of a cachegrind output file, by event name."""
    with open(path) as f:
        lines = f.read().splitlines()
    events = next(line.split()[1:] for line in lines if line.startswith("events:"))
    totals = next(line.split()[1:] for line in lines if line.startswith("summary:"))
    return dict(zip(events, map(int, totals)))


def per_frame(short: Mapping[str, int], long: Mapping[str, int], frames: int) -> dict[str, float]:
    """Counts per frame from two runs that differ only in ``frames`` more frames; with
    ``cycles``, the modelled cycles (see the module docstring)."""
    counts = {e: (long[e] - short[e]) / frames for e in CACHEGRIND_EVENTS}
    counts["cycles"] = (counts["Ir"] + 10 * (counts["I1mr"] + counts["D1mr"] + counts["D1mw"])
                        + 100 * (counts["ILmr"] + counts["DLmr"] + counts["DLmw"]))
    return counts


def child(name: str, state: str, frames: int, capacity: int | None) -> None:
    """``--child``: stream ``frames`` frames of one workload once (run under cachegrind);
    metrics on keeps a ring of ``capacity`` spans (None: the default)."""
    make, data = workload(name, frames, None)
    asyncio.run(C.time_stream(make((capacity or True) if state == "on" else False), data))


def counted(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """``--valgrind``: instructions and modelled cycles per frame, metrics on vs off."""
    from partime_async.observe import SPAN_CAPACITY

    if shutil.which("valgrind") is None:
        raise SystemExit("--valgrind needs valgrind on the PATH (e.g. `apt install valgrind`)")
    names = args.workloads
    short = (args.capacity or SPAN_CAPACITY) // 4 + 1000  # >= 4 spans per frame: the ring is full, evicting
    long = short + (args.frames or 10000)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONHASHSEED="0")  # no spinning BLAS threads
    tool = ["valgrind", "--tool=cachegrind", "--cache-sim=yes"]
    if args.ll_cache:
        tool.append(f"--LL={args.ll_cache},16,64")
    extra = ["--capacity", str(args.capacity)] if args.capacity else []
    runs = [(name, state, n) for name in names for state in ("off", "on") for n in (short, long)]
    print(f"metrics overhead under cachegrind: {', '.join(names)}, metrics on/off, {short} and {long} frames "
          f"({len(runs)} runs, {C.cores()} at a time); last-level cache {args.ll_cache or 'as this CPU'}, "
          f"span ring {args.capacity or SPAN_CAPACITY}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        def run(key: tuple[str, str, int]) -> dict[str, int]:
            out, err = (Path(tmp) / "{}.{}.{}.{}".format(suffix, *key) for suffix in ("cg", "err"))
            with open(err, "w") as stderr:
                done = subprocess.run([*tool, f"--cachegrind-out-file={out}", sys.executable,
                                       str(Path(__file__).resolve()), "--child", *map(str, key), *extra],
                                      env=env, stdout=subprocess.DEVNULL, stderr=stderr)
            if done.returncode != 0:
                tail = err.read_text()[-2000:]
                raise RuntimeError(f"the cachegrind run {' '.join(map(str, key))} failed ({done.returncode}):\n{tail}")
            print(f"  {' '.join(map(str, key))} done", file=sys.stderr, flush=True)
            return cachegrind_summary(out)

        with ThreadPoolExecutor(C.cores()) as pool:
            futures = [pool.submit(run, key) for key in runs]
            try:
                totals = {key: future.result() for key, future in zip(runs, futures)}
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    numbers: dict[str, object] = {"frames_short": short, "frames_long": long, "ll_cache": args.ll_cache or "cpu",
                                  "span_capacity": args.capacity or SPAN_CAPACITY}
    loss: dict[str, float] = {}
    print(f"\n{'workload':10s} {'instr/frame off':>16s} {'on':>10s} {'instr loss':>11s} {'cycles loss':>12s}")
    for name in names:
        off, on = (per_frame(totals[(name, s, short)], totals[(name, s, long)], long - short) for s in ("off", "on"))
        ir_loss, loss[name] = 1 - off["Ir"] / on["Ir"], 1 - off["cycles"] / on["cycles"]
        numbers.update({f"{name}_instr_off": off["Ir"], f"{name}_instr_on": on["Ir"], f"{name}_instr_loss": ir_loss,
                        f"{name}_cycles_off": off["cycles"], f"{name}_cycles_on": on["cycles"],
                        f"{name}_cycles_loss": loss[name]})
        print(f"{name:10s} {off['Ir']:16.0f} {on['Ir']:10.0f} {ir_loss:11.2%} {loss[name]:12.2%}")
    worst = max(names, key=lambda n: loss[n])
    headline = f"worst modelled-cycle loss with metrics on = {loss[worst]:.2%} ({worst}; goal <= {GOAL:.0%})"
    C.record_run("metrics_overhead (valgrind)", args, argv, numbers, headline)
    return 0


def _ll_cache(text: str) -> int:
    """--ll-cache: bytes whose 16-way, 64-byte-line cache has a power-of-two number of sets."""
    size = int(text)
    sets = size // (16 * 64)
    if size <= 0 or size % (16 * 64) or sets & (sets - 1):
        raise argparse.ArgumentTypeError(f"{text}: not a size cachegrind accepts (16 x 64 x a power of two bytes, "
                                         "e.g. 2097152)")
    return size


def _workloads(text: str) -> list[str]:
    names = text.split(",")
    if any(n not in COUNTED for n in names):  # "" (an empty list item) included
        raise argparse.ArgumentTypeError(f"{text}: a comma-separated list of {', '.join(COUNTED)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, default_repeats=11)
    parser.add_argument("--frames", type=int, default=None,
                        help="frames per run of tiny/thread (default 20000; quick: 500); conv runs 1/40 of it; "
                             "with --valgrind: N2 - N1 (default 10000)")
    parser.add_argument("--valgrind", action="store_true", help="count work under cachegrind instead of timing")
    parser.add_argument("--workloads", type=_workloads, default=list(COUNTED),
                        help=f"with --valgrind: which of {', '.join(COUNTED)} (comma-separated; default both)")
    parser.add_argument("--ll-cache", type=_ll_cache, default=None, metavar="BYTES",
                        help="with --valgrind: simulate a last-level cache of BYTES (default: this CPU's)")
    parser.add_argument("--capacity", type=int, default=None,
                        help="with --valgrind: span ring capacity of the metrics-on runs (Pipeline(metrics=N))")
    parser.add_argument("--child", nargs=3, metavar=("WORKLOAD", "STATE", "FRAMES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        name, state, frames = args.child
        if name not in WORKLOADS or state not in ("on", "off") or not frames.isdigit():
            parser.error(f"--child takes one of {WORKLOADS}, on|off, a frame count; got {args.child}")
        child(name, state, int(frames), args.capacity)
        return 0
    if args.capacity is not None and args.capacity < 1:
        parser.error("--capacity must be >= 1")
    if args.valgrind:
        if args.quick or args.repeats is not None:
            parser.error("--valgrind counts (no repeats, no quick mode): drop --quick/--repeats")
        if args.frames is not None and args.frames < 1:
            parser.error("--frames must be >= 1")
        return counted(args, argv)
    if args.ll_cache or args.capacity or args.workloads != list(COUNTED):
        parser.error("--workloads, --ll-cache and --capacity go with --valgrind")
    n_frames = args.frames or (500 if args.quick else 20000)
    repeats = args.repeats or (2 if args.quick else 11)
    if repeats < 1 or n_frames < 20:
        parser.error("--repeats must be >= 1 and --frames >= 20")
    counts = {"tiny": n_frames, "thread": n_frames, "conv": max(10, n_frames // 40)}
    print(f"metrics overhead: metrics=True vs False, frames tiny/thread {n_frames}, conv {counts['conv']}; "
          f"{repeats} interleaved repeats (medians)", flush=True)

    with asyncio.Runner() as runner:
        # Warm-up (not timed): imports, allocator, code paths, and the conv net's balance.
        make, frames = workload("conv", 10, None)
        probe = make(False)
        runner.run(probe.start(frames[0]))
        runner.run(probe.stop())
        conv_balance = list(probe.balance)
        loads = {name: workload(name, counts[name], conv_balance) for name in WORKLOADS}
        for name, (make, frames) in loads.items():
            for metrics in (False, True):
                runner.run(timed_stream(make, frames[:min(len(frames), 200)], metrics))
        variants = {f"{name}@{'on' if metrics else 'off'}":
                    (lambda m=make, f=frames, on=metrics: runner.run(timed_stream(m, f, on)))
                    for name, (make, frames) in loads.items() for metrics in (False, True)}
        raw = C.interleaved(variants, repeats)

    fps = {key: C.throughput(counts[key.split("@")[0]], C.median(times)) for key, times in raw.items()}
    loss = {name: 1 - C.median([off / on for off, on in zip(raw[f"{name}@off"], raw[f"{name}@on"])])
            for name in WORKLOADS}
    noise = max(C.spread(v) for v in raw.values())
    cost = span_cost_s()
    spans = {name: spans_per_frame(*loads[name]) for name in WORKLOADS}
    model = {name: spans[name] * cost * fps[f"{name}@off"] for name in WORKLOADS}
    print(f"\n{'workload':10s} {'off fps':>10s} {'on fps':>10s} {'loss':>7s} {'model':>7s}  spread off/on")
    for name in WORKLOADS:
        print(f"{name:10s} {fps[f'{name}@off']:10.1f} {fps[f'{name}@on']:10.1f} {loss[name]:7.1%} {model[name]:7.2%}"
              f"  {C.spread(raw[f'{name}@off']):.0%}/{C.spread(raw[f'{name}@on']):.0%}")
    print("(fps from the median times; loss = 1 - median of t_off/t_on paired within each repeat; negative: "
          "on was faster, i.e. noise. spread: (max - min) / median of a variant's repeats. model: spans per "
          f"frame x {cost * 1e9:.0f} ns per span append / off time per frame)")

    numbers: dict[str, object] = {"frames": n_frames, "conv_frames": counts["conv"], "repeats": repeats,
                                  "conv_balance": conv_balance}
    for name in WORKLOADS:
        numbers[f"{name}_off_fps"] = fps[f"{name}@off"]
        numbers[f"{name}_on_fps"] = fps[f"{name}@on"]
        numbers[f"{name}_loss"] = loss[name]
        numbers[f"{name}_spans_per_frame"] = spans[name]
        numbers[f"{name}_model_loss"] = model[name]
    numbers["span_cost_ns"] = cost * 1e9
    numbers["noise"] = noise
    worst = max(WORKLOADS, key=lambda n: loss[n])
    headline = f"worst throughput loss with metrics on = {loss[worst]:.1%} ({worst}; goal <= {GOAL:.0%})"
    C.record_run("metrics_overhead", args, argv, numbers, headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
