"""A job: a frame inside a pipeline, as its stages and transports carry it; and the gradient
that is not there."""
from __future__ import annotations

from typing import Any

from .frame import Frame


class Job:
    """A frame inside the pipeline, with where its output goes and its readiness on device.

    ``key`` is unique in a run, in admission order: learning matches a frame's gradients by it
    (seqs need not be unique: two streams, or a stream and ``submit()``, each count from 0).
    ``route`` is where the frame settles (delivered, skipped or dropped; see
    :mod:`partime_async.pipeline.routes`); a transport from another process gives the frames
    it receives a stand-in that reports their settling back. ``ready`` is the event that
    marks ``frame.data`` complete on the device that produced it (a GPU's; None when it
    already is): transports carry it along and only devices wait on it. ``ticket`` is the
    runner's own: the device's pending result while the job is in flight on a stage; it
    never crosses a transport.

    ``skipped``: a learning stage skipped this frame (``on_error="skip"``; its route has
    settled it). The job still travels to the last stage as a marker, without data, so that
    every stage's learning schedule counts the same frames in the same order (a stage owes
    frame t's gradient a fixed number of frames after t); no stage computes on it.
    """

    __slots__ = ("frame", "route", "key", "ready", "ticket", "skipped")

    def __init__(self, frame: Frame, route: Any, key: int = -1) -> None:
        self.frame = frame
        self.route = route
        self.key = key
        self.ready: Any = None
        self.ticket: Any = None
        self.skipped = False


class _NoGradient:
    """The type of :data:`NO_GRADIENT`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_GRADIENT"

    def __reduce__(self) -> str:
        return "NO_GRADIENT"  # one object, also across a copy or a pickle


NO_GRADIENT = _NoGradient()
"""What a learning stage sends back instead of a gradient when a frame's update is skipped:
the frame was skipped further down (``on_error="skip"``), or its loss or a gradient was not
finite. Every stage that receives it skips that frame's update too; the schedule goes on."""
