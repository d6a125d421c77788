"""Inference is exact: the pipeline's outputs equal the unsplit model's, bit for bit."""
from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from torch import nn

import partime_async as pa
from partime_async.sources import SyntheticVideo
from pa_helpers import assert_clean, assert_outputs, reference, run_stream, tree_equal


# -- models (each has at least 3 layers so that it splits over 1, 2 and 3 stages) ---------------
def mlp() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8))


def randomise_batchnorm(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model


def convnet() -> nn.Sequential:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    return randomise_batchnorm(model).eval()


def transformer() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(*[
        nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.1, batch_first=True)
        for _ in range(3)
    ]).eval()


class Fork(nn.Module):
    """x -> (h, skip): the start of a residual block whose skip travels between stages."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.relu(self.proj(x)), x


class Body(nn.Module):
    """(h, skip) -> (f(h), skip)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, skip = pair
        return torch.tanh(self.lin(h)), skip


class Join(nn.Module):
    """(h, skip) -> h + skip."""

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h, skip = pair
        return h + skip


def tuple_model() -> nn.Sequential:
    torch.manual_seed(4)
    return nn.Sequential(Fork(8), Body(8), Body(8), Join(), nn.Linear(8, 3))


def float64_mlp() -> nn.Sequential:
    return mlp().double()


class Normalise(nn.Module):
    """uint8 image -> float in [-1, 1]-ish, per-channel normalised."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - self.mean) / self.std


def uint8_convnet() -> nn.Sequential:
    torch.manual_seed(5)
    model = nn.Sequential(
        Normalise(), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2), nn.Flatten(),
    )
    return randomise_batchnorm(model).eval()


def inputs(kind: str, n: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(list(MODELS).index(kind))
    if kind == "mlp":
        return [torch.randn(2, 16, generator=g) for _ in range(n)]
    if kind == "convnet":
        return [torch.randn(1, 3, 12, 12, generator=g) for _ in range(n)]
    if kind == "transformer":
        return [torch.randn(2, 5, 16, generator=g) for _ in range(n)]
    if kind == "tuple":
        return [torch.randn(3, 8, generator=g) for _ in range(n)]
    if kind == "float64":
        return [torch.randn(2, 16, generator=g, dtype=torch.float64) for _ in range(n)]
    if kind == "uint8":
        return [SyntheticVideo(n, height=12, width=12, dtype=torch.uint8, seed=7).render(t) for t in range(n)]
    raise ValueError(kind)


MODELS = {
    "mlp": mlp, "convnet": convnet, "transformer": transformer,
    "tuple": tuple_model, "float64": float64_mlp, "uint8": uint8_convnet,
}


def explicit_balance(n_layers: int, n_stages: int) -> list[int]:
    if n_stages == 1:
        return [n_layers]
    if n_stages == 2:
        return [1, n_layers - 1]
    return [1, n_layers - 2, 1]


def cpu_devices(n: int, *, inline: bool | str = "auto") -> list[pa.CpuDevice]:
    """CPU devices with the test process's own intra-op thread count: torch's kernels split
    reductions by thread count, so bit-equality with the unsplit run holds at equal counts
    (see README, "Exact inference"); whether a kernel's result depends on it varies by CPU."""
    return pa.cpu_devices(n, inline=inline, threads=torch.get_num_threads())


# -- the main grid ---------------------------------------------------------------------------------
@pytest.mark.parametrize("balance", ["time", "params", "explicit"])
@pytest.mark.parametrize("inline", [True, False], ids=["inline", "thread"])
@pytest.mark.parametrize("n_stages", [1, 2, 3])
@pytest.mark.parametrize("kind", list(MODELS))
async def test_outputs_equal_the_unsplit_model(kind, n_stages, inline, balance):
    model = MODELS[kind]()
    xs = inputs(kind)
    expected = reference(model, xs)
    if balance == "explicit":
        balance = explicit_balance(len(model), n_stages)
    pipe = pa.Pipeline(model, devices=cpu_devices(n_stages, inline=inline), balance=balance)
    frames = await run_stream(pipe, xs)
    assert_outputs(frames, expected)
    stats = pipe.stats()
    assert len(stats.balance) == n_stages and sum(stats.balance) == len(model)
    if isinstance(balance, list):
        assert stats.balance == balance
    assert [s.frames for s in stats.stages] == [len(xs)] * n_stages
    assert stats.delivered == len(xs)
    await assert_clean()


@pytest.mark.parametrize("kind", ["convnet", "tuple", "uint8"])
async def test_outputs_equal_with_automatic_inline_choice(kind):
    model = MODELS[kind]()
    xs = inputs(kind)
    expected = reference(model, xs)
    frames = await run_stream(pa.Pipeline(model, devices=cpu_devices(3), balance="time"), xs)
    assert_outputs(frames, expected)


async def test_synthetic_uint8_video_source_through_a_split_model():
    model = uint8_convnet()
    video = SyntheticVideo(6, height=12, width=12, dtype=torch.uint8, seed=3)
    expected = reference(model, [video.render(t) for t in range(6)])
    frames = await run_stream(pa.Pipeline(model, devices=cpu_devices(2, inline=False)), video)
    assert_outputs(frames, expected)
    assert all(f.data.dtype == torch.float32 for f in frames)


