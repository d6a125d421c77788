"""Issue #6.5: bad input anywhere in a stream gets a clear FrameError (what was expected, what
came, which frame) and never corrupts the frames that follow.

Bad kinds: wrong rank, shape, dtype or device; NaN/Inf (when ``check_finite``); non-tensor
payloads; a model whose output changes shape mid-stream. A non-contiguous tensor is *not* bad
input: every stage computes on it as the unsplit model does, so it is accepted and its output
is exact (a strided view from a camera buffer is a normal frame).
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import partime_async as pa
from pa_helpers import assert_clean, tree_equal

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
RESHAPE_MARK = 1e6  # a frame whose first element is this makes the model change its output shape


class ShapeShifter(nn.Module):
    """Identity, except on marked frames, where it drops a column (a model whose output
    changes mid-stream, e.g. a buggy dynamic head)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :-1] if x[0, 0].item() == RESHAPE_MARK else x


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(ShapeShifter(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


BALANCE = [1, 3]  # the shape shifter is stage 0's last layer: its output check catches it


def good(seq: int) -> torch.Tensor:
    return torch.randn(2, 4, generator=torch.Generator().manual_seed(seq))


def payload(kind: str, seq: int):
    """(payload, words the FrameError must hold, or None for a good frame)."""
    x = good(seq)
    if kind == "good":
        return x, None
    if kind == "non-contiguous":
        return torch.randn(4, 2, generator=torch.Generator().manual_seed(seq)).t(), None
    if kind == "rank":
        return x.unsqueeze(0), "expected 2 dimensions (2, 4), got 3 (1, 2, 4)"
    if kind == "shape":
        return torch.zeros(3, 4), "expected shape (2, 4), got (3, 4)"
    if kind == "dtype":
        return x.double(), "expected dtype torch.float32, got torch.float64"
    if kind == "device":
        return torch.empty(2, 4, device="meta"), "expected a tensor on cpu, got one on meta"
    if kind == "nan":
        x[1, 1] = float("nan")
        return x, "NaN or Inf"
    if kind == "inf":
        x[0, 3] = float("inf")
        return x, "NaN or Inf"
    if kind == "numpy":
        return x.numpy(), "not a tensor"
    if kind == "list":
        return x.tolist(), "not a tensor"
    if kind == "tuple":
        return (x, x), "expected a payload shaped like"
    if kind == "reshape":
        x[0, 0] = RESHAPE_MARK
        return x, "stage 0 (cpu:0) output failed on frame"
    raise ValueError(kind)


KINDS = ["good", "non-contiguous", "rank", "shape", "dtype", "device", "nan", "inf", "numpy", "list", "tuple",
         "reshape"]


def stream(kinds: list[str]) -> list[tuple[object, str | None]]:
    return [payload(kind, seq) for seq, kind in enumerate(kinds)]


def expected(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(x)


def devices(inline):
    return pa.cpu_devices(2, inline=inline, threads=torch.get_num_threads())


@given(kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=40), inline=st.booleans())
@SETTINGS
async def test_skip_rejects_each_bad_frame_and_keeps_the_rest_exact(kinds, inline):
    kinds = ["good"] + kinds  # the first frame fixes the spec
    frames = stream(kinds)
    net = model()
    pipe = pa.Pipeline(net, devices=devices(inline), balance=BALANCE, check_finite=True, on_error="skip")
    async with pipe:
        out = [f async for f in pipe.stream([x for x, _ in frames])]
    good_seqs = [seq for seq, (_, words) in enumerate(frames) if words is None]
    assert [f.seq for f in out] == good_seqs
    for f in out:
        assert tree_equal(f.data, expected(net, frames[f.seq][0])), f"frame {f.seq} was corrupted"
    stats = pipe.stats()
    reshaped = [seq for seq, kind in enumerate(kinds) if kind == "reshape"]
    assert stats.skipped_input == len(frames) - len(good_seqs) - len(reshaped)
    assert list(stats.stages[0].skipped_seqs) == reshaped and stats.stages[1].skipped == 0
    await assert_clean()


# Rejected at the door, so they fail their caller only. A stage whose output changes shape
# fails inside the pipeline, which on_error="raise" stops (as any stage failure does).
INPUT_KINDS = [k for k in KINDS if k != "reshape"]


@given(kinds=st.lists(st.sampled_from(INPUT_KINDS), min_size=1, max_size=25), inline=st.booleans())
@SETTINGS
async def test_each_bad_submit_fails_that_caller_only_with_a_clear_frame_error(kinds, inline):
    kinds = ["good"] + kinds
    net = model()
    async with pa.Pipeline(net, devices=devices(inline), balance=BALANCE, check_finite=True) as pipe:
        for seq, kind in enumerate(kinds):
            x, words = payload(kind, seq)
            if words is None:
                assert tree_equal(await pipe.submit(x), expected(net, x))
                continue
            with pytest.raises(pa.FrameError) as info:
                await pipe.submit(x)
            assert words in str(info.value), (kind, str(info.value))
            assert info.value.seq == seq and f"request {seq}" in str(info.value) and info.value.request
    await assert_clean()


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in ("good", "non-contiguous")])
async def test_a_bad_frame_in_a_stream_stops_it_with_one_frame_error(kind):
    frames = stream(["good", "good", kind, "good"])
    pipe = pa.Pipeline(model(), devices=devices("auto"), balance=BALANCE, check_finite=True)
    with pytest.raises(pa.FrameError) as info:
        async with pipe:
            async for _ in pipe.stream([x for x, _ in frames]):
                pass
    assert frames[2][1] in str(info.value) and info.value.seq == 2
    await assert_clean()


async def test_finite_check_is_a_policy():
    """check_finite=False (the default) lets NaN through, as the unsplit model would."""
    frames = stream(["good", "nan", "inf", "good"])
    net = model()
    async with pa.Pipeline(net, devices=devices("auto"), balance=BALANCE) as pipe:
        out = [f async for f in pipe.stream([x for x, _ in frames])]
    assert [f.seq for f in out] == [0, 1, 2, 3]
    for f in out:  # bit-equal, NaN where the unsplit model gives NaN
        torch.testing.assert_close(f.data, expected(net, frames[f.seq][0]), rtol=0, atol=0, equal_nan=True)


async def test_output_checks_can_be_switched_off_for_models_whose_shapes_vary():
    frames = stream(["good", "reshape", "good"])
    pipe = pa.Pipeline(nn.Sequential(ShapeShifter(), nn.Identity()), devices=devices("auto"), balance=[1, 1],
                       output_spec=None)
    async with pipe:
        out = [f async for f in pipe.stream([x for x, _ in frames])]
    assert [tuple(f.data.shape) for f in out] == [(2, 4), (2, 3), (2, 4)]


async def test_frames_after_the_end_of_the_stream_are_refused():
    pipe = pa.Pipeline(model(), devices=devices("auto"), balance=BALANCE)
    async with pipe:
        outputs = pipe.stream([good(0), good(1)])
        assert [f.seq async for f in outputs] == [0, 1]
        with pytest.raises(StopAsyncIteration):  # an ended stream stays ended
            await outputs.__anext__()
    with pytest.raises(pa.PipelineClosed, match="not running"):
        await pipe.submit(good(2))
    with pytest.raises(pa.PipelineClosed, match="not running"):
        async for _ in pipe.stream([good(3)]):
            pass
    await assert_clean()
