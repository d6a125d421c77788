"""Pictures of a pipeline at work (matplotlib, imported only when called).

:func:`timeline` draws three panels over one time axis:

* a Gantt chart, one row per stage (and per copy stream on CUDA): a bar per span, coloured by
  the frame's seq (the colours cycle every 20 frames), so a frame can be followed down the
  stages; backward passes are hatched, optimiser steps are the dark strips under them;
* the throughput, frames delivered per second;
* the latency of each frame from capture to delivery, at the time it was delivered.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .observation import Observable, Observation
from .spans import OUT_KINDS, Columns, Span, as_spans, frame_ids
from .trace import track_name, track_of

COLOURS = 20  # the tab20 colour map's colours, cycled by seq


def timeline(source: Observable | Observation | Iterable[Span | tuple[int, str, int, float, float]],
             path: str | Path, *, title: str | None = None, stage_names: Sequence[str] = ()) -> Path:
    """Draw ``source``'s spans (a :class:`Pipeline` run with metrics on, or spans as from
    :meth:`Pipeline.spans`) into the image file ``path`` (PNG, or any format matplotlib
    writes, from the suffix). ``stage_names`` labels the rows (default: a pipeline's own stage
    names, else ``stage k``). Returns the path. Raises ``ValueError`` if there is no span."""
    from matplotlib.figure import Figure

    origin: float | None = None
    obs = source.observation() if isinstance(source, Observable) else source
    if isinstance(obs, Observation):
        spans = as_spans(obs.spans)
        stage_names = stage_names or [s.name for s in obs.stats.stages]
        origin = obs.t_start
    else:
        spans = as_spans(obs)
    if not spans:
        if isinstance(obs, Observation) and not obs.metrics:
            raise ValueError("no spans to draw: this pipeline records none (metrics=False); "
                             "create it with metrics=True")
        raise ValueError("no spans to draw: stream some frames through the pipeline first")
    work = [s for s in spans if s.kind not in OUT_KINDS]
    delivered = sorted((s for s in spans if s.kind == "deliver"), key=lambda s: s.t1)
    origin = min([s.t0 for s in work] + [s.t1 for s in delivered] + ([origin] if origin is not None else []))

    fig = Figure(figsize=(12, 7.5), layout="constrained")
    gantt, fps, latency = fig.subplots(3, 1, sharex=True, height_ratios=[3, 1, 1])
    _gantt(gantt, work, stage_names, origin)
    _throughput(fps, delivered, origin)
    _latency(latency, delivered, origin)
    latency.set_xlabel("time since start (s)")
    frames = len(frame_ids(Columns.of(work))[1])  # seqs that repeat in the run count once per frame
    fig.suptitle(title or f"partime_async timeline: {frames} frames, {len(work)} spans")
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def _gantt(ax, spans: Sequence[Span], names: Sequence[str], origin: float) -> None:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    keys = sorted({track_of(s) for s in spans})
    rows = {key: len(keys) - 1 - i for i, key in enumerate(keys)}  # the first stage on top
    for key, row in rows.items():
        mine = [s for s in spans if track_of(s) == key]
        for kinds, bottom, height, hatch in ((("compute", "h2d", "d2d", "d2h"), 0.1, 0.8, None),
                                             (("backward",), 0.1, 0.8, "////"), (("step",), 0.1, 0.2, None)):
            chosen = [s for s in mine if s.kind in kinds]
            if not chosen:
                continue
            colours = ["0.15" if s.kind == "step" else cmap(s.seq % COLOURS) for s in chosen]
            ax.broken_barh([(s.t0 - origin, s.t1 - s.t0) for s in chosen], (row + bottom, height),
                           facecolors=colours, edgecolor="0.3" if hatch else "none", linewidth=0.3, hatch=hatch)
    ax.set_yticks([row + 0.5 for row in rows.values()], [track_name(k, names) for k in rows])
    ax.set_ylim(0, len(rows))
    ax.set_title("spans per stage (colour: frame seq, cycling every 20; hatched: backward; dark: optimiser step)",
                 fontsize=9)
    ax.grid(axis="x", alpha=0.3)


def _throughput(ax, delivered: Sequence[Span], origin: float) -> None:
    ax.set_ylabel("frames/s")
    if len(delivered) < 2:
        return
    t = np.array([s.t1 - origin for s in delivered])
    bins = max(1, min(50, len(t) // 4))
    counts, edges = np.histogram(t, bins=bins)
    width = edges[1] - edges[0]
    if width > 0:
        ax.stairs(counts / width, edges, fill=True, alpha=0.6)
    ax.grid(alpha=0.3)


def _latency(ax, delivered: Sequence[Span], origin: float) -> None:
    ax.set_ylabel("latency (ms)")
    if not delivered:
        return
    t = np.array([s.t1 - origin for s in delivered])
    ms = np.array([1e3 * s.duration for s in delivered])
    ax.scatter(t, ms, s=6, alpha=0.7, label="capture to delivery")
    for q, style in ((50, "-"), (99, ":")):
        ax.axhline(np.percentile(ms, q), color="0.3", linestyle=style, linewidth=0.8, label=f"p{q}")
    if ms.min() > 0 and ms.max() > 10 * np.median(ms):  # a few outliers (e.g. frames that waited
        ax.set_yscale("log")                            # for the split at start) would flatten the rest
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
