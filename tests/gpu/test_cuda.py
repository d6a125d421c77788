"""The CUDA path: exactness, ordering, no host synchronisation, event hand-off, bounded pools. Runs only with CUDA."""
import asyncio
import threading
import warnings

import pytest
import torch
from torch import nn

import partime_async as pa

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.ReLU()) for _ in range(6)]).eval()


def convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
        *[nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()) for _ in range(5)],
    ).eval()


async def stream(pipe: pa.Pipeline, xs: list[torch.Tensor]) -> list[pa.Frame]:
    async with pipe:
        return [f async for f in pipe.stream(xs)]


@pytest.fixture(autouse=True)
def deterministic():
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    yield


@pytest.mark.parametrize("make, shape", [(mlp, (1, 256)), (convnet, (1, 3, 32, 32))])
@pytest.mark.parametrize("balance", ["time", "params"])
async def test_outputs_equal_unsplit_on_gpu(make, shape, balance, cuda_devices):
    model = make()
    xs = [torch.randn(shape) for _ in range(40)]
    with torch.no_grad():
        expected = [model.cuda()(x.cuda()).cpu() for x in xs]
    outs = await stream(pa.Pipeline(model, devices=cuda_devices(), balance=balance), xs)
    assert [f.seq for f in outs] == list(range(40))
    assert all(o.data.device.type == "cpu" and torch.equal(o.data, e) for o, e in zip(outs, expected))


async def test_mixed_cpu_and_gpu_stages():
    model = mlp()
    xs = [torch.randn(1, 256) for _ in range(20)]
    with torch.no_grad():
        expected = [model(x) for x in xs]
    outs = await stream(pa.Pipeline(model, devices=["cuda:0", pa.CpuDevice(0, threads=1)], balance=[3, 3]), xs)
    assert all(torch.allclose(o.data, e, atol=1e-5) for o, e in zip(outs, expected))


async def test_uint8_frames_normalised_on_gpu(cuda_devices):
    class Normalise(nn.Module):
        def forward(self, x):
            return x.float().div_(255)

    torch.manual_seed(0)
    model = nn.Sequential(Normalise(), nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1)).eval()
    xs = [torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8) for _ in range(20)]
    with torch.no_grad():
        expected = [model.cuda()(x.cuda()).cpu() for x in xs]
    outs = await stream(pa.Pipeline(model, devices=cuda_devices(), balance=[2, 2]), xs)
    assert all(torch.equal(o.data, e) for o, e in zip(outs, expected))


async def test_no_host_synchronisation_between_gpu_stages(cuda_devices):
    model = mlp().cuda()
    xs = [torch.randn(1, 256).pin_memory() for _ in range(30)]
    pipe = pa.Pipeline(model, devices=cuda_devices(), balance=[3, 3])
    async with pipe:
        await pipe.submit(xs[0])  # build and profile (profiling synchronises on purpose)
        torch.cuda.set_sync_debug_mode("error")
        try:
            outs = [f async for f in pipe.stream(xs)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len(outs) == 30


async def test_event_pool_and_pinned_memory_do_not_grow_per_frame(cuda_devices):
    devices = cuda_devices()
    pipe = pa.Pipeline(mlp(), devices=devices, balance=[3, 3], window=2)
    xs = [torch.randn(1, 256) for _ in range(300)]  # pageable: staged through pinned memory
    host_stats = getattr(torch.cuda, "host_memory_stats", None)
    async with pipe:
        async for _ in pipe.stream(xs[:50]):
            pass
        created = [d.events.created for d in devices]
        host_allocs = host_stats()["num_host_alloc"] if host_stats else 0
        async for _ in pipe.stream(xs):
            pass
    # Bounded by the in-flight depth (depth + window + channel slots, a few events each), not
    # by the 350 frames; the warm-up need not have reached the peak, so a few more may appear.
    assert all(after <= 64 and after - before <= 16 for before, after in zip(created, [d.events.created for d in devices]))
    if host_stats:  # PyTorch's caching host allocator reuses its page-locked blocks
        assert host_stats()["num_host_alloc"] - host_allocs <= 8


async def test_gpu_hand_off_carries_a_pending_event_and_depth_bounds_the_queue():
    """A ticket resolves at launch with the result's ready-event (no host round trip); the
    ticket of frame t waits for frame t - depth; the loop runs meanwhile."""
    device = pa.CudaDevice(0, depth=2)
    device.start(asyncio.get_running_loop())
    try:
        x = torch.ones(1, 16, device="cuda")
        cycles = 200_000_000  # ~0.1 s of GPU time per frame on an H100/H200

        def slow(v, seq):
            torch.cuda._sleep(cycles)
            return v * 2

        tickets = [asyncio.ensure_future(device.submit(slow, x)) for _ in range(3)]
        y0, ready0 = await tickets[0]
        assert ready0 is not None and not ready0.query()  # handed over while still running
        await asyncio.sleep(0)
        assert tickets[1].done() and not tickets[2].done()  # frame 2 waits for frame 0
        ticks = 0
        while not tickets[2].done():
            await asyncio.sleep(0.001)
            ticks += 1
        assert ticks > 0  # the loop kept running while the GPU was busy
        (y2, ready2) = tickets[2].result()
        host = await device.download(y2, ready2)
        assert host.is_pinned() and torch.equal(host, torch.full((1, 16), 2.0))
    finally:
        device.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("partime-")]


