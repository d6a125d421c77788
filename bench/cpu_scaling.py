"""Throughput of batch-1 frames on CPU: the unsplit model against a two-stage pipeline.

Three models; the first two have 8 layers (a layer is one child of the ``nn.Sequential``):

* ``conv``: 8 x (Conv2d(32, 32, 3, padding=1) + ReLU), frames of shape (1, 32, 32, 32);
* ``mlp``:  8 x (Linear(1024, 1024) + ReLU), frames of shape (1, 1024);
* ``resnet``: not an ``nn.Sequential`` — a stem conv, four residual blocks (two 3x3 convs
  with BatchNorm, 32 channels, the input added back) and a linear head, frames of shape
  (1, 3, 32, 32), split by the graph splitter (``torch.export``); its ceiling's halves are
  the splitter's two stages at the time-balanced cut.

For each model, in the same run with interleaved repeats (order alternating), medians:

* ``unsplit_1t``: the model looping over the frames, ``torch.set_num_threads(1)``;
* ``unsplit_2t``: the same with ``torch.set_num_threads(2)`` (intra-op parallelism);
* ``ours``:       ``Pipeline(model, devices=cpu_devices(2, threads=1), balance="time")``,
                  one intra-op thread per stage, the default ``input_spec="first"``;
* ``ceiling`` (a reference, not a competitor): two plain threads, one intra-op thread each,
                  running the first and the second half of the layers at the same time on
                  inputs prepared beforehand, with no hand-off at all; frames / the slower
                  thread's time bounds what any two-stage pipeline can reach on this machine
                  *now* (cores shared with other work, caches, memory bandwidth).

Our pipeline runs on the event loop that ``pa.run`` and the CLI pick (``--loop auto``: uvloop
when installed). Printed with it: the loop thread's CPU time per frame while streaming (waking
up for each finished frame and moving it to the reader: CPU that the stages' threads do not
get, on a machine with as many cores as stages).

All under ``torch.no_grad()`` with ``model.eval()``; frames are generated before timing; a
pipeline is built (profiling, balance) before its clock starts, and a fresh one is built for
every repeat, so the balance it picks is part of what is measured (reported below).
Goals: ours / unsplit_1t >= 1.8 and ours / best unsplit >= 1.4 for conv (never < 1.0).
The last line printed is conv's ratio over the best unsplit. ``torch.set_num_threads`` is
restored afterwards.

    python bench/cpu_scaling.py [--quick] [--repeats N] [--frames N] [--loop auto|uvloop|asyncio]
        [--no-record | --record]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):  # run as a script: make `bench._common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

import partime_async as pa
from bench import _common as C
from partime_async.partition import GraphSplit, min_max_partition

VARIANTS = ("unsplit_1t", "unsplit_2t", "ours", "ceiling")


def make_conv() -> nn.Module:
    return nn.Sequential(*[nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()) for _ in range(8)])


def make_mlp() -> nn.Sequential:
    return nn.Sequential(*[nn.Sequential(nn.Linear(1024, 1024), nn.ReLU()) for _ in range(8)])


class Block(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with BatchNorm, and the input added back."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


class ResNetLike(nn.Module):
    """Not an nn.Sequential: a stem, four residual blocks and a head, split by the graph splitter."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.block1, self.block2, self.block3, self.block4 = (Block(32) for _ in range(4))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block4(self.block3(self.block2(self.block1(torch.relu(self.stem(x))))))
        return self.head(x.mean((2, 3)))


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv": (make_conv, (1, 32, 32, 32)),
    "mlp": (make_mlp, (1, 1024)),
    "resnet": (ResNetLike, (1, 3, 32, 32)),
}


