"""Delivery: the last stage's outlet, which hands each finished frame to its route."""
from __future__ import annotations

from ..core.frame import Frame, now
from ..core.job import Job
from .routes import Route, StreamRoute
from .run import Run
from .state import PipelineState


class Egress:
    """After the last stage: each finished job goes straight to its route, in order, from the
    last stage's own task (an egress task behind one more channel would cost the loop a task
    switch per frame). It stamps ``Frame.t_done``, records the frame's ``deliver`` span (or
    ``discard``: its reader went away) and settles it: an answer to a ``submit()`` is counted
    as delivered now (:meth:`Run.handed`), a stream's frame when its reader takes it (or as
    discarded if the stream closes first). The send end of a transport
    (:class:`~partime_async.transport.Sender`): a reader that is behind makes the last stage
    wait, as a full channel would."""

    def __init__(self, run: Run, state: PipelineState) -> None:
        self._run = run
        self._state = state
        self._record = run.spans.append if run.spans is not None else None

    def send_nowait(self, job: Job) -> bool:
        frame, route = job.frame, job.route
        frame.t_done = now()
        gone = route.gone
        if not route.offer(frame):
            return False
        self._settled(frame, route, gone)
        return True

    async def send(self, job: Job) -> None:
        await job.route.deliver(job.frame)
        self._settled(job.frame, job.route, job.route.gone)  # a reader that left while we waited did not get it

    def close(self) -> None:
        """Nothing to do: each route closes itself once all its frames have settled."""

    def abort(self, exc: BaseException) -> None:
        """Nothing to do: the failed run fails every route still waiting (:meth:`Run.serve`)."""

    def _settled(self, frame: Frame, route: Route, gone: bool) -> None:
        # Every frame that leaves the last stage gets its stage -1 span here, in order (what
        # tells frames of a repeated seq apart): deliver, or discard if its reader had gone.
        if self._record is not None:
            self._record((-1, "discard" if gone else "deliver", frame.seq, frame.t_capture, frame.t_done))
        run = self._run
        run.egressed += 1
        if gone:  # its reader went away: not delivered to anyone
            run.discarded += 1
        elif not isinstance(route, StreamRoute):  # a stream's frame is delivered when read
            run.handed(frame)
        if not route.request:  # a submit()'s number is not a position in a stream
            self._state.position = frame.seq + 1
