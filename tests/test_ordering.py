"""Order is kept and nothing is lost (unless a drop policy says so, and then it is counted)."""
from __future__ import annotations

import asyncio
import contextlib
import random
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import partime_async as pa
from pa_helpers import (
    Gate, JitterAffine, Sleep, assert_clean, assert_outputs, even_balance, mark_of, marked, reference, run_stream,
)

HYPOTHESIS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# -- random per-stage delays ------------------------------------------------------------------
@given(
    n_stages=st.integers(1, 4),
    extra_layers=st.integers(0, 2),
    inline=st.booleans(),
    capacity=st.integers(1, 4),
    window=st.integers(1, 3),
    max_us=st.lists(st.integers(0, 600), min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
    n_frames=st.integers(1, 12),
    source_jitter=st.booleans(),
)
@HYPOTHESIS
async def test_order_and_values_survive_random_stage_delays(
        n_stages, extra_layers, inline, capacity, window, max_us, seed, n_frames, source_jitter):
    rng = random.Random(seed)
    n_layers = n_stages + extra_layers
    layers = [JitterAffine(a=rng.choice([0.5, 1.5, -1.0, 2.0]), b=rng.choice([0.0, 0.25, -3.0]),
                           max_us=max_us[i], seed=seed + i) for i in range(n_layers)]
    model = nn.Sequential(*layers)
    xs = [torch.randn(2, 3, generator=torch.Generator().manual_seed(seed + i)) for i in range(n_frames)]
    for layer in layers:
        layer.sleeping = False
    expected = reference(model, xs)
    for layer in layers:
        layer.sleeping = True

    async def source():
        for x in xs:
            if source_jitter:
                await asyncio.sleep(rng.uniform(0, 300) * 1e-6)
            yield x

    pipe = pa.Pipeline(model, devices=pa.cpu_devices(n_stages, inline=inline),
                       balance=even_balance(n_layers, n_stages), capacity=capacity, window=window)
    frames = await run_stream(pipe, source())
    assert_outputs(frames, expected)
    stats = pipe.stats()
    assert stats.delivered == n_frames and stats.dropped == 0 and stats.skipped == 0
    await assert_clean()


async def test_frames_keep_their_seq_target_and_meta():
    frames_in = [pa.Frame(10 * i + 3, torch.full((1, 2), float(i)), target=torch.tensor([i]), meta={"cam": i % 2})
                 for i in range(8)]
    pipe = pa.Pipeline([nn.Identity(), Sleep(0.001), nn.Identity()], devices=pa.cpu_devices(3, inline=False),
                       balance=[1, 1, 1])
    out = await run_stream(pipe, frames_in)
    assert [f.seq for f in out] == [10 * i + 3 for i in range(8)]
    assert [int(f.target) for f in out] == list(range(8))
    assert [f.meta for f in out] == [{"cam": i % 2} for i in range(8)]
    assert all(f.t_done is not None and f.latency is not None and f.latency >= 0 for f in out)
    # the caller's frames are not mutated
    assert all(torch.equal(f.data, torch.full((1, 2), float(i))) for i, f in enumerate(frames_in))


async def test_two_streams_at_once_each_keep_their_own_order():
    model = nn.Sequential(nn.Linear(3, 3), Sleep(0.0005), nn.Tanh())
    xs = [torch.randn(1, 3) for _ in range(10)]
    ys = [torch.randn(1, 3) for _ in range(7)]
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(2, inline=False), balance=[1, 2])
    async with pipe:
        async def consume(src):
            return [f async for f in pipe.stream(src)]

        a, b = await asyncio.gather(consume(xs), consume(ys))
    assert_outputs(a, reference(model, xs))
    assert_outputs(b, reference(model, ys))


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "thread"])
async def test_pipeline_can_run_again_after_stop(inline):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    xs = [torch.randn(1, 4) for _ in range(5)]
    expected = reference(model, xs)
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(2, inline=inline))
    for _ in range(2):
        assert_outputs(await run_stream(pipe, xs), expected)
        await assert_clean()


# -- backpressure ------------------------------------------------------------------------------
@pytest.mark.parametrize("capacity, window", [(1, 1), (2, 2), (3, 1)])
async def test_memory_is_bounded_by_the_channel_capacities(capacity, window):
    """A fast source, a slow stage and a slow reader: the source is never far ahead."""
    n_stages = 2
    produced = 0
    consumed = 0
    max_lag = 0

    def source():
        nonlocal produced, max_lag
        for i in range(40):
            max_lag = max(max_lag, produced - consumed)
            produced += 1
            yield torch.full((1, 2), float(i))

    pipe = pa.Pipeline([nn.Identity(), Sleep(0.001)], devices=pa.cpu_devices(n_stages, inline=False),
                       balance=[1, 1], capacity=capacity, window=window)
    async with pipe:
        async for frame in pipe.stream(source()):
            consumed += 1
            await asyncio.sleep(0.0005)
    assert consumed == 40
    # Who can hold a frame: the pump, the ingress, per stage (feeder, in-flight window,
    # collector, and the channel to the next stage, but for the last, whose collector hands
    # frames straight to the output channel), the output channel and the reader.
    bound = 1 + capacity + n_stages * (window + 2) + (n_stages - 1) * capacity + capacity + 1
    assert max_lag <= bound


