"""Bad input gets a clear FrameError naming the frame; on_error="skip" skips and counts it."""
from __future__ import annotations

import asyncio

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import partime_async as pa
from partime_async.core.validation import check_tensors
from pa_helpers import assert_clean, assert_outputs, reference, run_stream


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def good(i: int = 0) -> torch.Tensor:
    return torch.randn(2, 4, generator=torch.Generator().manual_seed(i))


def nan_frame() -> torch.Tensor:
    x = good()
    x[1, 2] = float("nan")
    return x


def inf_frame() -> torch.Tensor:
    x = good()
    x[0, 0] = float("-inf")
    return x


# (bad payload, words the message must contain); the first frame is good((2, 4) float32)
BAD = {
    "list of floats": ([1.0, 2.0, 3.0, 4.0], "not a tensor"),
    "string": ("a frame", "not a tensor"),
    "None inside a tuple": ((torch.zeros(2, 4), None), "not a tensor"),
    "wrong shape": (torch.zeros(2, 5), "expected shape (2, 4), got (2, 5)"),
    "wrong dtype": (torch.zeros(2, 4, dtype=torch.float64), "expected dtype torch.float32, got torch.float64"),
    "wrong integer dtype": (torch.zeros(2, 4, dtype=torch.int64), "expected dtype"),
    "wrong rank": (torch.zeros(2, 4, 1), "expected 2 dimensions"),
    "scalar": (torch.tensor(1.0), "expected 2 dimensions"),
    "wrong structure": ((torch.zeros(2, 4), torch.zeros(2, 4)), "expected a payload shaped like"),
}


def devices(inline=False):
    return pa.cpu_devices(2, inline=inline)


# -- stream(), on_error="raise" ---------------------------------------------------------------------
@pytest.mark.parametrize("case", list(BAD))
async def test_bad_frame_in_stream_raises_frame_error(case):
    bad, words = BAD[case]
    xs = [good(0), good(1), bad, good(3)]
    pipe = pa.Pipeline(model(), devices=devices(), balance=[1, 2])
    with pytest.raises(pa.FrameError) as info:
        await run_stream(pipe, xs)
    error = info.value
    assert words in str(error)
    assert error.seq == 2 and "frame 2" in str(error)
    assert isinstance(error, ValueError) and isinstance(error, pa.PipelineError)
    await assert_clean()


@pytest.mark.parametrize("value, words", [(nan_frame, "NaN"), (inf_frame, "Inf")])
async def test_non_finite_frames_rejected_with_check_finite(value, words):
    pipe = pa.Pipeline(model(), devices=devices(), balance=[1, 2], check_finite=True)
    with pytest.raises(pa.FrameError, match=words) as info:
        await run_stream(pipe, [good(0), value()])
    assert info.value.seq == 1


async def test_non_finite_frames_pass_without_check_finite():
    m = model()
    xs = [good(0), nan_frame()]
    frames = await run_stream(pa.Pipeline(m, devices=devices(), balance=[1, 2]), xs)
    assert [f.seq for f in frames] == [0, 1]
    assert torch.isnan(frames[1].data).any()


async def test_first_frame_that_is_not_a_tensor_names_frame_zero():
    pipe = pa.Pipeline(model(), devices=devices())
    with pytest.raises(pa.FrameError, match="not a tensor") as info:
        await run_stream(pipe, [[0.5, 0.5], good()])
    assert info.value.seq == 0


# -- submit() ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("inline", [True, False], ids=["inline", "thread"])
async def test_bad_submit_fails_only_that_caller(inline):
    m = model()
    xs = [good(i) for i in range(6)]
    expected = reference(m, xs)
    pipe = pa.Pipeline(m, devices=devices(inline), balance=[1, 2])
    async with pipe:
        assert torch.equal(await pipe.submit(xs[0]), expected[0])  # fixes the spec: (2, 4) float32
        for case, (bad, words) in BAD.items():
            with pytest.raises(pa.FrameError) as info:
                await pipe.submit(bad)
            assert words in str(info.value), case
            assert info.value.seq is not None and f"request {info.value.seq}" in str(info.value) and info.value.request
        # concurrent good and bad requests: the good ones are served
        results = await asyncio.gather(pipe.submit(xs[1]), pipe.submit("nope"), pipe.submit(xs[2]),
                                       pipe.submit(torch.zeros(3, 4)), return_exceptions=True)
        assert torch.equal(results[0], expected[1]) and torch.equal(results[2], expected[2])
        assert isinstance(results[1], pa.FrameError) and isinstance(results[3], pa.FrameError)
        for x, want in zip(xs[3:], expected[3:]):
            assert torch.equal(await pipe.submit(x), want)
    assert pipe.stats().delivered == 6


