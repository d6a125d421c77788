"""Building a run when its first frame arrives: the split, the plans, the programs, the
transports and the runners.

1. **Plan.** ``balance="time"`` profiles every unit of the model on each kind of device on
   the frame, then takes the optimal min-max split; the partitioner checks that no tensor
   is shared where that cannot work and places each stage's module on its device.
2. **Learners** (learning pipelines, first run only: a restart keeps the optimisers).
3. **Inline stages** (inference): each stage is timed on the frame; a CPU stage with
   ``inline="auto"`` that is cheaper than a measured thread hand-off runs on the loop.
4. **Stages and runners.** A program per stage; consecutive threaded CPU stages that infer
   share one runner and hand frames on through a thread chain; the other runners are joined
   by local links (a channel forward, a gradient box back), the first fed by the ingress,
   the last delivering through the egress.
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import statistics
from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from ..aio.threads import in_thread, to_the_end
from ..core.errors import PipelineError, StageFailed
from ..core.frame import Payload, now
from ..core.stats import StageStats
from ..core.validation import InputSpec
from ..depth import Solver
from ..devices import Device
from ..partition import LayerFailed, Partitioner, StagePlan, min_max_partition, time_module
from ..programs import (
    DepthLearnProgram,
    DepthProgram,
    DepthStack,
    InferProgram,
    LearnProgram,
    OnlineLearning,
    StageLearner,
    StageProgram,
    WidthProgram,
)
from ..ranks.device import RankDevice
from ..stage import OnError, OnFailure, Replica, Stage, StageRunner
from ..transport import Inlet, Outlet, Sender, local_link
from ..width import SplitLayer
from .admission import SkipFrame
from .config import initial_balance
from .delivery import Egress
from .run import Run
from .state import PipelineState


@dataclass(frozen=True)
class BuildSettings:
    """What the pipeline's arguments say about building its runs (``depth``: the solver class
    of each stage whose layers are solved in depth, by stage index; ``width``: the stages run
    split in width, or True for every stage that holds width-split layers; ``replicas``: every
    device of each replicated stage, by stage index)."""

    devices: Sequence[Device]
    learning: OnlineLearning | None
    input_spec: InputSpec | Literal["first"] | None
    check_outputs: bool
    on_error: OnError
    capacity: int
    window: int
    depth: Mapping[int, type[Solver]] = field(default_factory=dict)
    width: bool | frozenset[int] = False
    replicas: Mapping[int, tuple[Device, ...]] = field(default_factory=dict)


async def build(settings: BuildSettings, state: PipelineState, run: Run, sample: Payload, seq: int | None,
                request: bool) -> None:
    """Build ``run``'s stages from its first frame ``sample`` (frame ``seq``, or request
    ``seq`` of a ``submit()`` where ``request``; None: a ``start(sample)``) and start their
    runners in the run's task group. Once per run: a second call returns at once. Raises a
    :class:`PipelineError` naming what failed, :class:`SkipFrame` (``on_error="skip"``, a
    streamed frame the model failed on), or the run's error if it ended meanwhile (this
    frame waited for another's build, or the run closed the devices under this one)."""
    admission = run.admission
    async with run.build_lock:
        if admission.built:
            return
        run.check_running()
        try:
            plans, inline = await _plan(settings, state, sample)
            stages = [_stage(plan, inline, settings, state, run.spans)
                      for plan, inline in zip(plans, inline, strict=True)]
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or not task.cancelling():
                run.check_running()  # not this caller's cancellation: the run ended under it
            raise
        except (LayerFailed, StageFailed) as exc:  # the model raised on this frame
            if isinstance(exc, LayerFailed):  # profiling: the split is not known yet, the layer is
                cause, what, component = exc.__cause__, "profiling the model", str(exc)
            else:
                cause, what = exc.error, "timing the stage"
                component = f"stage {exc.stage} ({settings.devices[exc.stage].name})"
            error = PipelineError(f"{type(cause).__name__}: {cause} (while {what} on its first frame)",
                                  component=component, seq=seq, request=request)
            error.__cause__ = cause
            if settings.on_error == "skip" and seq is not None:  # a streamed frame: skipped like any other
                raise SkipFrame(error) from cause
            raise error from cause
        except Exception as exc:
            raise PipelineError(f"{type(exc).__name__}: {exc} (while splitting the model on its first frame)",
                                component="pipeline set-up", seq=seq, request=request) from exc
        run.install(stages, _connect(stages, Inlet(admission.ingress), Egress(run, state), settings, run.fail))
        admission.open(InputSpec.like(sample) if settings.input_spec == "first" else settings.input_spec,
                       cut_parts=len(stages) if settings.learning is not None else 0)


