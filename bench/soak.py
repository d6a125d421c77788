"""Soak: the demo job for a long time, with injected crashes, resumes and overload phases.

The job is ``partime-async demo``'s (its building blocks from :mod:`partime_async.cli`): the
camera panning over the shipped photograph, 64 x 64 frames, next-frame prediction learned online
in ``partime`` mode by the demo's 9-layer conv net on two CPU stages. The stream is endless; the
soak runs it for ``--minutes`` (default 30) through three sinks: a meter (frames, running loss),
a :class:`~partime_async.sinks.Checkpoint` (``every=N`` frames, atomically) and a "slow
consumer" with a drop policy (``latest`` by default). Not run in CI (``partime-async bench``
without names leaves it out); ``--quick`` is its smoke test (16 s, 2 s samples).

What happens, on a seeded schedule (``--seed``) after a warm-up (10% of the run):

* **faults**: at random times a stage raises on the next frame it forwards (a forward pre-hook
  on its first layer). A learning pipeline cannot skip a frame (``on_error="skip"`` would leave
  a gradient owed forever), so the run ends with a ``PipelineError``; the soak catches it,
  loads the last checkpoint the ``Checkpoint`` sink wrote, builds a fresh ``Pipeline`` from it
  and resumes the stream at the checkpoint's ``position`` (the frames after it are replayed).
  Each resumed stage checks, on its own worker thread right before its first forward, that its
  weights and its optimiser's state are bit for bit the checkpoint's; a resume counts once every
  stage has passed that check. Counted: crashes, resumes, replayed frames, the time from a
  crash to the resumed pipeline's first frame, and crashes whose ``PipelineError`` names another
  cause than the injected fault (``misreported``). After the run every segment's ``Pipeline``
  must have been freed (``pipelines_alive=0``).
* **overload**: in phases (about 10% of the run) the slow consumer takes ~10x a frame's time
  (10 / the median normal frames/s so far, as an ``asyncio.sleep``): its channel drops frames
  for it alone while the pipeline goes on. Counted: drops.

Every ``--sample-s`` (default 10 s): RSS (``VmRSS`` of ``/proc/self/status``), frames/s over the
interval, running loss, drops and crashes so far. At the end: ``bench/soak.png`` (RSS and
throughput against time, the warm-up, overload and fault-to-resume phases shaded) and a verdict:

* RSS growth: median RSS of the last quarter of the samples after warm-up minus that of the
  first quarter, in MiB, against ``--rss-bound-mib`` (default 64);
* throughput: median frames/s of the last quarter of the *normal* samples (after warm-up, no
  overload or fault-to-resume phase in their interval) over that of the first quarter; no
  degradation means >= 0.8 on a noisy shared machine. It is the last line printed.

    python bench/soak.py [--minutes M] [--sample-s S] [--seed N] [--every N] [--quick]
                         [--no-record | --record]
"""

import argparse
import asyncio
import contextlib
import gc
import math
import random
import statistics
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

if __package__ in (None, ""):  # run as a script: make `bench._common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import partime_async as pa
from bench import _common as C
from partime_async.checkpoint import load
from partime_async.cli import demo_learning, demo_model, demo_source
from partime_async.core.errors import PipelineError
from partime_async.graph import loop_factory
from partime_async.sinks import Checkpoint, Sink

PLOT = C.BENCH_DIR / "soak.png"
RATIO_GOAL = 0.8
SLOWDOWN = 10.0  # the slow consumer's time per frame in overload, in frames of the pipeline's


class InjectedFault(RuntimeError):
    """What a stage raises when the soak injects a fault."""


# -- the schedule ----------------------------------------------------------------------------------
@dataclass
class Fault:
    at_s: float                      # scheduled (seconds since the start)
    stage: int
    armed_s: float | None = None     # when the hook was armed
    crash_s: float | None = None     # when the PipelineError reached the soak
    resumed_s: float | None = None   # when the resumed pipeline delivered its first frame
    component: str = ""
    seq: int | None = None
    reported: str = ""               # the PipelineError, when its cause was not the injected fault
    position: int | None = None      # where the stream resumed
    replayed: int = 0


@dataclass
class Phase:
    t0: float
    t1: float


