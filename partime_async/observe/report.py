"""Reports: per-stage busy time, compute and wait times, frame counts and queue depths, and
latency percentiles and throughput, from an :class:`~partime_async.observe.observation.Observation`."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .observation import Observable, Observation, observe
from .spans import Columns, wait_intervals


@dataclass
class StageReport:
    """One stage in a :class:`Report`.

    ``busy_s``: seconds the stage computed over the run, forward and (learning) backward, and
    ``busy`` that as a fraction of the elapsed time (on CUDA: GPU time between timing events).
    ``compute_*``: forward time per frame over the spans kept (without spans, the mean
    is busy time per frame over the run). ``wait_mean_s``: mean queue wait before the stage
    (derived from spans). ``frames_in``: frames that entered the stage's inlet (for stage 0,
    every admitted frame: those the ingress policy then dropped, counted in ``dropped``,
    included); ``frames_out``: frames it finished; ``queued``: frames waiting for it now (in
    its inlet and on its device's queue). ``counters``: what the stage's program counts besides
    frames (a stage solved in depth: ``solver_iterations``, ``solver_fallbacks``; learning:
    ``skipped_updates``), totals over the run.
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
    counters: dict[str, float] = field(default_factory=dict)


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
    abandoned: int = 0
    latency_sum_s: float = 0.0
    metrics: bool = True  # whether the pipeline records spans

    @property
    def bottleneck(self) -> str | None:
        """The name of the busiest stage (the one that limits throughput), if any ran."""
        busiest = max(self.stages, key=lambda s: s.busy, default=None)
        return busiest.name if busiest is not None and busiest.busy > 0 else None

    def __str__(self) -> str:
        lost = f", discarded {self.discarded} (reader gone)" if self.discarded else ""
        if self.abandoned:
            lost += f", abandoned {self.abandoned} (failed, or in flight when the pipeline stopped)"
        lines = [f"{self.delivered} delivered of {self.admitted} admitted in {self.elapsed_s:.3f} s: "
                 f"{self.throughput:.1f} frames/s; dropped {self.dropped}, skipped {self.skipped}{lost}"]
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
            cells = enumerate(zip(r, widths, strict=True))
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in cells))
        if self.bottleneck is not None:
            lines.append(f"bottleneck: {self.bottleneck}")
        return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.3f} ms"


def report(source: Observable | Observation) -> Report:
    """The :class:`Report` of a pipeline (or of an observation of one) now, running or
    stopped; see :meth:`Pipeline.metrics`.

    Vectorised over the ring: a full one (65 536 spans) takes tens of milliseconds, so that a
    ``/metrics`` endpoint on the loop thread does not stall the pipeline."""
    obs = observe(source)
    stats = obs.stats
    c = Columns.of(obs.spans)
    duration = c.t1 - c.t0
    compute, latencies = c.kind == "compute", duration[c.kind == "deliver"]
    w = wait_intervals(c)
    wait = w.t1 - w.t0
    elapsed = stats.elapsed_s
    stages = []
    previous_out = stats.admitted
    for k, (st, queued) in enumerate(zip(stats.stages, obs.queued, strict=False)):
        times = duration[compute & (c.stage == k)]
        busy_s = st.busy_s  # a counter (on CUDA, of event-timed GPU seconds): not limited to the ring
        # Without spans, the busy time per frame: the forward alone only where nothing else runs
        mean = float(times.mean()) if len(times) else (
            st.mean_compute_s if st.frames and not obs.learning else None)
        waits = wait[w.stage == k]
        stages.append(StageReport(
            index=k, name=st.name, device=st.device, inline=st.inline,
            busy=busy_s / elapsed if elapsed > 0 else 0.0, busy_s=busy_s, compute_mean_s=mean,
            compute_median_s=float(np.median(times)) if len(times) else None,
            wait_mean_s=float(waits.mean()) if len(waits) else None,
            frames_in=previous_out, frames_out=st.frames, dropped=stats.dropped if k == 0 else 0,
            skipped=st.skipped, queued=queued, counters=dict(st.counters)))
        previous_out = st.frames
    mean = p50 = p95 = p99 = None
    if len(latencies):
        mean = float(latencies.mean())
        p50, p95, p99 = (float(v) for v in np.percentile(latencies, [50, 95, 99]))
    return Report(elapsed_s=elapsed, admitted=stats.admitted, delivered=stats.delivered, dropped=stats.dropped,
                  skipped=stats.skipped, throughput=stats.throughput, latency_mean_s=mean, latency_p50_s=p50,
                  latency_p95_s=p95, latency_p99_s=p99, latency_frames=len(latencies), stages=stages,
                  spans=len(c.stage), discarded=stats.discarded, abandoned=stats.abandoned,
                  latency_sum_s=obs.latency_sum_s, metrics=obs.metrics)
