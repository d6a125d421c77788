"""Observation: where the time goes, read from a snapshot of a pipeline's run.

``observation.py`` (the snapshot the pipeline takes: counters, spans, queue depths),
``spans.py`` (spans, their kinds, the queue waits derived from them), ``report.py``
(:class:`Report`: per-stage numbers and latency percentiles), ``prometheus.py`` (the same in
Prometheus' text format), ``trace.py`` (a Chrome / Perfetto trace), ``plot.py`` (a timeline
picture). The pipeline imports this package; nothing here imports the pipeline.
"""
from .observation import Observable, Observation
from .plot import timeline
from .prometheus import prometheus_text
from .report import Report, StageReport, report
from .spans import KINDS, SPAN_CAPACITY, Columns, Span, as_spans, frame_ids, wait_intervals
from .trace import chrome_trace, write_trace

__all__ = ["KINDS", "SPAN_CAPACITY", "Columns", "Observable", "Observation", "Report", "Span", "StageReport",
           "as_spans", "chrome_trace", "frame_ids", "prometheus_text", "report", "timeline", "wait_intervals",
           "write_trace"]

