"""Spans on CUDA come from timing events on the device's streams. Runs only with CUDA."""
import json
from collections import Counter

import pytest
import torch
from torch import nn

import partime_async as pa

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

N = 30


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(512, 512), nn.ReLU()) for _ in range(6)]).eval()


async def test_cuda_spans_time_copies_and_kernels(tmp_path, cuda_devices):
    pipe = pa.Pipeline(mlp(), devices=cuda_devices(), balance=[3, 3])
    async with pipe:
        outs = [f async for f in pipe.stream([torch.randn(8, 512) for _ in range(N)])]
    assert [f.seq for f in outs] == list(range(N))
    spans = pipe.spans()
    counts = Counter((s.stage, s.kind) for s in spans)
    assert counts[0, "compute"] == counts[1, "compute"] == N
    assert counts[0, "h2d"] == N            # host frames are copied in on stage 0's copy stream
    assert counts[1, "d2h"] == N            # outputs are copied back to the host by the last stage
    two_gpus = pipe.devices[0].torch_device != pipe.devices[1].torch_device
    assert counts[1, "d2d"] == (N if two_gpus else 0)
    assert all(s.t1 >= s.t0 for s in spans)
    by = {(s.stage, s.kind, s.seq): s for s in spans}
    for seq in range(N):
        # on one device's clock anchor, the copy ends before the kernels that read it start
        assert by[0, "h2d", seq].t1 <= by[0, "compute", seq].t0 + 1e-6
        assert by[1, "compute", seq].t1 <= by[1, "d2h", seq].t0 + 1e-6
        # across devices the anchors differ by a host round trip at most
        assert by[0, "compute", seq].t1 <= by[1, "compute", seq].t0 + 1e-3
    report = pipe.metrics()
    assert all(0 < s.busy <= 1 and s.compute_median_s > 0 for s in report.stages)
    assert 0 < report.latency_p50_s <= report.latency_p95_s <= report.latency_p99_s
    # timing events come from a pool that grows to the in-flight depth, not per frame
    assert all(d.timing.created < N for d in pipe.devices)
    with open(pipe.export_trace(tmp_path / "cuda.json")) as f:
        events = json.load(f)["traceEvents"]
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"stage 0 copy-in", "stage 1 copy-out", "deliver"} <= names


async def test_cuda_learning_records_backward_spans(cuda_devices):
    learning = pa.OnlineLearning(loss=nn.MSELoss(), optimizer=lambda p: torch.optim.SGD(p, lr=1e-3), mode="stashed")
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))
    pipe = pa.Pipeline(model, devices=cuda_devices(), balance=[2, 1], learning=learning)
    frames = [pa.Frame(i, torch.randn(4, 64), target=torch.randn(4, 64)) for i in range(N)]
    async with pipe:
        _ = [f async for f in pipe.stream(frames)]
    counts = Counter((s.stage, s.kind) for s in pipe.spans())
    for k in range(2):
        assert counts[k, "compute"] == counts[k, "backward"] == N