# -- drop policies at the pipeline level -----------------------------------------------------------
@pytest.mark.parametrize("policy", ["drop_oldest", "latest", "drop_newest"])
async def test_drop_policy_counts_every_frame(policy):
    """The stage is held shut until the source has emitted everything, so frames must drop."""
    n = 30
    gate = threading.Event()

    async def source():
        for i in range(n):
            yield marked(i)
            await asyncio.sleep(0)
        gate.set()

    pipe = pa.Pipeline([Gate(gate), nn.Identity()], devices=pa.cpu_devices(2, inline=False), balance=[1, 1],
                       capacity=2, window=1, policy=policy)
    out = await run_stream(pipe, source())
    seqs = [f.seq for f in out]
    stats = pipe.stats()
    assert all(a < b for a, b in zip(seqs, seqs[1:])), "delivered out of order"
    assert set(seqs) <= set(range(n))
    assert all(mark_of(f.data) == f.seq for f in out), "a frame was paired with another frame's data"
    assert stats.dropped > 0
    assert len(out) + stats.dropped == n
    assert stats.delivered == len(out)
    assert stats.dropped == n - len(out)
    assert stats.admitted == stats.delivered + stats.dropped
    if policy in ("drop_oldest", "latest"):
        assert seqs[-1] == n - 1  # the newest frame is never the one evicted
    else:
        assert seqs[0] == 0 and n - 1 not in seqs  # drop_newest keeps the oldest
    await assert_clean()


@pytest.mark.parametrize("policy", ["drop_oldest", "latest"])
async def test_drop_policy_with_a_slow_stage_keeps_order_and_counts(policy):
    n = 40

    async def source():
        for i in range(n):
            await asyncio.sleep(0.0002)
            yield marked(i)

    model = nn.Sequential(Sleep(0.002), nn.Identity())
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(2, inline=False), balance=[1, 1], capacity=1, policy=policy)
    out = await run_stream(pipe, source())
    seqs = [f.seq for f in out]
    stats = pipe.stats()
    assert seqs == sorted(set(seqs)) and seqs[-1] == n - 1
    assert len(out) + stats.dropped == n
    assert stats.dropped == n - len(out)
    assert all(mark_of(f.data) == f.seq for f in out)


async def test_submit_of_a_dropped_frame_raises_frame_dropped():
    gate = threading.Event()
    n = 12
    xs = [torch.full((2,), float(i)) for i in range(n)]
    pipe = pa.Pipeline([Gate(gate), nn.Identity()], devices=pa.cpu_devices(2, inline=False), balance=[1, 1],
                       capacity=1, window=1, policy="drop_oldest")
    await pipe.start(sample=xs[0])  # split now, so that every submit is admitted at once
    try:
        tasks = [asyncio.create_task(pipe.submit(x)) for x in xs]
        for _ in range(20):
            await asyncio.sleep(0)
    finally:
        gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await pipe.stop()
    dropped = [r for r in results if isinstance(r, pa.FrameDropped)]
    served = [(x, r) for x, r in zip(xs, results) if not isinstance(r, BaseException)]
    assert len(dropped) + len(served) == n, results
    assert dropped, "the gate should have forced drops"
    assert all(isinstance(e, pa.PipelineError) and e.seq is not None for e in dropped)
    assert str(dropped[0]) == f"request {dropped[0].seq} was not run: dropped by the ingress channel policy"
    assert all(torch.equal(r, x) for x, r in served)
    assert torch.equal(results[-1], xs[-1])  # drop_oldest never evicts the newest request
    stats = pipe.stats()
    assert stats.dropped == len(dropped)
    assert stats.delivered == len(served)


