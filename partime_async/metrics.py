"""Where the time goes: spans, per-stage statistics, and a Prometheus exposition.

With ``Pipeline(..., metrics=True)`` (the default) every stage records *spans* into one
bounded ring per run (a ``collections.deque`` of the latest :data:`SPAN_CAPACITY`, or of the
latest ``n`` with ``metrics=n``; appends are thread-safe, so worker threads record without
locks). A span is a plain tuple ``(stage, kind, seq, t0, t1)`` on the library clock
:func:`partime_async.frame.now`; read them as :class:`Span` with :meth:`Pipeline.spans`. A
span costs about 1 000 instructions on CPython 3.11: the tuple and the append (about 600),
and the one pass of the garbage collector's young generation that each new tuple gets before
it is untracked. The records that avoid the tuple cost more per span on 3.11 under
cachegrind: a flat ``deque.extend``, per-track column lists (``list.append`` or ``+=``, with
blocks handed over to the ring), ``array('d')`` columns, ``struct``-packed bytes. The
kinds:

============  ===========================================================================
``compute``   a stage's forward of frame ``seq`` (on CUDA: timed by events on its stream)
``backward``  learning: the backward the schedule owes, for frame ``seq`` (optimiser step included)
``step``      learning, CPU: the optimiser step inside that backward
``h2d``       CUDA: the copy of the frame's input from the host onto the stage's device
``d2d``       CUDA: the copy from the previous stage's device
``d2h``       CUDA, last stage: the copy of the output back to the host
``deliver``   stage ``-1``: ``t0`` = the frame's capture time, ``t1`` = when it left the last stage
              for its reader (a stream's frame counts as delivered once read)
``discard``   stage ``-1``, as ``deliver``, for a frame whose reader had gone when it left
============  ===========================================================================

Queue waits are not recorded but derived (:func:`wait_intervals`): a frame waits before stage
k from the end of its forward at stage k - 1 (its capture, for stage 0) to the start of its
first span at stage k.

Spans name a frame by its seq. Where seqs repeat in one run (a stream and ``submit()`` calls,
each numbering from 0; two streams one after the other), the derived waits and the trace's
flows tell frames of equal seq apart by their order (:func:`frame_ids`). One case they cannot:
a frame skipped by a later stage (``on_error="skip"``) leaves no span there, so the next frame
of its seq is matched to it at the stages after that one.

:meth:`Pipeline.metrics` summarises it all in a :class:`Report`; :func:`prometheus_text`
renders the same numbers in Prometheus' text exposition format.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from .devices import CpuDevice

if TYPE_CHECKING:
    from .pipeline import Pipeline

SPAN_CAPACITY = 1 << 16
"""Spans a pipeline run keeps by default (the latest; about 10 MB when full)."""

KINDS = ("compute", "backward", "step", "h2d", "d2d", "d2h", "deliver", "discard")
"""The kinds of span a pipeline records (the table above)."""
FORWARD_KINDS = frozenset({"h2d", "d2d", "compute", "d2h"})
"""Kinds on a frame's way forward through a stage (the path its trace flow follows)."""
OUT_KINDS = frozenset({"deliver", "discard"})
"""Kinds of a frame's leaving the last stage (stage ``-1``): one per frame, in order."""


class Span(NamedTuple):
    """One timed piece of work: ``kind`` at ``stage`` for frame ``seq``, from ``t0`` to ``t1``
    (seconds, :func:`~partime_async.frame.now` clock). See the module docstring for the kinds."""

    stage: int
    kind: str
    seq: int
    t0: float
    t1: float

    @property
    def duration(self) -> float:
        return self.t1 - self.t0


def as_spans(spans: Iterable[tuple[int, str, int, float, float]]) -> list[Span]:
    """Span tuples as :class:`Span` objects, in start order."""
    return sorted(map(Span._make, spans), key=lambda s: (s.t0, s.stage))


class Columns(NamedTuple):
    """Spans as numpy columns (one entry per span), for vectorised statistics."""

    stage: np.ndarray
    kind: np.ndarray
    seq: np.ndarray
    t0: np.ndarray
    t1: np.ndarray

    @classmethod
    def of(cls, spans: Sequence[tuple[int, str, int, float, float]]) -> Columns:
        n = len(spans)

        def column(i: int, dtype: Any) -> np.ndarray:
            return np.fromiter(map(itemgetter(i), spans), dtype, count=n)

        return cls(column(0, np.int64), np.array(list(map(itemgetter(1), spans)), "<U8"), column(2, np.int64),
                   column(3, np.float64), column(4, np.float64))


