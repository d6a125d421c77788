"""Issue #6.1: 10 000 frames through 1-4 stages with random delays everywhere — nothing lost,
duplicated or reordered; under drop policies, delivered + dropped == emitted, still in order."""
from __future__ import annotations

import random

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import partime_async as pa
from reliability_helpers import Hiccup, JitterySink, assert_accounted, expected_output, jittery_source

N = 10_000
SETTINGS = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def chain(n_stages: int, extra: int, seed: int) -> tuple[nn.Sequential, list[int], list[tuple[float, float]]]:
    """Hiccup layers with exact coefficients, split evenly over ``n_stages``."""
    rng = random.Random(seed)
    coefficients = [(rng.choice([0.5, 1.0, 2.0, -1.0]), rng.choice([0.0, 0.25, -3.0])) for _ in range(n_stages + extra)]
    layers = [Hiccup(a, b, p=0.01, max_us=800, seed=seed + i) for i, (a, b) in enumerate(coefficients)]
    base, more = divmod(len(layers), n_stages)
    return nn.Sequential(*layers), [base + (k < more) for k in range(n_stages)], coefficients


def check_delivered(sink: JitterySink, coefficients: list[tuple[float, float]]) -> None:
    """Strictly increasing seqs, each with its own frame's exact output."""
    seqs = sink.seqs
    assert all(a < b for a, b in zip(seqs, seqs[1:])), "delivered out of order or twice"
    for seq, data in zip(seqs, sink.data):
        assert torch.equal(data, expected_output(seq, coefficients)), f"frame {seq} carries another frame's data"


@given(n_stages=st.integers(1, 4), extra=st.integers(0, 2), inline=st.sampled_from([True, False, "auto"]),
       capacity=st.integers(1, 4), window=st.integers(1, 3), seed=st.integers(0, 2**16))
@SETTINGS
async def test_ten_thousand_frames_none_lost_duplicated_or_reordered(n_stages, extra, inline, capacity, window, seed):
    model, balance, coefficients = chain(n_stages, extra, seed)
    rng = random.Random(seed)
    sink = JitterySink(random.Random(seed + 1), capacity=capacity)
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(n_stages, inline=inline), balance=balance,
                       capacity=capacity, window=window)
    stats = await pa.run(jittery_source(N, rng) >> pipe >> sink)
    assert sink.seqs == list(range(N))
    check_delivered(sink, coefficients)
    assert (stats.admitted, stats.delivered, stats.dropped, stats.skipped) == (N, N, 0, 0)
    assert [s.frames for s in stats.stages] == [N] * n_stages
    assert (sink.opened, sink.closed, sink.written, sink.dropped) == (1, 1, N, 0)


@given(n_stages=st.integers(1, 4), inline=st.booleans(), capacity=st.integers(1, 3),
       policy=st.sampled_from(["block", "drop_oldest", "drop_newest", "latest"]),
       sink_policy=st.sampled_from(["block", "drop_oldest", "drop_newest", "latest"]), seed=st.integers(0, 2**16))
@SETTINGS
async def test_under_drop_policies_every_frame_is_delivered_or_counted(n_stages, inline, capacity, policy,
                                                                     sink_policy, seed):
    model, balance, coefficients = chain(n_stages, 0, seed)
    # A sink that often stalls, so that the drop policies have something to drop.
    sink = JitterySink(random.Random(seed + 1), p_yield=0.3, p_sleep=0.01, max_sleep_s=0.003,
                       capacity=capacity, policy=sink_policy)
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(n_stages, inline=inline), balance=balance,
                       capacity=capacity, policy=policy)
    stats = await pa.run(jittery_source(N, random.Random(seed)) >> pipe >> sink)
    check_delivered(sink, coefficients)
    assert sink.written == len(sink.seqs)
    assert sink.written + sink.dropped + stats.dropped == N, "a frame was neither delivered nor counted as dropped"
    assert stats.admitted == N and stats.delivered + stats.dropped == N and stats.skipped == 0
    assert_accounted(stats)
    if policy == "block":
        assert stats.dropped == 0
    if sink_policy == "block":
        assert sink.dropped == 0
    if policy != "drop_newest" and sink_policy != "drop_newest":
        assert sink.seqs[-1] == N - 1  # the newest frame is never the one evicted
