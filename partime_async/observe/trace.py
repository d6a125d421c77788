"""Chrome trace-event / Perfetto JSON from a pipeline's spans (open in https://ui.perfetto.dev).

One process, ``partime_async``, with these tracks (threads, in this order):

* ``stage k (device)``: the stage's forwards (``compute``), and when learning its ``backward``
  slices with the optimiser ``step`` nested inside;
* ``stage k copy-in`` / ``stage k copy-out`` (CUDA): its ``h2d``/``d2d`` and ``d2h`` copies;
* ``deliver``: an instant per frame delivered, with its latency (``discard`` for a frame whose
  reader went away).

Every span is a complete event (``"ph": "X"``) with ``args: {"seq": …}``; the queue wait of a
frame before each stage is an async slice (``"ph": "b"``/``"e"``, category ``wait``). Each frame
has exactly one flow (``"ph": "s"``, then ``"t"``, ending with ``"f"``) that follows it through
the forward spans of the stages, in order; its ``id`` is the frame's seq, or for the n-th later
frame of a seq that repeats (:func:`~partime_async.observe.spans.frame_ids`), ``seq + n * (max seq -
min seq + 1)`` (where that would pass 2**53, every flow's id is its frame's number instead).
Timestamps are microseconds from the start of the run.
"""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .observation import Observable, Observation, observe
from .spans import FORWARD_KINDS, OUT_KINDS, Columns, Span, as_spans, frame_ids, wait_intervals

PID = 1
COPY_IN = frozenset({"h2d", "d2d"})
DELIVER_TRACK = (1 << 30, 0)


def track_of(span: Span) -> tuple[int, int]:
    """Sort key of the track a span belongs on: (stage, lane) with lanes 0 = the stage itself,
    1 = copy-in, 2 = copy-out; deliveries after every stage."""
    if span.kind in OUT_KINDS:
        return DELIVER_TRACK
    return (span.stage, 1 if span.kind in COPY_IN else 2 if span.kind == "d2h" else 0)


def track_name(key: tuple[int, int], stage_names: Sequence[str]) -> str:
    """The display name of a track key from :func:`track_of`."""
    if key == DELIVER_TRACK:
        return "deliver"
    stage, lane = key
    name = stage_names[stage] if stage < len(stage_names) else f"stage {stage}"
    return name if lane == 0 else f"stage {stage} " + ("copy-in" if lane == 1 else "copy-out")


def chrome_trace(spans: Sequence[Span], stage_names: Sequence[str] = (), origin: float | None = None) -> dict[str, Any]:
    """The trace-event document (a dict ready for ``json.dump``) of ``spans``; ``origin`` (the
    ``now()`` time shown as 0) defaults to the earliest span."""
    if origin is None:
        origin = min((s.t0 for s in spans), default=0.0)

    def us(t: float) -> float:
        return round((t - origin) * 1e6, 3)

    keys = sorted({track_of(s) for s in spans})
    tids = {key: i + 1 for i, key in enumerate(keys)}
    events: list[dict[str, Any]] = [{"ph": "M", "pid": PID, "name": "process_name", "args": {"name": "partime_async"}}]
    for key, tid in tids.items():
        events.append({"ph": "M", "pid": PID, "tid": tid, "name": "thread_name",
                       "args": {"name": track_name(key, stage_names)}})
        events.append({"ph": "M", "pid": PID, "tid": tid, "name": "thread_sort_index", "args": {"sort_index": tid}})
    columns = Columns.of(spans)
    ids, frames = frame_ids(columns)
    forward: dict[int, list[tuple[float, int, float, float]]] = defaultdict(list)  # frame -> (t0, tid, ts, dur)
    for s, frame in zip(spans, ids.tolist(), strict=True):
        tid = tids[track_of(s)]
        if s.kind in OUT_KINDS:
            events.append({"ph": "i", "s": "t", "pid": PID, "tid": tid, "name": s.kind, "ts": us(s.t1),
                           "args": {"seq": s.seq, "latency_ms": round(1e3 * s.duration, 3)}})
            continue
        # dur from the rounded ends: a span that starts where the one before ends must not
        # overlap it by a rounding (Perfetto would nest it inside)
        ts, dur = us(s.t0), round(max(us(s.t1) - us(s.t0), 0.0), 3)
        events.append({"ph": "X", "pid": PID, "tid": tid, "name": s.kind, "cat": s.kind, "ts": ts, "dur": dur,
                       "args": {"seq": s.seq}})
        if s.kind in FORWARD_KINDS:
            forward[frame].append((s.t0, tid, ts, dur))
    # A flow's id: the frame's seq; for the n-th later frame of a repeated seq, seq + n * span
    # of the seqs (an int: Perfetto reads a string id as hex, and drops "5.1")
    stride = int(frames[:, 0].max(initial=0) - frames[:, 0].min(initial=0)) + 1
    repeats = int(frames[:, 1].max(initial=0))
    dense = repeats and abs(int(frames[:, 0].max(initial=0))) + repeats * stride >= 1 << 53  # beyond a double
    for frame, points in forward.items():
        seq, n = frames[frame].tolist()
        flow_id = frame if dense else seq + n * stride
        points.sort()
        # s on the first span, t on each next, f on the last (a frame seen by one span only
        # starts and ends its flow there). A point binds to the slice enclosing it: the middle
        # of its span is inside.
        phases = ["s", *["t"] * (len(points) - 2), "f"] if len(points) > 1 else ["s", "f"]
        for phase, (_, tid, ts, dur) in zip(phases, points + points[-1:] * (len(phases) - len(points)), strict=True):
            event = {"ph": phase, "pid": PID, "tid": tid, "name": "frame", "cat": "frame", "id": flow_id,
                     "ts": round(ts + dur / 2, 3)}
            if phase == "f":
                event["bp"] = "e"
            events.append(event)
    waits = zip(*(column.tolist() for column in wait_intervals(columns)), strict=True)
    for i, (stage, _, seq, start, end) in enumerate(waits):
        name, wait_id = f"stage {stage} wait", f"wait-{i}"
        events.append({"ph": "b", "pid": PID, "cat": "wait", "name": name, "id": wait_id, "ts": us(start),
                       "args": {"seq": seq}})
        events.append({"ph": "e", "pid": PID, "cat": "wait", "name": name, "id": wait_id, "ts": us(end)})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_trace(source: Observable | Observation, path: str | Path) -> Path:
    """Write a pipeline's spans to ``path`` as trace-event JSON; see :meth:`Pipeline.export_trace`."""
    obs = observe(source)
    if not obs.metrics:
        raise RuntimeError("this pipeline records no spans (metrics=False); create it with metrics=True")
    spans = as_spans(obs.spans)
    names = [s.name for s in obs.stats.stages]
    origin = min([obs.t_start, *(s.t0 for s in spans)])
    path = Path(path)
    with open(path, "w") as f:
        json.dump(chrome_trace(spans, names, origin), f)
    return path
