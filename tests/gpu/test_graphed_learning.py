"""GraphedLearningStage (forward and backward as CUDA graphs) and graphed learning pipelines:
outputs and gradients equal eager ones frame after frame while the weights move; what a
frame gets back is its own; stashed stages with a delay stay eager, saying so. Runs only with
CUDA. (This file sorts before test_graphs.py, whose last test breaks captures for the rest of
the process on PyTorch < 2.12.)"""
import warnings

import pytest
import torch
from torch import nn

import partime_async as pa
from partime_async.devices.cuda_graphs import GraphedLearningStage

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.usefixtures("deterministic_cudnn")]


def stage_module() -> nn.Sequential:
    """Convs with a BatchNorm in training mode (buffers that warm-up must not disturb)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 3, padding=1)).cuda().train()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_forward_and_backward_replays_equal_eager_while_the_weights_move():
    eager, module = stage_module(), stage_module()
    graphed = GraphedLearningStage(module, name="learning convs")
    stream = torch.cuda.Stream()
    gen = torch.Generator().manual_seed(1)
    with torch.cuda.stream(stream):
        for _ in range(6):
            x = torch.randn(1, 4, 16, 16, generator=gen).cuda().requires_grad_()
            g = torch.randn(1, 4, 16, 16, generator=gen).cuda()
            results = []
            for run, m in ((eager, eager), (graphed, module)):
                xi = x.detach().clone().requires_grad_()
                out = run(xi)
                params = list(m.parameters())
                grads = torch.autograd.grad(out, [xi, *params], g)
                results.append((out.detach().clone(), [gr.clone() for gr in grads]))
                with torch.no_grad():  # an in-place step: the next replay must see it
                    for p, gr in zip(params, grads[1:]):
                        p.sub_(0.1 * gr)
            (out_e, grads_e), (out_g, grads_g) = results
            assert close(out_g, out_e)
            assert all(close(a, b) for a, b in zip(grads_g, grads_e))
    torch.cuda.synchronize()
    assert graphed.captured and graphed.replays == 6 and graphed.fallback_reason is None
    for a, b in zip(module.buffers(), eager.buffers()):  # warm-up left the running statistics alone
        assert torch.equal(a, b) if a.dtype == torch.long else close(a, b)


def test_outputs_and_input_gradients_are_the_frames_own():
    module = stage_module()
    graphed = GraphedLearningStage(module, name="fresh")
    xs = [torch.randn(1, 4, 16, 16).cuda().requires_grad_() for _ in range(3)]
    outs, input_grads = [], []
    for x in xs:
        out = graphed(x)
        (gx,) = torch.autograd.grad(out, [x], torch.ones_like(out))
        outs.append((out, out.detach().clone()))
        input_grads.append((gx, gx.clone()))
    torch.cuda.synchronize()
    assert graphed.replays == 3
    assert all(torch.equal(o, copy) for o, copy in outs)  # later replays did not overwrite them
    assert all(torch.equal(g, copy) for g, copy in input_grads)
    assert not torch.equal(outs[0][0], outs[1][0])


def frames(n: int) -> list[pa.Frame]:
    gen = torch.Generator().manual_seed(2)
    return [pa.Frame(t, torch.randn(1, 8, 16, 16, generator=gen), target=torch.randn(1, 8, 16, 16, generator=gen))
            for t in range(n)]


def conv_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(8)]).train()


async def learn(mode: str, graphs: bool) -> tuple[pa.Pipeline, list[warnings.WarningMessage]]:
    learning = pa.OnlineLearning(loss=nn.MSELoss(), optimizer=lambda p: torch.optim.Adam(p, lr=1e-3), mode=mode)
    pipe = pa.Pipeline(conv_model(), devices=[pa.CudaDevice(0, graphs=graphs), pa.CudaDevice(0, graphs=graphs)],
                       balance=[4, 4], learning=learning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with pipe:
            outs = [f async for f in pipe.stream(frames(20))]
    assert [f.seq for f in outs] == list(range(20))
    return pipe, [w for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("mode", ["partime", "stashed"])
async def test_graphed_learning_pipeline_learns_what_the_eager_one_learns(mode):
    graphed, caught = await learn(mode, graphs=True)
    eager, _ = await learn(mode, graphs=False)
    messages = [str(w.message) for w in caught]
    if mode == "partime":
        assert not messages, messages
        assert [learner.graphed.replays for learner in graphed.learners] == [20, 20]
    else:  # stage 0 is delayed: eager, with a warning; the last stage is graphed
        assert len(messages) == 1 and "stashed stage with a delay" in messages[0], messages
        assert graphed.learners[0].graphed is None and graphed.learners[1].graphed.replays == 20
    assert [learner.steps for learner in graphed.learners] == [learner.steps for learner in eager.learners]
    got, expected = graphed.state_dict()["model"], eager.state_dict()["model"]
    assert all(torch.allclose(got[k], expected[k], rtol=1e-4, atol=1e-5) for k in expected)
