"""Issue #6.6: a learning pipeline crashes between two checkpoints; resuming from the last
checkpoint restores exactly its weights and optimiser state, and the stream goes on from its
position, ending in exactly the weights of a run that was never interrupted at that cut."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import partime_async as pa
from partime_async.checkpoint import load
from partime_async.sinks import Checkpoint
from reliability_helpers import Injected

N = 60
EVERY = 10
SETTINGS = settings(max_examples=8, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(4)])


def make_frames(seed: int) -> list[pa.Frame]:
    g = torch.Generator().manual_seed(seed)
    return [pa.Frame(t, torch.randn(1, 6, generator=g), target=torch.randn(1, 6, generator=g)) for t in range(N)]


def pipeline(model: nn.Module, mode: str) -> pa.Pipeline:
    balance = [4] if mode == "sequential" else [2, 2]
    learning = pa.OnlineLearning(loss=nn.MSELoss(), optimizer=lambda p: torch.optim.Adam(p, 1e-2), mode=mode)
    return pa.Pipeline(model, devices=pa.cpu_devices(len(balance), threads=1), balance=balance, learning=learning)


def fail_on_call(module: nn.Module, call: int) -> None:
    """``module`` raises Injected on its ``call``-th forward (0-based), i.e. on that frame."""
    calls = [0]

    def hook(*_):
        calls[0] += 1
        if calls[0] - 1 == call:
            raise Injected(f"injected fault on call {call}")

    module.register_forward_pre_hook(hook)


async def stream_all(pipe: pa.Pipeline, frames: list[pa.Frame]) -> None:
    async with pipe:
        async for _ in pipe.stream(frames):
            pass


def tensors_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


# A checkpoint is written when its frame reaches the sink; frames still between the failing
# stage and the sink (channels, windows, the sink's own queue: under 25) may never get there.
# Failing 25 frames after the first checkpoint makes sure at least that one is on disk.
IN_FLIGHT = 25


@given(mode=st.sampled_from(["sequential", "partime"]), fail_at=st.integers(EVERY + IN_FLIGHT, N - 1), data=st.data(),
       seed=st.integers(0, 1000))
@SETTINGS
async def test_crash_then_resume_from_the_last_checkpoint(mode, fail_at, data, seed, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("learn")
    frames = make_frames(seed)
    n_stages = 1 if mode == "sequential" else 2
    fail_stage = data.draw(st.integers(0, n_stages - 1), label="fail_stage")
    initial = make_model(seed)

    # The run that crashes on frame fail_at, in stage fail_stage.
    model = copy.deepcopy(initial)
    pipe = pipeline(model, mode)
    fail_on_call(model[2 * fail_stage], fail_at)
    sink = Checkpoint(pipe, tmp / "ckpt-{seq}.pt", every=EVERY)
    with pytest.raises(pa.PipelineError) as info:
        await pa.run(frames >> pipe >> sink)
    assert info.value.seq == fail_at and isinstance(info.value.__cause__, Injected)
    assert info.value.component == f"stage {fail_stage} (cpu:{fail_stage})"
    saved = sorted(tmp.glob("ckpt-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    assert not list(tmp.glob(".*")), "a temporary checkpoint file was left"
    assert saved, "no checkpoint before the crash"
    last = int(saved[-1].stem.split("-")[1])
    assert last < fail_at and (last + 1) % EVERY == 0
    state = load(saved[-1])
    assert state["position"] == last + 1

    # Resume: the weights and optimiser state are the checkpoint's, exactly.
    resumed_model = make_model(seed + 1)  # other weights: all must come from the checkpoint
    resumed = pipeline(resumed_model, mode)
    resumed.load_state_dict(state)
    await resumed.start(sample=frames[state["position"]].data)
    try:
        now = resumed.state_dict()
        assert tensors_equal(now["model"], state["model"])
        assert tensors_equal(now["learners"], state["learners"])
        assert now["position"] == state["position"]
        async for frame in resumed.stream(frames[state["position"]:]):
            pass
        assert frame.seq == N - 1
    finally:
        await resumed.stop()

    # ... and it ends where a run without the crash ends that stopped cleanly at the same cut
    # and went on (in sequential mode: where one uninterrupted run ends).
    reference = copy.deepcopy(initial)
    if mode == "sequential":
        await stream_all(pipeline(reference, mode), frames)
    else:
        again = pipeline(reference, mode)
        await stream_all(again, frames[:last + 1])
        await stream_all(again, frames[last + 1:])
    assert all(torch.equal(p, q) for p, q in zip(resumed_model.parameters(), reference.parameters()))