# -- stopping early ---------------------------------------------------------------------------------
def endless():
    i = 0
    while True:
        yield marked(i)
        i += 1


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "thread"])
async def test_closing_a_stream_early_leaves_the_pipeline_serving(inline):
    pipe = pa.Pipeline([nn.Identity(), nn.Identity()], devices=pa.cpu_devices(2, inline=inline),
                       balance=[1, 1], capacity=2)
    async with pipe:
        seen = []
        async with pipe.stream(endless()) as outputs:
            async for frame in outputs:
                seen.append(frame.seq)
                await asyncio.sleep(0.001)  # a slow reader: the pipeline fills up behind it
                if len(seen) == 5:
                    break
        assert seen == [0, 1, 2, 3, 4]
        x = torch.randn(2, 4)
        assert torch.equal(await asyncio.wait_for(pipe.submit(x), 10), x)
    await assert_clean()


async def test_closing_a_stream_early_with_contextlib_aclosing():
    pipe = pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1, inline=False), capacity=1)
    async with pipe:
        async with contextlib.aclosing(pipe.stream(endless())) as outputs:
            async for frame in outputs:
                if frame.seq == 3:
                    break
    await assert_clean()


async def test_stop_finishes_frames_for_a_reader_that_reads_each_frame_in_a_task_of_its_own():
    """``wait_for(anext(stream), t)`` reads each frame from a short task of its own: a stop()
    from another task still finishes every frame in flight, and this reader gets them all."""
    pipe = pa.Pipeline([Sleep(0.002), nn.Identity()], devices=pa.cpu_devices(2, inline=False),
                       balance=[1, 1], capacity=2)
    await pipe.start()
    outputs = pipe.stream(endless())
    got = [(await asyncio.wait_for(anext(outputs), 60)).seq for _ in range(3)]
    stopping = asyncio.create_task(pipe.stop())
    while True:
        try:
            got.append((await asyncio.wait_for(anext(outputs), 60)).seq)
        except StopAsyncIteration:
            break
    await stopping
    stats = pipe.stats()
    assert got == list(range(len(got))) and stats.delivered == stats.admitted == len(got)
    await assert_clean()


async def test_stats_account_for_every_admitted_frame_after_an_early_close():
    """PipelineStats promises admitted == delivered + discarded + dropped + stage skips once
    drained; the frames that finished after the reader had closed its stream are discarded,
    not delivered."""
    pipe = pa.Pipeline([nn.Identity(), nn.Identity()], devices=pa.cpu_devices(2, inline=False),
                       balance=[1, 1], capacity=2)
    async with pipe:
        async with pipe.stream(endless()) as outputs:
            async for frame in outputs:
                await asyncio.sleep(0.002)
                if frame.seq == 3:
                    break
    stats = pipe.stats()
    assert stats.admitted == stats.delivered + stats.discarded + stats.dropped + sum(s.skipped for s in stats.stages)
    assert stats.discarded > 0 and stats.delivered >= 4  # the reader had 4; some more may have waited unread


async def test_stop_while_a_reader_is_active_ends_its_stream_cleanly():
    """stop(): "admit no more frames, finish those in flight, stop". A reader still iterating
    should get every frame the pipeline delivered, in order, then a normal end of stream."""
    pipe = pa.Pipeline([Sleep(0.001), nn.Identity()], devices=pa.cpu_devices(2, inline=False),
                       balance=[1, 1], capacity=2)
    await pipe.start()
    got: list[int] = []

    async def reader():
        async for frame in pipe.stream(endless()):
            got.append(frame.seq)
            await asyncio.sleep(0.002)

    task = asyncio.create_task(reader())
    while len(got) < 5:
        await asyncio.sleep(0.001)
    await pipe.stop()
    try:
        await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
    assert got == list(range(len(got)))
    assert len(got) == pipe.stats().delivered


async def test_drop_policy_with_a_list_source_lets_the_loop_run():
    """A sync source under a drop policy never blocks on the ingress; the pump must still yield
    to the loop, or the stages never get a frame until the source is exhausted."""
    pipe = pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1, inline=False), policy="latest", input_spec=None)
    async with pipe:
        outs = [f.seq async for f in pipe.stream([torch.zeros(1)] * 2000)]
    stats = pipe.stats()
    assert len(outs) > 1 and outs == sorted(outs)
    assert stats.delivered + stats.dropped == 2000