def schedule(duration: float, warmup: float, sample_s: float, stages: int, rng: random.Random, *,
             fault_every_s: float, overload_every_s: float, overload_s: float) -> tuple[list[Fault], list[Phase]]:
    """Faults and overload phases after the warm-up: one of each per slot of
    ``fault_every_s`` / ``overload_every_s`` seconds (at least one), at a random time in its slot."""
    end = duration - 2 * sample_s  # leave the last resume some time to show up in the samples
    n_faults = max(1, round((end - warmup) / fault_every_s))
    slot = (end - warmup) / n_faults
    faults = [Fault(warmup + (i + rng.uniform(0.15, 0.85)) * slot, rng.randrange(stages)) for i in range(n_faults)]
    n_over = max(1, round((duration - warmup) / overload_every_s))
    slot = (duration - warmup) / n_over
    length = min(overload_s, 0.8 * slot)
    overloads = []
    for i in range(n_over):
        t0 = warmup + i * slot + rng.uniform(0, slot - length)
        overloads.append(Phase(t0, t0 + length))
    return faults, overloads


# -- faults and resume checks, on the stages' worker threads ---------------------------------------
class Probe:
    """Forward pre-hooks on every layer of a pipeline's model. On the first layer of stage k
    they raise an :class:`InjectedFault` when k is armed, and, once after a resume, check that
    stage k's weights and optimiser state are the checkpoint's before its first forward."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.armed: int | None = None
        self.fired: str | None = None  # the fault raised in the current segment
        self.pipe: pa.Pipeline | None = None
        self.expected: dict[str, Any] | None = None
        self.unchecked: set[int] = set()
        self.mismatches: list[str] = []
        self._handles: list[Any] = []

    def attach(self, pipe: pa.Pipeline, expected: dict[str, Any] | None) -> None:
        self.pipe, self.expected = pipe, expected
        self.unchecked = set(range(len(pipe.devices))) if expected is not None else set()
        self.fired = None
        self._handles = [layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(pipe.layers)]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.armed = None

    def arm(self, stage: int) -> None:
        with self._lock:
            self.armed = stage

    def _hook(self, index: int):
        def hook(module: Any, args: Any) -> None:
            balance = self.pipe.balance if self.pipe is not None else None
            if balance is None:  # profiling the layers: no stage yet
                return
            starts = [sum(balance[:k]) for k in range(len(balance))]
            if index not in starts:
                return
            k = starts.index(index)
            if k in self.unchecked:
                self._check(k, starts[k], balance[k])
            with self._lock:
                fire, self.armed = self.armed == k, (None if self.armed == k else self.armed)
            if fire:
                self.fired = f"injected fault in stage {k}"
                raise InjectedFault(self.fired)
        return hook

    def _check(self, k: int, start: int, count: int) -> None:
        expected, pipe = self.expected, self.pipe
        problems = []
        for i in range(start, start + count):
            for name, value in pipe.layers[i].state_dict().items():
                want = expected["model"].get(f"{i}.{name}")
                if want is None or not torch.equal(value, want):
                    problems.append(f"layer {i} {name}")
        saved = expected.get("learners")
        if saved is not None:
            learner = pipe.learners[k]
            if not _same(learner.optimizer.state_dict(), saved[k]["optimizer"]):
                problems.append("optimizer state")
            if learner.steps != saved[k]["steps"]:
                problems.append(f"steps {learner.steps} != {saved[k]['steps']}")
        if problems:
            self.mismatches.append(f"stage {k} at position {expected['position']}: " + ", ".join(problems))
        self.unchecked.discard(k)


def _same(a: Any, b: Any) -> bool:
    """Deep equality of nested state (tensors bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


# -- sinks -----------------------------------------------------------------------------------------
class Meter(Sink):
    """Counts every output frame, keeps the running loss (the demo's: exponential over ~50
    frames) and notices the first frame of each segment (a resume is done when it arrives)."""

    name = "meter"

    def __init__(self) -> None:
        super().__init__()
        self.frames = 0
        self.segment_frames = 0
        self.next_seq = 0
        self.loss: float | None = None
        self.on_first: Any = None

    async def write(self, frame: pa.Frame) -> None:
        if self.segment_frames == 0 and self.on_first is not None:
            self.on_first()
        self.frames += 1
        self.segment_frames += 1
        self.next_seq = frame.seq + 1
        loss = frame.meta.get("loss")
        if loss is not None:
            self.loss = loss if self.loss is None else 0.98 * self.loss + 0.02 * loss


class SlowConsumer(Sink):
    """A consumer that, while :attr:`delay` is set, takes that long per frame; its drop policy
    lets it fall behind alone (``dropped`` counts what it missed)."""

    name = "slow consumer"

    def __init__(self, policy: str) -> None:
        super().__init__(capacity=4, policy=policy)
        self.delay = 0.0

    async def write(self, frame: pa.Frame) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)