def halves(model: nn.Module, sample: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    """The model's two halves for the ceiling: an nn.Sequential's first and second 4 layers; a
    graph's two stages as the graph splitter cuts it, balanced by time as ours is."""
    if isinstance(model, nn.Sequential):
        return model[:len(model) // 2], model[len(model) // 2:]
    split = GraphSplit(model)
    split.prepare(sample)
    first, second = split.plans(min_max_partition(split.profile(sample), 2), pa.cpu_devices(2))
    return first.module, second.module


def unsplit(model: nn.Module, frames: Sequence[torch.Tensor], threads: int) -> float:
    torch.set_num_threads(threads)
    with torch.no_grad():
        t0 = time.perf_counter()
        for x in frames:
            model(x)
        return time.perf_counter() - t0


def ceiling(halves: Sequence[nn.Module], inputs: Sequence[Sequence[torch.Tensor]]) -> float:
    """Both halves at once on two threads, no hand-off: seconds of the slower one."""

    def work(k: int) -> None:
        with torch.no_grad():
            for x in inputs[k]:
                halves[k](x)

    return C.on_threads([lambda k=k: work(k) for k in range(len(halves))])


class Ours:
    """A fresh two-stage pipeline per run; remembers the balances and inline choices it saw."""

    def __init__(self, model: nn.Module, runner: asyncio.Runner) -> None:
        self.model = model
        self.runner = runner
        self.balances: Counter[str] = Counter()
        self.inline: Counter[str] = Counter()
        self.first_outputs: list[torch.Tensor] = []
        self.busy: list[list[float]] = []  # per run: each stage's busy fraction while streaming
        self.loop_cpu: list[float] = []  # per run: the loop thread's CPU seconds per frame while streaming

    def __call__(self, frames: Sequence[torch.Tensor]) -> float:
        return self.runner.run(self._run(frames))

    async def _run(self, frames: Sequence[torch.Tensor]) -> float:
        pipe = pa.Pipeline(self.model, devices=pa.cpu_devices(2, threads=1), balance="time")
        keep_first = not self.first_outputs  # the first run keeps 3 outputs for the exactness check

        def keep(out: pa.Frame) -> None:
            if len(self.first_outputs) < 3:
                self.first_outputs.append(out.data)

        cpu: list[float] = []  # the loop thread's CPU clock when the stream starts and ends

        def mark() -> None:
            cpu.append(time.thread_time())

        dt = await C.time_stream(pipe, frames, keep if keep_first else None, on_start=mark, on_end=mark)
        self.loop_cpu.append((cpu[1] - cpu[0]) / len(frames))
        stats = pipe.stats()
        self.busy.append([s.busy_s / dt for s in stats.stages])
        self.balances[str(stats.balance)] += 1
        self.inline[str([s.inline for s in stats.stages])] += 1
        return dt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, default_repeats=5)
    C.add_loop_arg(parser)
    parser.add_argument("--frames", type=int, default=None, help="frames per run and model (default 600; quick: 40)")
    args = parser.parse_args(argv)
    n_frames = args.frames or (40 if args.quick else 600)
    repeats = args.repeats or (2 if args.quick else 5)
    if repeats < 1 or n_frames < 1:
        parser.error("--repeats and --frames must be >= 1")

    threads_before = torch.get_num_threads()
    print(f"cpu scaling: {n_frames} batch-1 frames per run, {repeats} interleaved repeats (medians), "
          f"{C.cores()} cores, torch {torch.__version__}", flush=True)
    try:
        torch.manual_seed(0)
        models = {name: make().eval() for name, (make, _) in MODELS.items()}
        frames = {name: [torch.randn(shape) for _ in range(n_frames)] for name, (_, shape) in MODELS.items()}
        loop_name = C.loop_name(args.loop)
        with C.runner(args.loop) as runner:
            ours = {name: Ours(models[name], runner) for name in MODELS}
            runs: dict[str, Callable[[Sequence[torch.Tensor]], float]] = {}
            for name in MODELS:
                m = models[name]
                two = halves(m, frames[name][0])
                with torch.no_grad():
                    middles = [two[0](x) for x in frames[name]]
                runs[f"{name}/unsplit_1t"] = lambda fr, m=m: unsplit(m, fr, 1)
                runs[f"{name}/unsplit_2t"] = lambda fr, m=m: unsplit(m, fr, 2)
                runs[f"{name}/ours"] = ours[name]
                runs[f"{name}/ceiling"] = lambda fr, h=two, mid=middles: ceiling(h, (fr, mid[:len(fr)]))
            for key, run in runs.items():  # warm-up (allocator, oneDNN/MKL kernels): not timed
                run(frames[key.split("/")[0]][:min(n_frames, 10)])
            raw = C.interleaved({key: (lambda r=run, fr=frames[key.split("/")[0]]: r(fr)) for key, run in runs.items()},
                                repeats)

            # Exactness spot check: the pipeline's first outputs against the unsplit model.
            torch.set_num_threads(1)
            exact = {}
            with torch.no_grad():
                for name in MODELS:
                    refs = [models[name](x) for x in frames[name][:len(ours[name].first_outputs)]]
                    exact[name] = all(torch.equal(a, b) for a, b in zip(refs, ours[name].first_outputs))
    finally:
        torch.set_num_threads(threads_before)

    fps = {key: C.throughput(n_frames, C.median(v)) for key, v in raw.items()}
    numbers: dict[str, object] = {"frames": n_frames, "repeats": repeats, "loop": loop_name}
    lines = []
    ratios = {}
    print(f"\n{'model':6s} {'unsplit 1 thread':>17s} {'unsplit 2 threads':>18s} {'ours 2 stages':>14s} "
          f"{'ceiling':>8s}  (frames/s; spread 1t/2t/ours/ceiling)")
    for name in MODELS:
        f1, f2, fo = fps[f"{name}/unsplit_1t"], fps[f"{name}/unsplit_2t"], fps[f"{name}/ours"]
        fc = fps[f"{name}/ceiling"]
        spreads = "/".join(f"{C.spread(raw[f'{name}/{v}']):.0%}" for v in VARIANTS)
        print(f"{name:6s} {f1:17.1f} {f2:18.1f} {fo:14.1f} {fc:8.1f}  ({spreads})")
        r1, rb = fo / f1, fo / max(f1, f2)
        ratios[name] = (r1, rb)
        busy = [C.median([run[k] for run in ours[name].busy]) for k in range(2)]
        numbers.update({f"{name}_unsplit_1t_fps": f1, f"{name}_unsplit_2t_fps": f2, f"{name}_ours_fps": fo,
                        f"{name}_ceiling_fps": fc, f"{name}_ours_over_1t": r1, f"{name}_ours_over_best": rb,
                        f"{name}_ours_over_ceiling": fo / fc,
                        f"{name}_stage_busy": "/".join(f"{b:.2f}" for b in busy),
                        f"{name}_loop_cpu_us": 1e6 * C.median(ours[name].loop_cpu),
                        f"{name}_balance": " ".join(f"{b}x{c}" for b, c in ours[name].balances.items()),
                        f"{name}_exact": exact[name]})
        goal_best = ">= 1.4" if name == "conv" else ">= 1.0"
        lines.append(f"{name}: ours / unsplit 1 thread = {r1:.2f} (goal >= 1.8); "
                     f"ours / best unsplit = {rb:.2f} (goal {goal_best})")
    print()
    for name in MODELS:
        busy = "/".join(f"{C.median([run[k] for run in ours[name].busy]):.2f}" for k in range(2))
        print(f"{name}: ours / ceiling = {fps[f'{name}/ours'] / fps[f'{name}/ceiling']:.2f}; stage busy fractions "
              f"while streaming {busy}; event loop ({loop_name}) thread CPU "
              f"{numbers[f'{name}_loop_cpu_us']:.0f} us per frame; balances chosen {dict(ours[name].balances)}; "
              f"stages inline {dict(ours[name].inline)}; first outputs bit-exact: {exact[name]}")
    print("(spread: (max - min) / median of a variant's repeats; large spreads mean a busy machine: rerun)")
    for line in lines:
        print(line)
    headline = f"conv: ours / best unsplit = {ratios['conv'][1]:.2f} (goal >= 1.4)"
    C.record_run("cpu_scaling", args, argv, numbers, headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
