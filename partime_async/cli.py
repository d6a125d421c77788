"""The ``partime-async`` command: ``demo`` (the main job) and ``bench``.

``partime-async demo`` streams a camera panning over a real photograph through a small conv
net split over the available devices, learning online to predict the next frame (``partime``
mode by default; ``--no-learn`` for inference only). It shows a live progress line (frames/s,
running loss, per-stage busy %, drops) and closes with a summary that includes the speed-up
over the unsplit model (its best over 1 and all cores' threads, measured on the stream's first
frames before and after the pipelined run). It runs on uvloop when
installed. ``--trace FILE`` writes the run's Perfetto trace and ``--plot FILE`` its timeline
picture (see :mod:`partime_async.observe`). ``--video PATH`` streams a video (a file, a network
stream, a camera; PyAV needed) instead of the built-in camera.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import importlib.util
import signal
import statistics
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO, cast

import torch
from torch import nn

from .core.frame import Frame, now
from .core.stats import PipelineStats
from .devices import Device, available_cores, cpu_devices
from .graph import Sink, loop_factory, run
from .pipeline import Pipeline
from .programs import MODES, OnlineLearning
from .programs.online import Mode


def demo_model(channels: int = 3, width: int = 32, depth: int = 8) -> nn.Sequential:
    """The demo's conv net: ``depth`` × (3×3 conv + ReLU) then a 1×1 conv back to ``channels``.

    Each conv + ReLU pair is one layer of the split.
    """
    layers: list[nn.Module] = []
    c = channels
    for _ in range(depth):
        layers.append(nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.ReLU()))
        c = width
    layers.append(nn.Conv2d(width, channels, 1))
    return nn.Sequential(*layers)


def demo_learning(mode: Mode = "partime") -> OnlineLearning:
    """Next-frame prediction: mean squared error, Adam per stage."""
    return OnlineLearning(loss=nn.MSELoss(), optimizer=lambda params: torch.optim.Adam(params, lr=1e-3), mode=mode)


def demo_source(frames: int | None, size: int = 64, *, learn: bool = True, start: int = 0,
                video: str | Path | None = None) -> tuple[Any, Any]:
    """The demo's stream: a ``size`` x ``size`` camera over the shipped photograph, frames
    ``start``, ``start + 1``, … up to ``frames`` (None: endless), each carrying the next frame
    as its target when ``learn``. Returns ``(camera, source)``; ``start`` resumes a stream at a
    checkpoint's ``state["position"]``. ``video``: the frames of that video instead (a file, a
    URL or a device, read by a :class:`~partime_async.sources.VideoSource`), resized by FFmpeg to
    ``size`` x ``size``, as float32 in [0, 1] like the camera's; ``start`` must then be 0."""
    from partime_async.sources import PanZoomCamera, VideoSource, next_frame_targets

    if video is not None:
        if start:
            raise ValueError("start= resumes the built-in camera's stream; a video starts at its beginning")
        count = frames + 1 if learn and frames is not None else frames
        clip = VideoSource(video, width=size, height=size, dtype=torch.float32, frames=count)
        return clip, (next_frame_targets(clip) if learn else clip)
    camera = PanZoomCamera(frames + 1 if learn and frames is not None else frames, height=size, width=size,
                           start=start)
    return camera, (next_frame_targets(camera) if learn else camera)


class Unsplit:
    """The unsplit model on one device, one frame at a time: inference, or plain online SGD
    (forward, loss, backward, step per frame) when ``learning`` is given. ``model`` is used
    as is: pass a copy. :attr:`losses` has each learning frame's loss."""

    def __init__(self, model: nn.Module, learning: OnlineLearning | None = None) -> None:
        self.model = model
        self.learning = learning
        self.optimizer = learning.optimizer(model.parameters()) if learning is not None else None
        self.losses: list[float] = []

    def step(self, frame: Frame) -> None:
        if self.learning is None or self.optimizer is None:
            with torch.no_grad():
                self.model(frame.data)
            return
        loss = self.learning.loss(self.model(frame.data), frame.target)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.item())