async def test_model_given_as_a_list_of_modules():
    model = mlp()
    xs = inputs("mlp")
    frames = await run_stream(pa.Pipeline(list(model), devices=cpu_devices(2)), xs)
    assert_outputs(frames, reference(model, xs))


# -- submit ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("inline", [True, False], ids=["inline", "thread"])
async def test_concurrent_submits_each_get_their_own_output(inline):
    model = mlp()
    xs = [torch.randn(1, 16) for _ in range(20)]
    expected = reference(model, xs)
    pipe = pa.Pipeline(model, devices=cpu_devices(3, inline=inline), balance=[2, 2, 1])
    async with pipe:
        outs = await asyncio.gather(*[pipe.submit(x) for x in xs])
    assert len(outs) == 20
    for out, want in zip(outs, expected):
        assert torch.equal(out, want)
    assert pipe.stats().delivered == 20


async def test_stream_and_submits_share_one_running_pipeline():
    model = tuple_model()
    xs = inputs("tuple", 12)
    ys = [torch.randn(3, 8) for _ in range(20)]
    pipe = pa.Pipeline(model, devices=cpu_devices(2, inline=False))
    async with pipe:
        async def consume():
            return [f async for f in pipe.stream(xs)]

        frames, *outs = await asyncio.gather(consume(), *[pipe.submit(y) for y in ys])
    assert_outputs(frames, reference(model, xs))
    for out, want in zip(outs, reference(model, ys)):
        assert torch.equal(out, want)
    assert pipe.stats().delivered == len(xs) + len(ys)


async def test_submit_returns_tuple_payloads():
    model = nn.Sequential(Fork(4), Body(4))
    x = torch.randn(2, 4)
    async with pa.Pipeline(model, devices=cpu_devices(2)) as pipe:
        out = await pipe.submit(x)
    assert isinstance(out, tuple) and tree_equal(out, reference(model, [x])[0])


# -- BatchNorm in train mode --------------------------------------------------------------------------
def train_bn_model() -> nn.Sequential:
    torch.manual_seed(6)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.Flatten(),
    ).train()


@pytest.mark.parametrize("inline", [True, False, "auto"], ids=["inline", "thread", "auto"])
@pytest.mark.parametrize("n_stages", [1, 2, 3])
async def test_batchnorm_train_mode_outputs_and_running_stats(n_stages, inline):
    base = train_bn_model()
    unsplit, split_model = copy.deepcopy(base), copy.deepcopy(base)
    xs = [torch.randn(4, 3, 8, 8) for _ in range(6)]
    expected = reference(unsplit, xs)  # updates unsplit's running statistics, frame by frame
    pipe = pa.Pipeline(split_model, devices=cpu_devices(n_stages, inline=inline), balance="time")
    frames = await run_stream(pipe, xs)
    assert_outputs(frames, expected)
    for (name, want), got in zip(unsplit.named_buffers(), split_model.buffers()):
        assert torch.equal(got, want), f"buffer {name} differs from the unsplit model's"


async def test_profiling_and_inline_probing_leave_buffers_untouched():
    model = train_bn_model()
    before = copy.deepcopy(model.state_dict())
    pipe = pa.Pipeline(model, devices=cpu_devices(3), balance="time")  # profiles and probes inline
    await pipe.start(sample=torch.randn(4, 3, 8, 8))
    try:
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert pipe.balance is not None and sum(pipe.balance) == len(model)
    finally:
        await pipe.stop()


class HalveInPlace(nn.Module):
    """Normalises its input in place, as a preprocessing layer may."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(0.5)


@pytest.mark.parametrize("balance", ["time", [2, 2]])
async def test_profiling_leaves_the_first_frame_alone(balance):
    """Profiling (balance="time") and the inline probe run the layers on the first frame many
    times: on copies of it, or a layer that modifies its input in place would change it."""
    torch.manual_seed(8)
    model = nn.Sequential(HalveInPlace(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    xs = [torch.randn(1, 8) for _ in range(4)]
    expected = reference(model, [x.clone() for x in xs])
    inputs = [x.clone() for x in xs]
    pipe = pa.Pipeline(model, devices=cpu_devices(2), balance=balance)
    assert_outputs(await run_stream(pipe, inputs), expected)
    assert torch.equal(inputs[0], xs[0] * 0.5)  # halved once, by its own forward


class DictMix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(2, 3)

    def forward(self, d: dict) -> dict:
        return {"sum": self.a(d["x"]) + self.b(d["y"]), "y": d["y"]}


class DictOut(nn.Module):
    def forward(self, d: dict) -> torch.Tensor:
        return torch.cat([d["sum"], d["y"]], dim=-1)


async def test_dict_payloads():
    torch.manual_seed(7)
    model = nn.Sequential(DictMix(), DictOut(), nn.Linear(5, 2))
    xs = [{"x": torch.randn(2, 4), "y": torch.randn(2, 2)} for _ in range(5)]
    frames = await run_stream(pa.Pipeline(model, devices=cpu_devices(3, inline=False)), xs)
    assert_outputs(frames, reference(model, xs))


async def test_default_devices_on_this_machine():
    if torch.cuda.is_available():
        pytest.skip("devices='auto' picks the GPUs there; tests/gpu covers them")
    model = mlp()
    xs = inputs("mlp")
    pipe = pa.Pipeline(model)  # devices="auto"
    assert_outputs(await run_stream(pipe, xs), reference(model, xs))
    assert 1 <= len(pipe.devices) <= len(model)