async def _until(source: Any, deadline: float, at_least: int) -> AsyncIterator[pa.Frame]:
    """``source``'s frames until ``deadline`` (time.perf_counter), but at least ``at_least``."""
    frames = aiter(source)
    try:
        n = 0
        async for frame in frames:
            if n >= at_least and time.perf_counter() >= deadline:
                return
            yield frame
            n += 1
    finally:
        await frames.aclose()


def rss_mib() -> float:
    """Resident set size of this process (VmRSS), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class Sample:
    t: float            # seconds since the start, at the end of the interval
    dt: float
    rss_mib: float
    fps: float
    loss: float | None
    drops: int          # so far
    crashes: int        # so far
    normal: bool = True


@dataclass
class Soak:
    duration: float
    sample_s: float
    warmup: float
    faults: list[Fault]
    overloads: list[Phase]
    samples: list[Sample] = field(default_factory=list)
    crashes: int = 0
    resumes: int = 0
    unverified: int = 0
    mismatches: list[str] = field(default_factory=list)
    misreported: list[str] = field(default_factory=list)
    checkpoints: int = 0
    segments: int = 0
    drops: int = 0
    frames: int = 0
    loss: float | None = None
    balance: list[int] | None = None
    overload_delay_s: list[float] = field(default_factory=list)
    pipes: list[Any] = field(default_factory=list)  # a weak reference to each segment's Pipeline


async def soak(args: argparse.Namespace, folder: Path, out: Any = sys.stdout) -> Soak:
    duration, sample_s = args.seconds, args.sample_s
    warmup = max(2 * sample_s, 0.1 * duration)
    faults, overloads = schedule(duration, warmup, sample_s, args.stages, random.Random(args.seed),
                                 fault_every_s=args.fault_every_s, overload_every_s=args.overload_every_s,
                                 overload_s=max(2 * sample_s, min(args.overload_s, 0.1 * duration)))
    result = Soak(duration, sample_s, warmup, faults, overloads)
    path = folder / "soak.pt"
    meter, slow, probe = Meter(), SlowConsumer(args.policy), Probe()
    open_fault: list[Fault] = []  # the fault between its arming and the resumed pipeline's first frame
    t0 = time.perf_counter()
    deadline = t0 + duration

    def resumed() -> None:
        if open_fault and open_fault[0].crash_s is not None:
            open_fault.pop().resumed_s = time.perf_counter() - t0

    meter.on_first = resumed

    async def control() -> None:
        """Arms faults, switches overload on and off, takes the samples."""
        pending = list(faults)
        last_t, last_frames = 0.0, 0
        next_sample = sample_s
        while True:
            t = time.perf_counter() - t0
            if pending and t >= pending[0].at_s and meter.segment_frames > 0 and not open_fault:
                fault = pending.pop(0)
                fault.armed_s = t
                open_fault.append(fault)
                probe.arm(fault.stage)
            if any(p.t0 <= t < p.t1 for p in overloads):
                if not slow.delay:  # ~10x a frame's time at the normal pace so far
                    normal = [s.fps for s in result.samples if s.normal and s.fps > 0] or [meter.frames / t]
                    slow.delay = SLOWDOWN / max(1.0, statistics.median(normal))
                    result.overload_delay_s.append(slow.delay)
            else:
                slow.delay = 0.0
            if t >= next_sample:
                frames = meter.frames
                sample = Sample(t, t - last_t, rss_mib(), (frames - last_frames) / (t - last_t), meter.loss,
                                slow.dropped, result.crashes)
                sample.normal = _normal(last_t, t, overloads, faults)
                result.samples.append(sample)
                loss = f"{sample.loss:.5f}" if sample.loss is not None else "-"
                out.write(f"  t {t:7.1f} s | RSS {sample.rss_mib:7.1f} MiB | {sample.fps:6.1f} frames/s | "
                          f"loss {loss} | drops {sample.drops} | crashes {sample.crashes} | "
                          f"{'normal' if sample.normal else 'overload/fault'}\n")
                out.flush()
                last_t, last_frames = t, frames
                next_sample += sample_s
            await asyncio.sleep(0.05)

    controller = asyncio.create_task(control(), name="soak-control")
    state: dict[str, Any] | None = None   # what the current segment resumed from (None: the start)
    initial: dict[str, Any] | None = None
    try:
        while True:
            torch.manual_seed(0)
            pipe = pa.Pipeline(demo_model(), devices=pa.cpu_devices(args.stages), balance="time",
                               learning=demo_learning("partime"))
            if state is None:
                initial = pipe.state_dict()
            else:
                pipe.load_state_dict(state)
            _, source = demo_source(None, args.size, start=state["position"] if state is not None else 0)
            checkpoint = Checkpoint(pipe, path, every=args.every)
            probe.attach(pipe, state)
            result.pipes.append(weakref.ref(pipe))
            meter.segment_frames = 0
            result.segments += 1
            crashed: Fault | None = None
            try:
                await pa.run(_until(source, deadline, at_least=8) >> pipe >> [meter, slow, checkpoint])
            except PipelineError as exc:
                if probe.fired is None or not open_fault:
                    raise  # not ours: a real failure
                crashed = open_fault[0]
                crashed.crash_s = time.perf_counter() - t0
                crashed.component, crashed.seq = exc.component, exc.seq
                result.crashes += 1
                if not isinstance(_root(exc), InjectedFault):
                    # The stage raised our fault, but the pipeline reported another error: the
                    # backward that the stage still ran for the failed frame (see the report).
                    crashed.reported = f"{exc}"
                    result.misreported.append(f"{probe.fired}, reported as: {exc}")
                    out.write(f"  MISREPORTED: {probe.fired} raised, but the PipelineError says: {exc}\n")
            finally:
                probe.detach()
                result.checkpoints += len(checkpoint.saved)
                if pipe.balance is not None:
                    result.balance = list(pipe.balance)
                if state is not None:  # this segment was a resume: did every stage check out?
                    if probe.unchecked:
                        result.unverified += 1
                    elif not probe.mismatches:
                        result.resumes += 1
                    result.mismatches += probe.mismatches
                    probe.mismatches = []
            if crashed is None:
                break  # the stream reached the deadline
            # Resume from the last checkpoint written (the initial state if none was yet).
            state = load(path) if path.exists() else initial
            crashed.position = state["position"]
            crashed.replayed = meter.next_seq - state["position"]
            out.write(f"  crash {result.crashes} in {crashed.component} at frame {crashed.seq} "
                      f"(t {crashed.crash_s:.1f} s): resuming from the checkpoint at frame {crashed.position}, "
                      f"{crashed.replayed} frames to replay\n")
            out.flush()
    finally:
        controller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await controller
    result.drops = slow.dropped
    result.frames = meter.frames
    result.loss = meter.loss
    return result


def _root(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _normal(t0: float, t1: float, overloads: Sequence[Phase], faults: Sequence[Fault]) -> bool:
    """No overload phase and no fault (armed to resumed, or still open) within [t0, t1]."""
    for p in overloads:
        if p.t0 < t1 and p.t1 > t0:
            return False
    for f in faults:
        if f.armed_s is not None and f.armed_s < t1 and (f.resumed_s is None or f.resumed_s > t0):
            return False
    return True


# -- verdict, plot, main ---------------------------------------------------------------------------
def quarters(values: Sequence[float]) -> tuple[float, float]:
    """Medians of the first and the last quarter of ``values`` (at least one value each)."""
    q = max(1, len(values) // 4)
    return statistics.median(values[:q]), statistics.median(values[-q:])


def verdict(result: Soak) -> dict[str, Any]:
    after = [s for s in result.samples if s.t - s.dt >= result.warmup]
    normal = [s for s in after if s.normal]
    numbers: dict[str, Any] = {}
    if after:
        first, last = quarters([s.rss_mib for s in after])
        numbers.update(rss_first_q_mib=first, rss_last_q_mib=last, rss_growth_mib=last - first)
    else:
        numbers.update(rss_first_q_mib=math.nan, rss_last_q_mib=math.nan, rss_growth_mib=math.nan)
    numbers["rss_peak_mib"] = max((s.rss_mib for s in result.samples), default=math.nan)
    numbers["normal_samples"] = len(normal)
    if normal:
        first, last = quarters([s.fps for s in normal])
        numbers.update(fps_first_q=first, fps_last_q=last, fps_ratio=last / first if first > 0 else math.nan)
    else:
        numbers.update(fps_first_q=math.nan, fps_last_q=math.nan, fps_ratio=math.nan)
    overload = [s.fps for s in after if not s.normal and any(p.t0 < s.t and p.t1 > s.t - s.dt
                                                               for p in result.overloads)]
    numbers["fps_overload"] = statistics.median(overload) if overload else math.nan
    return numbers


def plot(result: Soak, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    t = [s.t for s in result.samples]
    fig, (ax_rss, ax_fps) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    ax_rss.plot(t, [s.rss_mib for s in result.samples], marker=".", color="tab:blue")
    ax_rss.set_ylabel("RSS (MiB)")
    ax_fps.plot(t, [s.fps for s in result.samples], marker=".", color="tab:green")
    ax_fps.set_ylabel("frames/s (per sample)")
    ax_fps.set_xlabel("time (s)")
    for ax in (ax_rss, ax_fps):
        ax.axvspan(0, result.warmup, color="0.85", zorder=0)
        for p in result.overloads:
            ax.axvspan(p.t0, min(p.t1, result.duration), color="tab:orange", alpha=0.25, zorder=0)
        for f in result.faults:
            if f.armed_s is not None:
                ax.axvspan(f.armed_s, f.resumed_s if f.resumed_s is not None else f.armed_s + result.sample_s / 4,
                           color="tab:red", alpha=0.35, zorder=0)
                if f.crash_s is not None:
                    ax.axvline(f.crash_s, color="tab:red", linewidth=0.8)
        ax.grid(alpha=0.3)
    ax_rss.legend(handles=[Patch(color="0.85", label="warm-up"),
                           Patch(color="tab:orange", alpha=0.25, label="overload (slow sink, drops)"),
                           Patch(color="tab:red", alpha=0.35, label="fault → resumed")],
                  loc="lower right", fontsize=8)
    ax_rss.set_title(f"Soak: demo job, partime on 2 CPU stages, {result.duration / 60:.0f} min, "
                     f"crashes {result.crashes}, resumes {result.resumes}, drops {result.drops}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(parser, default_repeats=1)
    parser.add_argument("--minutes", type=float, default=None, help="how long (default 30; quick: 16 s)")
    parser.add_argument("--sample-s", type=float, default=None, help="seconds between samples (default 10; quick: 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault and overload schedule")
    parser.add_argument("--every", type=int, default=None, help="checkpoint every N frames (default 100; quick: 40)")
    parser.add_argument("--stages", type=int, default=2, help="CPU stages")
    parser.add_argument("--size", type=int, default=64, help="frame height and width")
    parser.add_argument("--fault-every-s", type=float, default=120.0, help="about one fault per this many seconds")
    parser.add_argument("--overload-every-s", type=float, default=300.0,
                        help="one overload phase per this many seconds")
    parser.add_argument("--overload-s", type=float, default=30.0,
                        help="length of an overload phase (at most 10%% of the run, at least 2 samples)")
    parser.add_argument("--policy", choices=["latest", "drop_oldest"], default="latest",
                        help="the slow consumer's drop policy")
    parser.add_argument("--rss-bound-mib", type=float, default=64.0, help="allowed RSS growth, first to last quarter")
    parser.add_argument("--plot", type=Path, default=None, help=f"the picture (default {PLOT}; quick: a temporary file)")
    parser.add_argument("--dir", type=Path, default=None, help="where checkpoints go (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.repeats is not None:
        parser.error("--repeats does not apply: the soak is one long run")
    args.seconds = 60 * args.minutes if args.minutes is not None else (16.0 if args.quick else 1800.0)
    args.sample_s = args.sample_s or (2.0 if args.quick else 10.0)
    args.every = args.every or (40 if args.quick else 100)
    if args.seconds < 6 * args.sample_s:
        parser.error("the run must last at least 6 samples")

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        print(f"soak: {args.seconds:.0f} s of the demo job (partime, {args.stages} CPU stages, {args.size}x{args.size}), "
              f"sample every {args.sample_s:g} s, checkpoint every {args.every} frames, seed {args.seed}", flush=True)
        with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:
            result = runner.run(soak(args, args.dir or Path(tmp)))
        picture = plot(result, args.plot or (Path(tmp) / "soak.png" if args.quick else PLOT))
        print(f"plot written to {picture}" + (" (quick run: not kept)" if args.quick and args.plot is None else ""))
    gc.collect()
    alive = sum(ref() is not None for ref in result.pipes)  # every segment's Pipeline should be freed

    n = verdict(result)
    replayed = sum(f.replayed for f in result.faults)
    resume_s = [f.resumed_s - f.crash_s for f in result.faults if f.crash_s is not None and f.resumed_s is not None]
    overload_s = sum(min(p.t1, result.duration) - p.t0 for p in result.overloads)
    numbers: dict[str, Any] = {
        "minutes": round(args.seconds / 60, 2), "sample_s": args.sample_s, "seed": args.seed, "every": args.every,
        "policy": args.policy, "balance": result.balance, "frames": result.frames, "replayed": replayed,
        "crashes": result.crashes, "resumes": result.resumes, "resume_mismatches": len(result.mismatches),
        "resume_unverified": result.unverified, "misreported": len(result.misreported),
        "pipelines_alive": alive, "checkpoints": result.checkpoints, "overload_s": round(overload_s, 1),
        "resume_s_median": statistics.median(resume_s) if resume_s else math.nan,
        "resume_s_max": max(resume_s, default=math.nan),
        "drops": result.drops, "final_loss": result.loss if result.loss is not None else math.nan, **n,
    }
    for problem in result.mismatches:
        print(f"RESUME MISMATCH: {problem}")
    print(f"crashes {result.crashes}, resumes {result.resumes} (each resumed stage's weights and optimiser state "
          f"checked against the checkpoint: {len(result.mismatches)} mismatches, {result.unverified} unverified); "
          f"{replayed} frames replayed; crash to first frame after resume {numbers['resume_s_median']:.2f} s "
          f"(median), {numbers['resume_s_max']:.2f} s (max); {result.checkpoints} checkpoints written; "
          f"misreported (the PipelineError names another cause than the injected fault): "
          f"{len(result.misreported)}; "
          f"{alive} of {len(result.pipes)} pipelines still alive after the run")
    print(f"overload: {len(result.overloads)} phases, {overload_s:.0f} s, slow consumer at "
          f"{1e3 * statistics.median(result.overload_delay_s or [math.nan]):.0f} ms per frame: "
          f"{result.drops} frames dropped for it alone; pipeline {n['fps_overload']:.1f} frames/s meanwhile")
    rss_ok = n["rss_growth_mib"] <= args.rss_bound_mib
    print(f"RSS growth, first to last quarter after warm-up: {n['rss_growth_mib']:+.1f} MiB "
          f"({n['rss_first_q_mib']:.1f} -> {n['rss_last_q_mib']:.1f}; bound {args.rss_bound_mib:g} MiB): "
          f"{'OK' if rss_ok else 'EXCEEDED'}; peak {n['rss_peak_mib']:.1f} MiB")
    ratio = n["fps_ratio"]
    print(f"throughput of normal phases: first quarter {n['fps_first_q']:.1f}, last quarter {n['fps_last_q']:.1f} "
          f"frames/s (medians; {n['normal_samples']} normal samples after warm-up): "
          f"{'no degradation' if ratio >= RATIO_GOAL else 'DEGRADED'} (goal >= {RATIO_GOAL})")
    ok = (ratio >= RATIO_GOAL and rss_ok and result.crashes >= 1 and result.resumes == result.crashes
          and not result.mismatches and not alive)
    C.record_run("soak", args, argv, numbers,
                 f"soak {'PASS' if ok else 'FAIL'}: {result.resumes}/{result.crashes} resumes, "
                 f"RSS {n['rss_growth_mib']:+.1f} MiB (bound {args.rss_bound_mib:g}); throughput last/first quarter "
                 f"of normal phases = {ratio:.2f} (goal >= {RATIO_GOAL})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