async def test_stage_error_raised_at_launch_reaches_the_ticket():
    device = pa.CudaDevice(0)
    device.start(asyncio.get_running_loop())
    try:
        def bad(v, seq):
            raise ValueError("bad stage")

        with pytest.raises(ValueError, match="bad stage"):
            await device.submit(bad, torch.ones(2))
        y, ready = await device.submit(lambda v, seq: v + 1, torch.ones(2))  # the device goes on
        assert torch.equal(await device.download(y, ready), torch.full((2,), 2.0))
    finally:
        device.close()


async def test_stage_error_on_gpu_names_stage_and_frame(cuda_devices):
    class FailAt(nn.Module):
        def forward(self, x):
            if float(x[0, 0]) == 7.0:
                raise RuntimeError("boom")
            return x

    model = nn.Sequential(nn.Linear(4, 4), FailAt())
    xs = [torch.full((1, 4), float(i)) for i in range(20)]
    model[0].weight.data = torch.eye(4)
    model[0].bias.data.zero_()
    devices = cuda_devices()
    with pytest.raises(pa.PipelineError) as info:
        await stream(pa.Pipeline(model, devices=devices, balance=[1, 1]), xs)
    assert info.value.component.startswith("stage 1") and info.value.seq == 7
    assert not [t for t in threading.enumerate() if t.name.startswith("partime-")]
    assert len(asyncio.all_tasks()) == 1


@pytest.mark.parametrize("mode", ["partime", "stashed"])
async def test_learning_on_gpu_every_stage_learns_deterministically(mode, cuda_devices):
    def run_once():
        model = mlp().train()
        before = [p.detach().clone() for p in model.parameters()]
        learning = pa.OnlineLearning(loss=nn.MSELoss(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05), mode=mode)
        pipe = pa.Pipeline(model, devices=cuda_devices(), balance=[3, 3], learning=learning)
        g = torch.Generator().manual_seed(1)
        frames = [pa.Frame(t, torch.randn(1, 256, generator=g), target=torch.randn(1, 256, generator=g))
                  for t in range(30)]
        return pipe, model, before, frames

    async def go():
        pipe, model, before, frames = run_once()
        async with pipe:
            outs = [f async for f in pipe.stream(frames)]
        return pipe, model, before, outs

    pipe, model, before, outs = await go()
    assert [f.seq for f in outs] == list(range(30)) and all("loss" in f.meta for f in outs)
    assert all(not torch.equal(p.detach().cpu(), q) for p, q in zip(model.parameters(), before))
    expected_steps = [30, 30] if mode == "stashed" else [28, 30]
    assert [learner.steps for learner in pipe.learners] == expected_steps
    _, model2, _, _ = await go()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


async def test_pipeline_with_graphed_cuda_stages_equals_the_unsplit_model():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(20)]).eval()
    xs = [torch.randn(1, 8, 16, 16) for _ in range(30)]
    with torch.no_grad():
        expected = [model.cuda()(x.cuda()).cpu() for x in xs]
    pipe = pa.Pipeline(model, devices=[pa.CudaDevice(0, graphs=True), pa.CudaDevice(0, graphs=True)], balance=[10, 10])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with pipe:
            outs = [f async for f in pipe.stream(xs)]
    assert not [w for w in caught if "CUDA graph" in str(w.message)]  # capturable: no fallback
    assert [f.seq for f in outs] == list(range(30))
    assert all(torch.equal(o.data, e) for o, e in zip(outs, expected))
