"""Faults while learning.

* Issue #6.6: a learning pipeline crashes between two checkpoints; resuming from the last
  checkpoint restores exactly its weights and optimiser state, and the stream goes on from its
  position, ending in exactly the weights of a run that was never interrupted at that cut.
* With ``on_error="skip"``, any frames skipped at any stages, under random stage delays:
  the stream completes with exactly the other frames, in order, every frame accounted for, and
  learning is deterministic (``stashed``: the weights are those of the same stream with the
  skipped frames carrying no target).
"""
from __future__ import annotations

import asyncio
import copy
import random
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import partime_async as pa
from partime_async.checkpoint import load
from partime_async.sinks import Checkpoint
from reliability_helpers import Injected, assert_accounted

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


class SkipAndJitter(nn.Module):
    """``Linear(6, 6)`` + Tanh that raises on the frames of ``bad`` (told by a frame-number
    column) and sleeps up to 1 ms on some calls (drawn from ``seed``)."""

    def __init__(self, bad: set[int], seed: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.bad, self.rng = bad, random.Random(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rng.random() < 0.2:
            time.sleep(self.rng.uniform(0, 1e-3))
        if int(x[0, -1]) in self.bad:
            raise Injected("skip me")
        return torch.cat([self.body(x[:, :6]), x[:, 6:]], dim=1)


def numbered_frames(seed: int, n: int, *, without: set[int] = frozenset()) -> list[pa.Frame]:
    """``make_frames``' frames with their number appended as a 7th column (what SkipAndJitter
    reads); targets too, so that the loss compares like with like."""
    g = torch.Generator().manual_seed(seed)
    frames = []
    for t in range(n):
        x, y = torch.randn(1, 6, generator=g), torch.randn(1, 6, generator=g)
        tag = torch.tensor([[float(t)]])
        frames.append(pa.Frame(t, torch.cat([x, tag], 1), None if t in without else torch.cat([y, tag], 1)))
    return frames


@given(mode=st.sampled_from(["partime", "stashed"]), n_stages=st.integers(2, 4), data=st.data(),
       seed=st.integers(0, 2**16))
@SETTINGS
async def test_skipped_frames_anywhere_keep_learning_complete_and_deterministic(mode, n_stages, data, seed):
    n = 30
    bad = [data.draw(st.sets(st.integers(0, n - 1), max_size=8), label=f"skipped at stage {k}")
           for k in range(n_stages)]

    def model(jitter: int) -> nn.Sequential:
        torch.manual_seed(seed)
        return nn.Sequential(*[SkipAndJitter(bad[k], jitter * 100 + k) for k in range(n_stages)])

    def pipe_for(m: nn.Module) -> pa.Pipeline:
        learning = pa.OnlineLearning(loss=nn.MSELoss(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05), mode=mode)
        return pa.Pipeline(m, devices=pa.cpu_devices(n_stages, threads=1), balance=[1] * n_stages,
                           learning=learning, on_error="skip", input_spec=None)

    skipped = set().union(*bad)
    runs = []
    for jitter in (1, 2):
        m = model(jitter)
        pipe = pipe_for(m)
        async with pipe:
            outputs = await asyncio.wait_for(_read(pipe, numbered_frames(seed, n)), 60)
        assert [f.seq for f in outputs] == [t for t in range(n) if t not in skipped]
        assert_accounted(pipe.stats())
        runs.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    if mode == "stashed":
        reference = model(3)
        for module in reference:
            module.bad = set()
        async with pipe_for(reference) as pipe:
            await _read(pipe, numbered_frames(seed, n, without=skipped))
        assert all(torch.equal(a, b.detach()) for a, b in zip(runs[0], reference.parameters()))


async def _read(pipe: pa.Pipeline, frames: list[pa.Frame]) -> list[pa.Frame]:
    return [f async for f in pipe.stream(frames)]
