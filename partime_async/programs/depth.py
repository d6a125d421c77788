"""Depth programs: a stage's layers solved in parallel in depth (:mod:`partime_async.depth`),
each frame's solve started from the previous frame's states.

:class:`DepthStack` is the stage's layers as one module whose forward runs them with a solver
(DeepPCR by default, its tolerance chosen by dtype: :data:`DEFAULT_TOL`). On the first frame
(and whenever the input's shape, dtype or device changes) it runs the layers once in
sequence, without autograd, to see which consecutive
layers map a tensor to one of the same shape and dtype: each such run of two or more layers
is solved, the layers around them (an encoder or a head that changes the shape) run as
usual. Each ``nn.Linear`` mapping a width to itself and the elementwise activation after it
are solved as one layer (:func:`~partime_async.depth.fuse`). Every solved run keeps its
latest states and starts the next frame's solve from them (a warm start: consecutive frames
of a stream are close, so Newton needs a step or two instead of several).

* :class:`DepthProgram` infers: the stack under no-grad on each frame, timed, spanned and
  checked as :class:`~partime_async.programs.InferProgram` does (never as CUDA graphs: how
  many steps a solve takes depends on the data).
* :class:`DepthLearnProgram` learns: a :class:`~partime_async.programs.LearnProgram` whose
  learner's module is a :class:`DepthStack` (the solve's output is differentiable, its
  backward is the solver's adjoint solve), so the modes, their deterministic schedule, the
  optimiser and checkpoints are those of every learning stage.

Counted in the stage's ``stats.counters`` (totals over the run): ``solver_frames`` (forwards
that went through the stack), ``solver_iterations`` (Newton steps or Jacobi sweeps, all
solved runs together) and ``solver_fallbacks`` (solves that ran their layers in sequence
instead). Spans (metrics on, on a device that the host clock times), inside the frame's
``compute`` span: ``iterate``, one per step, and ``fallback``, the sequential run after a
solve that did not converge.
"""
from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..core.frame import Payload
from ..core.stats import StageStats
from ..depth import DeepPCR, Solver, fuse
from ..partition import StagePlan
from .base import Record, StageProgram, calls, host_timing, timed_inference
from .learn import LearnProgram
from .online import StageLearner

COUNTERS = ("solver_frames", "solver_iterations", "solver_fallbacks")

DEFAULT_TOL: dict[torch.dtype, float] = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2,
                                         torch.bfloat16: 1e-2}
"""The solvers' ``tol`` where none is given, by the dtype of the states: a few hundred times
the rounding of O(1) states (a finer one cannot be certified: see
:class:`~partime_async.depth.Solver`)."""


