"""Spans: the timed pieces of work a pipeline records, and the queue waits derived from them.

With ``Pipeline(..., metrics=True)`` (the default) every stage records *spans* into one
bounded ring per run (a ``collections.deque`` of the latest :data:`SPAN_CAPACITY`, or of the
latest ``n`` with ``metrics=n``; appends are thread-safe, so worker threads record without
locks). A span is a plain tuple ``(stage, kind, seq, t0, t1)`` on the library clock
:func:`partime_async.core.frame.now`; read them as :class:`Span` with :meth:`Pipeline.spans`. A
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
``iterate``   a stage solved in depth: one Newton step (DeepPCR) or sweep (Jacobi), inside ``compute``
``fallback``  a stage solved in depth: the layers run in sequence after a solve that did not converge
============  ===========================================================================

Queue waits are not recorded but derived (:func:`wait_intervals`): a frame waits before stage
k from the end of its forward at stage k - 1 (its capture, for stage 0) to the start of its
first span at stage k.

Spans name a frame by its seq. Where seqs repeat in one run (a stream and ``submit()`` calls,
each numbering from 0; two streams one after the other), the derived waits and the trace's
flows tell frames of equal seq apart by their order (:func:`frame_ids`). One case they cannot:
a frame skipped by a later stage (``on_error="skip"``) leaves no span there, so the next frame
of its seq is matched to it at the stages after that one.

:meth:`Pipeline.metrics` summarises it all in a :class:`~partime_async.observe.report.Report`;
:func:`~partime_async.observe.prometheus.prometheus_text` renders the same numbers in Prometheus'
text exposition format.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from operator import itemgetter
from typing import Any, NamedTuple

import numpy as np

SPAN_CAPACITY = 1 << 16
"""Spans a pipeline run keeps by default (the latest; about 10 MB when full)."""

KINDS = ("compute", "backward", "step", "h2d", "d2d", "d2h", "deliver", "discard", "iterate", "fallback")
"""The kinds of span a pipeline records (the table above)."""
FORWARD_KINDS = frozenset({"h2d", "d2d", "compute", "d2h"})
"""Kinds on a frame's way forward through a stage (the path its trace flow follows)."""
OUT_KINDS = frozenset({"deliver", "discard"})
"""Kinds of a frame's leaving the last stage (stage ``-1``): one per frame, in order."""


class Span(NamedTuple):
    """One timed piece of work: ``kind`` at ``stage`` for frame ``seq``, from ``t0`` to ``t1``
    (seconds, :func:`~partime_async.core.frame.now` clock). See the module docstring for the kinds."""

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
    for code, name in enumerate(KINDS, 1):  # a comparison per known kind is 5x faster than np.unique on strings
        kinds[c.kind == name] = code
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


def wait_intervals(spans: Sequence[tuple[int, str, int, float, float]] | Columns) -> Columns:
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
