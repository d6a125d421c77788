"""What observation reads: a snapshot of a pipeline's run, taken by the pipeline.

Reports, Prometheus text, traces and pictures never look inside a pipeline: they read an
:class:`Observation`, which :meth:`Pipeline.observation` takes (or anything else
:class:`Observable`). So the pipeline imports this package, never the other way round.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..core.stats import PipelineStats


@dataclass(frozen=True)
class Observation:
    """A pipeline's run as it is now (running or stopped), which the run no longer changes.

    Attributes:
        stats: its counters (:meth:`Pipeline.stats`).
        spans: the span tuples still in its ring, as recorded (empty with ``metrics=False``).
        queued: per stage, the frames waiting for it now (in its inlet and on its device).
        latency_sum_s: capture-to-delivery seconds summed over every frame delivered.
        metrics: whether the pipeline records spans.
        learning: whether its stages learn (their busy time then includes backward passes).
        t_start: when the run's throughput counts from (``now()`` clock).
    """

    stats: PipelineStats
    spans: list[tuple[int, str, int, float, float]]
    queued: list[int]
    latency_sum_s: float
    metrics: bool
    learning: bool
    t_start: float


@runtime_checkable
class Observable(Protocol):
    """Anything that can be observed (a :class:`~partime_async.Pipeline`)."""

    def observation(self) -> Observation: ...


def observe(source: Observable | Observation) -> Observation:
    """``source``'s observation now (an observation is its own)."""
    return source if isinstance(source, Observation) else source.observation()
