"""Helpers shared by the benchmarks: medians, interleaved repeats, timing, and RESULTS.md.

Every benchmark in ``bench/`` is runnable as ``python bench/NAME.py [--quick] [--repeats N]``
from the repository root and exposes ``main(argv) -> int`` for a CLI. Its last printed line is
its headline ratio; :func:`record` appends one dated line per run to ``bench/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import gc
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "RESULTS.md"

HEADER = """\
# Benchmark results

One line per full benchmark run, appended by `bench/_common.py:record` (never by tests):

    - <ISO date+time UTC> | <benchmark> | <machine> | `<exact command>` | <numbers> | <headline ratio>

* **machine**: OS/platform, CPU model (from /proc/cpuinfo), cores usable by the process
  (`len(os.sched_getaffinity(0))`), torch version, GPU name or "no GPU".
* **numbers**: `name=value` pairs; times are medians over interleaved repeats (the variants of
  one benchmark alternate order from repeat to repeat, so drift and noise hit all of them);
  units are in the names (`_us` microseconds, `_fps` frames per second).
* **headline ratio**: the one number the benchmark is about, with its goal; it is also the last
  line the benchmark prints.

Numbers from a shared or busy machine are noisy: compare lines from the same machine only, and
rerun before drawing conclusions. `--quick` runs (CI smoke tests) are not recorded unless
`--record` is given; `--no-record` skips recording for any run.

"""


# -- statistics and timing --------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return statistics.median(values)


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: a rough noise indicator for a set of repeats."""
    m = statistics.median(values)
    return (max(values) - min(values)) / m if m else 0.0


def time_call(fn: Callable[[], object]) -> float:
    """Seconds of one call of ``fn`` (perf_counter), after a garbage collection."""
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def on_threads(works: Sequence[Callable[[], None]]) -> float:
    """Run each of ``works`` on its own thread, one intra-op thread each, all released at
    once; seconds of the slowest. The ceiling of a pipeline: its stages' work done at the
    same time with no hand-off at all (what this machine allows *now*: cores shared with
    other work, caches, memory bandwidth)."""
    import threading

    import torch

    seconds = [0.0] * len(works)
    barrier = threading.Barrier(len(works))

    def run(k: int) -> None:
        torch.set_num_threads(1)
        barrier.wait()
        t0 = time.perf_counter()
        works[k]()
        seconds[k] = time.perf_counter() - t0

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(works))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return max(seconds)


def throughput(frames: int, seconds: float) -> float:
    """Frames per second."""
    return frames / seconds if seconds > 0 else float("inf")


