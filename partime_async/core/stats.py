"""What a pipeline and its stages did so far: plain counters, written by the stages' threads
and read as snapshots (by :meth:`Pipeline.stats` and by :mod:`partime_async.observe`)."""
from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field


@dataclass
class StageStats:
    """What one stage did so far."""

    name: str
    device: str
    layers: int
    inline: bool = False
    frames: int = 0
    skipped: int = 0
    busy_s: float = 0.0
    skipped_seqs: deque[int] = field(default_factory=lambda: deque(maxlen=1024))  # the latest, streams' frames
    skipped_requests: deque[int] = field(default_factory=lambda: deque(maxlen=1024))  # the latest, submit()s
    loss: float | None = None  # learning, last stage: the latest frame's loss
    counters: dict[str, float] = field(default_factory=dict)
    """What the stage's program counts besides frames, by name (a depth solver's iterations
    and fallbacks, a width-split stage's exchanged activations): totals over the run."""
    replicas: list[StageStats] = field(default_factory=list)
    """A replicated stage's replicas, each with its own device, frames and busy time (the
    stage's ``busy_s`` is their sum in a snapshot); empty for a stage on one device."""

    @property
    def mean_compute_s(self) -> float:
        """Busy seconds per frame: the forward, and for a learning stage its backward and
        optimiser step too (spans time the forward alone: see :class:`~partime_async.observe.Report`)."""
        return self.busy_s / self.frames if self.frames else 0.0

    def snapshot(self) -> StageStats:
        """A copy that the stage's threads no longer write."""
        replicas = [r.snapshot() for r in self.replicas]
        return dataclasses.replace(self, skipped_seqs=deque(self.skipped_seqs, maxlen=self.skipped_seqs.maxlen),
                                   skipped_requests=deque(self.skipped_requests, maxlen=self.skipped_requests.maxlen),
                                   counters=dict(self.counters), replicas=replicas,
                                   busy_s=sum(r.busy_s for r in replicas) if replicas else self.busy_s)


@dataclass
class PipelineStats:
    """A snapshot of what the pipeline did so far.

    ``delivered`` frames reached their reader: a stream's when it is read, a ``submit()``'s
    answer when it is handed back (so ``delivered``, like every counter here, only grows).
    Once the pipeline has stopped and its streams are read to their end or closed (frames
    waiting in a stream for its reader are neither delivered nor discarded yet; one read after
    the pipeline restarted counts in no run), every admitted frame is accounted for:
    ``admitted == delivered + discarded + dropped + sum(stage.skipped) + abandoned``, where
    ``discarded`` frames finished after their reader had gone, or were never read (a stream
    closed early, a cancelled ``submit()``), and ``abandoned`` frames never finished because
    the pipeline stopped first (a failure, in frame order: the frame that failed a stage and
    the frames after it; a cancellation: every frame in flight), counted once the run has
    ended (0 while it runs); frames
    rejected at the door (with ``on_error="skip"``: bad input, or a first frame that the
    model failed on while the pipeline split it) are counted in ``skipped_input`` instead.
    """

    balance: list[int] | None
    admitted: int = 0
    delivered: int = 0
    discarded: int = 0
    skipped_input: int = 0
    dropped: int = 0
    stages: list[StageStats] = field(default_factory=list)
    elapsed_s: float = 0.0
    abandoned: int = 0

    @property
    def skipped(self) -> int:
        return self.skipped_input + sum(s.skipped for s in self.stages)

    @property
    def throughput(self) -> float:
        """Delivered frames per second since start."""
        return self.delivered / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def busy(self) -> list[float]:
        """Each stage's busy fraction of the elapsed time."""
        return [s.busy_s / self.elapsed_s if self.elapsed_s > 0 else 0.0 for s in self.stages]
