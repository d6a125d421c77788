"""Consistent checkpoints of a learning pipeline, taken while frames keep flowing.

A checkpoint "at frame t" is a cut through the schedule: every stage contributes its state
as it is right after its work for frame t (its forward of t and the optimiser step that
follows it), captured on the stage's own device thread, in order with its other work, so no
update is half-applied and no stage waits. The frame that closes the cut carries a
:class:`Cut` as ``frame.checkpoint``; the checkpoint sink awaits it and writes it atomically
(:mod:`partime_async.checkpoint`). Without learning the weights do not change while frames
flow, and the cut is the model and the position.

Cuts are taken every ``every`` admitted frames for each :class:`~partime_async.sinks.Checkpoint`
sink that is open (several sinks, several periods; a sink that is not running asks for none).

Resuming from a checkpoint restores exactly those weights and optimiser states, and the
stream goes on at ``state["position"]`` (t + 1). What the cut leaves out: gradients that were
still owed for frames before t (in flight between the stages) — the resumed pipeline starts a
fresh warm-up, as at the start of a stream.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable
from collections.abc import Set as AbstractSet
from typing import Any

from ..core.frame import Frame
from ..devices import settle
from .state import PipelineState


class Cut:
    """One cut at frame ``seq``, for the checkpoint sinks whose period is in ``periods``
    (frames admitted in the run, counted from 1: a sink with period N takes the cut at the
    N-th, 2N-th, … frame admitted; a cut whose frame a drop policy dropped before stage 0
    moves to the newest frame still queued). With learning, filled in by the stages' runners
    as they pass it (``n_stages`` parts); without, ``n_stages`` is 0."""

    def __init__(self, seq: int, periods: frozenset[int], n_stages: int, state: PipelineState) -> None:
        self.seq = seq
        self.periods = periods
        self._parts: list[Awaitable[Any] | None] = [None] * n_stages
        self._state = state

    def add(self, stage: int, part: Awaitable[Any]) -> None:
        """Stage ``stage``'s part: a device ticket of ``(weights, learner state)``."""
        self._parts[stage] = part

    async def state(self) -> dict[str, Any]:
        """The pipeline's state at this cut, shaped like :meth:`Pipeline.state_dict`."""
        if not self._parts:  # no learning: the weights do not change while streaming
            state = self._state.state_dict()
            state["position"] = self.seq + 1
            return state
        parts = []
        for k, part in enumerate(self._parts):
            if part is None:
                raise RuntimeError(f"stage {k} did not contribute to the checkpoint at frame {self.seq}")
            value, ready = await part
            if ready is not None:  # copied on a GPU stream: complete before anyone reads it
                await settle(ready)
            parts.append(value)
        return self._state.at_cut(parts, self.seq)


class CutSchedule:
    """Which admitted frames close a checkpoint cut: every ``every``-th, for each open
    checkpoint sink's ``every`` (:meth:`ask` when it opens, :meth:`release` when it closes)."""

    def __init__(self, state: PipelineState) -> None:
        self.periods: Counter[int] = Counter()  # of the open Checkpoint sinks
        self.orphans: set[int] = set()  # periods whose cut was dropped with its frame: due now
        self._state = state

    def ask(self, every: int) -> None:
        """A checkpoint sink opened: cut every ``every`` admitted frames."""
        self.periods[every] += 1

    def release(self, every: int) -> None:
        """That sink closed."""
        self.periods[every] -= 1
        if self.periods[every] <= 0:
            del self.periods[every]

    def due(self, admitted: int) -> frozenset[int]:
        """The periods whose cut the ``admitted``-th frame of the run closes."""
        return frozenset(every for every in self.periods if admitted % every == 0)

    def cut(self, frame: Frame, periods: AbstractSet[int], n_stages: int) -> None:
        """Take a cut at ``frame`` for the sinks of ``periods`` (``n_stages`` parts to come)."""
        frame.checkpoint = Cut(frame.seq, frozenset(periods), n_stages, self._state)