class DepthStack(nn.Module):
    """``layers`` (a stage's module: an ``nn.Sequential``'s children are its layers; any
    other module is one layer) as one module whose forward solves its runs of shape-keeping
    layers (see the module docstring). Its parameters are the layers' own (registered under
    ``layers.``), so an optimiser or a ``functional_call`` reaches them.

    Args:
        layers: the stage's module.
        solver: the solver class, :class:`~partime_async.depth.DeepPCR` or
            :class:`~partime_async.depth.Jacobi`.
        tol: its tolerance; None: :data:`DEFAULT_TOL` for the dtype of the run's input.
        max_iters: its cap on steps (None: the run's number of layers).
        min_run: the fewest consecutive shape-keeping layers that are solved.

    Set by a program: ``counters`` (a dict the forward adds its counts to), ``record`` (called
    as ``record(kind, t0, t1)`` for each solver step and fallback) and ``seq`` (the frame,
    for the caller's spans).
    """

    def __init__(self, layers: nn.Module, solver: type[Solver] = DeepPCR, *, tol: float | None = None,
                 max_iters: int | None = None, min_run: int = 2) -> None:
        super().__init__()
        if not (isinstance(solver, type) and issubclass(solver, Solver)):
            raise TypeError(f"solver must be a depth solver class (DeepPCR or Jacobi), got {solver!r}")
        if min_run < 2:
            raise ValueError(f"min_run must be >= 2 (a single layer gains nothing from a solve), got {min_run}")
        self.layers = layers
        self.solver = solver
        self.tol = tol
        self.max_iters = max_iters
        self.min_run = min_run
        self.calls = fuse(calls(layers))
        self.counters: dict[str, float] | None = None
        self.record: Callable[[str, float, float], None] | None = None
        self.seq = -1
        self._signature: Any = None
        self._pieces: list[tuple[tuple[Callable[[Payload], Payload], ...], Solver | None]] = []
        self._warm: list[Tensor | None] = []
        self.last: tuple[int, int] = (0, 0)  # the latest forward's (iterations, fallbacks)

    @property
    def solvers(self) -> list[Solver]:
        """The solvers of the solved runs, for the latest input signature (empty before the first frame)."""
        return [solver for _, solver in self._pieces if solver is not None]

    def forward(self, x: Payload) -> Payload:
        signature = (tuple(x.shape), x.dtype, x.device) if isinstance(x, Tensor) else type(x)
        if signature != self._signature:
            self._pieces = self._split(x)
            self._warm = [None] * len(self._pieces)
            self._signature = signature
        iterations = fallbacks = 0
        for k, (layers, solver) in enumerate(self._pieces):
            if solver is None:
                for layer in layers:
                    x = layer(x)
                continue
            init = self._warm[k]
            if init is not None and (init.shape[1:] != x.shape or init.dtype != x.dtype or init.device != x.device):
                init = None  # (only a layer whose output shape depends on the data gets here)
            solution = solver.solve(x, init=init)
            self._warm[k] = solution.states.detach()
            x = solution.output
            iterations += solution.iterations
            fallbacks += solution.fallback
        self.last = (iterations, fallbacks)
        counters = self.counters
        if counters is not None:
            counters["solver_frames"] = counters.get("solver_frames", 0.0) + 1
            counters["solver_iterations"] = counters.get("solver_iterations", 0.0) + iterations
            counters["solver_fallbacks"] = counters.get("solver_fallbacks", 0.0) + fallbacks
        return x

    def _split(self, x: Payload) -> list[tuple[tuple[Callable[[Payload], Payload], ...], Solver | None]]:
        """The layers as runs: ``(layers, solver)`` for a run of at least ``min_run`` layers that
        keep the shape and dtype of a tensor like ``x`` (found by running them once, without
        autograd), ``(layers, None)`` for the others."""
        # Per layer, the dtype it keeps (None: it does not keep its input's shape and dtype); a
        # run's default tolerance goes by it.
        keeps: list[torch.dtype | None] = []
        with torch.no_grad():
            z = x
            for layer in self.calls:
                y = layer(z)
                same = (isinstance(z, Tensor) and isinstance(y, Tensor) and y.shape == z.shape
                        and y.dtype == z.dtype and y.device == z.device and z.is_floating_point())
                keeps.append(z.dtype if same else None)
                z = y
        pieces: list[tuple[tuple[Callable[[Payload], Payload], ...], Solver | None]] = []
        i, n = 0, len(self.calls)
        while i < n:
            j = i + 1
            while j < n and keeps[j] == keeps[i]:
                j += 1
            run = tuple(self.calls[i:j])
            dtype = keeps[i]
            if dtype is not None and len(run) >= self.min_run:
                tol = self.tol if self.tol is not None else DEFAULT_TOL.get(dtype, 1e-10)
                solver = self.solver(run, tol=tol, max_iters=self.max_iters)
                solver.observer = self._observe
                pieces.append((run, solver))
            elif pieces and pieces[-1][1] is None:
                pieces[-1] = (pieces[-1][0] + run, None)
            else:
                pieces.append((run, None))
            i = j
        return pieces

    def _observe(self, kind: str, t0: float, t1: float) -> None:
        record = self.record
        if record is not None:
            record(kind, t0, t1)


