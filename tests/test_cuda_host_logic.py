"""CudaDevice's host-side logic on a machine without a GPU: stand-in streams and events.

What this covers: the control flow that the GPU tests (tests/gpu) would otherwise be the first
to run — tickets handed on at launch with their event, the depth gate, events recycled by the
waiter thread, spans from timing events, learning (loss downloaded through the event), errors
at launch, thread clean-up. What it does not: anything a GPU does (copies, streams, kernels,
allocators). The stand-ins: a stream is a no-op, an event completes a little after it is
recorded (``synchronize`` sleeps until then), and the device's tensors stay on the CPU.
"""
import asyncio
import contextlib
import threading
import time
from collections import Counter

import pytest
import torch
from torch import nn

import partime_async as pa
from pa_helpers import FailOn, marked
from partime_async import devices as D

LATENCY = 0.0005  # seconds from an event's record to its completion


class StandInStream:
    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass


class StandInEvent:
    created = 0

    def __init__(self, enable_timing: bool = False, blocking: bool = False) -> None:
        StandInEvent.created += 1
        self.t: float | None = None

    def record(self, stream=None) -> None:
        self.t = time.perf_counter() + LATENCY

    def query(self) -> bool:
        return self.t is None or time.perf_counter() >= self.t

    def synchronize(self) -> None:
        if self.t is not None:
            time.sleep(max(0.0, self.t - time.perf_counter()))

    def elapsed_time(self, end: "StandInEvent") -> float:
        if not (self.query() and end.query()):
            raise RuntimeError("cudaErrorNotReady")  # what CUDA says of an incomplete event
        return (end.t - self.t) * 1e3


class HostCuda(D.CudaDevice):
    """A CudaDevice whose tensors stay on the host (the stand-ins do the rest)."""

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        super().start(loop)
        self.torch_device = torch.device("cpu")


@pytest.fixture(autouse=True)
def stand_ins(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: StandInStream())
    monkeypatch.setattr(torch.cuda, "Event", StandInEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: StandInStream())
    yield
    assert not [t for t in threading.enumerate() if t.name.startswith("partime-")]


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.ReLU()) for _ in range(6)]).eval()


async def stream(pipe: pa.Pipeline, xs) -> list[pa.Frame]:
    async with pipe:
        return [f async for f in pipe.stream(xs)]


@pytest.mark.parametrize("metrics", [True, False])
async def test_inference_exact_in_order_with_spans_and_bounded_events(metrics):
    model, xs = mlp(), [torch.randn(1, 32) for _ in range(60)]
    with torch.no_grad():
        expected = [model(x) for x in xs]
    devices = [HostCuda(0), HostCuda(0)]
    pipe = pa.Pipeline(model, devices=devices, balance=[3, 3], metrics=metrics)  # output checks on
    outs = await stream(pipe, xs)
    assert [f.seq for f in outs] == list(range(60))
    assert all(torch.equal(o.data, e) for o, e in zip(outs, expected))
    if metrics:  # every frame's compute on both stages and its download, recorded before stop returned
        kinds = Counter((s.stage, s.kind) for s in pipe.spans() if s.stage >= 0)
        assert kinds == {(0, "compute"): 60, (1, "compute"): 60, (1, "d2h"): 60}
    assert all(d.events.created <= 32 and len(d.events._free) == d.events.created for d in devices)
    assert all(len(d.timing._free) == d.timing.created for d in devices)


async def test_mixed_gpu_then_cpu_stages():
    model, xs = mlp(), [torch.randn(1, 32) for _ in range(30)]
    with torch.no_grad():
        expected = [model(x) for x in xs]
    outs = await stream(pa.Pipeline(model, devices=[HostCuda(0), pa.CpuDevice(0, threads=1)], balance=[3, 3]), xs)
    assert all(torch.equal(o.data, e) for o, e in zip(outs, expected))


@pytest.mark.parametrize("mode, steps", [("partime", [28, 30]), ("stashed", [30, 30]), ("sequential", [30])])
async def test_learning_every_stage_learns_with_every_span(mode, steps):
    model = mlp().train()
    learning = pa.OnlineLearning(loss=nn.MSELoss(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05), mode=mode)
    balance = [6] if mode == "sequential" else [3, 3]  # sequential: the whole model on one device
    pipe = pa.Pipeline(model, devices=[HostCuda(0) for _ in balance], balance=balance, learning=learning)
    g = torch.Generator().manual_seed(1)
    frames = [pa.Frame(t, torch.randn(1, 32, generator=g), target=torch.randn(1, 32, generator=g)) for t in range(30)]
    outs = await stream(pipe, frames)
    assert [learner.steps for learner in pipe.learners] == steps
    assert all(isinstance(f.meta["loss"], float) for f in outs)
    backward = Counter(s.stage for s in pipe.spans() if s.kind == "backward")
    assert backward == dict(enumerate(steps))  # the drain's last backward included


async def test_error_at_launch_names_stage_and_frame_and_cleans_up():
    model = nn.Sequential(nn.Identity(), FailOn(7))
    xs = [marked(i) for i in range(20)]
    with pytest.raises(pa.PipelineError) as info:
        await stream(pa.Pipeline(model, devices=[HostCuda(0), HostCuda(0)], balance=[1, 1]), xs)
    assert info.value.component.startswith("stage 1") and info.value.seq == 7
    assert len(asyncio.all_tasks()) == 1