async def _plan(settings: BuildSettings, state: PipelineState, sample: Payload) -> tuple[list[StagePlan], list[bool]]:
    """Choose the balance (profiling if asked), place the stages, make the learners, choose
    the inline stages; the plans, and for each whether it runs inline."""
    devices, split = settings.devices, state.partitioner
    prepare = getattr(split, "prepare", None)
    if prepare is not None:  # a graph is captured on its first frame (off the loop: it takes a while)
        await in_thread(prepare, sample)
        state.sample = sample  # a serving rank captures it on the same
        if state.balance is None and state.requested != "time":
            state.balance = initial_balance(state.requested, split, devices)
    if state.balance is None:
        costs = await _profile(split, devices, sample)
        # A stage on n replicas does n frames at a time: each of its layers costs 1/n of a frame.
        costs = [[c / len(settings.replicas.get(k, (d,))) for c in row]
                 for k, (row, d) in enumerate(zip(costs, devices, strict=True))]
        state.balance = min_max_partition(costs, len(devices))
    split.check_shared(state.balance, learning=settings.learning is not None,
                       one_device=len({d.torch_device for d in devices}) == 1)
    plans = split.plans(state.balance, devices)
    state.modules = [plan.module for plan in plans]
    for before, after in itertools.pairwise(plans):
        if before.outputs != after.inputs:
            raise RuntimeError(f"the partitioner's stages do not join: stage {before.index} gives {before.outputs}, "
                               f"stage {after.index} takes {after.inputs}")
    inline = [False] * len(plans)  # a learning stage keeps graphs between its own calls: never inline
    learning = settings.learning
    if learning is not None:
        if not state.learners:  # a restarted pipeline keeps its optimisers' state
            # Off the loop: the first optimiser a process makes imports torch._dynamo
            # (1-2 s, during which the loop would serve nothing else).
            state.learners = await in_thread(_learners, plans, settings)
        state.load_pending()
    else:
        inline = await _choose_inline(plans, sample, never={*settings.depth, *_split_in_width(plans, settings),
                                                            *settings.replicas})
    # Weights moved and buffers restored on whatever stream each step used: done before
    # the stages' own streams read them (set-up only; streaming never synchronises).
    for device in devices:
        device.synchronize()
    return plans, inline


def _learners(plans: Sequence[StagePlan], settings: BuildSettings) -> list[StageLearner]:
    """One learner per stage (a stage solved in depth learns through its solver)."""
    assert settings.learning is not None
    depth, n = settings.depth, len(plans)
    return [StageLearner(settings.learning, DepthStack(plan.module, depth[plan.index]) if plan.index in depth
                         else plan.module, plan.index, n) for plan in plans]


