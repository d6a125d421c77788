"""The serving rank's side: run the driving rank's requests for this rank's stages, in order.

A serving rank holds no source, sink or runner: for each run of the driving rank it serves
one session on a thread of its own, from the driving rank's first message to its ``BYE``.
Each request is the work of one stage of this rank on one frame (build, forward, backward,
state); it runs here, on this thread, in the order it came, and its reply (the result, or
the exception described) goes back in the same order. The receives are posted ahead (see
:class:`~partime_async.ranks.link.PeerLink`), so the next frame arrives while this one
computes, and replies are posted (``isend``) without waiting: no event loop, and no
hand-off to another thread, is on a frame's way.

A stage that fails to build answers every later request with a fatal error (the driving
rank stops the run); an exception in a frame's work is that frame's (the driving rank applies
``on_error``). A lost driving rank ends the session with :class:`~partime_async.ranks.link.PeerLost`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..core.frame import now, to_device
from ..stage import Stage
from .device import SENTINELS, WORK
from .link import BUILD, BYE, ERROR, FATAL, FINAL, RESULT, WANT_FINAL, PeerLink, describe
from .wire import BATCH, Message

_WORK = {op: name for name, op in WORK.items()}

BuildStage = Callable[[int, list[int], dict[str, Any]], Stage]
"""``build(index, balance, saved)``: this rank's stage ``index`` of the split ``balance``, with
the weights and learner state in ``saved`` (``{"module": ..., "learner": ...}``)."""


def serve(driving_rank: int, build: BuildStage) -> None:
    """Serve one session of ``driving_rank``'s requests (blocks until its ``BYE``), on the
    calling thread."""
    link = PeerLink(driving_rank, sentinels=SENTINELS, name=f"rank {driving_rank}")
    link.start()
    session = _Session(build)
    try:
        while (message := link.receive()).kind != BYE:
            if message.kind == BATCH:  # several requests: one reply holding their replies, in order
                link.send_batch([session.answer(each) for each in message.payload])
            else:
                kind, k, seq, payload, flags, busy, _ = session.answer(message)
                link.send(kind, k, seq, payload, flags=flags, busy=busy)
        if message.flags & WANT_FINAL:
            link.send(FINAL, -1, -1, {k: _learnt(stage) for k, stage in session.stages.items()})
    finally:
        link.close()


Reply = tuple[int, int, int, Any, int, float, None]


class _Session:
    """This rank's stages in one session, and how it answers one request."""

    def __init__(self, build: BuildStage) -> None:
        self.build = build
        self.stages: dict[int, Stage] = {}
        self.broken: dict[int, dict[str, Any]] = {}

    def answer(self, message: Message) -> Reply:
        """The reply to ``message``: ``(kind, stage, seq, payload, flags, busy, None)``."""
        k, seq = message.stage, message.seq
        if k in self.broken:
            return ERROR, k, seq, self.broken[k], FATAL, 0.0, None
        if message.kind == ERROR:  # a request the driving rank could not send: its error comes back
            return ERROR, k, seq, message.payload, 0, 0.0, None
        if message.kind == BUILD:
            try:
                self.stages[k] = stage = self.build(k, message.payload["balance"], message.payload)
                stage.device.adopt_thread()  # this thread runs the stage's work
            except Exception as exc:
                self.broken[k] = describe(exc)
                return ERROR, k, seq, self.broken[k], FATAL, 0.0, None
            return RESULT, k, seq, None, 0, 0.0, None
        stage = self.stages[k]
        work = getattr(stage.program, _WORK[message.kind])
        t0 = now()
        try:
            # What came over gloo is on the host; a stage on a GPU takes it there (its device's
            # own submit would have): staged through the host, not device to device.
            payload = message.payload if stage.device.on_host else to_device(message.payload, stage.device.torch_device)
            result = work(payload, seq)
        except Exception as exc:
            return ERROR, k, seq, describe(exc), 0, now() - t0, None
        return RESULT, k, seq, result, 0, now() - t0, None


def _learnt(stage: Stage) -> tuple[dict[str, Any], Any]:
    """The stage's weights (keyed as its module's) and learner state."""
    learner = getattr(stage.program, "learner", None)
    return stage.plan.module.state_dict(), learner.state_dict() if learner is not None else None