def interleaved(variants: Mapping[str, Callable[[], float]], repeats: int, *,
                verbose: bool = True) -> dict[str, list[float]]:
    """Run every variant once per repeat and collect what each returns (seconds).

    The order alternates (forward on even repeats, reversed on odd ones) so that a slow drift
    of the machine or a warm-up effect does not favour whichever variant runs first. A
    variant is a callable returning its own measured seconds (so that it can leave set-up and
    tear-down out of the timing); ``gc.collect()`` runs before each.
    """
    names = list(variants)
    results: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            gc.collect()
            results[name].append(variants[name]())
        if verbose:
            print(f"  repeat {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    return results


# -- machine and command ------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_line() -> str:
    """Platform, CPU model, usable cores, Python and torch versions, GPU (if any)."""
    import torch

    gpu = "no GPU"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        gpu = f"GPU {len(names)}x " + ", ".join(sorted(set(names)))
    return (f"{platform.system()} {platform.release()} {platform.machine()}, {cpu_model()}, "
            f"{cores()} cores, Python {platform.python_version()}, torch {torch.__version__}, {gpu}")


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that ran the benchmark, rebuilt from ``sys.argv``.

    ``python bench/X.py ARGS`` when run as a script; the console command as typed when a CLI
    called ``main(argv)``; if ``argv`` differs from what ``sys.argv`` says (a caller passed its
    own arguments), they are appended as ``[main(argv=...)]`` so the line is never misleading.
    """
    args = list(sys.argv)
    if args and args[0].endswith(".py"):
        cmd = shlex.join(["python", os.path.relpath(args[0]) if os.path.isabs(args[0]) else args[0], *args[1:]])
    else:
        cmd = shlex.join([os.path.basename(args[0]) if args else "python", *args[1:]])
    argv = list(argv) if argv is not None else None
    if argv and argv != args[len(args) - len(argv):]:  # not what the command line ends with
        cmd += f" [main(argv={argv!r})]"
    return cmd


def add_common_args(parser: argparse.ArgumentParser, default_repeats: int) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny run (CI smoke test)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"interleaved repeats, medians reported (default {default_repeats}; quick: 2)")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--record", action="store_true",
                        help="append to the results file even with --quick (quick runs do not, by default)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results file (default bench/RESULTS.md)")


def add_loop_arg(parser: argparse.ArgumentParser) -> None:
    """``--loop``: the event loop our pipelines run on, ``auto`` by default as in ``pa.run``."""
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                        help="event loop for our pipelines (default auto: uvloop when installed, as pa.run "
                             "and the CLI use)")


def runner(kind: str) -> asyncio.Runner:
    """An ``asyncio.Runner`` on the event loop ``kind`` (see :func:`add_loop_arg`)."""
    from partime_async.graph import loop_factory

    return asyncio.Runner(loop_factory=loop_factory(kind))  # type: ignore[arg-type]


def loop_name(kind: str) -> str:
    """The event loop that ``kind`` stands for here, as recorded with the numbers."""
    from partime_async.graph import loop_factory

    return "asyncio" if loop_factory(kind) is None else "uvloop"  # type: ignore[arg-type]


def gpu_or_smoke(bench: str, requested: str | None, quick: bool, smoke: str) -> str | None:
    """The device type a GPU benchmark runs on: ``"cuda"`` when asked or available; ``"cpu"``
    (its smoke path, described by ``smoke``) when asked, or under --quick without CUDA; None
    (nothing to run, said so) for a full run without CUDA. ``--device cuda`` without CUDA exits."""
    import torch

    if requested == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"{bench}: --device cuda given, but CUDA is not available here")
        return "cuda"
    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    print(f"{bench}: needs CUDA for the real measurement; no CUDA device here", flush=True)
    if quick:
        print(f"{bench}: running the CPU smoke path instead ({smoke}; not a measurement)", flush=True)
        return "cpu"
    print(f"{bench}: nothing measured, nothing recorded (run with --quick or --device cpu for the CPU smoke path)",
          flush=True)
    return None


def results_path(args: argparse.Namespace) -> Path | None:
    """Where :func:`record` writes: None for --no-record, and for --quick unless --record."""
    if args.no_record or (args.quick and not args.record):
        return None
    return args.results


# -- recording ----------------------------------------------------------------------------------
def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}" if abs(value) < 100 else f"{value:.1f}"
        return f"{value:.3e}"
    return str(value)


def format_numbers(numbers: Mapping[str, object]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in numbers.items())


def record(name: str, machine: str, command: str, numbers: Mapping[str, object], ratio_text: str,
           *, path: Path | None = RESULTS) -> str:
    """Append one dated line to ``path`` (created with its header if missing; ``None``: print it
    only) and print the ratio LAST. Returns the line."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    line = f"- {stamp} | {name} | {machine} | `{command}` | {format_numbers(numbers)} | {ratio_text}"
    if path is not None:
        path = Path(path)
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a") as f:
            if new:
                f.write(HEADER)
            f.write(line + "\n")
        print(f"recorded in {path}", flush=True)
    else:
        print(f"not recorded: {line}", flush=True)
    print(ratio_text, flush=True)
    return line


# -- pipelines ------------------------------------------------------------------------------------
async def time_stream(pipe, frames: Sequence[object], on_output: Callable[[object], None] | None = None, *,
                      preroll: int = 0, on_start: Callable[[], None] | None = None,
                      on_end: Callable[[], None] | None = None) -> float:
    """Seconds from the first frame in to the last frame out of ``pipe`` over ``frames``
    (``on_output`` sees each output frame, inside the timing). ``preroll``: that many of the
    frames are streamed once before the clock starts (one-off work on a first frame, such as
    a CUDA graph capture, is then not timed). ``on_start`` is called just before the clock
    starts and ``on_end`` just after it stops (to take other measurements over the same span,
    e.g. the loop thread's CPU time).

    The pipeline is started and built on the first frame, and every device's worker thread is
    up and idle, before the clock starts: no set-up is timed, and no thread start-up competes
    for the GIL with the first frames. The pipeline is stopped afterwards (cancelled on error).
    """
    await pipe.start(frames[0])
    await asyncio.gather(*(d.submit(_identity, None) for d in pipe.devices))
    try:
        if preroll:
            async for _ in pipe.stream(frames[:preroll]):
                pass
        n = 0
        if on_start is not None:
            on_start()
        t0 = time.perf_counter()
        async for out in pipe.stream(frames):
            if on_output is not None:
                on_output(out)
            n += 1
        seconds = time.perf_counter() - t0
        if on_end is not None:
            on_end()
    except BaseException:
        await pipe.cancel()
        raise
    await pipe.stop()
    assert n == len(frames), (n, len(frames))
    return seconds


def _identity(x: object, seq: int) -> object:
    return x


def record_run(name: str, args: argparse.Namespace, argv: Sequence[str] | None,
               numbers: Mapping[str, object], headline: str) -> str:
    """:func:`record` for a benchmark's ``main``: machine, command and results path from ``args``
    (quick runs are labelled and, by default, not written)."""
    return record(name + (" (quick)" if args.quick else ""), machine_line(), command_line(argv),
                  numbers, headline, path=results_path(args))