async def test_bad_first_submit_does_not_break_the_pipeline():
    m = model()
    x = good()
    async with pa.Pipeline(m, devices=devices()) as pipe:
        with pytest.raises(pa.FrameError, match="not a tensor") as info:
            await pipe.submit([1.0, 2.0])
        assert info.value.seq is not None and info.value.seq >= 0
        assert torch.equal(await pipe.submit(x), reference(m, [x])[0])


async def test_nan_submit_with_check_finite():
    async with pa.Pipeline(model(), devices=devices(), check_finite=True) as pipe:
        await pipe.submit(good())
        with pytest.raises(pa.FrameError, match="NaN"):
            await pipe.submit(nan_frame())
        await pipe.submit(good(1))


# -- on_error="skip" ------------------------------------------------------------------------------
@pytest.mark.parametrize("inline", [True, False], ids=["inline", "thread"])
async def test_skip_bad_frames_in_stream(inline):
    m = model()
    xs = [good(i) for i in range(10)]
    payloads = list(xs)
    payloads[2] = "garbage"
    payloads[3] = torch.zeros(2, 5)
    payloads[5] = torch.zeros(2, 4, dtype=torch.float64)
    payloads[8] = nan_frame()
    keep = [0, 1, 4, 6, 7, 9]
    pipe = pa.Pipeline(m, devices=devices(inline), balance=[2, 1], on_error="skip", check_finite=True)
    frames = await run_stream(pipe, payloads)
    assert_outputs(frames, reference(m, [xs[i] for i in keep]), seqs=keep)
    stats = pipe.stats()
    assert stats.skipped_input == 4
    assert stats.delivered == len(keep)
    assert stats.skipped == 4
    assert all(s.skipped == 0 for s in stats.stages)
    await assert_clean()


async def test_skip_a_bad_first_frame():
    m = model()
    xs = [good(i) for i in range(3)]
    pipe = pa.Pipeline(m, devices=devices(), on_error="skip")
    frames = await run_stream(pipe, ["not a tensor", *xs])
    assert_outputs(frames, reference(m, xs), seqs=[1, 2, 3])
    assert pipe.stats().skipped_input == 1


# -- explicit specs -------------------------------------------------------------------------------
def spec_for(example, *leaves: pa.TensorSpec) -> pa.InputSpec:
    return pa.InputSpec(pytree.tree_structure(example), list(leaves))


async def test_explicit_spec_with_free_batch_dimension():
    m = model()
    spec = spec_for(torch.zeros(1), pa.TensorSpec((None, 4), torch.float32, "cpu"))
    xs = [torch.randn(b, 4) for b in (1, 3, 7, 2)]
    pipe = pa.Pipeline(m, devices=devices(), balance=[1, 2], input_spec=spec)
    frames = await run_stream(pipe, xs)
    assert_outputs(frames, reference(m, xs))
    for bad, words in [(torch.randn(3, 5), "expected shape (*, 4), got (3, 5)"),
                       (torch.randn(3, 4).double(), "expected dtype"),
                       (torch.randn(4), "expected 2 dimensions (*, 4)")]:
        pipe = pa.Pipeline(m, devices=devices(), balance=[1, 2], input_spec=spec)
        with pytest.raises(pa.FrameError) as info:
            await run_stream(pipe, [xs[0], bad])
        assert words in str(info.value) and info.value.seq == 1


async def test_explicit_spec_for_a_tuple_payload_names_the_leaf():
    class Add(nn.Module):
        def forward(self, pair):
            return pair[0] + pair[1].float()

    spec = spec_for((torch.zeros(1), torch.zeros(1)),
                    pa.TensorSpec((None, 3), torch.float32), pa.TensorSpec((None, 3), torch.int64))
    pipe = pa.Pipeline([Add(), nn.Identity()], devices=devices(), balance=[1, 1], input_spec=spec)
    good_pair = (torch.ones(2, 3), torch.ones(2, 3, dtype=torch.int64))
    bad_pair = (torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(pa.FrameError) as info:
        await run_stream(pipe, [good_pair, good_pair, bad_pair])
    assert "leaf 1: expected dtype torch.int64" in str(info.value)
    assert info.value.seq == 2


async def test_input_spec_none_accepts_any_tensor_but_not_other_things():
    xs = [torch.randn(1, 2), torch.randn(5, 2, 2), torch.arange(3)]
    frames = await run_stream(pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1), input_spec=None), xs)
    assert_outputs(frames, xs)
    with pytest.raises(pa.FrameError, match="not a tensor"):
        await run_stream(pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1), input_spec=None),
                         [torch.zeros(1), {"x": 3}])


