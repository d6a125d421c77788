"""Frames: one sample of a stream and everything that travels with it.

A payload is a tensor or any nesting of tuples, lists and dicts of tensors (a *pytree*,
as torch understands it). The pytree helpers here are thin wrappers over
``torch.utils._pytree``, the implementation torch itself uses for ``torch.compile`` and
``torch.export``.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

Payload = Any
"""A tensor, or a tuple / list / dict nesting of tensors."""


now: Callable[[], float] = time.perf_counter
"""The clock of every timestamp in the library (monotonic, seconds); bound directly, as it
is read on every hop."""


@dataclass(slots=True, eq=False)
class Frame:
    """One sample of a stream.

    ``seq`` orders the stream; ``t_capture`` is when the source produced the frame (``now()``
    clock), ``t_done`` when the pipeline delivered its output. ``target`` and ``meta`` travel
    with the frame unchanged, so a delayed output is never paired with another frame's target.
    ``checkpoint``: set by the pipeline on the frames that close a checkpoint cut that a
    :class:`~partime_async.sinks.Checkpoint` sink asked for (see :mod:`partime_async.pipeline.cuts`).
    """

    seq: int
    data: Payload
    target: Payload | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    t_capture: float = field(default_factory=now)
    t_done: float | None = None
    checkpoint: Any = field(default=None, repr=False)

    @property
    def latency(self) -> float | None:
        """Seconds from capture to delivery, once delivered."""
        return None if self.t_done is None else self.t_done - self.t_capture


def leaves(payload: Payload) -> list[Any]:
    """The leaves of a payload, in pytree order."""
    return pytree.tree_leaves(payload)


def tree_map(fn: Callable[[Any], Any], payload: Payload) -> Payload:
    """Apply ``fn`` to every leaf of a payload, keeping its structure."""
    return pytree.tree_map(fn, payload)


def clone(payload: Payload) -> Payload:
    """A copy of a payload with every tensor leaf cloned: for work on a frame that must leave
    the frame as it was (profiling the model on it; a layer may modify its input in place)."""
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, payload)


def to_device(payload: Payload, device: torch.device, non_blocking: bool = False) -> Payload:
    """Move every tensor leaf of a payload to ``device``."""
    return pytree.tree_map(
        lambda t: t.to(device, non_blocking=non_blocking) if isinstance(t, torch.Tensor) else t,
        payload,
    )
