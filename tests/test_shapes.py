"""Shapes that change along the stream: where the input spec leaves a dimension free, frames
of different shapes flow through the same pipeline, exact and in order; shapes outside the
spec are refused at the door."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import partime_async as pa

SIZES = [(32, 32), (48, 40), (24, 64)]


def convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 3, 1)).eval()


def interleaved(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1, 3, *SIZES[k % len(SIZES)], generator=g) for k in range(n)]


def spec() -> pa.InputSpec:
    return pa.InputSpec.of(pa.TensorSpec((1, 3, None, None), torch.float32))


@pytest.mark.parametrize("stages", [2, 3])
async def test_three_resolutions_interleaved_are_exact_and_in_order(stages):
    model = convnet()
    xs = interleaved(12)
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(stages, threads=1), input_spec=spec())
    async with pipe:
        outs = [f async for f in pipe.stream(xs)]
        asked = await pipe.submit(xs[1])
    with torch.no_grad():
        expected = [model(x) for x in xs]
    assert [f.seq for f in outs] == list(range(12))
    assert all(torch.equal(f.data, e) for f, e in zip(outs, expected, strict=True))
    assert torch.equal(asked, expected[1])


async def test_a_shape_outside_the_spec_is_refused_and_the_stream_goes_on():
    model = convnet()
    xs = interleaved(6)
    xs[3] = torch.randn(1, 4, 32, 32)  # four channels: the spec says three
    xs[4] = torch.randn(3, 32, 32)     # no batch dimension
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(2, threads=1), input_spec=spec(), on_error="skip")
    async with pipe:
        outs = [f.seq async for f in pipe.stream(xs)]
        refused = r"input failed on request \d+: expected shape \(1, 3, \*, \*\), got \(1, 4, 8, 8\)"
        with pytest.raises(pa.FrameError, match=refused):
            await pipe.submit(torch.randn(1, 4, 8, 8))
    assert outs == [0, 1, 2, 5] and pipe.stats().skipped_input == 3  # two streamed frames, one request


def test_input_spec_of_takes_tensor_specs_only():
    nested = pa.InputSpec.of({"image": pa.TensorSpec((1, 3, None, None)), "depth": pa.TensorSpec((1, 1, None, None))})
    assert nested.mismatch({"depth": torch.zeros(1, 1, 5, 6), "image": torch.zeros(1, 3, 5, 6)}) is None
    assert "expected" in nested.mismatch({"depth": torch.zeros(1, 2, 5, 6), "image": torch.zeros(1, 3, 5, 6)})
    with pytest.raises(TypeError, match=r"InputSpec.of takes TensorSpecs .* got int"):
        pa.InputSpec.of((pa.TensorSpec((1,)), 3))