def test_tensor_spec_mismatch_messages():
    spec = pa.TensorSpec((None, 3, 8), torch.uint8, "cpu")
    assert spec.mismatch(torch.zeros(5, 3, 8, dtype=torch.uint8)) is None
    assert "expected a tensor, got list" in spec.mismatch([1])
    assert "expected dtype torch.uint8, got torch.float32" in spec.mismatch(torch.zeros(5, 3, 8))
    assert "expected 3 dimensions (*, 3, 8), got 2 (3, 8)" in spec.mismatch(torch.zeros(3, 8, dtype=torch.uint8))
    assert "expected shape (*, 3, 8), got (1, 4, 8)" in spec.mismatch(torch.zeros(1, 4, 8, dtype=torch.uint8))
    assert pa.TensorSpec().mismatch(torch.zeros(9, 9, 9)) is None


def test_input_spec_like_and_check():
    payload = {"image": torch.zeros(1, 3, 4, 4, dtype=torch.uint8), "t": torch.zeros(1)}
    spec = pa.InputSpec.like(payload)
    spec.check({"image": torch.ones(1, 3, 4, 4, dtype=torch.uint8), "t": torch.ones(1)}, 0)
    with pytest.raises(pa.FrameError, match="expected a payload shaped like") as info:
        spec.check({"image": payload["image"]}, 7)
    assert info.value.seq == 7 and info.value.component == "input"
    # the same keys in another order: the same structure (a model reads a dict by key)
    spec.check({"t": torch.ones(1), "image": torch.ones(1, 3, 4, 4, dtype=torch.uint8)}, 8)
    with pytest.raises(pa.FrameError, match="uint8"):  # and each key still gets its own spec
        spec.check({"t": torch.ones(1), "image": torch.ones(1, 3, 4, 4)}, 9)


def test_check_tensors_messages():
    check_tensors((torch.zeros(1), [torch.ones(2)]), 0, finite=True)
    with pytest.raises(pa.FrameError, match=r"payload\[1\] is a int, not a tensor"):
        check_tensors((torch.zeros(1), 5), 3, finite=False)
    with pytest.raises(pa.FrameError, match=r"payload\['depth'\]\[0\] is a int, not a tensor"):  # named by its key
        check_tensors({"img": torch.zeros(1), "depth": [5]}, 3, finite=False)
    with pytest.raises(pa.FrameError, match="NaN or Inf"):
        check_tensors(torch.tensor([float("nan")]), 3, finite=True)
    check_tensors(torch.tensor([float("nan")]), 3, finite=False)
    check_tensors(torch.tensor([1, 2], dtype=torch.int64), 3, finite=True)  # integers are always finite


async def test_a_payload_of_a_pytree_type_registered_without_key_paths_passes():
    class Pair:
        def __init__(self, a, b):
            self.a, self.b = a, b

    pytree.register_pytree_node(Pair, lambda p: ([p.a, p.b], None), lambda leaves, _: Pair(*leaves))

    class Sum(nn.Module):
        def forward(self, pair):
            return pair.a + pair.b

    pipe = pa.Pipeline([Sum(), nn.Identity()], devices=pa.cpu_devices(2, threads=1), balance=[1, 1])
    outs = await run_stream(pipe, [Pair(torch.zeros(1), torch.full((1,), float(i))) for i in range(4)])
    assert [float(f.data) for f in outs] == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(pa.FrameError, match="payload leaf 1 is a int"):  # no key path to name it by
        check_tensors(Pair(torch.zeros(1), 5), 0, finite=False)


# -- constructor arguments ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    ({"on_error": "ignore"}, "on_error"),
    ({"input_spec": "last"}, "input_spec"),
    ({"window": 0}, "window"),
    ({"capacity": 0}, "capacity"),
    ({"policy": "fifo"}, "policy"),
    ({"balance": "flops"}, "balance"),
])
def test_pipeline_rejects_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        pa.Pipeline([nn.Identity(), nn.Identity()], devices=pa.cpu_devices(2), **kwargs)


def test_devices_must_be_a_list_and_sink_capacities_positive():
    from partime_async.sinks import Collect

    with pytest.raises(TypeError, match=r"pa.cpu_devices\(n\)"):
        pa.Pipeline([nn.Identity(), nn.Identity()], devices=2)
    with pytest.raises(ValueError, match="sink capacity must be an int >= 1"):
        Collect(capacity=0)


class LabelOf(nn.Module):
    """Ends the model with a Python int (a class label), not a tensor."""

    def forward(self, x: torch.Tensor) -> int:
        return int(x.argmax())


async def test_a_stage_may_output_non_tensor_leaves_of_a_steady_type():
    model = nn.Sequential(nn.Linear(4, 3), LabelOf())
    xs = [torch.randn(1, 4) for _ in range(5)]
    with torch.no_grad():
        expected = [model(x) for x in xs]
    frames = await run_stream(pa.Pipeline(model, devices=pa.cpu_devices(2), balance=[1, 1]), xs)
    assert [f.data for f in frames] == expected
    spec = pa.InputSpec.like((torch.zeros(2), 3))
    assert spec.mismatch((torch.ones(2), 5)) is None
    assert spec.mismatch((torch.ones(2), "5")) == "leaf 1: expected int, got str"