def frame_ids(c: Columns) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, frames)``: for each span the number of its frame, and for each frame number its
    ``(seq, n)``. Frames of equal seq (seqs repeat where several feeds number their own) are
    told apart by order: every stage takes frames in the order they were admitted, so the n-th
    span of seq s of one kind at one stage (by start; a delivery or discard by its time)
    belongs to the n-th frame of seq s there. ``n`` is 0 where a seq does not repeat. (Where
    the ring has lost the earlier spans of a repeated seq at one stage but not at the next,
    the two are matched one frame apart.)"""
    kinds = np.zeros(len(c.kind), np.int64)
    for code, kind in enumerate(KINDS, 1):  # a comparison per known kind is 5x faster than np.unique on strings
        kinds[c.kind == kind] = code
    if not kinds.all():  # spans made by hand, of other kinds
        kinds = np.unique(c.kind, return_inverse=True)[1].reshape(-1)
    out = np.isin(c.kind, list(OUT_KINDS))  # a frame leaves by one or the other, in order: one group
    kinds[out] = -1
    order = np.lexsort((np.where(out, c.t1, c.t0), c.seq, kinds, c.stage))
    stage, kind, seq = c.stage[order], kinds[order], c.seq[order]
    first = np.ones(len(order), bool)  # the first of its (stage, kind, seq) group
    first[1:] = (stage[1:] != stage[:-1]) | (kind[1:] != kind[:-1]) | (seq[1:] != seq[:-1])
    index = np.arange(len(order))
    nth = np.empty(len(order), np.int64)
    nth[order] = index - np.maximum.accumulate(np.where(first, index, 0))
    repeats = int(nth.max(initial=0)) + 1
    low, high = int(c.seq.min(initial=0)), int(c.seq.max(initial=0))
    if (high - low + 1) * repeats < 1 << 62:  # (seq, n) as one int64: 1-D np.unique is 50x faster
        keys, ids = np.unique((c.seq - low) * repeats + nth, return_inverse=True)
        return ids.reshape(-1), np.stack([keys // repeats + low, keys % repeats], axis=1)
    frames, ids = np.unique(np.stack([c.seq, nth], axis=1), axis=0, return_inverse=True)
    return ids.reshape(-1), frames


def wait_intervals(spans: Sequence[tuple[int, str, int, float, float]]) -> Columns:
    """The queue waits that the spans allow deriving, as columns (``kind`` is ``"wait"``): for
    each stage and frame (:func:`frame_ids`), from the end of the frame's forward at the stage
    before (its capture, for stage 0; known once it is delivered) to the start of its first
    forward span at the stage."""
    c = spans if isinstance(spans, Columns) else Columns.of(spans)
    ids, frames = frame_ids(c)
    width = int(c.stage.max(initial=0)) + 2  # key = frame * width + stage + 1: stages -1 .. S-1
    key = ids * width + c.stage + 1
    forward = np.isin(c.kind, list(FORWARD_KINDS))
    # arrival at (stage, frame): the start of the earliest forward span there
    order = np.lexsort((c.t0[forward], key[forward]))
    fkey, ft0 = key[forward][order], c.t0[forward][order]
    first = np.ones(len(fkey), bool)
    first[1:] = fkey[1:] != fkey[:-1]
    arrive_key, arrive = fkey[first], ft0[first]
    # departure from (stage, frame): the end of its compute; from the source (-1): the capture
    compute, deliver = c.kind == "compute", np.isin(c.kind, list(OUT_KINDS))
    leave_key = np.concatenate([key[compute], key[deliver]])
    leave = np.concatenate([c.t1[compute], c.t0[deliver]])
    order = np.argsort(leave_key, kind="stable")
    leave_key, leave = leave_key[order], leave[order]
    before = arrive_key - 1  # the same frame one stage earlier
    pos = np.minimum(np.searchsorted(leave_key, before), max(len(leave_key) - 1, 0))
    found = leave_key[pos] == before if len(leave_key) else np.zeros(len(before), bool)
    keys = arrive_key[found]
    return Columns(keys % width - 1, np.full(len(keys), "wait"), frames[keys // width, 0], leave[pos[found]],
                   arrive[found])


@dataclass
class StageReport:
    """One stage in a :class:`Report`.

    ``busy_s``: seconds the stage computed over the run, forward and (learning) backward, and
    ``busy`` that as a fraction of the elapsed time (on CUDA: GPU time between timing events).
    ``compute_*``: forward time per frame over the spans kept (without spans, the mean
    is busy time per frame over the run). ``wait_mean_s``: mean queue wait before the stage
    (derived from spans). ``frames_in``: frames that entered the stage's inbox (for stage 0,
    every admitted frame: those the ingress policy then dropped, counted in ``dropped``,
    included); ``frames_out``: frames it finished; ``queued``: frames waiting for it now (in
    its inbox channel and on its worker thread's queue).
    """

    index: int
    name: str
    device: str
    inline: bool
    busy: float
    busy_s: float
    compute_mean_s: float | None
    compute_median_s: float | None
    wait_mean_s: float | None
    frames_in: int
    frames_out: int
    dropped: int
    skipped: int
    queued: int


@dataclass
class Report:
    """What a pipeline did: counts, throughput, latency percentiles, and per-stage numbers.

    Latency is capture to delivery (``Frame.t_capture`` to ``Frame.t_done``) over the frames
    whose ``deliver`` span is still in the ring; ``None`` without spans (``metrics=False``, or
    no frame delivered yet). ``latency_sum_s`` is the sum over every frame delivered since
    start (a counter, spans or not). ``spans``: how many spans the statistics came from.
    ``str(report)`` is a readable table.
    """

    elapsed_s: float
    admitted: int
    delivered: int
    dropped: int
    skipped: int
    throughput: float
    latency_mean_s: float | None
    latency_p50_s: float | None
    latency_p95_s: float | None
    latency_p99_s: float | None
    latency_frames: int
    stages: list[StageReport] = field(default_factory=list)
    spans: int = 0
    discarded: int = 0
    latency_sum_s: float = 0.0
    metrics: bool = True  # whether the pipeline records spans

    @property
    def bottleneck(self) -> str | None:
        """The name of the busiest stage (the one that limits throughput), if any ran."""
        busiest = max(self.stages, key=lambda s: s.busy, default=None)
        return busiest.name if busiest is not None and busiest.busy > 0 else None

    def __str__(self) -> str:
        discarded = f", discarded {self.discarded} (reader gone)" if self.discarded else ""
        lines = [f"{self.delivered} delivered of {self.admitted} admitted in {self.elapsed_s:.3f} s: "
                 f"{self.throughput:.1f} frames/s; dropped {self.dropped}, skipped {self.skipped}{discarded}"]
        if self.latency_p50_s is not None:
            lines.append(f"latency capture->delivery over {self.latency_frames} frames: "
                         f"p50 {_ms(self.latency_p50_s)}, p95 {_ms(self.latency_p95_s)}, p99 {_ms(self.latency_p99_s)}")
        elif self.metrics:
            lines.append("latency: no frame delivered yet (or the span ring holds none)")
        else:
            lines.append("latency: no spans recorded (metrics=False)")
        rows = [("stage", "busy", "compute mean", "median", "wait mean", "in", "out", "dropped", "skipped", "queued")]
        for s in self.stages:
            rows.append((s.name + (" inline" if s.inline else ""), f"{s.busy:.0%}", _ms(s.compute_mean_s),
                         _ms(s.compute_median_s), _ms(s.wait_mean_s), str(s.frames_in), str(s.frames_out),
                         str(s.dropped), str(s.skipped), str(s.queued)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if self.bottleneck is not None:
            lines.append(f"bottleneck: {self.bottleneck}")
        return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.3f} ms"


def report(pipe: Pipeline) -> Report:
    """The :class:`Report` of ``pipe`` now (running or stopped); see :meth:`Pipeline.metrics`.

    Vectorised over the ring: a full one (65 536 spans) takes tens of milliseconds, so that a
    ``/metrics`` endpoint on the loop thread does not stall the pipeline."""
    stats = pipe.stats()
    c = Columns.of(pipe._span_tuples())
    duration = c.t1 - c.t0
    compute, latencies = c.kind == "compute", duration[c.kind == "deliver"]
    w = wait_intervals(c)
    wait = w.t1 - w.t0
    elapsed = stats.elapsed_s
    stages = []
    previous_out = stats.admitted
    for executor, st in zip(pipe.executors, stats.stages):
        k, device = executor.index, executor.device
        times = duration[compute & (c.stage == k)]
        busy_s = st.busy_s  # a counter (on CUDA, of event-timed GPU seconds): not limited to the ring
        # Without spans, the busy time per frame: the forward alone only where nothing else runs
        mean = float(times.mean()) if len(times) else (
            st.mean_compute_s if st.frames and executor.learner is None else None)
        waits = wait[w.stage == k]
        queued = len(executor.inbox)
        if isinstance(device, CpuDevice) and not device.inline:
            queued += device.queued
        stages.append(StageReport(
            index=k, name=st.name, device=st.device, inline=device.inline and executor.learner is None,
            busy=busy_s / elapsed if elapsed > 0 else 0.0, busy_s=busy_s, compute_mean_s=mean,
            compute_median_s=float(np.median(times)) if len(times) else None,
            wait_mean_s=float(waits.mean()) if len(waits) else None,
            frames_in=previous_out, frames_out=st.frames, dropped=stats.dropped if k == 0 else 0,
            skipped=st.skipped, queued=queued))
        previous_out = st.frames
    mean = p50 = p95 = p99 = None
    if len(latencies):
        mean = float(latencies.mean())
        p50, p95, p99 = (float(v) for v in np.percentile(latencies, [50, 95, 99]))
    return Report(elapsed_s=elapsed, admitted=stats.admitted, delivered=stats.delivered, dropped=stats.dropped,
                  skipped=stats.skipped, throughput=stats.throughput, latency_mean_s=mean, latency_p50_s=p50,
                  latency_p95_s=p95, latency_p99_s=p99, latency_frames=len(latencies), stages=stages,
                  spans=len(c.stage), discarded=stats.discarded, latency_sum_s=pipe._latency_sum_s,
                  metrics=pipe.metrics_enabled)


# -- Prometheus ------------------------------------------------------------------------------------
def prometheus_text(pipe: Pipeline) -> str:
    """``pipe``'s metrics now, in Prometheus' text exposition format (for a ``/metrics`` endpoint).

    Counters: ``partime_frames_{admitted,delivered,discarded,dropped,skipped}_total``; per stage (labels
    ``stage``, ``device``) ``partime_stage_frames_total``, ``partime_stage_skipped_total``,
    ``partime_stage_busy_seconds_total``. Gauges: ``partime_throughput_fps``, per stage
    ``partime_stage_busy_ratio``, ``partime_stage_queued_frames``,
    ``partime_stage_compute_median_seconds``, ``partime_stage_wait_mean_seconds`` (the last two
    only where spans give them). Summary: ``partime_latency_seconds``, capture to delivery:
    quantiles 0.5, 0.95, 0.99 over the frames kept in the span ring (a sliding window), and
    ``_sum`` / ``_count`` over every frame delivered since start (counters, as Prometheus'
    ``rate(_sum) / rate(_count)`` needs them). The
    numbers are those of :meth:`Pipeline.metrics`. Each call builds its own registry, so any
    number of pipelines can be exposed, each with its own call.
    """
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(pipe))
    return generate_latest(registry).decode()


class _Collector:
    """A prometheus-client custom collector reading one pipeline's :class:`Report`."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

        rep = report(self.pipe)
        for name, value, doc in (("admitted", rep.admitted, "Frames admitted into the pipeline."),
                                 ("delivered", rep.delivered, "Frames delivered by the pipeline."),
                                 ("discarded", rep.discarded, "Frames finished after their reader had gone."),
                                 ("dropped", rep.dropped, "Frames dropped by the ingress policy."),
                                 ("skipped", rep.skipped, "Frames skipped as bad input or failed (on_error='skip').")):
            yield CounterMetricFamily(f"partime_frames_{name}", doc, value=value)
        yield GaugeMetricFamily("partime_throughput_fps", "Delivered frames per second since start.",
                                value=rep.throughput)
        labels = ["stage", "device"]
        frames = CounterMetricFamily("partime_stage_frames", "Frames a stage finished.", labels=labels)
        skipped = CounterMetricFamily("partime_stage_skipped", "Frames a stage skipped.", labels=labels)
        busy = GaugeMetricFamily("partime_stage_busy_ratio", "Fraction of the elapsed time a stage computed.",
                                 labels=labels)
        busy_s = CounterMetricFamily("partime_stage_busy_seconds", "Seconds a stage computed.", labels=labels)
        queued = GaugeMetricFamily("partime_stage_queued_frames", "Frames waiting for a stage now.", labels=labels)
        median = GaugeMetricFamily("partime_stage_compute_median_seconds", "Median forward time per frame.",
                                   labels=labels)
        wait = GaugeMetricFamily("partime_stage_wait_mean_seconds", "Mean queue wait before a stage.", labels=labels)
        for s in rep.stages:
            values = [str(s.index), s.device]
            frames.add_metric(values, s.frames_out)
            skipped.add_metric(values, s.skipped)
            busy.add_metric(values, s.busy)
            busy_s.add_metric(values, s.busy_s)
            queued.add_metric(values, s.queued)
            if s.compute_median_s is not None:
                median.add_metric(values, s.compute_median_s)
            if s.wait_mean_s is not None:
                wait.add_metric(values, s.wait_mean_s)
        yield from (frames, skipped, busy, busy_s, queued, median, wait)
        latency = Metric("partime_latency_seconds", "Capture to delivery (quantiles over the frames kept in the "
                         "span ring; sum and count over every delivered frame).", "summary")
        if rep.latency_mean_s is not None:
            for q, v in (("0.5", rep.latency_p50_s), ("0.95", rep.latency_p95_s), ("0.99", rep.latency_p99_s)):
                latency.add_sample("partime_latency_seconds", {"quantile": q}, v)
        latency.add_sample("partime_latency_seconds_sum", {}, rep.latency_sum_s)
        latency.add_sample("partime_latency_seconds_count", {}, rep.delivered)
        yield latency
