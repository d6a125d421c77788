"""Parallel in depth: DeepPCR and Jacobi (partime_async.depth) against the layers in sequence.

(a) **Warm starts along a stream.** Frames of the pan-zoom camera (:class:`PanZoomCamera`,
    32 x 32) through a small fixed random encoder (average-pooled to 4 x 4, a random linear map
    to width 16) into a deep narrow MLP: L = 256 layers ``tanh(W z + b)`` of width 16. Every
    frame is solved with DeepPCR twice: cold (from zeros) and warm (from the previous frame's
    states, as a depth program in a pipeline does). Two configurations: float32 with
    ``tol=1e-5`` (the headline: the pipeline's and the GPU's dtype, the tolerance used in (b)
    and (c)) and float64 with the default ``tol=1e-10``; each with PyTorch's default
    initialisation (a strongly contracting stack: its output barely depends on its input) and
    with the weights times sqrt(3) (unit-variance weights, the usual choice for deep tanh
    stacks). Reported: mean Newton steps per frame, cold and warm, and their ratio.
(b) **Wall time on this CPU.** DeepPCR, Jacobi and the sequential layers (an ``nn.Sequential``),
    forward (no autograd) and forward + backward (``output.sum().backward()`` to every
    parameter), over L in {64, 256, 1024}, width in {8, 32, 128}, batch in {1, 16}: tanh MLPs,
    default initialisation, float32, ``tol=1e-5``, cold solves, ``--threads`` intra-op threads
    (default 1). Medians of interleaved repeats after one warm-up run; a cell whose warm-up
    run took more than ``--budget`` seconds (the widest, deepest cells: DeepPCR's work grows as
    L log L x batch x width^3) is measured by that one run. On a CPU the solvers do more
    arithmetic than the sequential layers and have no parallel hardware to spend it on:
    DeepPCR is slower than sequential there, except where the sequential layers' per-layer
    overhead dominates; the table says so per cell.
(c) **The same grid on CUDA**, when a GPU is present (skipped, with a message, otherwise).
    Goals (the paper's regime, width <= 16, L >= 1024): DeepPCR >= 10x the sequential forward
    and >= 20x its forward + backward.

Table per device, a PNG (``docs/depth.png``: steps per frame along the stream; speed-ups over
sequential against L), one line in bench/RESULTS.md; the last line printed is the headline:
warm / cold Newton steps of (a), float32, default initialisation (goal <= 0.5).

    python bench/depth.py [--quick] [--repeats N] [--frames N] [--threads N] [--budget S]
        [--parts abc] [--no-record | --record]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):  # run as a script: make `bench._common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from bench import _common as C
from partime_async.depth import DeepPCR, Jacobi, Solver
from partime_async.sources import PanZoomCamera

PLOT = C.BENCH_DIR.parent / "docs" / "depth.png"
TOL32 = 1e-5
GRID = {"L": (64, 256, 1024), "width": (8, 32, 128), "batch": (1, 16)}
QUICK_GRID = {"L": (16, 64), "width": (8,), "batch": (1, 4)}
METHODS = ("seq", "pcr", "jacobi")


def tanh_mlp(depth: int, width: int, *, seed: int = 0, gain: float = 1.0,
             dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(*(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)))
    if gain != 1.0:
        with torch.no_grad():
            for layer in model:
                layer[0].weight.mul_(gain)
    return model.to(device=device, dtype=dtype)


# -- (a) warm starts along a stream ---------------------------------------------------------------
def camera_inputs(frames: int, width: int = 16) -> list[torch.Tensor]:
    """The camera's frames through a small fixed random encoder: ``(1, width)`` float64 each."""
    camera = PanZoomCamera(frames, height=32, width=32)
    torch.manual_seed(123)
    encoder = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, width)).double()
    with torch.no_grad():
        return [encoder(camera.render(t).double()) for t in range(frames)]


def stream_steps(xs: Sequence[torch.Tensor], depth: int, gain: float, dtype: torch.dtype,
                 tol: float) -> dict[str, float]:
    """DeepPCR along ``xs``, every frame cold and warm: mean steps, fallbacks, the largest
    difference from the sequential layers, and per-frame steps (for the plot)."""
    model = tanh_mlp(depth, xs[0].shape[-1], seed=1, gain=gain, dtype=dtype)
    solver = DeepPCR(list(model), tol=tol)
    cold, warm, fallbacks, error = [], [], 0, 0.0
    states = None
    with torch.no_grad():
        for x in xs:
            x = x.to(dtype)
            result = solver.solve(x, init=states)
            if states is not None:
                warm.append(result.iterations)
            states = result.states
            fresh = solver.solve(x)
            cold.append(fresh.iterations)
            fallbacks += result.fallback + fresh.fallback
            error = max(error, float((result.output - model(x)).abs().max()))
    return {"cold": statistics.mean(cold), "warm": statistics.mean(warm), "fallbacks": fallbacks,
            "max_error": error, "cold_steps": cold, "warm_steps": warm}