def serve_stage(settings: BuildSettings, state: PipelineState, index: int, balance: list[int],
                saved: Mapping[str, Any]) -> Stage:
    """Stage ``index`` of the split ``balance``, on this (serving) rank, for a run of the
    driving rank (:mod:`partime_async.ranks.serve`, on its thread): the same program the
    driving rank's own build makes, holding the weights and learner state it sent (``saved``:
    ``{"module": ..., "learner": ...}``)."""
    split = state.partitioner
    prepare = getattr(split, "prepare", None)
    if prepare is not None and saved.get("sample") is not None:
        prepare(saved["sample"])  # a graph: captured on the driving rank's first frame
    state.balance = split.check_balance(balance, len(settings.devices))
    plans = split.plans(state.balance, settings.devices)
    state.modules = [plan.module for plan in plans]
    if settings.learning is not None and not state.learners:
        state.learners = _learners(plans, settings)
    plan = plans[index]
    plan.module.load_state_dict(saved["module"])
    if saved["learner"] is not None:
        state.learners[index].load_state_dict(saved["learner"])
    plan.device.synchronize()
    return _stage(plan, False, settings, state, None)


async def _profile(split: Partitioner, devices: Sequence[Device], sample: Payload) -> list[list[float]]:
    """Per-device rows of per-unit seconds; devices of one kind are profiled once.

    Buffers are restored (profile_layers). The random-number generators are not: a model
    with random layers draws from them here as in any forward. Restoring them after
    these awaits would rewind the draws that other tasks and threads made meanwhile.
    """
    rows: dict[Hashable, list[float]] = {}
    for device in devices:
        key = device.profile_key
        if key not in rows:
            split.to(device.torch_device)
            # To its end, even for a cancelled caller: the layers are not to be moved
            # or used again while the worker still profiles them.
            rows[key], _ = await to_the_end(device.submit(lambda x, _: split.profile(x), sample))
    return [rows[d.profile_key] for d in devices]


async def _choose_inline(plans: Sequence[StagePlan], sample: Payload, never: Any = ()) -> list[bool]:
    """For each stage, whether it runs on the loop thread: where its device says so, or may
    (``inline_mode="auto"``) and the stage is cheaper than a measured thread hand-off; the
    stages in ``never`` (solved in depth: the plain layers timed here are not what they run)
    do not."""
    auto = [plan.index for plan in plans if plan.device.inline_mode == "auto" and plan.index not in never]
    inline = [plan.device.inline_mode is True and plan.index not in never for plan in plans]
    if not auto:
        return inline
    handoff = await _handoff_seconds(plans[auto[0]].device)
    x = sample
    for k, plan in enumerate(plans):
        device = plan.device
        if isinstance(device, RankDevice):  # from here on, frames go to another rank: timed no further
            break

        def timed(v: Payload, _: int, m: nn.Module = plan.module) -> tuple[float, Payload]:
            return time_module(m, v)

        try:
            (seconds, x), ready = await to_the_end(device.submit(timed, x))
        except Exception as exc:
            cause = exc.__cause__ if isinstance(exc, LayerFailed) else exc
            assert cause is not None  # a LayerFailed is raised from the layer's error
            raise StageFailed(k, cause) from cause
        if k in auto:
            # After a stage whose results are not on the host (a GPU's), the input's event is
            # waited for off the loop, which costs a thread hop anyway: run on the worker thread.
            after_device = k > 0 and not plans[k - 1].device.on_host
            inline[k] = seconds < handoff and not after_device
        if not device.on_host and k + 1 < len(plans):
            x = await device.download(x, ready)
    return inline


async def _handoff_seconds(device: Device, repeats: int = 41) -> float:
    """Median round trip of an empty job through ``device``'s worker thread and the loop."""
    samples = []
    for _ in range(repeats):
        t0 = now()
        await device.submit(_noop, None)
        samples.append(now() - t0)
    return statistics.median(samples)


def _noop(x: Any, seq: int) -> Any:
    return x


