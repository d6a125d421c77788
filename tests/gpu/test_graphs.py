"""GraphedStage (per-stage CUDA graphs): replays equal eager, outputs are the caller's own, and
every fallback warns once and loses no frame. Runs only with CUDA."""
import warnings

import pytest
import torch
from torch import nn

from partime_async.devices import cuda_graphs
from partime_async.devices.cuda_graphs import GraphedStage

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.usefixtures("deterministic_cudnn")]


@pytest.fixture
def stream() -> torch.cuda.Stream:
    """A non-default stream, as a CudaDevice's compute stream is."""
    return torch.cuda.Stream()


def conv_layers(depth: int, channels: int = 8, device: str = "cuda") -> list[nn.Module]:
    """``depth`` x (3x3 conv channels->channels, ReLU): a narrow stage, many launches."""
    torch.manual_seed(0)
    layers = [m for _ in range(depth) for m in (nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())]
    return list(nn.Sequential(*layers).to(device).eval())


def eager(layers: list[nn.Module]):
    """The stage's eager computation, as the inference program runs it."""
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for layer in layers:
                x = layer(x)
        return x
    return run


def frames(n: int, size: int = 32, device: str = "cuda") -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, 8, size, size, generator=gen).to(device) for _ in range(n)]
    torch.cuda.synchronize()  # made on the default stream; the tests use another
    return xs


def ours(record: list[warnings.WarningMessage], name: str) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning) and str(w.message).startswith(name)]


def test_graphed_stage_equals_eager(stream):
    run = eager(conv_layers(20))
    stage = GraphedStage(run, name="convs")
    xs = frames(10)
    with warnings.catch_warnings(), torch.cuda.stream(stream):
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        got = [stage(x) for x in xs]
        expected = [run(x) for x in xs]
    torch.cuda.synchronize()
    assert stage.captured and stage.graphs == 1 and stage.fallback_reason is None
    assert stage.replays == 10
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    assert not all(torch.equal(got[0], g) for g in got[1:])  # the frames differ, so must their outputs


def test_outputs_survive_later_replays(stream):
    """Each call returns its own tensors: the next replay overwrites the graph's static outputs,
    never an output already handed out."""
    run = eager(conv_layers(20))
    stage = GraphedStage(run, name="convs")
    x0, x1 = frames(2)
    with torch.cuda.stream(stream):
        y0 = stage(x0)
        kept = y0.clone()
        y1 = stage(x1)
        y2 = stage(x0)
        expected1 = run(x1)
    torch.cuda.synchronize()
    assert stage.replays == 3
    assert len({y0.data_ptr(), y1.data_ptr(), y2.data_ptr()}) == 3
    assert torch.equal(y0, kept) and torch.equal(y2, kept)
    assert torch.equal(y1, expected1) and not torch.equal(y1, y0)


def test_new_shapes_are_captured_up_to_max_graphs_then_run_eagerly(stream):
    """Documented: each new signature is captured, up to max_graphs; a frame with a further one
    runs eagerly (one warning per stage), while captured signatures keep replaying."""
    run = eager(conv_layers(4))
    stage = GraphedStage(run, name="shapes", max_graphs=2)
    sizes = [16, 24, 16, 32, 40, 24, 32]
    xs = [frames(1, size)[0] for size in sizes]
    replays = []
    with warnings.catch_warnings(record=True) as record, torch.cuda.stream(stream):
        warnings.simplefilter("always")
        got = []
        for x in xs:
            got.append(stage(x))
            replays.append(stage.replays)
        expected = [run(x) for x in xs]
    torch.cuda.synchronize()
    assert replays == [1, 2, 3, 3, 3, 4, 4]  # 16 and 24 graphed; 32 and 40 eager
    messages = ours(record, "shapes")
    assert len(messages) == 1 and "(1, 8, 32, 32)" in messages[0] and "max_graphs" in messages[0], messages
    assert stage.captured and stage.graphs == 2 and stage.fallback_reason is None
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_cpu_input_falls_back_with_a_warning(stream):
    run = eager(conv_layers(4, device="cpu"))
    stage = GraphedStage(run, name="on-cpu")
    xs = frames(3, device="cpu")
    with warnings.catch_warnings(record=True) as record, torch.cuda.stream(stream):
        warnings.simplefilter("always")
        got = [stage(x) for x in xs]
    messages = ours(record, "on-cpu")
    assert len(messages) == 1 and "no CUDA tensor" in messages[0] and "graphs=False" in messages[0], messages
    assert not stage.captured and stage.replays == 0 and stage.fallback_reason is not None
    assert all(torch.equal(g, run(x)) for g, x in zip(got, xs))


