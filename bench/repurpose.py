"""RePurpose: a trained classifier split in width into K sub-models that exchange few activations.

The problem (generated here, no downloads): 10 classes in 16 dimensions, each class a union of
50 Gaussian clusters (centres N(0, I), spread 0.5): hard enough that a 3-hidden-layer MLP
needs its width (width 256 reaches about 95.5% on held-out data; width 32, trained the same
way, falls about 35 points behind). The model: ``Linear(16, 256)``, 2 x ``Linear(256, 256)``,
``Linear(256, 10)``, ReLU between, trained with Adam (one-cycle) on 60 000 samples; a
calibration set of 16 384 fresh samples, a test set of 10 000 more.

For K in {2, 4} and budgets {0, 0.05, 0.1, 0.25, 0.5, 1} (the fraction of the dense split's
activations exchanged; ``plan.communication / plan.dense_communication``), test accuracy of

* ``a``: ``repurpose(model, calibration, workers=K, budget=b)`` (Hungarian assignment,
  data-aware pruning, least-squares refit);
* ``b``: the same without refit (``refit=False``: masking only);
* ``c``: a random balanced partition, magnitude pruning (the largest weights), no refit;
* ``d``: a random balanced partition with the pruning and refit of ``a``: what the
  assignment itself adds is ``a - d``;
* ``e1``/``e3``: ``a``, then online fine-tuning of ``plan.model`` on the calibration stream
  through a ``Pipeline`` (``OnlineLearning(mode="sequential")``, one CPU device, Adam 1e-3,
  frames of 64 samples) to the original model's logits (squared error: the calibration
  stream needs no labels; hard labels overfit it and lose accuracy): after one and three
  passes. The pruned connections have no parameter in ``plan.model``, so they stay zero.

``c`` and ``d`` are medians over ``--repeats`` random partitions. Also timed (at the
library's default intra-op threads): the balanced Hungarian assignment at 4096 neurons x 4
workers (every such call inside the next run; goal < 1 s), the whole ``repurpose()`` of a
3 x 4096 MLP (random weights, 256 inputs, 10 outputs, 8192 calibration samples) with K=4 at
budget 0.25 (goal < 60 s), and the width-split stage
(:class:`~partime_async.programs.width.WidthProgram`, K=2 workers of one intra-op thread)
against the unsplit model on one and two intra-op threads, frames of 64 samples through the
same 3 x 4096 MLP: at budget 1.0 (an exact permutation: the same arithmetic in two blocks)
and at 0.25 (fewer weights and a quarter of the exchange), interleaved repeats, medians.

Printed: the table, the timings, a PNG of accuracy against communication (``docs/repurpose.png``,
full runs only). Last line: the accuracy drop in points at 25% communication, K=2, of the
better of ``a`` and ``e3`` (goal <= 1.0; at least <= 3.0).

    python bench/repurpose.py [--quick] [--repeats N] [--no-record | --record]
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):  # run as a script: make `bench._common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

import partime_async as pa
import partime_async.width as width
from bench import _common as C
from partime_async.core.stats import StageStats
from partime_async.partition import SequentialSplit
from partime_async.programs.width import WidthProgram

PLOT = C.BENCH_DIR.parent / "docs" / "repurpose.png"
BUDGETS = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)
WORKERS = (2, 4)
PATHS = ("a", "b", "c", "d", "e1", "e3")


# -- the problem ---------------------------------------------------------------------------------
def clusters(n: int, *, dim: int = 16, classes: int = 10, per: int = 50, spread: float = 0.5,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples of the 10-class problem (the same centres for every call with ``seed``)."""
    centres = torch.randn(classes * per, dim, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    pick = torch.randint(0, classes * per, (n,), generator=g)
    return centres[pick] + spread * torch.randn(n, dim, generator=g), pick // per


def mlp(widths: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int = 256,
          lr: float = 2e-3) -> nn.Module:
    steps = epochs * ((len(x) + batch - 1) // batch)
    opt = torch.optim.Adam(model.parameters(), lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            b = order[i:i + batch]
            loss = nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def random_partition(model: nn.Sequential, k: int, seed: int) -> list[torch.Tensor]:
    """A random balanced partition of every Linear layer's neurons."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(m.out_features, generator=g) % k for m in model if isinstance(m, nn.Linear)]


# -- (e): fine-tuning through a Pipeline ---------------------------------------------------------------
def fine_tune(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, passes: Sequence[int], frame: int,
              evaluate: Callable[[nn.Module], float]) -> list[float]:
    """Fine-tune ``model`` in place on the calibration stream through a one-stage learning
    Pipeline; ``evaluate(model)`` after each pass in ``passes`` (1-based)."""
    learning = pa.OnlineLearning(loss=nn.functional.mse_loss, optimizer=lambda p: torch.optim.Adam(p, 1e-3),
                                 mode="sequential")
    frames = [pa.Frame(i, x[s:s + frame], target=targets[s:s + frame])
              for i, s in enumerate(range(0, len(x) - frame + 1, frame))]
    model.train()

    async def go() -> list[float]:
        pipe = pa.Pipeline(model, devices=pa.cpu_devices(1, threads=1), balance=[len(model)], learning=learning,
                           metrics=False)
        scores = []
        for n in range(1, max(passes) + 1):
            await pipe.start(sample=frames[0].data)
            try:
                async for _ in pipe.stream(frames):
                    pass
            finally:
                await pipe.stop()
            if n in passes:
                model.eval()
                scores.append(evaluate(model))
                model.train()
        return scores

    try:
        return asyncio.run(go())
    finally:
        model.eval()


# -- timings at width 4096 --------------------------------------------------------------------------
def time_repurpose(wide: int, samples: int) -> tuple[float, list[float]]:
    """Seconds of ``repurpose()`` of a 3 x ``wide`` MLP with K=4 at budget 0.25, and the seconds
    of each balanced assignment of ``wide`` neurons it made."""
    torch.manual_seed(0)
    model = mlp([256, wide, wide, wide, 10]).eval()
    x = torch.randn(samples, 256)
    calls: list[float] = []
    hungarian = width.balanced_assignment

    def timed(cost):
        t0 = time.perf_counter()
        owner = hungarian(cost)
        if len(owner) == wide:
            calls.append(time.perf_counter() - t0)
        return owner

    width.balanced_assignment = timed
    try:
        seconds = C.time_call(lambda: width.repurpose(model, x, workers=4, budget=0.25))
    finally:
        width.balanced_assignment = hungarian
    return seconds, calls


def throughput(wide: int, frames: int, batch: int, repeats: int) -> dict[str, float]:
    """Frames/s of the unsplit 3 x ``wide`` MLP (1 and 2 intra-op threads), of its width-split
    stage (K=2 workers, one intra-op thread each) at budgets 1.0 and 0.25, and of each split's
    ``ceiling``: the two workers' blocks on two plain threads at once, every received
    activation read from activations computed beforehand (no waiting, no hand-off)."""
    torch.manual_seed(0)
    model = mlp([256, wide, wide, wide, 10]).eval()
    calibration = torch.randn(max(2 * wide, 512), 256)
    xs = [torch.randn(batch, 256) for _ in range(frames)]
    programs: dict[str, WidthProgram] = {}
    ceilings: dict[str, Callable[[], float]] = {}
    for budget in (1.0, 0.25):  # masking only: the structure, not the weights, sets the speed
        plan = width.repurpose(model, calibration, workers=2, budget=budget, refit=False,
                               assignment=random_partition(model, 2, 0))
        stage = SequentialSplit(plan.model).plans([len(plan.model)], pa.cpu_devices(1, threads=1))[0]
        programs[f"split_b{budget:g}"] = WidthProgram(stage, StageStats(stage.name, "cpu", 1), threads=1)
        ceilings[f"ceiling_b{budget:g}"] = ceiling(plan.model, xs)

    def unsplit(threads: int) -> Callable[[], float]:
        def run() -> float:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                with torch.no_grad():
                    model(xs[0])
                    t0 = time.perf_counter()
                    for x in xs:
                        model(x)
                    return time.perf_counter() - t0
            finally:
                torch.set_num_threads(before)
        return run

    def split(program: WidthProgram) -> Callable[[], float]:
        def run() -> float:
            program.forward(xs[0], -1)
            t0 = time.perf_counter()
            for seq, x in enumerate(xs):
                program.forward(x, seq)
            return time.perf_counter() - t0
        return run

    for program in programs.values():
        program.attach()
    try:
        variants = {"unsplit_1t": unsplit(1), "unsplit_2t": unsplit(2),
                    **{name: split(program) for name, program in programs.items()}, **ceilings}
        times = C.interleaved(variants, repeats)
    finally:
        for program in programs.values():
            program.detach()
    out = {f"{name}_fps": C.throughput(frames, C.median(ts)) for name, ts in times.items()}
    out["fps_spread"] = max(C.spread(ts) for ts in times.values())
    return out


def ceiling(model: nn.Sequential, xs: Sequence[torch.Tensor]) -> Callable[[], float]:
    """The ``ceiling`` variant of :func:`throughput` for ``model`` (a plan's, K=2)."""
    splits = [(i, m) for i, m in enumerate(model) if isinstance(m, width.SplitLinear)]
    inputs: list[list[torch.Tensor]] = []  # per frame, the whole input of each split layer
    with torch.no_grad():
        for x in xs:
            row, h = [], x
            for i, module in enumerate(model):
                if isinstance(module, width.SplitLinear):
                    row.append(h)
                h = module(h)
            inputs.append(row)
    after = [[m for m in model[i + 1:(splits[n + 1][0] if n + 1 < len(splits) else i + 1)]]
             for n, (i, _) in enumerate(splits)]

    def work(w: int) -> None:
        torch.set_grad_enabled(False)
        for row in inputs:
            for n, (_, layer) in enumerate(splits):
                x = row[n]
                if layer.broadcast:
                    own, received = x, None
                else:
                    start, stop = layer.in_range(w)
                    own = x[..., start:stop]
                    index = layer.cross_index(w)
                    received = x.index_select(-1, index) if index.numel() else None
                h = layer.block(w, own, received)
                for module in after[n]:
                    h = module(h)

    return lambda: C.on_threads([lambda: work(0), lambda: work(1)])


# -- the picture --------------------------------------------------------------------------------------
def plot(table: dict[tuple[int, float], dict[str, float]], unsplit: float, narrow: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"a": "a: RePurpose (Hungarian, refit)", "b": "b: no refit (masking)",
              "c": "c: random partition, magnitude pruning", "d": "d: random partition, pruning + refit of a",
              "e1": "e: a + fine-tuning, 1 pass", "e3": "e: a + fine-tuning, 3 passes"}
    styles = {"a": "o-", "b": "s-", "c": "^-", "d": "v-", "e1": "x--", "e3": "D--"}
    fig, axes = plt.subplots(1, len(WORKERS), figsize=(11, 4.2), sharey=True)
    for ax, k in zip(axes, WORKERS):
        budgets = sorted(b for kk, b in table if kk == k)
        for path_name in PATHS:
            ax.plot(budgets, [table[k, b][path_name] for b in budgets], styles[path_name], label=labels[path_name],
                    linewidth=1.3, markersize=4)
        ax.axhline(unsplit, color="black", linewidth=0.8, linestyle=":", label=f"unsplit ({unsplit:.1f}%)")
        ax.axhline(narrow, color="grey", linewidth=0.8, linestyle="-.", label=f"width-32 model ({narrow:.1f}%)")
        ax.set_xscale("symlog", linthresh=0.05)
        ax.set_xlim(-0.004, 1.15)
        ax.set_xticks(budgets)
        ax.set_xticklabels([f"{b:g}" for b in budgets])
        ax.set_xlabel("communication kept (fraction of the dense split's)")
        ax.set_title(f"K = {k} workers")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_ylim(0, 100)
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("RePurpose: a 3 x 256 MLP split in width (10-class clusters)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(parser, default_repeats=3)
    args = parser.parse_args(argv)
    quick = args.quick
    repeats = args.repeats or (1 if quick else 3)
    n_train, n_cal, n_test = (3000, 1024, 2000) if quick else (60000, 16384, 10000)
    hidden, epochs = (64, 3) if quick else (256, 15)
    budgets = (0.0, 0.25, 1.0) if quick else BUDGETS
    wide, wide_samples, fps_frames, batch = (256, 512, 4, 16) if quick else (4096, 8192, 24, 64)
    frame = 64

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: one intra-op thread is the fastest and the steadiest here
    try:
        x, y = clusters(n_train + n_cal + n_test, per=5 if quick else 50)
        xt, yt = x[-n_test:], y[-n_test:]
        xc = x[n_train:n_train + n_cal]
        x, y = x[:n_train], y[:n_train]
        torch.manual_seed(0)
        model = train(mlp([16, hidden, hidden, hidden, 10]), x, y, epochs)
        torch.manual_seed(0)
        narrow_model = train(mlp([16, 32, 32, 32, 10]), x, y, epochs)
        unsplit, narrow = accuracy(model, xt, yt), accuracy(narrow_model, xt, yt)
        print(f"unsplit width {hidden}: {unsplit:.2f}%   width 32: {narrow:.2f}%   "
              f"(train {n_train}, calibration {n_cal}, test {n_test})", flush=True)
        with torch.no_grad():
            teacher = model(xc)

        table: dict[tuple[int, float], dict[str, float]] = {}
        used: list[float] = []
        print(f"{'K':>2} {'budget':>6} {'comm':>6} " + " ".join(f"{p:>6}" for p in PATHS), flush=True)
        for k in WORKERS:
            for budget in budgets:
                row: dict[str, float] = {}
                plan = width.repurpose(model, xc, workers=k, budget=budget)
                row["a"] = accuracy(plan.model, xt, yt)
                comm = plan.communication / plan.dense_communication
                used.append(comm / budget if budget else 1.0)
                row["b"] = accuracy(width.repurpose(model, xc, workers=k, budget=budget, refit=False).model, xt, yt)
                cs, ds = [], []
                for seed in range(repeats):
                    partition = random_partition(model, k, seed + 1)
                    cs.append(accuracy(width.repurpose(model, xc, workers=k, budget=budget, refit=False,
                                                       selection="magnitude", assignment=partition).model, xt, yt))
                    ds.append(accuracy(width.repurpose(model, xc, workers=k, budget=budget,
                                                       assignment=partition).model, xt, yt))
                row["c"], row["d"] = C.median(cs), C.median(ds)
                if quick and (k, budget) != (2, 0.25):
                    row["e1"] = row["e3"] = float("nan")
                else:
                    tuned = copy.deepcopy(plan.model)
                    row["e1"], row["e3"] = fine_tune(tuned, xc, teacher, (1, 3), frame,
                                                     lambda m: accuracy(m, xt, yt))
                table[k, budget] = row
                print(f"{k:>2} {budget:>6g} {comm:>6.3f} " + " ".join(f"{row[p]:>6.2f}" for p in PATHS), flush=True)
    finally:
        torch.set_num_threads(threads)

    print(f"timing repurpose() of a 3 x {wide} MLP, K=4, budget 0.25, {wide_samples} calibration samples "
          f"({torch.get_num_threads()} intra-op threads)...", flush=True)
    repurpose_s, hungarian = time_repurpose(wide, wide_samples)
    print(f"  repurpose(): {repurpose_s:.1f} s (goal < 60 s); {len(hungarian)} balanced assignments of {wide} "
          f"neurons x 4 workers: median {C.median(hungarian):.3f} s, slowest {max(hungarian):.3f} s (goal < 1 s)",
          flush=True)
    print(f"timing the width-split stage (K=2 workers x 1 thread) against the unsplit 3 x {wide} MLP, "
          f"{fps_frames} frames of {batch}...", flush=True)
    fps = throughput(wide, fps_frames, batch, repeats)
    for name in ("unsplit_1t", "unsplit_2t", "split_b1", "ceiling_b1", "split_b0.25", "ceiling_b0.25"):
        print(f"  {name:13s} {fps[f'{name}_fps']:8.2f} frames/s", flush=True)
    best_unsplit = max(fps["unsplit_1t_fps"], fps["unsplit_2t_fps"])

    numbers: dict[str, object] = {"repeats": repeats, "train": n_train, "calibration": n_cal, "test": n_test,
                                  "hidden": hidden, "unsplit_acc": unsplit, "width32_acc": narrow}
    for k in WORKERS:
        for path_name in PATHS:
            numbers[f"k{k}_{path_name}"] = [round(table[k, b][path_name], 2) for b in budgets]
    numbers["budgets"] = list(budgets)
    numbers["budget_used_min"] = min(used)
    for k in WORKERS:  # what the assignment adds: a - d, budgets below 1
        gains = [table[k, b]["a"] - table[k, b]["d"] for b in budgets if b < 1]
        numbers[f"k{k}_assignment_gain_mean"] = sum(gains) / len(gains)
    numbers.update({"repurpose_3x4096_k4_s" if not quick else "repurpose_3x256_k4_s": repurpose_s,
                    "hungarian_median_s": C.median(hungarian), "hungarian_max_s": max(hungarian),
                    "hungarian_n": wide})
    numbers.update({key: value for key, value in fps.items()})
    numbers["split_b1_over_best_unsplit"] = fps["split_b1_fps"] / best_unsplit
    numbers["split_b0.25_over_best_unsplit"] = fps["split_b0.25_fps"] / best_unsplit
    numbers["split_b1_over_unsplit_2t"] = fps["split_b1_fps"] / fps["unsplit_2t_fps"]
    numbers["split_b1_over_ceiling"] = fps["split_b1_fps"] / fps["ceiling_b1_fps"]
    numbers["split_b0.25_over_ceiling"] = fps["split_b0.25_fps"] / fps["ceiling_b0.25_fps"]
    print(f"what the assignment adds (a - d, mean over budgets < 1): K=2 {numbers['k2_assignment_gain_mean']:+.2f}, "
          f"K=4 {numbers['k4_assignment_gain_mean']:+.2f} points")
    print(f"width-split stage / best unsplit: {numbers['split_b1_over_best_unsplit']:.2f}x at budget 1.0, "
          f"{numbers['split_b0.25_over_best_unsplit']:.2f}x at budget 0.25; / unsplit on 2 threads: "
          f"{numbers['split_b1_over_unsplit_2t']:.2f}x at budget 1.0; / its ceiling (the same blocks on two threads, "
          f"no waiting): {numbers['split_b1_over_ceiling']:.2f}x and {numbers['split_b0.25_over_ceiling']:.2f}x")
    if not quick:
        plot(table, unsplit, narrow, PLOT)
        print(f"plot written to {PLOT}")
    row = table[2, 0.25]
    best = max(("a", "e3"), key=lambda p: row[p] if row[p] == row[p] else -1.0)
    drop = unsplit - row[best]
    numbers["drop_k2_b0.25_points"] = drop
    C.record_run("repurpose", args, argv, numbers,
                 f"repurpose: K=2 at 25% communication, best path {best} ({row[best]:.2f}% vs {unsplit:.2f}% "
                 f"unsplit): accuracy drop = {drop:.2f} points (goal <= 1.0; at least <= 3.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
