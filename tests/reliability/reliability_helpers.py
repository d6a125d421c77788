"""Fault and delay injection shared by the reliability suite.

Every injected delay and fault is drawn from a seeded ``random.Random``, so a failing
hypothesis example replays exactly (its timing aside, which the properties do not depend on).
"""
from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import torch
from torch import nn

import partime_async as pa
from partime_async.sinks import Sink


class Hiccup(nn.Module):
    """``x * a + b``; on a fraction ``p`` of calls it first sleeps up to ``max_us`` µs, and on
    the frame whose first element equals ``fail_at`` it raises :class:`Injected`."""

    def __init__(self, a: float, b: float, *, p: float = 0.01, max_us: int = 1000, seed: int = 0,
                 fail_at: int | None = None) -> None:
        super().__init__()
        self.a, self.b, self.p, self.max_us = a, b, p, max_us
        self.rng = random.Random(seed)
        self.fail_at = fail_at
        self.failed_at: float | None = None  # perf_counter() when the fault fired

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rng.random() < self.p:
            time.sleep(self.rng.uniform(0, self.max_us) * 1e-6)
        if self.fail_at is not None and int(x.reshape(-1)[0].item()) == self.fail_at:
            self.failed_at = time.perf_counter()
            raise Injected(f"injected fault on frame {self.fail_at}")
        return x * self.a + self.b


class Injected(RuntimeError):
    """The exception every injected fault raises."""


def frame_payload(seq: int, width: int = 4) -> torch.Tensor:
    """A float64 payload that carries its own seq (first element), so outputs can be checked."""
    x = torch.arange(width, dtype=torch.float64) / 8
    x[0] = seq
    return x


def expected_output(seq: int, coefficients: Sequence[tuple[float, float]], width: int = 4) -> torch.Tensor:
    """What a chain of :class:`Hiccup` layers gives for frame ``seq`` (exact: elementwise ops)."""
    y = frame_payload(seq, width)
    for a, b in coefficients:
        y = y * a + b
    return y


async def jittery_source(n: int, rng: random.Random, *, p_yield: float = 0.1, p_sleep: float = 0.002,
                         max_sleep_s: float = 0.002, fail_at: int | None = None,
                         fired: list[float] | None = None) -> AsyncIterator[torch.Tensor]:
    """Payloads 0..n-1; yields to the loop or sleeps at random; raises at ``fail_at``."""
    for seq in range(n):
        r = rng.random()
        if r < p_sleep:
            await asyncio.sleep(rng.uniform(0, max_sleep_s))
        elif r < p_yield:
            await asyncio.sleep(0)
        if seq == fail_at:
            if fired is not None:
                fired.append(time.perf_counter())
            raise Injected(f"injected source fault on frame {seq}")
        yield frame_payload(seq)


class JitterySink(Sink):
    """Keeps ``(seq, data)`` of what it writes; yields or sleeps at random; raises at ``fail_at``."""

    name = "jittery"

    def __init__(self, rng: random.Random, *, p_yield: float = 0.1, p_sleep: float = 0.002,
                 max_sleep_s: float = 0.002, fail_at: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rng = rng
        self.p_yield, self.p_sleep, self.max_sleep_s = p_yield, p_sleep, max_sleep_s
        self.fail_at = fail_at
        self.failed_at: float | None = None
        self.seqs: list[int] = []
        self.data: list[torch.Tensor] = []
        self.opened = self.closed = 0

    async def open(self) -> None:
        self.opened += 1

    async def write(self, frame: pa.Frame) -> None:
        r = self.rng.random()
        if r < self.p_sleep:
            await asyncio.sleep(self.rng.uniform(0, self.max_sleep_s))
        elif r < self.p_yield:
            await asyncio.sleep(0)
        if frame.seq == self.fail_at:
            self.failed_at = time.perf_counter()
            raise Injected(f"injected sink fault on frame {frame.seq}")
        self.seqs.append(frame.seq)
        self.data.append(frame.data)

    async def close(self) -> None:
        self.closed += 1


def open_fds() -> set[str]:
    """What this process's file descriptors point at (Linux), to catch leaked files."""
    fd_dir = Path("/proc/self/fd")
    out = set()
    for fd in fd_dir.iterdir():
        try:
            out.add(os.readlink(fd))
        except OSError:  # closed meanwhile (the listing's own descriptor)
            pass
    return out


def leaked_files(before: set[str], under: Path) -> list[str]:
    """Descriptors opened since ``before`` that point into ``under``."""
    return sorted(p for p in open_fds() - before if p.startswith(str(under)))


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def assert_accounted(stats: pa.PipelineStats) -> None:
    """Every frame admitted is accounted for, once the pipeline has stopped (or failed, or was
    cancelled) and its streams are read or closed: delivered, discarded (its reader had gone),
    dropped (a policy), skipped by a stage, or abandoned (the pipeline stopped first)."""
    stage_skips = sum(s.skipped for s in stats.stages)
    assert stats.admitted == stats.delivered + stats.discarded + stats.dropped + stage_skips + stats.abandoned, stats
