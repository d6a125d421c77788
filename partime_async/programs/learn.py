"""Learning: a stage's forward, the backward its schedule owes, and the optimiser step, in the
``partime``, ``stashed`` or ``sequential`` mode of its :class:`~partime_async.programs.online.StageLearner`."""
from __future__ import annotations

import copy
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any

from ..core.frame import Payload, now
from ..core.job import Job
from ..core.stats import StageStats
from ..partition import StagePlan
from .base import StageProgram, host_timing, output_checker
from .online import StageLearner

SKIPPED = object()
"""What a learning forward gets for a frame skipped before its stage: nothing to compute."""


class LearnProgram(StageProgram):
    """One stage of a learning pipeline (see :mod:`partime_async.programs.base` for the order
    the runner keeps). The :class:`StageLearner` holds what outlives a run (optimiser,
    scheduler, step count); this program is the run's: timing, spans, output checks.

    Spans (metrics on, where the host clock times the device's work): ``compute`` per
    forward, ``backward`` per owed backward, and ``step`` per optimiser step, from the
    optimiser's own step hooks (they run inside the backward, on the device's thread).
    """

    learns = True

    def __init__(self, plan: StagePlan, learner: StageLearner, stats: StageStats, *, spans: deque[Any] | None,
                 check_outputs: bool) -> None:
        super().__init__(plan)
        device = plan.device
        self.learner = learner
        learner.new_run()
        learner.graphed = None
        if device.graphs:
            if learner.graphable:
                learner.graphed = device.graph_learning(learner.module, name=plan.name)
            else:
                warnings.warn(f"{plan.name}: graphs=True does not apply to a stashed stage with a delay (it keeps "
                              f"{learner.delay + 1} frames' graphs at stashed weights; a CUDA graph has one set "
                              "of buffers): its learning runs eagerly; use mode='partime' to graph it, or pass "
                              "graphs=False to silence this", RuntimeWarning, stacklevel=2)
        self._timed, self._record = host_timing(plan, stats, spans)
        self._seq = -1  # the frame whose backward runs now (device thread): its step span's
        self._hooks: list[Any] = []
        check = output_checker(plan.name) if check_outputs else None

        counters = stats.counters
        counters["skipped_updates"] = 0

        def forward(item: Any, seq: int) -> tuple[Payload, Any]:
            y, loss = learner.forward(item, seq)
            if check is not None:
                try:
                    check(y, seq)
                except BaseException:
                    learner.reject(item)  # skipped here: no update may run through its graph
                    raise
            return y, loss

        def backward(item: Any, seq: int) -> tuple[int, Payload]:
            self._seq = seq
            skipped = learner.skipped_updates
            try:
                return learner.backward(item, seq)
            finally:
                counters["skipped_updates"] += learner.skipped_updates - skipped

        timed = self._timing(forward, "compute")

        def forward_or_pass(item: Any, seq: int) -> tuple[Payload, Any]:
            if item is SKIPPED:
                learner.pass_skipped()
                return SKIPPED, None
            return timed(item, seq)

        self.forward = forward_or_pass
        self.backward = self._timing(backward, "backward")

    def forward_input(self, job: Job) -> tuple[int, Payload, bool, Payload | None] | object:
        """``(key, x, learns, target)``: only the last stage is given the target; for a frame
        skipped before this stage, :data:`SKIPPED` (it only counts in the schedule)."""
        if job.skipped:
            return SKIPPED
        frame = job.frame
        return job.key, frame.data, self.learns_from(job), frame.target if self.plan.last else None

    def learns_from(self, job: Job) -> bool:
        return not job.skipped and self.learner.learns(job.frame.target is not None)

    def owes(self, job: Job) -> tuple[int, int] | None:
        return self.learner.owes(job.key, job.frame.seq, self.learns_from(job))

    def remaining(self) -> list[tuple[int, int]]:
        """``stashed`` applies every gradient still owed; ``partime`` has no newer graph left to
        carry them: it drops them and counts them (``learner.dropped_gradients``)."""
        owed = self.learner.remaining()
        if self.learner.config.mode == "partime":
            self.learner.dropped_gradients += len(owed)
            return []
        return owed

    def state(self, _: Any, seq: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """A copy of the stage's weights (keyed as the model's) and learner state."""
        return copy.deepcopy((self.plan.model_state(self.plan.module.state_dict()), self.learner.state_dict()))

    def attach(self) -> None:
        optimizer, record, index = self.learner.optimizer, self._record, self.plan.index
        if record is None or optimizer is None:
            return
        started = [0.0]

        def before(*_: Any) -> None:
            started[0] = now()

        def after(*_: Any) -> None:
            record((index, "step", self._seq, started[0], now()))

        self._hooks = [optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)]

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _timing(self, fn: Callable[[Any, int], Any], kind: str) -> Callable[[Any, int], Any]:
        """``fn`` with its host-clock time added to the busy time and, metrics on, recorded as a span."""
        stats, index, record = self._timed, self.plan.index, self._record

        def timed(payload: Any, seq: int) -> Any:
            t0 = now()
            try:
                return fn(payload, seq)
            finally:
                t1 = now()
                stats.busy_s += t1 - t0
                if record is not None:
                    record((index, kind, seq, t0, t1))

        return timed