def _stage(plan: StagePlan, inline: bool, settings: BuildSettings, state: PipelineState,
           spans: deque[Any] | None) -> Stage:
    """The stage of ``plan`` in a run whose span ring is ``spans``: its statistics and its
    program. A stage on another rank is built there too, from this rank's weights."""
    device = plan.device
    stats = StageStats(plan.name, device.name, plan.units, inline=inline)
    device.record_into(plan.index, stats, spans)  # where a device that times its own work records it
    program: StageProgram
    solver = settings.depth.get(plan.index)
    if state.learners:
        learn = LearnProgram if solver is None else DepthLearnProgram
        program = learn(plan, state.learners[plan.index], stats, spans=spans, check_outputs=settings.check_outputs)
    elif solver is not None:
        program = DepthProgram(plan, stats, spans=spans, check_outputs=settings.check_outputs, solver=solver)
    elif plan.index in _split_in_width([plan], settings):
        program = WidthProgram(plan, stats, spans=spans, check_outputs=settings.check_outputs)
    else:
        program = InferProgram(plan, stats, spans=spans, check_outputs=settings.check_outputs)
    if plan.index in settings.replicas:
        stats.replicas = [StageStats(plan.name, d.name, plan.units) for d in settings.replicas[plan.index]]
        for d, r in zip(settings.replicas[plan.index], stats.replicas, strict=True):
            d.record_into(plan.index, r, spans)  # a device that times its own work: each replica's
        replicas = tuple(Replica(d, InferProgram(_on(plan, d), r, spans=spans, check_outputs=settings.check_outputs), r)
                         for d, r in zip(settings.replicas[plan.index], stats.replicas, strict=True))
        return Stage(plan, replicas[0].program, stats, inline, replicas)
    if isinstance(device, RankDevice):
        assert state.balance is not None  # chosen before the stages are built
        device.bind(plan.index, program, list(state.balance),
                    state.learners[plan.index].state_dict() if state.learners else None, state.sample)
    return Stage(plan, program, stats, inline)


def _on(plan: StagePlan, device: Device) -> StagePlan:
    """``plan`` run on ``device``, a replica of its stage: the same module where the device's
    memory is the same, a copy of it moved there otherwise (another GPU)."""
    if device.torch_device == plan.device.torch_device:
        return dataclasses.replace(plan, devices=(device,))
    return dataclasses.replace(plan, devices=(device,), module=copy.deepcopy(plan.module).to(device.torch_device))


def _split_in_width(plans: Sequence[StagePlan], settings: BuildSettings) -> set[int]:
    """The stages of ``plans`` that run split in width: named by ``width=``, or with
    ``width=True`` those whose module holds width-split layers (of a RePurpose plan)."""
    if settings.width is True:
        return {p.index for p in plans if any(isinstance(m, SplitLayer) for m in p.module.modules())
                and p.index not in settings.depth}
    return {p.index for p in plans if p.index in (settings.width or ())}


def _connect(stages: Sequence[Stage], inlet: Inlet, egress: Sender[Any], settings: BuildSettings,
             on_failure: OnFailure) -> list[StageRunner]:
    """The runners of ``stages``, joined by local links: consecutive threaded CPU stages that
    infer become one runner over a thread chain (worker-to-worker hand-off); every other
    stage runs on its own. A runner that fails on a frame reports it to ``on_failure``."""
    segments: list[list[Stage]] = []
    for stage in stages:
        if _chains(stage) and segments and _chains(segments[-1][-1]):
            segments[-1].append(stage)
        else:
            segments.append([stage])
    runners = []
    learning = settings.learning is not None
    for i, segment in enumerate(segments):
        k = segment[-1].plan.index
        if i + 1 < len(segments):
            outlet, after = local_link(settings.capacity, name=f"after stage {k}",
                                       grads=f"stage {k}" if learning else None)
        else:
            outlet, after = Outlet(egress), None
        runners.append(StageRunner(segment, inlet, outlet, window=settings.window, on_error=settings.on_error,
                                   on_failure=on_failure))
        if after is not None:
            inlet = after
    return runners


def _chains(stage: Stage) -> bool:
    """Whether ``stage`` hands frames on from its worker thread (a thread chain)."""
    return stage.device.chainable and not stage.inline and not stage.program.learns and not stage.replicas