@contextlib.contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` on this thread, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_unsplit(model: nn.Module, frames: Sequence[Frame], threads: int, learning: OnlineLearning | None = None,
                *, warmup: bool = True) -> tuple[float, list[float]]:
    """:class:`Unsplit` over ``frames`` with ``threads`` intra-op threads: the seconds and,
    when learning, each frame's loss. ``warmup`` runs (and learns from) the first frame once
    before the clock starts."""
    unsplit = Unsplit(model, learning)
    with intra_op_threads(threads):
        if warmup:
            unsplit.step(frames[0])
            unsplit.losses.clear()
        t0 = now()
        for frame in frames:
            unsplit.step(frame)
        return now() - t0, unsplit.losses


async def unsplit_rates(model: nn.Module, frames: Sequence[Frame], learning: OnlineLearning | None,
                        *, slice_frames: int = 8) -> dict[int, float]:
    """The demo's baseline: frames per second of :func:`run_unsplit` (warm-up included) on a
    copy of ``model`` with 1 and with all cores' threads, by thread count.

    Measured as bench/ measures it and as a user runs a model: on this thread, the loop's.
    On a worker thread the model gets an OpenMP team of its own, which contends with this
    thread's: on 2 cores, 2 threads ran slower than 1 there, and the demo's speed-up was
    inflated by that. The loop handles what came (a Ctrl-C) between slices of
    ``slice_frames`` frames, outside the timing."""
    rates = {}
    for threads in sorted({1, available_cores()}):
        unsplit, seconds = Unsplit(copy.deepcopy(model), learning), 0.0
        with intra_op_threads(threads):
            unsplit.step(frames[0])
        for i in range(0, len(frames), slice_frames):
            with intra_op_threads(threads):
                t0 = now()
                for frame in frames[i:i + slice_frames]:
                    unsplit.step(frame)
                seconds += now() - t0
            await asyncio.sleep(0)
        rates[threads] = len(frames) / seconds
    return rates


class Progress(Sink):
    """A sink that keeps a one-line live display of a running pipeline."""

    name = "progress"

    def __init__(self, pipe: Pipeline, total: int | None, out: TextIO, every: float = 0.5) -> None:
        super().__init__()
        self.pipe, self.total, self.out, self.every = pipe, total, out, every
        self.latencies: list[float] = []
        self.loss: float | None = None  # running mean (exponential, over ~50 frames)
        self._last = 0.0
        self._tty = out.isatty()
        self._first_out: float | None = None
        self._last_out = 0.0
        self._written = 0

    @property
    def rate(self) -> float | None:
        """Frames per second from the first output on (the pipeline's set-up left out, as the
        unsplit baseline's warm-up is); None before two frames."""
        if self._written < 2 or self._first_out is None or self._last_out <= self._first_out:
            return None
        return (self._written - 1) / (self._last_out - self._first_out)

    async def write(self, frame: Frame) -> None:
        self._last_out = now()
        if self._first_out is None:
            self._first_out = self._last_out
        self._written += 1
        if frame.latency is not None:
            self.latencies.append(frame.latency)
        loss = frame.meta.get("loss")
        if loss is not None:
            self.loss = loss if self.loss is None else 0.98 * self.loss + 0.02 * loss
        t = now()
        if t - self._last >= self.every:
            self._last = t
            self._show(self.pipe.stats(), end="\r" if self._tty else "\n")

    async def close(self) -> None:
        self._show(self.pipe.stats(), end="\n")

    def _show(self, stats: PipelineStats, end: str) -> None:
        of = f"/{self.total}" if self.total else ""
        busy = " ".join(f"{b:4.0%}" for b in stats.busy())
        loss = f" | loss {self.loss:.5f}" if self.loss is not None else ""
        self.out.write(f"frames {stats.delivered}{of} | {stats.throughput:7.1f} frames/s{loss} | "
                       f"stage busy {busy} | dropped {stats.dropped} skipped {stats.skipped}{end}")
        self.out.flush()


def check_demo_options(stages: int | None, learn: bool, mode: str | None, trace: str | Path | None,
                       plot: str | Path | None, video: str | Path | None = None) -> None:
    """Raise ``ValueError`` (naming the command-line flags) for options that :func:`demo`
    could not honour: more stages than the model has layers, ``--stages`` with the one-stage
    ``sequential`` mode, a ``--mode`` with ``--no-learn``, a ``--trace`` / ``--plot`` file
    whose folder does not exist, or a ``--video`` without PyAV or whose file does not exist.
    Checked before anything runs, so that a mistake does not surface only after the baseline
    and the whole stream."""
    if stages is not None:
        layers = len(demo_model())
        if stages > layers:
            raise ValueError(f"--stages: the demo's conv net has {layers} layers, so at most {layers} stages, "
                             f"got {stages}")
        if torch.cuda.is_available() and stages > torch.cuda.device_count():
            raise ValueError(f"--stages: with CUDA a stage runs on each GPU, and this machine has "
                             f"{torch.cuda.device_count()}, got {stages}")
    if mode is not None and not learn:
        raise ValueError(f"--mode {mode} sets how the demo learns, but --no-learn turns learning off; "
                         "drop one of them")
    if learn and mode == "sequential" and stages not in (None, 1):
        raise ValueError(f"--mode sequential runs the whole model as one stage, so --stages {stages} cannot "
                         "apply; drop --stages, or pick --mode partime or stashed to split the model")
    for flag, path in (("--trace", trace), ("--plot", plot)):
        if path is None:
            continue
        folder = Path(path).parent
        if not folder.is_dir():
            raise ValueError(f"{flag}: the folder {str(folder)!r} of {str(path)!r} does not exist; create it first")
        if Path(path).is_dir():
            raise ValueError(f"{flag}: {str(path)!r} is a folder; give a file name in it")
    if video is not None:
        if importlib.util.find_spec("av") is None:
            raise ValueError("--video decodes with PyAV, which is not installed: pip install 'partime-async[video]'")
        if "://" not in str(video) and not Path(video).exists():
            raise ValueError(f"--video: there is no file {str(video)!r} (give a video file, a URL or a device "
                             "such as /dev/video0)")


async def demo(frames: int = 600, size: int = 64, stages: int | None = None, learn: bool = True,
               mode: str | None = None, out: TextIO = sys.stdout, trace: str | Path | None = None,
               plot: str | Path | None = None, video: str | Path | None = None) -> dict[str, float]:
    """The main job; returns the summary numbers (also printed). ``mode``: how it learns
    (None: ``partime``; must be None with ``learn=False``). ``stages``: CPU stages (None: one
    per core, at most 4); with CUDA, GPU stages (None: one per GPU). ``trace``: write the
    run's Chrome/Perfetto trace there; ``plot``: draw its timeline there (PNG). ``video``:
    stream that video (a file, a URL, a device), resized to ``size`` x ``size``, instead of the
    built-in camera (its frames up to ``frames``). Raises ``ValueError`` up front for options it
    cannot honour (:func:`check_demo_options`), and what opening the video raises before the
    baseline is measured."""
    check_demo_options(stages, learn, mode, trace, plot, video)
    chosen = cast(Mode, mode or "partime")  # OnlineLearning refuses a mode it does not know
    sequential = learn and chosen == "sequential"  # the whole model on one device
    torch.manual_seed(0)
    model = demo_model()
    camera, source = demo_source(frames, size, learn=learn, video=video)
    if video is not None:  # opened once now: a video that cannot be read fails before the baseline
        info = await camera.probe()
        if info.frames is not None:  # a shorter video ends the stream sooner
            frames = min(frames, info.frames - 1 if learn else info.frames)
            if frames < 1:
                raise ValueError(f"--video: {camera.url} has {info.frames} frame(s); the demo needs "
                                 f"{2 if learn else 1} or more{' (each frame learns from the next)' if learn else ''}")
        what = f"{camera.name} ({info.width}x{info.height}, resized to {size}x{size})"
    else:
        what = f"a {size}x{size} camera over {camera.path.name}"
    if torch.cuda.is_available():  # a stage per GPU (or per --stages GPUs), at most one per layer
        n = 1 if sequential else min(stages or torch.cuda.device_count(), len(model))
        devices: Sequence[Device | str] = [f"cuda:{i}" for i in range(n)]
    else:
        n = 1 if sequential else stages or max(1, min(available_cores(), 4))
        devices = cpu_devices(n)
    learning = demo_learning(chosen) if learn else None
    job = f"learning next-frame prediction online ({chosen} mode)" if learn else "inference"
    out.write(f"partime-async demo: {frames} frames of {what}, "
              f"{job}, {len(model)}-layer conv net on {n} device(s)\n")
    cores = available_cores()
    if n > cores and not torch.cuda.is_available():
        out.write(f"note: {n} stages on {cores} cores take turns on them; expect no speed-up\n")
    sample = [frame async for frame in _take(source, min(frames, 60))]
    unsplit_model = copy.deepcopy(model)  # on the host: the pipeline moves the model's own layers to its devices
    before = await unsplit_rates(unsplit_model, sample, learning)
    pipe = Pipeline(model, devices=devices, balance="time", learning=learning)
    progress = Progress(pipe, frames, out)
    stats = await run(source >> pipe >> progress)
    # Measured again after the run: on a shared machine the load moves, and the baseline is
    # the best the unsplit model did.
    after = await unsplit_rates(unsplit_model, sample, learning)
    rates = {threads: max(rate, after.get(threads, 0.0)) for threads, rate in before.items()}
    unsplit = max(rates.values())
    pipelined = progress.rate or stats.throughput
    latency = sorted(progress.latencies)
    summary = {
        "frames": stats.delivered,
        "pipeline_fps": pipelined,
        "unsplit_fps": unsplit,
        "speedup": pipelined / unsplit,
        "latency_p50_ms": 1e3 * statistics.median(latency) if latency else 0.0,
    }
    if progress.loss is not None:
        summary["loss"] = progress.loss
    work = " (forward, backward, step)" if learn else ""
    busy = ", ".join(f"{1e3 * s.mean_compute_s:.2f} ms{' (inline)' if s.inline else ''}" for s in stats.stages)
    out.write(f"balance {stats.balance} (layers per stage); per-stage busy time per frame{work} {busy}\n")
    threads = " and ".join(map(str, rates))
    out.write(f"pipelined {pipelined:.1f} frames/s (from its first output on) vs unsplit {unsplit:.1f} frames/s "
              f"(the best of {threads} thread(s), on {len(sample)} of the frames, before and after the run): "
              f"speed-up {summary['speedup']:.2f}x; latency p50 {summary['latency_p50_ms']:.2f} ms" +
              (f"; running loss (next-frame MSE, last ~50 frames) {summary['loss']:.5f}" if "loss" in summary else "")
              + "\n")
    if summary["speedup"] < 1 and len(rates) > 1 and not torch.cuda.is_available():
        scaling = rates[max(rates)] / rates[1]
        out.write(f"below 1x: the pipeline lost here. Its {n} stage(s) need free cores; on {max(rates)} threads the "
                  f"unsplit model ran at {scaling:.2f}x its 1-thread rate, so this machine had about "
                  f"{scaling:.1f} cores' worth free (other work holds the rest); bench/cpu_scaling.py compares "
                  "the two carefully\n")
    if trace is not None:
        out.write(f"trace written to {pipe.export_trace(trace)} (open it in https://ui.perfetto.dev)\n")
    if plot is not None:
        from .observe import timeline

        out.write(f"timeline written to {timeline(pipe, plot)}\n")
    return summary


async def _take(source: Any, n: int) -> AsyncIterator[Frame]:
    count = 0
    async for frame in source:
        if count >= n:
            return
        yield frame
        count += 1


# Run only when named (`partime-async bench soak`): a 30-minute soak is not part of "all".
LONG_BENCHMARKS = ("soak",)


def _bench_dir() -> Path:
    for candidate in (Path.cwd() / "bench", Path(__file__).resolve().parents[1] / "bench"):
        if candidate.is_dir():
            return candidate
    raise SystemExit("the benchmarks live in a source checkout's bench/ folder; run this from the repository root")


def _bench_names() -> str:
    """``: a, b, …`` (the benchmarks of this checkout), for the help; empty outside one."""
    try:
        folder = _bench_dir()
    except SystemExit:
        return ""
    return ": " + ", ".join(_benchmarks(folder))


def _benchmarks(folder: Path) -> list[str]:
    """The benchmarks in ``folder`` (its scripts, helpers left out), by name."""
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def bench(names: Sequence[str], extra: Sequence[str]) -> int:
    folder = _bench_dir()
    available = _benchmarks(folder)
    chosen = list(names) or [n for n in available if n not in LONG_BENCHMARKS]
    unknown = [n for n in chosen if n not in available]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; available: {', '.join(available)}")
    sys.path.insert(0, str(folder))
    for name in chosen:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", folder / f"{name}.py")
        assert spec is not None and spec.loader is not None  # a .py file that exists: _benchmarks listed it
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses (and pickle) look their module up there
        spec.loader.exec_module(module)
        print(f"== {name}", flush=True)
        module.main(list(extra))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="partime-async", description=__doc__.split("\n")[0].replace("``", ""))
    loops = ["auto", "uvloop", "asyncio"]
    parser.add_argument("--loop", choices=loops, default=None,
                        help="event loop (auto, the default: uvloop when installed); passed on to benchmarks")
    commands = parser.add_subparsers(dest="command", required=True)
    p_demo = commands.add_parser("demo", help="stream the built-in video through a split conv net")
    # Also after `demo` (argparse would otherwise call it unrecognised there).
    p_demo.add_argument("--loop", choices=loops, default=argparse.SUPPRESS, help="as before `demo`")
    p_demo.add_argument("--frames", type=_at_least(1), default=600, help="frames to stream (default: 600)")
    p_demo.add_argument("--size", type=_at_least(8), default=64, help="frame height and width")
    p_demo.add_argument("--stages", type=_at_least(1), default=None,
                        help="stages (default: one per core, at most 4; with CUDA, one per GPU)")
    p_demo.add_argument("--mode", choices=MODES, default=None, help="online learning mode (default: partime)")
    p_demo.add_argument("--no-learn", dest="learn", action="store_false", help="inference only")
    p_demo.add_argument("--trace", metavar="FILE", help="write a Chrome/Perfetto trace of the run (JSON)")
    p_demo.add_argument("--plot", metavar="FILE", help="draw a timeline of the run (PNG)")
    p_demo.add_argument("--video", metavar="PATH", help="stream this video instead of the built-in camera: a file "
                        "(mp4, mkv, webm), an rtsp:// or http(s):// URL, or a camera such as /dev/video0 "
                        "(needs pip install 'partime-async[video]')")
    p_bench = commands.add_parser("bench", help="run benchmarks from bench/ (all but the soak by default)",
                                  description="Run benchmarks from bench/. Options after the names (e.g. "
                                  "--repeats 3) go to every benchmark named, as its own command line takes them.")
    p_bench.add_argument("names", nargs="*", help="benchmarks to run, by file name in bench/ (default: all but "
                         f"{', '.join(LONG_BENCHMARKS)}){_bench_names()}")
    p_bench.add_argument("--quick", action="store_true", help="tiny runs (smoke test)")
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        loop = ["--loop", args.loop] if args.loop is not None else []
        return bench(args.names, ["--quick"] * args.quick + loop + extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:  # a usage error (exit 2), reported before anything runs
        check_demo_options(args.stages, args.learn, args.mode, args.trace, args.plot, args.video)
    except ValueError as exc:
        p_demo.error(str(exc))
    factory = loop_factory(args.loop or "auto")
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            if args.video is not None:  # a video that cannot be opened is a usage error too, found before the run
                try:
                    runner.run(_cancelled_by_sigint(demo_source(1, learn=False, video=args.video)[0].probe()))
                except (OSError, ValueError) as exc:
                    p_demo.error(f"--video: {exc}")
            runner.run(_cancelled_by_sigint(demo(args.frames, args.size, args.stages, args.learn, args.mode,
                                                 trace=args.trace, plot=args.plot, video=args.video)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


async def _cancelled_by_sigint(job: Any) -> Any:
    """Run ``job`` with Ctrl-C cancelling it through the loop's own signal handling.

    A plain ``signal.signal`` handler (asyncio.Runner's) runs only when the main thread next
    executes Python code; a SIGINT that the kernel delivers to another thread (a worker, an
    OpenMP thread) while the loop sleeps in its poll could wait for a long time. The loop's
    handler is woken through its wake-up fd, whichever thread took the signal.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None  # awaited by asyncio.run's main task
    loop.add_signal_handler(signal.SIGINT, task.cancel)
    try:
        return await job
    finally:
        loop.remove_signal_handler(signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
