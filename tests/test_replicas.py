"""Replicas of a stage: ``devices=[d0, [d1, d2]]`` runs stage 1 on d1 and d2 at once; frames go
to the least busy replica and come out in frame order, exact, none lost or duplicated."""
from __future__ import annotations

import random
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import partime_async as pa
from pa_helpers import JitterAffine, assert_clean, assert_outputs, reference, run_stream


class Wait(nn.Module):
    """``x + 1`` after ``seconds`` of sleep (work that waits, as on a device or I/O)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x + 1


class FailsOnMark(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.flatten()[0]) == 777.0:
            raise ValueError("marked frame")
        return x


def convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 3, 1)).eval()


async def test_replicas_are_exact_in_order_and_share_the_frames():
    model = convnet()
    xs = [torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(40)]
    pipe = pa.Pipeline(model, devices=[pa.CpuDevice(0, threads=1), [pa.CpuDevice(1, threads=1),
                                                                   pa.CpuDevice(2, threads=1)]], balance=[2, 3])
    frames = await run_stream(pipe, xs)
    assert_outputs(frames, reference(model, xs))
    stage = pipe.stats().stages[1]
    assert [r.device for r in stage.replicas] == ["cpu:1", "cpu:2"]
    assert sum(r.frames for r in stage.replicas) == stage.frames == 40
    assert all(r.frames > 0 for r in stage.replicas)  # both took frames
    assert stage.busy_s == pytest.approx(sum(r.busy_s for r in stage.replicas))
    assert pipe.stats().stages[0].replicas == []
    await assert_clean()


@given(replicas=st.integers(2, 3), max_us=st.integers(0, 800), seed=st.integers(0, 2**16),
       n_frames=st.integers(1, 30), window=st.integers(1, 3), faults=st.sets(st.integers(1, 29), max_size=3))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_replicas_keep_order_and_lose_nothing_under_random_delays_and_faults(
        replicas, max_us, seed, n_frames, window, faults):
    rng = random.Random(seed)
    layers = [JitterAffine(a=1.0, b=0.0, max_us=200, seed=seed), FailsOnMark(),
              JitterAffine(a=rng.choice([0.5, 2.0]), b=rng.choice([0.0, -3.0]), max_us=max_us, seed=seed + 1)]
    model = nn.Sequential(*layers)
    faults = {f for f in faults if f < n_frames}  # not the first: its failure would come at the build
    xs = [torch.full((1, 4), 777.0) if i in faults else torch.randn(1, 4, generator=torch.Generator().manual_seed(i))
          for i in range(n_frames)]
    good = [i for i in range(n_frames) if i not in faults]
    for layer in layers:
        layer.sleeping = False
    expected = reference(model, [xs[i] for i in good])
    for layer in layers:
        layer.sleeping = True
    pipe = pa.Pipeline(model, devices=[pa.CpuDevice(0), [pa.CpuDevice(k + 1) for k in range(replicas)]],
                       balance=[1, 2], window=window, on_error="skip")
    frames = await run_stream(pipe, xs)
    assert_outputs(frames, expected, seqs=good)
    stats = pipe.stats()
    assert sorted(stats.stages[1].skipped_seqs) == sorted(faults)
    assert sum(r.frames for r in stats.stages[1].replicas) == len(good)
    assert stats.admitted == stats.delivered + stats.stages[1].skipped == n_frames
    await assert_clean()


async def test_balance_by_time_gives_a_replicated_stage_the_work_of_two():
    model = nn.Sequential(*[Wait(0.002) for _ in range(4)])
    single = pa.Pipeline(model, devices=[pa.CpuDevice(0), pa.CpuDevice(1)], balance="time")
    doubled = pa.Pipeline(model, devices=[pa.CpuDevice(0), [pa.CpuDevice(1), pa.CpuDevice(2)]], balance="time")
    for pipe in (single, doubled):
        async with pipe:
            await pipe.submit(torch.zeros(1, 2))
    assert single.balance == [2, 2] and doubled.balance == [1, 3]


def test_replicas_refuse_what_they_cannot_do():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    learning = pa.OnlineLearning(optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), loss=nn.functional.mse_loss)
    with pytest.raises(ValueError, match=r"stage\(s\) \[1\] are replicated, and learning with replicas is not"):
        pa.Pipeline(model, devices=[pa.CpuDevice(0), [pa.CpuDevice(1), pa.CpuDevice(2)]], learning=learning)
    with pytest.raises(ValueError, match="replica group is empty"):
        pa.Pipeline(model, devices=[pa.CpuDevice(0), []])
    with pytest.raises(ValueError, match="replicated stage runs its layers plainly"):
        pa.Pipeline(model, devices=[[pa.CpuDevice(0), pa.CpuDevice(1)], pa.CpuDevice(2)], depth=pa.depth.Jacobi)
