"""A pipeline's metrics in Prometheus' text exposition format (for a ``/metrics`` endpoint)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .observation import Observable, Observation
from .report import report


def prometheus_text(pipe: Observable | Observation) -> str:
    """``pipe``'s metrics now, in Prometheus' text exposition format (for a ``/metrics`` endpoint).

    Counters: ``partime_frames_{admitted,delivered,discarded,dropped,skipped,abandoned}_total``; per stage (labels
    ``stage``, ``device``) ``partime_stage_frames_total``, ``partime_stage_skipped_total``,
    ``partime_stage_busy_seconds_total``. Gauges: ``partime_throughput_fps``, per stage
    ``partime_stage_busy_ratio``, ``partime_stage_queued_frames``,
    ``partime_stage_compute_median_seconds``, ``partime_stage_wait_mean_seconds`` (the last two
    only where spans give them); ``partime_stage_counter_total`` (labels ``stage``, ``device``,
    ``name``): what a stage's program counts besides frames (solver iterations, skipped
    updates). Summary: ``partime_latency_seconds``, capture to delivery: quantiles 0.5, 0.95,
    0.99 over the frames kept in the span ring (a sliding window), and ``_sum`` / ``_count``
    over every frame delivered since start (counters, as Prometheus' ``rate(_sum) /
    rate(_count)`` needs them). The numbers are those of :meth:`Pipeline.metrics`. Each call
    builds its own registry, so any number of pipelines can be exposed, each with its own call.
    """
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(pipe))
    return generate_latest(registry).decode()


class _Collector:
    """A prometheus-client custom collector reading one pipeline's :class:`Report`."""

    def __init__(self, pipe: Observable | Observation) -> None:
        self.pipe = pipe

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

        rep = report(self.pipe)
        for name, value, doc in (("admitted", rep.admitted, "Frames admitted into the pipeline."),
                                 ("delivered", rep.delivered, "Frames delivered by the pipeline."),
                                 ("discarded", rep.discarded, "Frames finished after their reader had gone."),
                                 ("dropped", rep.dropped, "Frames dropped by the ingress policy."),
                                 ("skipped", rep.skipped, "Frames skipped as bad input or failed (on_error='skip')."),
                                 ("abandoned", rep.abandoned, "Frames in flight when the pipeline stopped or failed.")):
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
        counter = CounterMetricFamily("partime_stage_counter", "What a stage's program counts besides frames.",
                                      labels=[*labels, "name"])
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
            for name, count in sorted(s.counters.items()):
                counter.add_metric([*values, name], count)
        yield from (frames, skipped, busy, busy_s, queued, median, wait, counter)
        latency = Metric("partime_latency_seconds", "Capture to delivery (quantiles over the frames kept in the "
                         "span ring; sum and count over every delivered frame).", "summary")
        for q, v in (("0.5", rep.latency_p50_s), ("0.95", rep.latency_p95_s), ("0.99", rep.latency_p99_s)):
            if v is not None:  # none is where no latency was measured
                latency.add_sample("partime_latency_seconds", {"quantile": q}, v)
        latency.add_sample("partime_latency_seconds_sum", {}, rep.latency_sum_s)
        latency.add_sample("partime_latency_seconds_count", {}, rep.delivered)
        yield latency