def test_a_stage_that_records_autograd_is_not_graphed(stream):
    """Only inference is graphed: a run whose outputs require grad (a learning forward) falls
    back to eager, and its outputs keep their autograd graph."""
    layers = conv_layers(2)

    def run(x: torch.Tensor) -> torch.Tensor:  # no no_grad: autograd records
        for layer in layers:
            x = layer(x)
        return x

    stage = GraphedStage(run, name="learning")
    xs = frames(2)
    with warnings.catch_warnings(record=True) as record, torch.cuda.stream(stream):
        warnings.simplefilter("always")
        got = [stage(x) for x in xs]
    torch.cuda.synchronize()
    messages = ours(record, "learning")
    assert len(messages) == 1 and "requires grad" in messages[0], messages
    assert not stage.captured and all(y.requires_grad for y in got)


# Last, of this file and of tests/gpu (test_graphs.py sorts after the other files): with
# PyTorch < 2.12 a capture that fails on purpose leaves the allocator in capture mode for the
# rest of the process (pytorch#180395).
def test_host_synchronisation_falls_back_once_and_loses_no_frame(stream):
    layers = conv_layers(4)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for layer in layers:
                x = layer(x)
            scale = 2.0 if x.sum().item() > 0 else 1.0  # .item(): the host waits for the GPU
            return x * scale

    stage = GraphedStage(run, name="syncing")
    xs = frames(5)
    with warnings.catch_warnings(record=True) as record, torch.cuda.stream(stream):
        warnings.simplefilter("always")
        got = [stage(x) for x in xs]
        # a failed capture leaves the caller's stream current, and nothing capturing
        assert torch.cuda.current_stream() == stream and not torch.cuda.is_current_stream_capturing()
        expected = [run(x) for x in xs]
    torch.cuda.synchronize()
    messages = ours(record, "syncing")
    assert len(messages) == 1, messages
    assert "capture failed" in messages[0] and "graphs=False" in messages[0]
    assert "no host synchronisation" in messages[0]
    assert not stage.captured and stage.replays == 0 and stage.fallback_reason.startswith("capture failed")
    assert all(torch.equal(g, e) for g, e in zip(got, expected))

    # Afterwards another stage captures and replays, or, where torch cannot capture again after
    # a failure, falls back at once saying so; its frames are exact either way.
    run2 = eager(conv_layers(4))
    stage2 = GraphedStage(run2, name="after")
    with warnings.catch_warnings(record=True) as record2, torch.cuda.stream(stream):
        warnings.simplefilter("always")
        got2 = [stage2(x) for x in xs]
        expected2 = [run2(x) for x in xs]
    torch.cuda.synchronize()
    assert all(torch.equal(g, e) for g, e in zip(got2, expected2))
    messages2 = ours(record2, "after")
    if cuda_graphs._CAPTURE_LEAVES_ALLOCATOR_BROKEN:
        assert "memory allocator in capture mode" in messages[0]
        assert len(messages2) == 1 and "an earlier capture failed in this process" in messages2[0], messages2
        assert not stage2.captured
    else:
        assert not messages2 and stage2.captured and stage2.replays == 5
