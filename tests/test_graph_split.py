"""Any nn.Module that torch.export captures: split as a graph, every value that crosses a cut
carried with the frame, exact against the unsplit model; learning through the graph."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

import partime_async as pa
from partime_async.partition import GraphSplit, SequentialSplit


class Block(nn.Module):
    """A residual block with BatchNorm (ResNet's basic block)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


class ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.layer1, self.layer2, self.layer3 = Block(16), Block(16), Block(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(torch.relu(self.stem(x)))))
        return self.head(x.mean((2, 3)))


class UNet(nn.Module):
    """Its first feature map is concatenated at the very end: at 3 stages it crosses every cut."""

    def __init__(self) -> None:
        super().__init__()
        self.down1 = nn.Conv2d(3, 8, 3, padding=1)
        self.down2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.out = nn.Conv2d(16, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.down1(x))
        b = torch.relu(self.down2(a))
        u = torch.relu(self.up(torch.relu(self.mid(b))))
        return self.out(torch.cat([u, a], 1))


class TwoInputs(nn.Module):
    """Two inputs, a dict out."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.mix = nn.Linear(8, 8), nn.Linear(4, 8), nn.Linear(8, 8)
        self.cls, self.reg = nn.Linear(8, 2), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        z = torch.tanh(self.mix(self.a(x) + self.b(y)))
        return {"cls": self.cls(z), "reg": self.reg(z) + x[:, :3]}


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(y) if y.sum() > 0 else y


def resnet_like() -> ResNetLike:
    torch.manual_seed(0)
    model = ResNetLike().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # statistics that are not the identity
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


def unet() -> UNet:
    torch.manual_seed(0)
    return UNet()


def two_inputs() -> TwoInputs:
    torch.manual_seed(0)
    return TwoInputs().eval()


def inputs(kind: str, n: int) -> list:
    g = torch.Generator().manual_seed(1)
    if kind == "two_inputs":
        return [(torch.randn(2, 8, generator=g), torch.randn(2, 4, generator=g)) for _ in range(n)]
    return [torch.randn(1, 3, 16, 16, generator=g) for _ in range(n)]


def unsplit(model: nn.Module, xs: list) -> list:
    with torch.no_grad():
        return [model(*x) if isinstance(x, tuple) else model(x) for x in xs]


def equal(a, b) -> bool:
    return pytree.tree_structure(a) == pytree.tree_structure(b) and all(
        torch.equal(x, y) for x, y in zip(pytree.tree_leaves(a), pytree.tree_leaves(b), strict=True))


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("make", [resnet_like, unet, two_inputs])
async def test_any_module_is_exact_against_the_unsplit_model(make, stages):
    model = make()
    xs = inputs(make.__name__, 6)
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(stages, threads=1))
    async with pipe:
        outs = [f async for f in pipe.stream(xs)]
        asked = await pipe.submit(xs[2])
    expected = unsplit(model, xs)
    assert [f.seq for f in outs] == list(range(6))
    assert all(equal(f.data, e) for f, e in zip(outs, expected, strict=True))
    assert equal(asked, expected[2])
    assert isinstance(pipe._split, GraphSplit) and len(pipe.balance) == stages


async def test_a_skip_connection_travels_through_every_stage_it_jumps():
    model = unet()
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(3, threads=1), balance=["down2", "up"])
    async with pipe:
        await pipe.submit(inputs("unet", 1)[0])
    assert pipe.layer_names == ["down1", "down2", "mid", "up", "out"] and pipe.balance == [1, 2, 2]
    plans = pipe._split.plans(pipe.balance, pipe.devices)
    # down1's output (relu) crosses both cuts: stage 1 passes it on beside its own result.
    assert [(p.inputs, p.outputs) for p in plans] == [
        (("x",), ("relu",)), (("relu",), ("relu", "relu_2")), (("relu", "relu_2"), ("conv2d_3",))]


def config(mode: str) -> pa.OnlineLearning:
    return pa.OnlineLearning(mode=mode, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05),
                             loss=nn.functional.mse_loss)


def learning_frames(n: int) -> list[pa.Frame]:
    g = torch.Generator().manual_seed(3)
    return [pa.Frame(seq=i, data=torch.randn(1, 3, 8, 8, generator=g), target=torch.randn(1, 3, 8, 8, generator=g))
            for i in range(n)]


async def learn(mode: str, stages: int) -> tuple[dict, pa.Pipeline]:
    model = unet()
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(stages, threads=1), learning=config(mode),
                       balance=["down2", "up"] if stages == 3 else [5])
    async with pipe:
        async for _ in pipe.stream(learning_frames(12)):
            pass
    return copy.deepcopy(model.state_dict()), pipe


@pytest.mark.parametrize("mode", ["partime", "stashed"])
async def test_learning_through_a_unet_at_three_stages_is_deterministic_and_every_stage_learns(mode):
    first, pipe = await learn(mode, 3)
    second, _ = await learn(mode, 3)
    initial = unet().state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(not torch.equal(first[k], initial[k]) for k in first)  # every layer of every stage moved
    assert all(learner.steps > 0 for learner in pipe.learners)
    assert pipe.state_dict()["model"].keys() == initial.keys()  # keyed as the model's own


@pytest.mark.parametrize("mode", ["partime", "stashed"])
async def test_learning_at_one_stage_is_plain_online_sgd(mode):
    reference = unet()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    for frame in learning_frames(12):
        loss = nn.functional.mse_loss(reference(frame.data), frame.target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    learnt, _ = await learn(mode, 1)
    assert all(torch.equal(learnt[k], v) for k, v in reference.state_dict().items())


async def test_a_model_export_cannot_capture_says_how_to_split_it_by_hand():
    pipe = pa.Pipeline(DataDependent(), devices=pa.cpu_devices(2, threads=1))
    async with pipe:
        with pytest.raises(pa.PipelineError, match=r"torch.export could not capture DataDependent .* split it by "
                                                   r"hand: give the Pipeline an nn.Sequential"):
            await pipe.submit(torch.randn(1, 4))


async def test_cut_names_are_checked():
    pipe = pa.Pipeline(unet(), devices=pa.cpu_devices(3, threads=1), balance=["mid", "down2"])
    async with pipe:
        with pytest.raises(pa.PipelineError, match=r"the cuts \['mid', 'down2'\] are not in the model's order"):
            await pipe.submit(inputs("unet", 1)[0])
    pipe = pa.Pipeline(unet(), devices=pa.cpu_devices(2, threads=1), balance=["middle"])
    async with pipe:
        with pytest.raises(pa.PipelineError, match=r"no unit named 'middle'; the units are: down1, down2, mid, up, out"):
            await pipe.submit(inputs("unet", 1)[0])


def test_sequential_models_keep_their_fast_path():
    assert isinstance(pa.Pipeline(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), devices="cpu")._split, SequentialSplit)
    assert isinstance(pa.Pipeline([nn.Linear(2, 2), nn.ReLU()], devices="cpu")._split, SequentialSplit)


async def test_a_graph_keeps_the_dimensions_the_input_spec_leaves_free():
    model = resnet_like()
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(1, 3, *size, generator=g) for size in [(16, 16), (24, 20), (12, 32)] * 3]
    spec = pa.InputSpec.of(pa.TensorSpec((1, 3, None, None), torch.float32))
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(3, threads=1), input_spec=spec)
    async with pipe:
        outs = [f.data async for f in pipe.stream(xs)]
    assert all(equal(o, e) for o, e in zip(outs, unsplit(model, xs), strict=True))


class Mean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.b(self.a(x).sum(0) / x.shape[0]), None  # the batch size is baked into the graph


async def test_a_graph_refuses_shapes_it_was_not_captured_for_and_keeps_constants_in_its_output():
    model = Mean()
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(2, threads=1), input_spec=None, output_spec=None,
                       on_error="skip")
    async with pipe:
        x = torch.randn(2, 4)
        y, none = await pipe.submit(x)
        assert none is None and torch.equal(y, unsplit(model, [x])[0][0])
        with pytest.raises(pa.PipelineError, match=r"input 0 has shape \(6, 4\), but the graph was captured for "
                                                   r"\(2, 4\) \(\* free\): give the Pipeline an input_spec"):
            await pipe.submit(torch.randn(6, 4))


class Keyed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.b(self.a(x["u"]) - x["v"])


async def test_a_dict_payload_may_hold_its_keys_in_any_order():
    torch.manual_seed(0)
    model = Keyed()
    g = torch.Generator().manual_seed(4)
    xs = [{"u": torch.randn(1, 4, generator=g), "v": torch.randn(1, 4, generator=g)} for _ in range(3)]
    xs[1] = {"v": xs[1]["v"], "u": xs[1]["u"]}
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(2, threads=1))
    async with pipe:
        outs = [f.data async for f in pipe.stream(xs)]
    assert all(equal(o, e) for o, e in zip(outs, unsplit(model, xs), strict=True))


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.spare = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.register_buffer("scale", torch.tensor(2.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) * self.scale)


async def test_states_and_checkpoint_cuts_are_keyed_as_the_models(tmp_path):
    from partime_async.checkpoint import load
    from partime_async.sinks import Checkpoint

    torch.manual_seed(0)
    model = Unused()
    learning = pa.OnlineLearning(optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), loss=nn.functional.mse_loss)
    frames = [pa.Frame(seq=i, data=torch.randn(1, 4), target=torch.randn(1, 4)) for i in range(4)]
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(2, threads=1), learning=learning)
    saved = pipe.state_dict()
    saved["balance"] = [1, 1]
    pipe.load_state_dict(saved)  # before the first frame, which cuts the graph into units
    await pa.run(frames >> pipe >> Checkpoint(pipe, tmp_path / "cut.pt", every=2))
    assert pipe.balance == [1, 1]
    cut = load(tmp_path / "cut.pt")
    assert cut["model"].keys() == model.state_dict().keys()
    Unused().load_state_dict(cut["model"])


def test_the_models_buffers_are_its_units_after_they_move():
    from partime_async.partition.graph import _share_buffers

    model = resnet_like()
    split = GraphSplit(model)
    split.prepare(torch.randn(1, 3, 16, 16))
    unit = split.layers[1]
    unit.to(torch.float64)  # a move replaces buffers (as .to(cuda) does)
    _share_buffers(model, split.layers)
    assert model.layer1.bn1.running_mean is unit.graph.layer1.bn1.running_mean


class InplaceAfterCut(nn.Module):
    """An inplace ReLU of its own right after a cut (as in torchvision's ResNets)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.relu, self.b = nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.relu(self.a(x)))


@pytest.mark.parametrize("mode", ["partime", "stashed"])
async def test_learning_through_an_inplace_op_on_a_value_that_crossed_a_cut(mode):
    def run_model() -> nn.Module:
        torch.manual_seed(0)
        return InplaceAfterCut()

    frames = [pa.Frame(seq=i, data=torch.randn(1, 4), target=torch.randn(1, 4)) for i in range(6)]
    models = []
    for stages, balance in ((2, ["relu"]), (1, [3])):
        model = run_model()
        pipe = pa.Pipeline(model, devices=pa.cpu_devices(stages, threads=1), balance=balance, learning=pa.OnlineLearning(
            mode=mode, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), loss=nn.functional.mse_loss))
        async with pipe:
            outs = [f.data async for f in pipe.stream([pa.Frame(seq=f.seq, data=f.data.clone(), target=f.target)
                                                        for f in frames])]
        assert len(outs) == 6 and all(learner.steps > 0 for learner in pipe.learners)
        models.append(model)
    assert not torch.equal(models[0].a.weight, run_model().a.weight)  # stage 0 learnt through the cut


async def test_devices_auto_makes_no_more_stages_than_the_model_has_submodules():
    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) * 2

    pipe = pa.Pipeline(One())  # devices="auto": one CPU stage per core, at most one per submodule
    assert len(pipe.devices) == 1
    async with pipe:
        x = torch.randn(1, 4)
        assert torch.equal(await pipe.submit(x), unsplit(pipe.model, [x])[0])
