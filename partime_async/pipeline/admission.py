"""Admission: the door of a run. Frames are checked, counted on their route, given a job key
(and a checkpoint cut when one is due), and queued on the ingress, the first stage's inlet,
whose policy decides what happens when it is full. The first good frame builds the run's
stages (:mod:`partime_async.pipeline.build`)."""
from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from collections.abc import Set as AbstractSet

from ..aio.channel import Channel, Policy
from ..core.errors import FrameError, PipelineError
from ..core.frame import Frame, Payload
from ..core.job import Job
from ..core.validation import InputSpec, check_tensors
from .cuts import CutSchedule
from .routes import Route


class SkipFrame(Exception):
    """Raised by the build, with ``on_error="skip"``, when the model failed on the streamed
    frame it was splitting on: that frame is skipped (``error`` says why), not the pipeline."""

    def __init__(self, error: PipelineError) -> None:
        super().__init__(error)
        self.error = error


Build = Callable[[Payload, "int | None", bool], Awaitable[None]]
"""``build(sample, seq, request)``: make the run's stages from a first frame (``request``: a
``submit()``'s, which its errors name so); raises :class:`SkipFrame` to skip that frame, or
the run's error if it has ended."""


class Admission:
    """The door of one run; see the module docstring.

    Attributes:
        ingress: the first stage's inlet (``capacity`` and ``policy`` are the pipeline's).
        built: the stages exist (:meth:`open` sets it, with ``spec`` and ``cut_parts``).
        spec: what every frame must match (from the first frame when ``input_spec="first"``);
            None: only "tensors".
        cut_parts: the parts a checkpoint cut waits for (one per stage when learning, else 0).
        admitted: frames admitted in the run (the checkpoint periods count them).
        skipped_input: frames rejected at the door with ``on_error="skip"``.

    ``targets``: the pipeline learns, so targets are checked too (tensors; against
    ``target_spec`` where one is given; finite with ``check_finite``).
    """

    def __init__(self, check_running: Callable[[], asyncio.TaskGroup], build: Build, cuts: CutSchedule, *,
                 capacity: int, policy: Policy, on_error: str, check_finite: bool, targets: bool = False,
                 target_spec: InputSpec | None = None) -> None:
        self.ingress: Channel[Job] = Channel(capacity, policy, name="ingress", on_drop=self._dropped)
        self.built = False
        self.spec: InputSpec | None = None
        self.cut_parts = 0
        self.admitted = 0
        self.skipped_input = 0
        self._check_running = check_running
        self._build = build
        self._cuts = cuts
        self._on_error = on_error
        self._check_finite = check_finite
        self._targets = targets
        self._target_spec = target_spec
        self._keys = itertools.count()  # job keys, unique in this run
        cuts.orphans.clear()

    def open(self, spec: InputSpec | None, *, cut_parts: int) -> None:
        """The stages are built: check frames against ``spec`` from now on; a checkpoint cut
        waits for ``cut_parts`` parts."""
        self.spec, self.cut_parts, self.built = spec, cut_parts, True

    async def admit(self, frame: Frame, route: Route) -> None:
        """Admit ``frame`` for ``route`` (waiting for room under ``block``); raises its
        FrameError (unless skipped), or the run's error."""
        self._check_running()
        if not self.built and not await self._first(frame, route):
            return
        job = self._prepare(frame, route)
        if job is None:
            return
        try:
            if not self.ingress.send_nowait(job):  # fast path: room in the channel
                await self.ingress.send(job)
            if self._cuts.orphans:
                self._place_orphan_cuts()
        except BaseException:  # not queued after all (stop(), or the reader went away)
            route.admitted -= 1
            self.admitted -= 1
            raise

    async def _first(self, frame: Frame, route: Route) -> bool:
        """Build the stages on the first good frame; False if ``frame`` was skipped as bad."""
        try:
            check_tensors(frame.data, frame.seq, finite=self._check_finite)
        except FrameError as error:
            self._refuse(frame, route, error)
            return False
        try:
            await self._build(frame.data, frame.seq, route.request)
        except SkipFrame as skip:  # the model failed on it; the next frame tries the split again
            self._skip_input(frame, route, skip.error)
            return False
        return True

    def _prepare(self, frame: Frame, route: Route) -> Job | None:
        """Check a frame and count it on its route; None if it was skipped as bad input."""
        try:
            check_tensors(frame.data, frame.seq, finite=False)
            if self.spec is not None:
                self.spec.check(frame.data, frame.seq)
            if self._check_finite:  # after the spec: it reads the values, which must be there
                check_tensors(frame.data, frame.seq, finite=True)
            if self._targets and frame.target is not None:
                check_tensors(frame.target, frame.seq, finite=False, component="target")
                if self._target_spec is not None:
                    self._target_spec.check(frame.target, frame.seq, component="target")
                if self._check_finite:
                    check_tensors(frame.target, frame.seq, finite=True, component="target")
        except FrameError as error:
            self._refuse(frame, route, error)
            return None
        route.admitted += 1
        self.admitted += 1
        if self._cuts.periods:
            due = self._cuts.due(self.admitted)
            if due:
                self._cut(frame, due)
        return Job(frame, route, next(self._keys))

    def _refuse(self, frame: Frame, route: Route, error: FrameError) -> None:
        """``frame`` failed at the door: raise its error (named as a request for a
        ``submit()``), or with ``on_error="skip"`` skip it."""
        if route.request:
            error = error.of_request()
        if self._on_error != "skip":
            raise error
        self._skip_input(frame, route, error)

    def _skip_input(self, frame: Frame, route: Route, error: PipelineError) -> None:
        self.skipped_input += 1
        route.admitted += 1
        route.skip(frame, error)

    def _cut(self, frame: Frame, periods: AbstractSet[int]) -> None:
        self._cuts.cut(frame, periods, self.cut_parts)

    def _dropped(self, job: Job) -> None:
        job.route.drop(job.frame, "ingress")
        if job.frame.checkpoint is not None:  # no stage saw it: see _place_orphan_cuts
            self._cuts.orphans |= job.frame.checkpoint.periods

    def _place_orphan_cuts(self) -> None:
        """Cuts whose frame the ingress dropped go to the frame queued last (a drop policy
        drops only when the ingress is full, so there is one): no stage has seen it yet, so
        the cut stays consistent, and it is not lost at the end of the stream."""
        newest = self.ingress.newest()
        if newest is None:
            return
        periods = self._cuts.orphans & self._cuts.periods.keys()
        self._cuts.orphans.clear()
        if periods:
            old = newest.frame.checkpoint
            self._cut(newest.frame, periods | (old.periods if old is not None else frozenset()))
