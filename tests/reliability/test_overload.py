"""Issue #6.4: a sink 10x slower than the source for 100 000 frames. With ``block`` the source
is throttled to the sink's pace (never more than the channels hold ahead of it); with
``drop_oldest`` / ``latest`` memory stays flat and every drop is counted.

The source and the pipeline cost 35-45 µs per frame on the loop; the sink hands each frame to
a thread that spins 150 µs (a sink waiting on a device or the network: slow in wall time, the
loop free meanwhile), 310-370 µs per frame all told: 7-10x (measured on the 2-vCPU dev VM).
Each frame carries 16 KiB, so an unbounded queue would grow by ~1.5 GiB over the run and show
at once.
"""
from __future__ import annotations

import asyncio
import time

import pytest
import torch
from torch import nn

import partime_async as pa
from partime_async.sinks import Sink
from reliability_helpers import assert_accounted, rss_bytes

N = 100_000
PAYLOAD = torch.zeros(4096)  # 16 KiB; each frame gets its own copy
RSS_BOUND = 48 * 2**20  # growth allowed after warm-up: allocator noise, spans ring, counters


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class SlowSink(Sink):
    """Waits for ``cost_s`` of work on a thread per frame; samples RSS as it goes."""

    name = "slow"

    def __init__(self, cost_s: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cost_s = cost_s
        self.last = -1
        self.in_order = True
        self.rss: list[tuple[int, int]] = []

    async def write(self, frame: pa.Frame) -> None:
        self.in_order &= frame.seq > self.last
        self.last = frame.seq
        await asyncio.to_thread(spin, self.cost_s)
        if self.written % 1000 == 0:
            self.rss.append((frame.seq, rss_bytes()))


def source(sink: SlowSink, lags: list[int], n: int = N):
    for seq in range(n):
        if seq % 100 == 0:
            lags.append(seq - sink.written)
        yield PAYLOAD.clone()


def pipeline(policy: str = "block") -> pa.Pipeline:
    return pa.Pipeline(nn.Sequential(nn.Identity(), nn.Identity()), devices=pa.cpu_devices(2, inline=True),
                       balance=[1, 1], policy=policy, capacity=4, metrics=False)


async def test_block_throttles_the_source_to_the_sink():
    # The bound holds frame by frame, so 20 000 frames show it as well as 100 000 (and the
    # blocked run lasts as long as the slow sink takes for all of them).
    n = 20_000
    sink = SlowSink(150e-6, capacity=8)
    lags: list[int] = []
    stats = await pa.run(source(sink, lags, n) >> pipeline() >> sink)
    assert sink.written == n and stats.dropped == 0 and sink.dropped == 0 and sink.in_order
    assert_accounted(stats)
    # Everything between the source and the sink: the ingress, each stage and the channel
    # after it (the last stage's is the stream's output queue), the graph's fan-out and the
    # sink's own channel.
    assert max(lags) <= 4 + 2 * 1 + 4 + 4 + 1 + 8 + 2


@pytest.mark.parametrize("where", ["sink", "pipeline"])
@pytest.mark.parametrize("policy", ["drop_oldest", "latest"])
async def test_drop_policies_keep_memory_flat_and_count_every_drop(policy, where):
    sink = SlowSink(150e-6, capacity=4, policy=policy if where == "sink" else "block")
    pipe = pipeline(policy if where == "pipeline" else "block")
    stats = await pa.run(source(sink, []) >> pipe >> sink)
    assert sink.in_order and sink.last == N - 1
    assert sink.written + sink.dropped + stats.dropped == N
    assert_accounted(stats)
    assert sink.dropped + stats.dropped > N // 2  # the sink kept up with a fraction only
    warm = [rss for seq, rss in sink.rss if seq >= N // 10]
    assert len(warm) >= 3, sink.rss
    growth = max(warm) - warm[0]
    assert growth < RSS_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB under overload"
