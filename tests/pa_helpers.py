"""Shared helpers for the partime_async test suite (imported by the test modules).

Kept out of ``conftest.py`` because ``tests/gpu/conftest.py`` shares its module name, so a
``from conftest import ...`` would be ambiguous. ``conftest.py`` re-exports these as fixtures.
"""
from __future__ import annotations

import asyncio
import random
import threading
import time
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

import partime_async as pa

THREAD_PREFIX = "partime-"


# -- running ------------------------------------------------------------------------------------
async def run_stream(pipe: pa.Pipeline, payloads: Iterable[Any]) -> list[pa.Frame]:
    """Start ``pipe``, stream ``payloads`` through it, stop it; the output frames in order."""
    async with pipe:
        return [frame async for frame in pipe.stream(payloads)]


def reference(model: nn.Module, xs: Sequence[Any]) -> list[Any]:
    """The unsplit model's outputs, one input at a time, without autograd."""
    with torch.no_grad():
        return [model(x) for x in xs]


# -- comparing ----------------------------------------------------------------------------------
def tree_equal(a: Any, b: Any) -> bool:
    """Same pytree structure and bit-identical tensor leaves (same dtype and shape)."""
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb or len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                return False
            if x.dtype != y.dtype or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def assert_outputs(frames: Sequence[pa.Frame], expected: Sequence[Any], seqs: Sequence[int] | None = None) -> None:
    """``frames`` carry ``seqs`` (default 0..n-1) in order and equal ``expected`` bit for bit."""
    seqs = list(range(len(expected))) if seqs is None else list(seqs)
    assert [f.seq for f in frames] == seqs
    assert len(frames) == len(expected)
    for frame, want in zip(frames, expected):
        assert tree_equal(frame.data, want), f"frame {frame.seq} differs from the unsplit model"


# -- leak checks --------------------------------------------------------------------------------
def partime_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX) and t.is_alive()]


def other_tasks() -> set[asyncio.Task[Any]]:
    current = asyncio.current_task()
    return {t for t in asyncio.all_tasks() if t is not current and not t.done()}


async def assert_clean() -> None:
    """No partime worker thread alive and no task other than the caller's left on the loop."""
    await asyncio.sleep(0)  # let callbacks posted by worker threads run
    assert partime_threads() == []
    assert other_tasks() == set()


# -- modules ------------------------------------------------------------------------------------
def marked(i: int, shape: tuple[int, ...] = (2, 4), dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A frame whose first element is ``i`` (so that a module can tell which frame it sees)."""
    x = torch.randn(shape, dtype=dtype)
    x.view(-1)[0] = i
    return x


def mark_of(x: Any) -> int:
    leaf = pytree.tree_leaves(x)[0]
    return int(leaf.reshape(-1)[0].item())


class FailOn(nn.Module):
    """Identity, except that it raises ``error`` on frames whose mark is in ``marks``."""

    def __init__(self, *marks: int, error: type[Exception] = ValueError) -> None:
        super().__init__()
        self.marks = set(marks)
        self.error = error

    def forward(self, x: Any) -> Any:
        if mark_of(x) in self.marks:
            raise self.error(f"bad frame {mark_of(x)}")
        return x


class Sleep(nn.Module):
    """Sleeps ``seconds`` in forward (on whichever thread runs it), then returns its input."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: Any) -> Any:
        time.sleep(self.seconds)
        return x


class Gate(nn.Module):
    """Blocks in forward until ``gate`` is set (use only on a worker-thread device)."""

    def __init__(self, gate: threading.Event, timeout: float = 30.0) -> None:
        super().__init__()
        self.gate = gate
        self.timeout = timeout

    def forward(self, x: Any) -> Any:
        self.gate.wait(self.timeout)
        return x


class JitterAffine(nn.Module):
    """``x * a + b`` after a random sleep of up to ``max_us`` microseconds (seeded).

    The arithmetic is exact to reproduce; the sleeps can be switched off for the reference.
    """

    def __init__(self, a: float, b: float, max_us: int, seed: int) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.max_us = max_us
        self.rng = random.Random(seed)
        self.sleeping = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sleeping and self.max_us:
            time.sleep(self.rng.uniform(0, self.max_us) * 1e-6)
        return x * self.a + self.b


class RecordThread(nn.Module):
    """Identity that records the name of the thread it runs on."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def forward(self, x: Any) -> Any:
        self.threads.append(threading.current_thread().name)
        return x


def even_balance(n_layers: int, n_stages: int) -> list[int]:
    base, extra = divmod(n_layers, n_stages)
    return [base + (1 if k < extra else 0) for k in range(n_stages)]