# -- (b), (c) wall time ---------------------------------------------------------------------------
def synchronizer(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def cell_variants(depth: int, width: int, batch: int, device: str,
                  steps: dict[str, int]) -> dict[str, Callable[[], float]]:
    """The six timed callables of one grid cell; ``steps`` gets each solver's iterations."""
    model = tanh_mlp(depth, width, device=device)
    layers = list(model)
    x = torch.randn(batch, width, device=device, generator=torch.Generator(device).manual_seed(7))
    solvers: dict[str, Solver] = {"pcr": DeepPCR(layers, tol=TOL32), "jacobi": Jacobi(layers, tol=TOL32)}
    params = list(model.parameters())
    sync = synchronizer(device)

    def run(method: str) -> torch.Tensor:
        if method == "seq":
            return model(x)
        result = solvers[method].solve(x)
        steps[method] = result.iterations
        steps[f"{method}_fallback"] = int(result.fallback)
        return result.output

    def forward(method: str) -> Callable[[], float]:
        def timed() -> float:
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                run(method)
            sync()
            return time.perf_counter() - t0
        return timed

    def forward_backward(method: str) -> Callable[[], float]:
        def timed() -> float:
            for p in params:
                p.grad = None
            sync()
            t0 = time.perf_counter()
            run(method).sum().backward()
            sync()
            return time.perf_counter() - t0
        return timed

    variants = {f"{m}_fwd": forward(m) for m in METHODS}
    variants.update({f"{m}_fb": forward_backward(m) for m in METHODS})
    return variants


def measure_grid(grid: dict[str, Sequence[int]], device: str, repeats: int, budget: float) -> list[dict]:
    """Every cell of ``grid`` on ``device``: median seconds per variant, steps, repeats used."""
    rows = []
    for depth in grid["L"]:
        for width in grid["width"]:
            for batch in grid["batch"]:
                steps: dict[str, int] = {}
                variants = cell_variants(depth, width, batch, device, steps)
                first = {name: fn() for name, fn in variants.items()}  # warm-up, kept for big cells
                if max(first.values()) > budget:
                    times, used = {name: [t] for name, t in first.items()}, 1
                else:
                    times, used = C.interleaved(variants, repeats, verbose=False), repeats
                row = {"L": depth, "width": width, "batch": batch, "repeats": used, **steps}
                row.update({name: C.median(ts) for name, ts in times.items()})
                rows.append(row)
                print(format_row(row), flush=True)
                del variants
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


HEADER = (f"{'L':>5} {'width':>5} {'batch':>5} | {'seq fwd':>9} {'DeepPCR':>9} {'(steps)':>7} {'Jacobi':>9} "
          f"{'(sweeps)':>8} | {'seq f+b':>9} {'DeepPCR':>9} {'Jacobi':>9} | speed-up over seq: "
          f"{'PCR fwd':>7} {'PCR f+b':>7} {'Jac fwd':>7} {'Jac f+b':>7}  reps")
# (a speed-up below 1: slower than the sequential layers)


def format_row(row: dict) -> str:
    def ms(s: float) -> str:
        return f"{1e3 * s:7.2f}ms" if s < 10 else f"{s:8.2f}s "

    fell = "*" if row.get("pcr_fallback") or row.get("jacobi_fallback") else " "
    return (f"{row['L']:5d} {row['width']:5d} {row['batch']:5d} | {ms(row['seq_fwd'])} {ms(row['pcr_fwd'])} "
            f"{row.get('pcr', 0):7d} {ms(row['jacobi_fwd'])} {row.get('jacobi', 0):8d} | {ms(row['seq_fb'])} "
            f"{ms(row['pcr_fb'])} {ms(row['jacobi_fb'])} | {'':18}{speedup(row, 'pcr', 'fwd'):7.2f} "
            f"{speedup(row, 'pcr', 'fb'):7.2f} {speedup(row, 'jacobi', 'fwd'):7.2f} "
            f"{speedup(row, 'jacobi', 'fb'):7.2f} {row['repeats']:5d}{fell}")


def speedup(row: dict, method: str, kind: str) -> float:
    """Sequential time over the method's (> 1: the method is faster)."""
    return row[f"seq_{kind}"] / row[f"{method}_{kind}"]


def summarise(rows: list[dict], device: str) -> str:
    slower = sum(speedup(r, "pcr", "fwd") < 1 for r in rows)
    best = max(rows, key=lambda r: speedup(r, "pcr", "fwd"))
    return (f"{device}: DeepPCR's forward is slower than the sequential layers in {slower} of {len(rows)} cells "
            f"(median speed-up {statistics.median(speedup(r, 'pcr', 'fwd') for r in rows):.2f}x, best "
            f"{speedup(best, 'pcr', 'fwd'):.2f}x at L={best['L']}, width={best['width']}, batch={best['batch']}); "
            f"Jacobi's median {statistics.median(speedup(r, 'jacobi', 'fwd') for r in rows):.2f}x")


def gpu_goals(rows: list[dict]) -> tuple[float, float] | None:
    """The smallest DeepPCR speed-ups (forward, forward + backward) over the cells with
    width <= 16 and L >= 1024: the paper's regime (goals 10x and 20x)."""
    cells = [r for r in rows if r["width"] <= 16 and r["L"] >= 1024]
    if not cells:
        return None
    return min(speedup(r, "pcr", "fwd") for r in cells), min(speedup(r, "pcr", "fb") for r in cells)


# -- the picture ------------------------------------------------------------------------------------
def plot(stream: dict[str, dict] | None, grids: dict[str, list[dict]], path: Path, depth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    ax = axes[0]
    if stream:
        names = list(stream)
        for offset, kind, colour in ((-0.2, "cold", "0.6"), (0.2, "warm", "C0")):
            values = [stream[name][kind] for name in names]
            bars = ax.bar([i + offset for i in range(len(names))], values, width=0.4, color=colour, label=kind)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(names)), [name.replace("_", "\n") for name in names], fontsize=8)
        ax.legend(fontsize=8)
    ax.set_ylabel("Newton steps per frame (mean)")
    ax.set_title(f"(a) DeepPCR along the camera stream (L={depth}, width 16):\n"
                 "f32: tol 1e-5, f64: tol 1e-10; default or unit-variance init", fontsize=9)
    markers = {"cpu": "o", "cuda": "s"}
    for ax, kind, title in ((axes[1], "fwd", "forward"), (axes[2], "fb", "forward + backward")):
        for device, rows in grids.items():
            for width, colour in zip(sorted({r["width"] for r in rows}), ("C0", "C1", "C2", "C3")):
                for batch, style in zip(sorted({r["batch"] for r in rows}), ("--", "-")):
                    cells = sorted((r for r in rows if r["width"] == width and r["batch"] == batch),
                                   key=lambda r: r["L"])
                    ax.plot([r["L"] for r in cells], [speedup(r, "pcr", kind) for r in cells], color=colour,
                            linestyle=style, marker=markers.get(device, "o"),
                            label=f"{device} DeepPCR w={width} b={batch}")
                    ax.plot([r["L"] for r in cells], [speedup(r, "jacobi", kind) for r in cells], color=colour,
                            linestyle=style, marker="x", alpha=0.45, linewidth=0.8)
        ax.axhline(1.0, color="0.3", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("layers L")
        ax.set_ylabel("speed-up over the sequential layers")
        ax.set_title(f"(b, c) {title}: DeepPCR (lines), Jacobi (faint x)", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(parser, default_repeats=3)
    parser.add_argument("--frames", type=int, default=None, help="camera frames for (a) (default 60; quick: 6)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU (default 1)")
    parser.add_argument("--budget", type=float, default=2.0,
                        help="a grid cell whose warm-up run of some variant takes longer than this many seconds "
                             "is measured by that run alone (default 2)")
    parser.add_argument("--parts", default="abc", help="which parts to run: any of a, b, c (default abc)")
    parser.add_argument("--plot", type=Path, default=None, help=f"PNG path (default {PLOT}; quick: none)")
    args = parser.parse_args(argv)
    if not set(args.parts) <= set("abc") or not args.parts:
        parser.error(f"--parts takes letters of 'abc', got {args.parts!r}")
    repeats = args.repeats or (1 if args.quick else 3)
    frames = args.frames or (6 if args.quick else 60)
    depth = 32 if args.quick else 256
    grid = QUICK_GRID if args.quick else GRID
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        numbers: dict[str, object] = {"threads": args.threads, "repeats": repeats, "tol32": TOL32}
        # torch.func and the first batched matmuls load and warm up once per process: not in any timing.
        DeepPCR(list(tanh_mlp(4, 4))).solve(torch.randn(2, 4)).output.sum().backward()

        stream: dict[str, dict] = {}
        ratio = None
        if "a" in args.parts:
            print(f"(a) DeepPCR along the camera stream: {frames} frames, L={depth}, width 16", flush=True)
            xs = camera_inputs(frames)
            numbers["frames"] = frames
            for label, dtype, tol in (("f32", torch.float32, TOL32), ("f64", torch.float64, 1e-10)):
                for init, gain in (("default", 1.0), ("unit", math.sqrt(3))):
                    name = f"{label}_{init}"
                    s = stream[name] = stream_steps(xs, depth, gain, dtype, tol)
                    numbers[f"stream_{name}_cold_steps"] = s["cold"]
                    numbers[f"stream_{name}_warm_steps"] = s["warm"]
                    numbers[f"stream_{name}_warm_over_cold"] = s["warm"] / s["cold"]
                    numbers[f"stream_{name}_fallbacks"] = s["fallbacks"]
                    print(f"  {dtype} tol={tol:g}, {init} init: cold {s['cold']:.2f} steps/frame, warm "
                          f"{s['warm']:.2f}, warm/cold {s['warm'] / s['cold']:.2f}, fallbacks {s['fallbacks']}, "
                          f"largest |output - sequential| {s['max_error']:.1e}", flush=True)
            ratio = stream["f32_default"]["warm"] / stream["f32_default"]["cold"]

        grids: dict[str, list[dict]] = {}
        if "b" in args.parts:
            print(f"(b) wall time on the CPU ({args.threads} intra-op thread(s)), float32, tol={TOL32:g}, cold "
                  f"solves; * = a solve fell back", flush=True)
            print(HEADER, flush=True)
            grids["cpu"] = measure_grid(grid, "cpu", repeats, args.budget)
            print(summarise(grids["cpu"], "cpu") + ": expected on a CPU (the solvers' extra arithmetic has no "
                  "parallel hardware to run on); the gain is on GPUs", flush=True)
        if "c" in args.parts:
            if torch.cuda.is_available():
                print(f"(c) wall time on {torch.cuda.get_device_name()}, float32, tol={TOL32:g}, cold solves",
                      flush=True)
                print(HEADER, flush=True)
                grids["cuda"] = measure_grid(grid, "cuda", repeats, args.budget)
                print(summarise(grids["cuda"], "cuda"), flush=True)
                goals = gpu_goals(grids["cuda"])
                if goals is not None:
                    numbers["cuda_pcr_fwd_x_min"], numbers["cuda_pcr_fb_x_min"] = goals
                    print(f"cuda, width <= 16 and L >= 1024: DeepPCR {goals[0]:.1f}x the sequential forward (goal "
                          f">= 10), {goals[1]:.1f}x its forward + backward (goal >= 20)", flush=True)
            else:
                print("(c) no CUDA device here: the GPU grid is skipped (run bench/depth.py on a GPU machine)",
                      flush=True)
        for device, rows in grids.items():
            for r in rows:
                numbers[f"{device}_x_L{r['L']}_w{r['width']}_b{r['batch']}"] = (
                    f"pcr {speedup(r, 'pcr', 'fwd'):.3g}/{speedup(r, 'pcr', 'fb'):.3g} "
                    f"jac {speedup(r, 'jacobi', 'fwd'):.3g}/{speedup(r, 'jacobi', 'fb'):.3g}")
            numbers[f"{device}_pcr_fwd_slower_cells"] = f"{sum(speedup(r, 'pcr', 'fwd') < 1 for r in rows)}/{len(rows)}"
        path = args.plot or (None if args.quick else PLOT)
        if path is not None and (stream or grids):
            plot(stream, grids, path, depth)
            print(f"picture written to {path}", flush=True)
        if ratio is None:
            headline = "depth: warm / cold Newton steps not measured (part a not run)"
        else:
            headline = (f"depth: warm / cold Newton steps = {ratio:.2f} (camera stream, L={depth}, width 16, float32 "
                        f"tol={TOL32:g}, default init; goal <= 0.5)")
        C.record_run("depth", args, argv, numbers, headline)
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
