"""Issue #6.3: the task running a graph is cancelled at a random moment (or the CLI gets
Ctrl-C): clean shutdown, every sink closed, no partial output file, nothing left running."""
from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import partime_async as pa
from partime_async.checkpoint import load
from partime_async.sinks import Checkpoint, JsonlSink, NpySink
from partime_async.sources import RealTime, SensorSource, next_frame_targets
from pa_helpers import assert_clean
from reliability_helpers import (Hiccup, JitterySink, assert_accounted, expected_output, jittery_source, leaked_files,
                                 open_fds)

N = 100_000  # more than any run reaches before it is cancelled
SETTINGS = settings(max_examples=12, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@given(n_stages=st.integers(1, 3), inline=st.sampled_from([True, False, "auto"]), learning=st.booleans(),
       cancel_after=st.integers(0, 60), when=st.sampled_from(["frames", "time"]), seed=st.integers(0, 2**16))
@SETTINGS
async def test_cancelling_the_graph_at_a_random_moment_cleans_up(n_stages, inline, learning, cancel_after, when,
                                                                   seed, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cancel")
    coefficients = [(1.0, float(k)) for k in range(n_stages)]
    if learning:
        torch.manual_seed(seed)
        model = nn.Sequential(*[nn.Linear(4, 4, dtype=torch.float64) for _ in range(n_stages)])
        learn = pa.OnlineLearning(loss=lambda y: y.pow(2).mean(), needs_target=False, mode="partime",
                                  optimizer=lambda p: torch.optim.SGD(p, 1e-3))
        pipe = pa.Pipeline(model, devices=pa.cpu_devices(n_stages), balance=[1] * n_stages, learning=learn)
    else:
        model = nn.Sequential(*[Hiccup(a, b, p=0.02, max_us=300, seed=seed + k) for k, (a, b) in enumerate(coefficients)])
        pipe = pa.Pipeline(model, devices=pa.cpu_devices(n_stages, inline=inline), balance=[1] * n_stages)
    watcher = JitterySink(random.Random(seed))
    sinks = [watcher, NpySink(tmp / "npy", fsync=False), JsonlSink(tmp / "out.jsonl", fsync=False)]
    if learning:
        sinks.append(Checkpoint(pipe, tmp / "ckpt-{seq}.pt", every=7))
    before = open_fds()
    task = asyncio.create_task(pa.run(jittery_source(N, random.Random(seed)) >> pipe >> sinks))
    if when == "frames":
        while len(watcher.seqs) < cancel_after and not task.done():
            await asyncio.sleep(0.001)
    else:
        await asyncio.sleep(cancel_after * 1e-3)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    assert task.cancelled(), f"the run ended otherwise: {task}"

    assert watcher.closed == watcher.opened  # closed exactly once if it was opened
    assert not leaked_files(before, tmp)
    assert not list(tmp.rglob("*.tmp")) and not list(tmp.rglob(".*")), "a partial (temporary) file was left"
    assert not (tmp / "out.jsonl").exists(), "a cancelled run must not leave a (partial) JSON lines file"
    for path in sorted((tmp / "npy").glob("*.npy")):  # complete files of delivered frames only
        seq = int(path.stem.split("_")[1])
        data = torch.from_numpy(np.load(path))
        if not learning:
            assert torch.equal(data, expected_output(seq, coefficients))
    for path in tmp.glob("ckpt-*.pt"):  # every checkpoint that exists loads and is whole
        state = load(path)
        assert state["position"] == int(path.stem.split("-")[1]) + 1
        assert state["model"].keys() == model.state_dict().keys()
    assert not pipe.running
    assert_accounted(pipe.stats())  # the frames in flight when it was cancelled are counted as abandoned
    await assert_clean()


def test_ctrl_c_in_the_cli_exits_cleanly(tmp_path):
    """SIGINT at a random moment of `partime-async demo` (while it sets up, and while frames
    flow): exit status 130, one line on stderr, no traceback, no file left half-written."""
    rng = random.Random(0)
    for lines, delay in ((1, rng.uniform(0.0, 0.5)), (3, rng.uniform(0.0, 0.5))):
        trace = tmp_path / f"trace-{lines}.json"
        proc = subprocess.Popen(
            [sys.executable, "-m", "partime_async.cli", "demo", "--frames", "100000", "--size", "32",
             "--trace", str(trace)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"})
        seen = [proc.stdout.readline() for _ in range(lines)]  # the header, then progress lines
        assert all(seen), seen
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler: every thread's stack to stderr
            out, err = proc.communicate()
            raise AssertionError(f"no exit 60 s after SIGINT; stacks:\n{err[-20000:]}") from None
        assert proc.returncode == 130, (seen, out, err)
        assert "Traceback" not in err and err.strip() == "interrupted", err
        assert not trace.exists()  # the trace is written only for a finished run
        assert not list(tmp_path.glob(".*")), "a temporary file was left"



# -- cleanup that must not be cut short (a second cancellation arrives while it runs) ------------
class SlowClosingSensor(SensorSource):
    """A device whose close takes a while (a connection flushed and shut)."""

    name = "slow-closing sensor"

    def __init__(self, log: list[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.log = log

    async def open(self) -> None:
        self.log.append("open")

    async def read(self) -> torch.Tensor:
        await asyncio.sleep(0.001)
        return torch.zeros(1, 4)

    async def close(self) -> None:
        self.log.append("close start")
        await asyncio.sleep(0.05)
        self.log.append("close end")


class FailingSink(pa.sinks.Sink):
    name = "failing"

    async def write(self, frame: pa.Frame) -> None:
        if frame.seq == 3:
            raise ValueError("sink down")


@pytest.mark.parametrize("paced", [False, True])
async def test_a_failing_run_closes_its_source_completely_before_it_returns(paced):
    """The source pump is cancelled by its reader and again by the pipeline's shutdown; the
    device's close (and RealTime's producer) still end before run() raises."""
    log: list[str] = []
    source = SlowClosingSensor(log, frames=1000)
    source = RealTime(source, fps=2000, policy="block") if paced else source
    pipe = pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1, inline=False), balance=[1])
    with pytest.raises(pa.PipelineError, match="sink down"):
        await pa.run(source >> pipe >> FailingSink())
    assert log == ["open", "close start", "close end"]
    await assert_clean()


async def test_next_frame_targets_closes_its_source_when_closed():
    log: list[str] = []
    frames = next_frame_targets(SlowClosingSensor(log, frames=1000)).frames()
    async with contextlib.aclosing(frames):
        await anext(frames)
    assert log == ["open", "close start", "close end"]  # at once, not by the garbage collector


async def test_stop_or_cancel_cancelled_by_its_caller_ends_the_pipeline_then_raises():
    """A caller cancelled (or timed out) in stop() or cancel() sees its cancellation, after the
    pipeline has ended; frames in flight fail with PipelineClosed."""
    class Slow(nn.Module):
        def forward(self, x):
            time.sleep(0.3)
            return x

    for how in ("stop", "timeout", "cancel"):
        pipe = pa.Pipeline([Slow()], devices=pa.cpu_devices(1, inline=False), balance=[1], input_spec=None)
        await pipe.start()
        pending = asyncio.ensure_future(pipe.submit(torch.zeros(1)))
        await asyncio.sleep(0.05)  # the frame is on the worker
        if how == "timeout":
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.01):
                    await pipe.stop()
        else:
            caller = asyncio.ensure_future(pipe.stop() if how == "stop" else pipe.cancel())
            await asyncio.sleep(0.01)
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
        assert not pipe.running
        with pytest.raises(pa.PipelineClosed):
            await pending
        await assert_clean()


async def test_a_start_that_fails_or_is_cancelled_leaves_nothing_running():
    pipe = pa.Pipeline(nn.Sequential(nn.Linear(4, 4)), devices=pa.cpu_devices(1, inline=False))
    with pytest.raises(pa.PipelineError):
        await pipe.start(sample=torch.zeros(1, 3))  # the wrong width: profiling fails
    assert not pipe.running
    await assert_clean()

    class SlowProfile(nn.Module):
        def forward(self, x):
            time.sleep(0.05)
            return x

    pipe = pa.Pipeline(nn.Sequential(SlowProfile(), SlowProfile()), devices=pa.cpu_devices(2, inline=False))
    starting = asyncio.ensure_future(pipe.start(sample=torch.zeros(1, 4)))
    await asyncio.sleep(0.08)  # profiling on a worker
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert not pipe.running
    await assert_clean()


class Slow(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        return x


@pytest.mark.parametrize("how", ["cancel", "stop"])
async def test_submits_waiting_for_room_when_the_pipeline_ends_are_accounted_for(how):
    """``submit()`` callers blocked on a full ingress when the pipeline is cancelled (or
    stopped) are told so, and are not counted as admitted, nor as abandoned."""
    pipe = pa.Pipeline([Slow(), nn.Identity()], devices=pa.cpu_devices(2, threads=1, inline=False), balance=[1, 1],
                       capacity=1)
    await pipe.start()
    tasks = [asyncio.create_task(pipe.submit(torch.full((1, 4), float(i)))) for i in range(10)]
    await asyncio.sleep(0.05)
    await (pipe.cancel() if how == "cancel" else pipe.stop())
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, (torch.Tensor, pa.PipelineClosed)) for r in results), results
    stats = pipe.stats()
    assert_accounted(stats)
    assert stats.delivered == sum(isinstance(r, torch.Tensor) for r in results)