async def test_ticket_is_handed_on_at_launch_and_depth_gates_the_next():
    device = HostCuda(0, depth=2)
    device.start(asyncio.get_running_loop())
    try:
        tickets = [device.submit(lambda v, seq: v * 2, torch.ones(2)) for _ in range(3)]
        assert tickets[0].done() and tickets[1].done() and not tickets[2].done()
        y, ready = tickets[0].result()
        assert isinstance(ready, StandInEvent) and torch.equal(y, torch.full((2,), 2.0))
        await asyncio.wait_for(tickets[2], 5)  # once frame 0 is complete
        assert torch.equal(await device.download(*tickets[2].result()), torch.full((2,), 2.0))
        with pytest.raises(RuntimeError, match="already started"):
            device.start(asyncio.get_running_loop())
    finally:
        device.close()



async def test_busy_time_of_a_gpu_stage_comes_from_its_timing_events():
    """A CUDA stage's busy time is the sum of its compute spans (GPU time between two events),
    with or without metrics; the host's launch time is not added on top."""
    xs = [torch.randn(1, 32) for _ in range(40)]
    pipe = pa.Pipeline(mlp(), devices=[HostCuda(0), HostCuda(0)], balance=[3, 3])
    await stream(pipe, xs)
    for k, stage in enumerate(pipe.stats().stages):
        spans = sum(s.duration for s in pipe.spans() if s.stage == k and s.kind == "compute")
        assert stage.busy_s == pytest.approx(spans, rel=1e-6) and spans > 0
    quiet = pa.Pipeline(mlp(), devices=[HostCuda(0), HostCuda(0)], balance=[3, 3], metrics=False)
    await stream(quiet, xs)
    assert all(stage.busy_s > 0 for stage in quiet.stats().stages)


async def test_checkpoint_cut_waits_for_the_gpu_copy_and_equals_a_cpu_run(tmp_path):
    """A checkpoint of a learning pipeline on CUDA stages: each stage's state copy is taken on
    its compute stream and waited for (its event) before the save; the cut equals the state a
    CPU pipeline reaches on the same frames."""
    from partime_async.checkpoint import load
    from partime_async.sinks import Checkpoint

    def learning() -> pa.OnlineLearning:
        return pa.OnlineLearning(loss=nn.MSELoss(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05), mode="partime")

    g = torch.Generator().manual_seed(1)
    frames = [pa.Frame(t, torch.randn(1, 32, generator=g), target=torch.randn(1, 32, generator=g)) for t in range(20)]
    pipe = pa.Pipeline(mlp().train(), devices=[HostCuda(0), HostCuda(0)], balance=[3, 3], learning=learning())
    sink = Checkpoint(pipe, tmp_path / "ckpt-{seq}.pt", every=10)
    await pa.run(frames >> pipe >> sink)
    assert [p.name for p in sink.saved] == ["ckpt-9.pt", "ckpt-19.pt"]
    reference = pa.Pipeline(mlp().train(), devices=pa.cpu_devices(2, threads=1), balance=[3, 3], learning=learning())
    await stream(reference, frames)
    expected, state = reference.state_dict(), load(tmp_path / "ckpt-19.pt")
    assert all(torch.equal(state["model"][k], expected["model"][k]) for k in expected["model"])


@pytest.mark.parametrize("mode", ["partime", "stashed"])
async def test_graphs_on_learning_stages_wrap_what_can_be_graphed_and_change_nothing(mode):
    """CudaDevice(graphs=True) with learning: partime stages and undelayed stages get a
    GraphedLearningStage (here, on host tensors, it falls back to eager saying why, once per
    stage); a delayed stashed stage is not graphed, with a warning; the weights learned are
    those of graphs=False. The graphs themselves run in tests/gpu."""
    from partime_async.devices.cuda_graphs import GraphedLearningStage

    def learning() -> pa.OnlineLearning:
        return pa.OnlineLearning(loss=nn.MSELoss(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05), mode=mode)

    g = torch.Generator().manual_seed(1)
    frames = [pa.Frame(t, torch.randn(1, 32, generator=g), target=torch.randn(1, 32, generator=g)) for t in range(12)]
    graphed = pa.Pipeline(mlp().train(), devices=[HostCuda(0, graphs=True), HostCuda(0, graphs=True)],
                          balance=[3, 3], learning=learning())
    with pytest.warns(RuntimeWarning) as record:
        await stream(graphed, frames)
    messages = [str(w.message) for w in record]
    wrapped = [isinstance(learner.graphed, GraphedLearningStage) for learner in graphed.learners]
    if mode == "partime":
        assert wrapped == [True, True]
        assert sorted(m.split(" runs eagerly")[0] for m in messages) == ["stage 0 (cpu)", "stage 1 (cpu)"]
    else:
        assert wrapped == [False, True]
        assert len(messages) == 2 and any("does not apply to a stashed stage with a delay" in m for m in messages)
    assert all("no CUDA tensor" in m for m in messages if "runs eagerly, not as a CUDA graph" in m)
    eager = pa.Pipeline(mlp().train(), devices=[HostCuda(0), HostCuda(0)], balance=[3, 3], learning=learning())
    await stream(eager, frames)
    expected, got = eager.state_dict()["model"], graphed.state_dict()["model"]
    assert all(torch.equal(got[k], expected[k]) for k in expected)