class DepthProgram(StageProgram):
    """Inference with the stage's layers solved in depth (a :class:`DepthStack` of
    ``plan.module`` with ``solver``, ``tol`` and ``max_iters``): the stack under no-grad on each frame; its output
    checked against its first (``check_outputs``); its busy time in ``stats`` and, with
    ``spans`` (metrics on), a ``compute`` span per frame with the solver's ``iterate`` and
    ``fallback`` spans inside, where the host clock times the device's work; the solver's
    counts in ``stats.counters`` (always)."""

    def __init__(self, plan: StagePlan, stats: StageStats, *, spans: deque[Any] | None, check_outputs: bool,
                 solver: type[Solver] = DeepPCR, tol: float | None = None, max_iters: int | None = None) -> None:
        super().__init__(plan)
        if plan.device.graphs:
            warnings.warn(f"{plan.name}: graphs=True does not apply to a stage solved in depth (how many steps a "
                          "solve takes depends on the data): it runs eagerly", RuntimeWarning, stacklevel=2)
        self.stack = stack = DepthStack(plan.module, solver, tol=tol, max_iters=max_iters)
        for name in COUNTERS:
            stats.counters.setdefault(name, 0.0)
        stack.counters = stats.counters
        stack.record = _solver_spans(host_timing(plan, stats, spans)[1], plan.index, stack)

        def solve(x: Payload, seq: int) -> Payload:
            stack.seq = seq
            return stack(x)

        self.forward = timed_inference(plan, stats, spans, check_outputs, solve)


class DepthLearnProgram(LearnProgram):
    """Learning with the stage's layers solved in depth: a :class:`LearnProgram` whose
    learner was made on a :class:`DepthStack` of the stage's module, i.e.
    ``StageLearner(config, DepthStack(plan.module, solver, tol=...), stage, n_stages)``. The modes,
    schedule, optimiser, spans and checkpoints are :class:`LearnProgram`'s; the forward
    solves, the backward is the solver's adjoint solve; ``stats.counters`` gets the solver's
    counts and the trace its ``iterate`` and ``fallback`` spans. Never CUDA graphs. With
    ``stashed`` and ``recompute=True`` the recomputed forward solves again (counted) and
    leaves the older frame's states as the next warm start."""

    def __init__(self, plan: StagePlan, learner: StageLearner, stats: StageStats, *, spans: deque[Any] | None,
                 check_outputs: bool) -> None:
        stack = learner.module
        if not isinstance(stack, DepthStack):  # (made on the first run's module: the same layers)
            raise TypeError(f"{plan.name}: a DepthLearnProgram needs a learner made on DepthStack(plan.module, "
                            f"solver), got one on {type(stack).__name__}")
        graphs = plan.device.graphs
        super().__init__(plan, learner, stats, spans=spans, check_outputs=check_outputs)
        if graphs:
            learner.graphed = None
            warnings.warn(f"{plan.name}: graphs=True does not apply to a stage solved in depth (how many steps a "
                          "solve takes depends on the data): its learning runs eagerly", RuntimeWarning,
                          stacklevel=2)
        self.stack = stack
        self._stats = stats
        for name in COUNTERS:
            stats.counters.setdefault(name, 0.0)
        forward = self.forward

        def solved(item: Any, seq: int) -> Any:
            stack.seq = seq
            return forward(item, seq)

        self.forward = solved

    def attach(self) -> None:
        super().attach()
        self.stack.counters = self._stats.counters
        self.stack.record = _solver_spans(self._record, self.plan.index, self.stack)

    def detach(self) -> None:
        super().detach()
        self.stack.counters = None
        self.stack.record = None


def _solver_spans(record: Record | None, index: int, stack: DepthStack) -> Callable[[str, float, float], None] | None:
    """The solver's steps and fallbacks as spans of the frame the stack is solving (None
    where no spans are recorded)."""
    if record is None:
        return None

    def spans(kind: str, t0: float, t1: float) -> None:
        record((index, kind, stack.seq, t0, t1))

    return spans
