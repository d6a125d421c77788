"""CPU devices: worker threads, their thread counts, FIFO work, inline choice, shutdown."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from torch import nn

import partime_async as pa
from partime_async.devices import as_device, available_cores, resolve_devices
from pa_helpers import RecordThread, assert_clean, partime_threads, run_stream


def started(device: pa.CpuDevice) -> pa.CpuDevice:
    device.start(asyncio.get_running_loop())
    return device


def get_threads(_, seq):
    return torch.get_num_threads()


# -- the worker thread ------------------------------------------------------------------------------
@pytest.mark.parametrize("threads", [1, 2, 3])
async def test_worker_uses_its_own_intra_op_thread_count(threads):
    main_threads = torch.get_num_threads()
    device = started(pa.CpuDevice(0, threads=threads))
    try:
        result, ready = await device.submit(get_threads, None)
        assert result == threads and ready is None
    finally:
        device.close()
    assert torch.get_num_threads() == main_threads  # the loop thread's count is left alone


def noop(_, seq):
    return None  # touches no torch function


async def test_each_device_keeps_its_own_thread_count():
    a = started(pa.CpuDevice(0, threads=1))
    b = None
    try:
        await a.submit(noop, None)  # a's worker has run set_num_threads(1)
        b = started(pa.CpuDevice(1, threads=2))
        await b.submit(noop, None)  # b's worker has run set_num_threads(2)
        (na, _), (nb, _) = await a.submit(get_threads, None), await b.submit(get_threads, None)
        assert (na, nb) == (1, 2)
    finally:
        a.close()
        if b is not None:
            b.close()


async def test_worker_thread_is_named_and_joined_on_close():
    device = started(pa.CpuDevice(7, threads=1))
    assert "partime-cpu:7" in partime_threads()
    name, _ = await device.submit(lambda _, seq: threading.current_thread().name, None)
    assert name == "partime-cpu:7"
    device.close()
    device.close()  # idempotent
    assert "partime-cpu:7" not in partime_threads()


async def test_work_runs_in_submission_order():
    device = started(pa.CpuDevice(0, threads=1))
    order = []

    def job(i, seq):
        time.sleep(0.0002 * (i % 3))
        order.append(i)
        return i

    try:
        results = await asyncio.gather(*[device.submit(job, i) for i in range(20)])
    finally:
        device.close()
    assert [r for r, _ in results] == list(range(20))
    assert order == list(range(20))


async def test_an_exception_in_a_job_reaches_its_awaiter_and_the_worker_survives():
    device = started(pa.CpuDevice(0, threads=1))

    def fail(_, seq):
        raise KeyError("nope")

    try:
        with pytest.raises(KeyError):
            await device.submit(fail, None)
        result, _ = await device.submit(lambda x, seq: x + 1, 41)
        assert result == 42
    finally:
        device.close()


async def test_start_twice_is_an_error():
    device = started(pa.CpuDevice(0, threads=1))
    try:
        with pytest.raises(RuntimeError, match="already started"):
            device.start(asyncio.get_running_loop())
    finally:
        device.close()


async def test_a_pipeline_that_cannot_start_leaves_anothers_devices_running():
    """Devices are given to a second pipeline while a first one runs on them: the second
    fails to start, and closes only what it started (here: nothing)."""
    shared = [pa.CpuDevice(0, threads=1, inline=False), pa.CpuDevice(1, threads=1, inline=False)]
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    xs = [torch.randn(1, 4) for _ in range(5)]
    async with pa.Pipeline(model, devices=shared, balance=[2, 1]) as first:
        with pytest.raises(pa.PipelineError, match="already started"):
            await pa.Pipeline(model, devices=[pa.CpuDevice(2, threads=1, inline=False), shared[1]],
                              balance=[2, 1]).start()
        outputs = [f.data async for f in first.stream(xs)]
    with torch.no_grad():
        assert all(torch.equal(y, model(x)) for x, y in zip(xs, outputs))
    await assert_clean()


async def test_device_can_be_restarted_after_close():
    device = started(pa.CpuDevice(0, threads=1))
    device.close()
    started(device)
    try:
        result, _ = await device.submit(lambda x, seq: x * 2, 21)
        assert result == 42
    finally:
        device.close()


# -- shutdown: pending work fails, never hangs ---------------------------------------------------------
async def test_close_cancels_the_pending_submits():
    device = started(pa.CpuDevice(0, threads=1))
    running = threading.Event()

    def slow(x, seq):
        if x == 0:
            running.set()
            deadline = time.monotonic() + 10
            while not device._closing and time.monotonic() < deadline:  # hold until close() began
                time.sleep(0.001)
        return x

    futures = [device.submit(slow, i) for i in range(4)]
    await asyncio.to_thread(running.wait, 10)
    device.close()  # lets the running job finish, cancels the queued ones, joins the worker
    results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)
    assert results[0] == (0, None)
    assert all(isinstance(r, asyncio.CancelledError) for r in results[1:])
    with pytest.raises(RuntimeError, match="not running"):
        device.submit(slow, 9)


async def test_submit_before_start_is_an_error():
    with pytest.raises(RuntimeError, match="not running"):
        pa.CpuDevice(0).submit(lambda x, seq: x, 1)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_submit_to_a_dead_worker_fails_instead_of_hanging(monkeypatch):
    def refuse(n):
        raise RuntimeError("cannot set threads")

    device = pa.CpuDevice(0, threads=1)
    monkeypatch.setattr(torch, "set_num_threads", refuse)
    started(device)
    device._thread.join(10)
    monkeypatch.undo()
    assert not device._thread.is_alive()
    try:
        with pytest.raises(RuntimeError, match="died"):  # at once, or through the future: never a hang
            await asyncio.wait_for(device.submit(lambda x, seq: x, 1), 2)
    finally:
        device.close()


async def test_pipeline_start_failure_joins_started_workers():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    pipe = pa.Pipeline([nn.Identity(), nn.Identity()], devices=[pa.CpuDevice(0, threads=1), "cuda:0"])
    with pytest.raises((pa.PipelineError, RuntimeError), match="CUDA"):
        async with pipe:
            pass
    await assert_clean()


# -- device lists -----------------------------------------------------------------------------------
def test_cpu_devices():
    devs = pa.cpu_devices(2)
    assert [d.index for d in devs] == [0, 1]
    assert all(d.threads == max(1, available_cores() // 2) for d in devs)
    assert all(d.inline_mode == "auto" for d in devs)
    assert [d.threads for d in pa.cpu_devices(3, threads=2)] == [2, 2, 2]
    assert all(d.inline_mode is True for d in pa.cpu_devices(2, inline=True))
    assert all(d.inline_mode is False for d in pa.cpu_devices(2, inline=False))
    assert len(pa.cpu_devices()) == available_cores()
    with pytest.raises(ValueError):
        pa.cpu_devices(0)


def test_cpu_device_argument_checks():
    with pytest.raises(ValueError, match="threads"):
        pa.CpuDevice(0, threads=0)
    with pytest.raises(ValueError, match="inline"):
        pa.CpuDevice(0, inline="sometimes")


def test_resolve_devices():
    assert isinstance(as_device("cpu"), pa.CpuDevice)
    assert as_device("cpu:1").index == 1
    with pytest.raises(ValueError):
        as_device("tpu")
    with pytest.raises(ValueError):
        as_device("not a device")
    d = pa.CpuDevice(0)
    with pytest.raises(ValueError, match="twice"):
        resolve_devices([d, d], 4)
    with pytest.raises(ValueError, match="at least one device"):
        resolve_devices([], 4)
    cpus = resolve_devices(["cpu", "cpu:1"], 4)
    assert all(c.threads == max(1, available_cores() // 2) for c in cpus)
    if not torch.cuda.is_available():
        auto = resolve_devices("auto", 1)
        assert len(auto) == 1 and isinstance(auto[0], pa.CpuDevice)
        assert len(resolve_devices("auto", 64)) == available_cores()


# -- inline or worker thread ----------------------------------------------------------------------------
@pytest.mark.parametrize("inline", [True, False])
async def test_forced_inline_setting_decides_where_a_stage_runs(inline):
    recorders = [RecordThread(), RecordThread()]
    pipe = pa.Pipeline(recorders, devices=pa.cpu_devices(2, inline=inline), balance=[1, 1])
    await run_stream(pipe, [torch.zeros(1)] * 3)
    assert [s.inline for s in pipe.stats().stages] == [inline, inline]
    for k, rec in enumerate(recorders):
        want = threading.main_thread().name if inline else f"partime-cpu:{k}"
        assert rec.threads == [want] * 3


def light_and_heavy():
    torch.manual_seed(0)
    heavy = nn.Linear(2048, 2048)
    return nn.Sequential(nn.Identity(), heavy), torch.randn(64, 2048)


async def test_auto_inline_runs_a_tiny_stage_inline_and_a_heavy_one_on_its_thread():
    model, x = light_and_heavy()
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(2), balance=[1, 1])
    async with pipe:
        out = await pipe.submit(x)
    assert out.shape == (64, 2048)
    assert pipe.stats().stages[0].inline is True   # nn.Identity: far cheaper than a thread hand-off
    assert pipe.stats().stages[1].inline is False  # a 2048x2048 matmul on 64 rows: far dearer


async def test_stats_report_which_stages_run_inline():
    model, x = light_and_heavy()
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(2), balance=[1, 1])
    async with pipe:
        await pipe.submit(x)
    assert [s.inline for s in pipe.stats().stages] == [True, False]


async def test_stage_stats_count_frames_and_busy_time():
    pipe = pa.Pipeline([nn.Identity(), nn.Linear(4, 4)], devices=pa.cpu_devices(2, inline=False), balance=[1, 1])
    await run_stream(pipe, [torch.randn(2, 4) for _ in range(6)])
    stats = pipe.stats()
    assert [s.frames for s in stats.stages] == [6, 6]
    assert [s.layers for s in stats.stages] == [1, 1]
    assert all(s.busy_s >= 0 and s.mean_compute_s >= 0 for s in stats.stages)
    assert stats.stages[0].name.startswith("stage 0") and stats.stages[1].name.startswith("stage 1")
    assert stats.elapsed_s > 0 and stats.throughput > 0
    assert len(stats.busy()) == 2


def test_stats_before_start():
    stats = pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1)).stats()
    assert (stats.admitted, stats.delivered, stats.dropped, stats.skipped) == (0, 0, 0, 0)
    assert stats.stages == [] and stats.throughput == 0.0