async def test_next_with_a_timeout_leaves_the_stream_open_and_takes_no_frame():
    """``await outputs.next(timeout=t)`` timing out while the source is held up takes nothing:
    reading on gets every frame, in order. A read cancelled from outside instead
    (``wait_for(anext(stream), t)`` timing out) closes the stream, as it would finish an
    async generator, and the next read says so instead of ending quietly."""
    release = asyncio.Event()

    async def held_up():
        for i in range(6):
            if i == 3:
                await release.wait()
            yield torch.tensor([float(i)])

    pipe = pa.Pipeline([nn.Identity(), nn.Identity()], devices=pa.cpu_devices(2), balance=[1, 1])
    async with pipe:
        outputs = pipe.stream(held_up())
        got = [(await outputs.next(timeout=60)).seq for _ in range(3)]
        with pytest.raises(TimeoutError):
            await outputs.next(timeout=0.05)
        release.set()
        got += [frame.seq async for frame in outputs]
        assert got == list(range(6))
        stats = pipe.stats()
        assert stats.delivered == stats.admitted == 6 and stats.discarded == 0

        release.clear()
        outputs = pipe.stream(held_up())
        assert [(await anext(outputs)).seq for _ in range(3)] == [0, 1, 2]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(outputs), 0.05)
        with pytest.raises(RuntimeError, match=r"closed when a read of it was cancelled.*stream.next\(timeout=t\)"):
            await anext(outputs)
    await assert_clean()


async def test_a_reader_task_cancelled_for_good_lets_stop_finish_though_its_task_is_kept():
    """A task cancelled while it waits for the next frame reads no more: its stream is closed,
    even while something (here: a variable) keeps the task, its traceback and the stream
    (a local of the reader) alive; stop() then returns instead of waiting for that reader."""
    pipe = pa.Pipeline([nn.Identity(), nn.Identity()], devices=pa.cpu_devices(2), balance=[1, 1])
    got: list[int] = []

    async def reader() -> None:
        outputs = pipe.stream(endless())
        async for frame in outputs:
            got.append(frame.seq)

    await pipe.start()
    task = asyncio.create_task(reader())
    while len(got) < 3:
        await asyncio.sleep(0.001)
    task.cancel()
    await asyncio.wait({task})
    await asyncio.wait_for(pipe.stop(), 60)  # a guard against a hang, not a timing assertion
    assert task.cancelled() and got == list(range(len(got)))
    stats = pipe.stats()
    assert stats.admitted == stats.delivered + stats.discarded
    await assert_clean()


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest", "latest"])
async def test_a_drop_policy_with_an_async_source_that_never_waits_still_lets_the_stages_run(policy):
    """An async source whose ``anext`` never suspends (frames made on the spot) must not
    starve the loop: with a drop policy admission never blocks either, so the pipeline
    yields between frames; the reader gets frames and can stop reading."""
    async def instant():
        i = 0
        while True:
            yield torch.tensor([float(i)])
            i += 1

    pipe = pa.Pipeline([nn.Identity(), nn.Identity()], devices=pa.cpu_devices(2), balance=[1, 1], policy=policy)

    async def read_five() -> list[int]:
        async with pipe:
            async with pipe.stream(instant()) as outputs:
                seqs = []
                async for frame in outputs:
                    seqs.append(frame.seq)
                    if len(seqs) == 5:
                        return seqs
        return seqs

    seqs = await asyncio.wait_for(read_five(), 60)  # a guard: before, the loop never ran again
    assert len(seqs) == 5 and seqs == sorted(seqs)
    await assert_clean()


async def test_a_stream_left_by_a_timeout_around_its_loop_does_not_stall_the_pipeline():
    """``async with asyncio.timeout(t): async for f in pipe.stream(src)`` in a task that lives
    on: the cancelled read closes the stream, and the pipeline serves on."""
    pipe = pa.Pipeline([Sleep(0.001), nn.Identity()], devices=pa.cpu_devices(2, inline=False), balance=[1, 1],
                       capacity=1)
    async with pipe:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                async for _ in pipe.stream(endless()):
                    pass
        y = await asyncio.wait_for(pipe.submit(marked(7)), 60)  # a guard: a stalled pipeline never answers
        assert mark_of(y) == 7
    await assert_clean()


async def test_frames_a_closing_stream_held_unread_are_discarded_not_delivered():
    """Frames already queued for a reader who then closes the stream never reach anyone:
    counted as discarded. A stream closed before its first read never starts its source."""
    pipe = pa.Pipeline([nn.Identity(), nn.Identity()], devices=pa.cpu_devices(2), balance=[1, 1], capacity=2)
    async with pipe:
        outputs = pipe.stream([marked(i) for i in range(6)])
        assert (await anext(outputs)).seq == 0

        async def queued_full() -> None:
            while len(outputs._route.out) < 2:
                await asyncio.sleep(0.001)

        await asyncio.wait_for(queued_full(), 60)  # a guard, not a timing assertion
        await outputs.aclose()
        with pytest.raises(StopAsyncIteration):
            await anext(outputs)

        untouched = pipe.stream(endless())
        await untouched.aclose()
        with pytest.raises(StopAsyncIteration):
            await anext(untouched)
    stats = pipe.stats()
    assert stats.delivered == 1 and stats.delivered + stats.discarded == stats.admitted == 6
    await assert_clean()
