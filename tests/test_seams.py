"""The engine's three seams, used directly: a partitioner's plans, a program of one's own run by
the stage runner, and transport ends of one's own. What the pipeline builds from them is tested
everywhere else; here each seam is shown to take a new implementation without changing the runner."""
from __future__ import annotations

import asyncio

import pytest
import torch
from torch import nn

import partime_async as pa
from partime_async.aio import Channel
from partime_async.core.stats import StageStats
from partime_async.partition import SequentialSplit
from partime_async.pipeline.routes import Route
from partime_async.programs import InferProgram, StageProgram
from partime_async.stage import Stage, StageRunner
from partime_async.transport import GradBox, Inlet, Job, Outlet, local_link


def test_sequential_plans_name_the_values_crossing_each_cut_and_key_states_as_the_model():
    model = nn.Sequential()
    for name, layer in (("conv", nn.Linear(3, 4)), ("act", nn.ReLU()), ("head", nn.Linear(4, 2))):
        model.add_module(name, layer)
    plans = SequentialSplit(model).plans([2, 1], pa.cpu_devices(2, threads=1))
    assert [(p.inputs, p.outputs, p.units, p.last) for p in plans] == [
        (("input",), ("act",), 2, False), (("act",), ("head",), 1, True)]
    assert [p.name for p in plans] == ["stage 0 (cpu:0)", "stage 1 (cpu:1)"]
    assert plans[1].module[0] is model.head  # the model's own layer, not a copy
    merged = {key: value for plan in plans for key, value in plan.model_state(plan.module.state_dict()).items()}
    assert list(merged) == list(model.state_dict())


class Scale(StageProgram):
    """A program of its own: multiplies each frame by ``factor`` and notes the seqs it saw."""

    def __init__(self, plan, factor: float) -> None:
        super().__init__(plan)
        self.seen: list[int] = []

        def forward(x, seq):
            self.seen.append(seq)
            return x * factor

        self.forward = forward


class Recorder:
    """A send end of its own (a transport's): never has room at once, so the runner awaits send()."""

    def __init__(self) -> None:
        self.items: list[Job] = []
        self.closed = False
        self.aborted: BaseException | None = None

    def send_nowait(self, job: Job) -> bool:
        return False

    async def send(self, job: Job) -> None:
        await asyncio.sleep(0)
        self.items.append(job)

    def close(self) -> None:
        self.closed = True

    def abort(self, exc: BaseException) -> None:
        self.aborted = exc
        self.closed = True


@pytest.mark.parametrize("inline", [False, True])
async def test_the_runner_drives_a_program_of_its_own_over_ends_of_its_own(inline):
    model = nn.Sequential(nn.Identity(), nn.Linear(4, 4))
    devices = pa.cpu_devices(2, threads=1)
    plans = SequentialSplit(model).plans([1, 1], devices)
    loop = asyncio.get_running_loop()
    for device in devices:
        device.start(loop)
    try:
        stats = [StageStats(p.name, p.device.name, p.units) for p in plans]
        stages = [Stage(plans[0], Scale(plans[0], 2.0), stats[0], inline=inline),
                  Stage(plans[1], InferProgram(plans[1], stats[1], spans=None, check_outputs=True), stats[1])]
        ingress: Channel[Job] = Channel(4, name="ingress")
        outlet, inlet = local_link(2, name="after stage 0")
        sink = Recorder()
        runners = [StageRunner([stages[0]], Inlet(ingress), outlet), StageRunner([stages[1]], inlet, Outlet(sink))]
        xs = [torch.randn(1, 4) for _ in range(10)]

        async def feed() -> None:
            for seq, x in enumerate(xs):
                await ingress.send(Job(pa.Frame(seq, x), route=Route(), key=seq))
            ingress.close()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(feed())
            for runner in runners:
                tg.create_task(runner.run())
    finally:
        for device in devices:
            device.close()
    assert [job.frame.seq for job in sink.items] == list(range(10)) and sink.closed
    assert stages[0].program.seen == list(range(10)) and [s.frames for s in stats] == [10, 10]
    with torch.no_grad():
        assert all(torch.equal(job.frame.data, model[1](2.0 * x)) for job, x in zip(sink.items, xs))


async def test_a_program_that_raises_fails_the_run_naming_its_stage_and_frame_and_aborts_its_ends():
    devices = pa.cpu_devices(1, threads=1)
    plan = SequentialSplit([nn.Identity()]).plans([1], devices)[0]

    class Fails(StageProgram):
        def __init__(self, plan) -> None:
            super().__init__(plan)

            def forward(x, seq):
                if seq == 3:
                    raise ValueError("boom")
                return x

            self.forward = forward

    devices[0].start(asyncio.get_running_loop())
    ingress: Channel[Job] = Channel(8, name="ingress")
    for seq in range(5):
        ingress.send_nowait(Job(pa.Frame(seq, torch.zeros(1)), route=Route(), key=seq))
    ingress.close()
    sink, grads_back = Recorder(), GradBox("stage -1")
    runner = StageRunner([Stage(plan, Fails(plan), StageStats(plan.name, "cpu:0", 1))], Inlet(ingress, grads_back),
                         Outlet(sink))
    waiting = asyncio.ensure_future(grads_back.get(0, 0))  # the stage before, waiting for a gradient
    try:
        with pytest.raises(ExceptionGroup) as info:
            await runner.run()
    finally:
        devices[0].close()
    error = info.value.exceptions[0]
    assert isinstance(error, pa.PipelineError) and error.component == "stage 0 (cpu:0)" and error.seq == 3
    assert isinstance(error.__cause__, ValueError)
    # Both ends learn why the stream ended, not only that it did (a peer process needs to).
    assert sink.aborted is error and [job.frame.seq for job in sink.items] == [0, 1, 2]
    with pytest.raises(pa.PipelineError) as waited:
        await waiting
    assert waited.value is error
