"""Fixtures shared by the whole suite.

Every test is checked for leaks: no worker thread named ``partime-*`` that the test started may
outlive it, and no asyncio task may be left on the test's event loop.
"""
from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pa_helpers  # noqa: E402


@pytest.fixture(autouse=True)
async def no_leaks():
    """Fail a test that leaves a partime worker thread alive or a task on the loop."""
    torch.manual_seed(0)
    before = set(threading.enumerate())
    main_threads = torch.get_num_threads()
    yield
    torch.set_num_threads(main_threads)  # also resets ATen's process-wide default for new threads
    await asyncio.sleep(0)  # callbacks that worker threads posted to the loop
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    for t in tasks:  # do not let one leak poison the next test
        t.cancel()
    threads = [t.name for t in threading.enumerate()
               if t.name.startswith(pa_helpers.THREAD_PREFIX) and t.is_alive() and t not in before]
    assert not threads, f"leaked worker threads: {threads}"
    assert not tasks, f"leaked asyncio tasks: {tasks}"


@pytest.fixture
def run_stream():
    """``await run_stream(pipe, payloads)``: the output frames of one whole stream."""
    return pa_helpers.run_stream


@pytest.fixture
def reference():
    """``reference(model, xs)``: the unsplit model's outputs under ``torch.no_grad``."""
    return pa_helpers.reference
