"""The program seam: what a stage does with one frame.

A :class:`StageProgram` is given its stage's plan (module, device) when a run is built, and
is driven by a runner (:mod:`partime_async.stage`), which owns the order, the transports and
the error rules. The runner calls ``program.attach()`` before the first frame of the run and
``program.detach()`` after the last, and for each job, in frame order:

* a program that infers (``learns = False``): submits ``program.forward(x, seq)`` to the
  stage's device, ``x`` the frame's payload; the device runs it on its thread (or on the loop
  thread for an inline stage; several inferring stages on threaded CPU devices may be
  chained worker to worker) and it returns the stage's output;
* a program that learns (``learns = True``): on the loop thread ``item =
  program.forward_input(job)``, then submits ``program.forward(item, seq)``, which returns
  ``(output, loss)`` (the loss, the last stage's, or None). Right after, on the loop thread,
  ``program.owes(job)`` says the ``(key, seq)`` of the job whose gradient is now owed, if
  any: the runner waits for that gradient (from the next stage) and submits
  ``program.backward((key, grad), seq)``, which applies it and returns ``(key, grad_in)``
  for the stage before. Submissions reach the device strictly in the order
  forward(t), backward(owed at t), forward(t + 1), …: that order, not timing, is what makes
  learning deterministic. At the end of the stream ``program.remaining()`` lists the owed
  gradients still to apply (a program that drops them instead counts them itself), and
  ``program.state(None, seq)`` (on the device, in order with the rest) copies the stage's
  weights and learner state for a checkpoint cut. Where a stage has no gradient to apply
  (the frame was skipped further down, or its forward here failed) the runner or the
  backward passes :data:`~partime_async.core.job.NO_GRADIENT` instead, and the update is
  skipped. A frame a stage before skipped comes as a marker (``job.skipped``): its
  ``forward`` only counts it (no data, no loss), and ``learns_from(job)`` is False.

``forward`` (and ``backward``) are plain callables built once: they run per frame and per
stage, so they are closures rather than methods (every attribute look-up counts on a hop of
a few microseconds). A program that solves its layers another way (DeepPCR, Jacobi) or runs
a width-split block plugs in here, without touching the runner.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.frame import Payload, now
from ..core.job import Job
from ..core.stats import StageStats
from ..core.validation import InputSpec
from ..devices import Work
from ..partition import StagePlan

Record = Callable[[tuple[int, str, int, float, float]], None]
"""Appends one span ``(stage, kind, seq, t0, t1)`` to the run's ring."""


class StageProgram:
    """What one stage computes; see the module docstring for the runner's side."""

    learns: ClassVar[bool] = False
    forward: Work
    backward: Work
    state: Work

    def __init__(self, plan: StagePlan) -> None:
        self.plan = plan

    def forward_input(self, job: Job) -> Any:
        """What :attr:`forward` of a program that learns gets for ``job`` (loop thread)."""
        return job.frame.data

    def learns_from(self, job: Job) -> bool:
        """Whether ``job``'s frame will contribute a gradient at this stage (loop thread)."""
        return False

    def owes(self, job: Job) -> tuple[int, int] | None:
        """The ``(key, seq)`` whose gradient is owed after ``job``'s forward (loop thread)."""
        return None

    def remaining(self) -> list[tuple[int, int]]:
        """At the end of the stream: the ``(key, seq)`` whose owed gradient is still to apply,
        oldest first (loop thread)."""
        return []

    def attach(self) -> None:
        """The run starts driving this program (hooks it needs while running go on here)."""

    def detach(self) -> None:
        """The run has ended (undo :meth:`attach`)."""


def calls(module: nn.Module) -> tuple[nn.Module, ...]:
    """The calls that compute ``module(x)`` one after another: an ``nn.Sequential``'s children
    (as it would call them, minus its own call overhead, which is most of a cheap hop), or
    the module itself."""
    return tuple(module) if type(module) is nn.Sequential else (module,)


def host_timing(plan: StagePlan, stats: StageStats, spans: Any) -> tuple[StageStats, Record | None]:
    """Where a program's host-clock timings go: the stage's ``stats`` and the run's span ring
    (``spans``, None with metrics off) on a device that the host clock times; on a device that
    times its own work (CUDA, where host clocks would time the launches), a throwaway counter
    and no spans: the device records both itself."""
    if plan.device.host_timed:
        return stats, (spans.append if spans is not None else None)
    return StageStats(stats.name, stats.device, 0), None


def timed_inference(plan: StagePlan, stats: StageStats, spans: Any, check_outputs: bool, body: Work) -> Work:
    """``body(x, seq)`` as a stage's inference ``forward``: under no-grad, its host-clock time
    in the busy time and (``spans``) a ``compute`` span where the host clock times the device
    (:func:`host_timing`), its output checked against its first (``check_outputs``). For
    programs whose work per frame is large (:class:`~partime_async.programs.infer.InferProgram`
    builds the same inline: one call less per frame is most of a cheap hop)."""
    timed, record = host_timing(plan, stats, spans)
    check = output_checker(plan.name) if check_outputs else None
    index = plan.index

    def forward(x: Payload, seq: int) -> Payload:
        t0 = now()
        with torch.no_grad():
            y = body(x, seq)
        t1 = now()
        timed.busy_s += t1 - t0
        if record is not None:
            record((index, "compute", seq, t0, t1))
        if check is not None:
            check(y, seq)
        return y

    return forward


def output_checker(name: str) -> Callable[[Payload, int], None]:
    """``check(y, seq)``: the stage's first output fixes the structure, shapes, dtypes and
    device of every later one; a frame whose output differs gets a :class:`FrameError`
    (a model whose output changes mid-stream would otherwise corrupt the next stage or a
    sink far from the cause). Called on the thread that ran the stage, one at a time."""
    spec: list[InputSpec | None] = [None]
    component, hint = f"{name} output", (
        " (a stage's output must keep the structure, shapes and dtypes of its first output; "
        "if it varies by design, pass output_spec=None to the Pipeline)")

    def check(y: Payload, seq: int) -> None:
        if spec[0] is None:
            spec[0] = InputSpec.like(y)
        else:
            spec[0].check(y, seq, component=component, hint=hint)

    return check
