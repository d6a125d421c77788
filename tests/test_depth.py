"""Parallel in depth (partime_async.depth): DeepPCR and Jacobi against the layers run in
sequence, in float64 — outputs and states, step counts cold and warm, gradients, the
sequential fallback, the errors — and the depth programs driven by a stage runner against
the plain programs."""
from __future__ import annotations

import asyncio
import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import partime_async as pa
from partime_async.aio import Channel
from partime_async.core.stats import StageStats
from partime_async.depth import DeepPCR, Jacobi, Solution, fuse
from partime_async.observe import prometheus_text
from partime_async.partition import SequentialSplit
from partime_async.programs import InferProgram, LearnProgram, OnlineLearning, StageLearner
from partime_async.programs.depth import DepthLearnProgram, DepthProgram, DepthStack
from partime_async.stage import Stage, StageRunner
from partime_async.transport import Inlet, Job, Outlet

SOLVERS = [DeepPCR, Jacobi]
DEPTHS = [16, 64, 256]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the solves are many small ops, which a second OpenMP thread on a
    busy machine only delays (the suite's fixture restores the count)."""
    torch.set_num_threads(1)


class Residual(nn.Module):
    """``z + tanh(W z + b)``: a layer the closed forms do not know (torch.func's path)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + torch.tanh(self.linear(z))


def tanh_mlp(depth: int, width: int = 8, *, seed: int = 0, gain: float = 1.0) -> list[nn.Module]:
    """``depth`` layers ``tanh(W z + b)``, PyTorch's default initialisation (weights times ``gain``)."""
    torch.manual_seed(seed)
    layers = [nn.Sequential(nn.Linear(width, width), nn.Tanh()).double() for _ in range(depth)]
    with torch.no_grad():
        for layer in layers:
            layer[0].weight.mul_(gain)
    return layers


def residual_mlp(depth: int, width: int = 8, *, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [Residual(width).double() for _ in range(depth)]


def sequential(layers, x: torch.Tensor) -> torch.Tensor:
    states = []
    for layer in layers:
        x = layer(x)
        states.append(x)
    return torch.stack(states)


def inputs(batch: int = 4, width: int = 8, *, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, width, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# -- forward ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", [tanh_mlp, residual_mlp], ids=["tanh", "residual"])
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("solver", SOLVERS, ids=["DeepPCR", "Jacobi"])
def test_outputs_and_every_state_match_the_layers_run_in_sequence(family, depth, solver):
    layers, x = family(depth), inputs()
    with torch.no_grad():
        expected = sequential(layers, x)
        result = solver(layers).solve(x)
    assert isinstance(result, Solution) and result.states.shape == (depth, *x.shape)
    assert not result.fallback and 1 <= result.iterations <= depth
    assert (result.states - expected).abs().max() <= 1e-9
    assert torch.equal(result.output, result.states[-1])
    if solver is DeepPCR and family is tanh_mlp:  # the cold bound: log2 L + 4 Newton steps
        assert result.iterations <= math.log2(depth) + 4


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(depth=st.integers(1, 40), width=st.integers(1, 12), batch=st.integers(1, 5), seed=st.integers(0, 2**16),
       unbatched=st.booleans())
def test_newton_from_cold_on_default_tanh_mlps_of_any_shape(depth, width, batch, seed, unbatched):
    layers = tanh_mlp(depth, width, seed=seed)
    x = torch.randn(width if unbatched else (batch, width), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        result = DeepPCR(layers).solve(x)
        expected = sequential(layers, x)
    assert result.states.shape == expected.shape and not result.fallback
    assert (result.states - expected).abs().max() <= 1e-9
    assert result.iterations <= math.log2(depth) + 4


def test_a_warm_start_on_a_slowly_changing_stream_takes_fewer_steps_than_any_cold_solve():
    layers = tanh_mlp(256, 16)
    solver = DeepPCR(layers)
    start, drift = inputs(2, 16, seed=2), inputs(2, 16, seed=3)
    states, warm, cold = None, [], []
    with torch.no_grad():
        for t in range(12):
            x = start + 0.01 * t * drift  # a slowly drifting input
            result = solver.solve(x, init=states)
            assert (result.states - sequential(layers, x)).abs().max() <= 1e-9 and not result.fallback
            states = result.states
            if t > 0:
                warm.append(result.iterations)
            cold.append(solver.solve(x).iterations)
    assert max(warm) <= 4 and max(warm) < min(cold), (warm, cold)
    # The same input again: the states given are already the solution (no step at all).
    with torch.no_grad():
        assert solver.solve(x, init=states).iterations == 0


# -- gradients ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", [tanh_mlp, residual_mlp], ids=["tanh", "residual"])
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("solver", SOLVERS, ids=["DeepPCR", "Jacobi"])
def test_gradients_match_autograd_through_the_sequential_run(family, depth, solver):
    """W.r.t. the input and every layer's parameters, from a loss on the output and on a
    middle state; relative 1e-8 to the largest gradient (DeepPCR's adjoint reduction is
    exact per tensor too, even for the 1e-70 gradients of the first layers of a deep tanh
    stack; Jacobi's adjoint sweeps stop at ``tol`` relative to the largest adjoint)."""
    layers, x = family(depth), inputs().requires_grad_()
    weights = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    params = [p for layer in layers for p in layer.parameters()]

    def loss(states):
        return (states[-1] * weights).sum() + (states[depth // 2] ** 2).sum()

    expected = torch.autograd.grad(loss(sequential(layers, x)), [x, *params])
    got = torch.autograd.grad(loss(solver(layers).solve(x).states), [x, *params])
    scale = max(g.abs().max() for g in expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-8 * scale)
    if solver is DeepPCR:
        assert max((g - e).norm() / e.norm() for g, e in zip(got, expected)) <= 1e-8


def test_only_the_output_may_be_differentiated_and_parameters_without_grad_get_none():
    layers, x = tanh_mlp(16), inputs()
    layers[3][0].weight.requires_grad_(False)
    result = DeepPCR(layers).solve(x)
    result.output.sum().backward()
    assert layers[3][0].weight.grad is None and layers[3][0].bias.grad is not None
    reference = copy.deepcopy(layers)
    sequential(reference, x)[-1].sum().backward()
    torch.testing.assert_close(layers[0][0].weight.grad, reference[0][0].weight.grad, rtol=1e-10, atol=0)


# -- fallback -----------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", SOLVERS, ids=["DeepPCR", "Jacobi"])
def test_an_expansive_relu_net_falls_back_to_the_layers_in_sequence_and_is_exact(solver):
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(8, 8), nn.ReLU()).double() for _ in range(64)]
    with torch.no_grad():
        for layer in layers:
            layer[0].weight.mul_(6)
    x = inputs().requires_grad_()
    result = solver(layers).solve(x)
    expected = sequential(layers, x)
    assert result.fallback and expected.abs().max() > 1e15  # far beyond what tol=1e-10 can certify
    assert torch.equal(result.states, expected.detach())
    got, = torch.autograd.grad(result.output.sum(), x)
    want, = torch.autograd.grad(expected[-1].sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=0)


def test_a_solve_that_does_not_converge_within_max_iters_falls_back_and_counts_its_steps():
    layers, x = residual_mlp(64), inputs()
    with torch.no_grad():
        result = DeepPCR(layers, max_iters=2).solve(x)
        assert result.fallback and result.iterations == 2
        assert torch.equal(result.states, sequential(layers, x))
        nan = DeepPCR(layers).solve(x, init=torch.full((64, *x.shape), math.nan, dtype=x.dtype))
        assert nan.fallback and nan.iterations == 0 and torch.equal(nan.states, sequential(layers, x))


# -- Jacobi ---------------------------------------------------------------------------------------
def test_jacobi_is_exact_within_L_sweeps_and_stops_early_on_contractive_nets():
    x = inputs()
    with torch.no_grad():
        for depth in DEPTHS:
            # A residual stack does not contract: Jacobi needs its L sweeps, and is exact then.
            layers = residual_mlp(depth)
            result = Jacobi(layers).solve(x)
            assert not result.fallback and result.iterations <= depth
            assert (result.states - sequential(layers, x)).abs().max() <= 1e-9
        sweeps = []
        for gain in (1.0, 0.5):
            layers = tanh_mlp(256, gain=gain)
            result = Jacobi(layers).solve(x)
            assert not result.fallback and (result.states - sequential(layers, x)).abs().max() <= 1e-9
            sweeps.append(result.iterations)
    assert sweeps[0] < 64 and sweeps[1] < sweeps[0], sweeps  # out of 256: the stack contracts


# -- layers the solvers take ---------------------------------------------------------------------
def test_closed_form_and_torch_func_jacobians_give_the_same_solve():
    """The same stack as closed-form layers, as layers of their own (torch.func, stacked
    with vmap), as separate Linear and Tanh layers (two segments kinds alternating), and on
    an unbatched input: the same states."""
    fused = tanh_mlp(32)

    class TanhLayer(nn.Module):
        def __init__(self, linear: nn.Linear) -> None:
            super().__init__()
            self.linear = linear

        def forward(self, z):
            return torch.tanh(self.linear(z))

    own = [TanhLayer(layer[0]) for layer in fused]
    split = [m for layer in fused for m in layer]
    x = inputs()
    with torch.no_grad():
        expected = sequential(fused, x)
        a, b = DeepPCR(fused).solve(x), DeepPCR(own).solve(x)
        c = DeepPCR(split).solve(x)
        d = DeepPCR(fused).solve(x[0])
    assert a.iterations == b.iterations
    for result in (a, b):
        assert (result.states - expected).abs().max() <= 1e-12
    assert (c.states[1::2] - expected).abs().max() <= 1e-9 and c.states.shape == (64, *x.shape)
    assert d.states.shape == (32, 8) and (d.states - expected[:, 0]).abs().max() <= 1e-9
    assert [type(m) for m in fuse(split)] == [nn.Sequential] * 32 and fuse(split)[0][0] is fused[0][0]


def test_layers_that_change_the_shape_or_bad_arguments_get_clear_errors():
    with pytest.raises(ValueError, match=r"layer 1 \(Linear\(in_features=8, out_features=4"):
        DeepPCR([nn.Linear(8, 8), nn.Linear(8, 4)])
    layers = [nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Conv1d(2, 3, 1), nn.Tanh()]
    with pytest.raises(ValueError, match=r"layer 1 \(Conv1d\(2, 3.*\) maps a tensor of shape \(4, 2, 8\).* to "
                                         r"shape \(4, 3, 8\)"):
        Jacobi(layers).solve(torch.randn(4, 2, 8))
    with pytest.raises(ValueError, match=r"layer 0 .* fails on a tensor of shape \(4, 5\)"):
        DeepPCR([nn.Linear(8, 8), nn.Linear(8, 8)]).solve(torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"init must be a tensor of shape \(L, \*x.shape\) = \(2, 4, 8\)"):
        DeepPCR([nn.Linear(8, 8), nn.Linear(8, 8)]).solve(torch.randn(4, 8), init=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="at least one layer"):
        DeepPCR([])
    with pytest.raises(TypeError, match="not an nn.Module"):
        Jacobi([torch.tanh])
    with pytest.raises(ValueError, match="max_iters"):
        DeepPCR([nn.Tanh()], max_iters=-1)


# -- the depth programs, driven by a stage runner ------------------------------------------------------
def depth_model() -> nn.Sequential:
    """An encoder, 24 shape-keeping layers (Linear + Tanh, fused into 12 solved layers), a head."""
    torch.manual_seed(0)
    body = [m for _ in range(12) for m in (nn.Linear(16, 16), nn.Tanh())]
    return nn.Sequential(nn.Linear(6, 16), *body, nn.Linear(16, 3)).double()


def stream(n: int) -> list[torch.Tensor]:
    start, drift = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    return [start + 0.01 * t * drift for t in range(n)]


async def run_stage(make_program, model: nn.Module, frames, targets=None):
    """One stage (the whole model, on a threaded CPU device) driven by a StageRunner over
    ``frames``: its outputs (and losses), its stats, its program."""
    devices = pa.cpu_devices(1, threads=1)
    plan = SequentialSplit(model).plans([len(model)], devices)[0]
    devices[0].start(asyncio.get_running_loop())
    try:
        stats = StageStats(plan.name, plan.device.name, plan.units)
        program = make_program(plan, stats)
        ingress: Channel[Job] = Channel(4, name="ingress")
        out: list[Job] = []

        class Sink:
            def send_nowait(self, job):
                out.append(job)
                return True

            async def send(self, job):
                out.append(job)

            def close(self):
                pass

            def abort(self, exc):
                pass

        async def feed():
            for seq, x in enumerate(frames):
                target = None if targets is None else targets[seq]
                await ingress.send(Job(pa.Frame(seq, x, target=target), route=None, key=seq))
            ingress.close()

        runner = StageRunner([Stage(plan, program, stats)], Inlet(ingress), Outlet(Sink()))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(feed())
            tg.create_task(runner.run())
    finally:
        devices[0].close()
    return out, stats, program


async def test_a_stage_solved_in_depth_infers_what_the_plain_stage_does_warm_started_and_counted():
    model, frames, spans = depth_model(), stream(12), []
    plain, _, _ = await run_stage(lambda plan, stats: InferProgram(plan, stats, spans=None, check_outputs=True),
                                  model, frames)
    solved, stats, program = await run_stage(
        lambda plan, stats: DepthProgram(plan, stats, spans=spans, check_outputs=True), model, frames)
    assert [job.frame.seq for job in solved] == list(range(12)) and stats.frames == 12
    for a, b in zip(solved, plain):
        assert (a.frame.data - b.frame.data).abs().max() <= 1e-9
    # The encoder and the head run as usual; the 12 fused body layers are solved.
    assert [(len(layers), solver is not None) for layers, solver in program.stack._pieces] == [
        (1, False), (12, True), (1, False)]
    counters = stats.counters
    assert counters["solver_frames"] == 12 and counters["solver_fallbacks"] == 0
    iterations = [sum(1 for s in spans if s[1] == "iterate" and s[2] == seq) for seq in range(12)]
    assert sum(iterations) == counters["solver_iterations"]
    assert max(iterations[1:]) < iterations[0]  # warm-started from the frame before
    computes = {s[2]: s for s in spans if s[1] == "compute"}
    assert all(computes[s[2]][3] <= s[3] <= s[4] <= computes[s[2]][4] for s in spans if s[1] == "iterate")


@pytest.mark.parametrize("mode", ["sequential", "partime"])
async def test_a_stage_solved_in_depth_learns_what_the_plain_stage_learns(mode):
    """The same frames, targets and optimiser: the same losses and weights (the solve's
    adjoint gives autograd's gradients), on the learning machinery's schedule."""
    frames = stream(10)
    targets = [torch.sin(x[:, :3]) for x in frames]
    config = OnlineLearning(loss=nn.functional.mse_loss, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05), mode=mode)
    plain_model, depth_model_ = depth_model(), depth_model()

    def plain(plan, stats):
        return LearnProgram(plan, StageLearner(config, plan.module, 0, 1), stats, spans=None, check_outputs=True)

    def solved(plan, stats):
        learner = StageLearner(config, DepthStack(plan.module, DeepPCR), 0, 1)
        return DepthLearnProgram(plan, learner, stats, spans=None, check_outputs=True)

    a, _, _ = await run_stage(plain, plain_model, frames, targets)
    b, stats, program = await run_stage(solved, depth_model_, frames, targets)
    losses = [job.frame.meta["loss"] for job in a], [job.frame.meta["loss"] for job in b]
    assert losses[0] == pytest.approx(losses[1], rel=1e-9, abs=0)
    for p, q in zip(plain_model.parameters(), depth_model_.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    assert program.learner.steps == 10 and stats.counters["solver_frames"] >= 10
    assert stats.counters["solver_fallbacks"] == 0 and program.stack.counters is None  # detached


def test_a_depth_learner_must_be_made_on_a_depth_stack():
    model = depth_model()
    plan = SequentialSplit(model).plans([len(model)], pa.cpu_devices(1, threads=1))[0]
    config = OnlineLearning(loss=nn.functional.mse_loss)
    with pytest.raises(TypeError, match="DepthStack"):
        DepthLearnProgram(plan, StageLearner(config, model, 0, 1), StageStats(plan.name, "cpu", 1), spans=None,
                          check_outputs=False)


@pytest.mark.parametrize("activation", [nn.Sigmoid(), nn.ReLU(inplace=True), nn.LeakyReLU(0.1), nn.GELU(), nn.SiLU(),
                                        nn.Softplus(beta=2.0)], ids=lambda a: type(a).__name__)
def test_every_closed_form_activation_gives_the_layers_and_their_gradients(activation):
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(8, 8), copy.deepcopy(activation)).double() for _ in range(24)]
    x = inputs().requires_grad_()
    result = DeepPCR(layers).solve(x)
    expected = sequential(layers, x)
    assert not result.fallback and (result.states - expected).abs().max() <= 1e-9
    params = [x, *(p for layer in layers for p in layer.parameters())]
    got = torch.autograd.grad(result.output.sum(), params)
    want = torch.autograd.grad(expected[-1].sum(), params)
    scale = max(g.abs().max() for g in want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-8 * scale)


@pytest.mark.parametrize("solver", SOLVERS, ids=["DeepPCR", "Jacobi"])
def test_layers_of_any_kind_go_through_torch_func_with_their_buffers(solver):
    """Convolutions with BatchNorm (eval mode: its running statistics are buffers) on
    (batch, channels, length) inputs, and one layer of another structure among them: states
    and gradients as in sequence."""
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Conv1d(3, 3, 3, padding=1), nn.BatchNorm1d(3), nn.Tanh()).double() for _ in range(10)]
    layers.insert(5, Residual(6).double())
    for layer in layers:
        layer.eval()
        if isinstance(layer, nn.Sequential):
            layer[1].running_mean.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    result = solver(layers).solve(x)
    expected = sequential(layers, x)
    assert not result.fallback and (result.states - expected).abs().max() <= 1e-9
    params = [x, *(p for layer in layers for p in layer.parameters())]
    got = torch.autograd.grad(result.output.sum(), params)
    want = torch.autograd.grad(expected[-1].sum(), params)
    scale = max(g.abs().max() for g in want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-8 * scale)


def test_a_depth_stack_chooses_its_tolerance_by_dtype_and_takes_solver_classes_only():
    model = depth_model().float()
    stack = DepthStack(model, Jacobi)
    stack.counters = {}
    xs = [x.float() for x in stream(4)]
    with torch.no_grad():
        for x in xs:
            assert (stack(x) - model(x)).abs().max() <= 1e-4
    assert stack.solvers[0].tol == 1e-5 and isinstance(stack.solvers[0], Jacobi)
    assert stack.counters["solver_fallbacks"] == 0 and stack.counters["solver_frames"] == 4
    with pytest.raises(TypeError, match="solver class"):
        DepthStack(model, lambda layers: DeepPCR(layers))


def test_a_depth_stack_takes_a_runs_tolerance_from_the_runs_own_input():
    """A stage whose payload is not a tensor (a pair, summed by its first layer) solves its
    run too (it raised a TypeError, with no dtype to choose the tolerance by); a run after a
    layer that changes the dtype gets that dtype's tolerance."""
    class Sum(nn.Module):
        def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return pair[0] + pair[1]

    class Float32(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float()

    torch.manual_seed(0)
    tail = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3)])
    pair = (torch.randn(2, 4), torch.randn(2, 4))
    for first, x, plain in ((Sum(), pair, pair[0] + pair[1]), (Float32(), pair[0].double(), pair[0])):
        stack = DepthStack(nn.Sequential(first, *tail))
        with torch.no_grad():
            assert (stack(x) - tail(plain)).abs().max() <= 1e-4
        assert len(stack.solvers) == 1 and stack.solvers[0].tol == 1e-5


# -- the Pipeline's depth= ------------------------------------------------------------------------
def _mlp64(depth: int = 12, width: int = 6) -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)]).double()


@pytest.mark.parametrize("solver", [DeepPCR, Jacobi])
async def test_a_pipeline_with_depth_equals_the_layers_run_in_sequence(solver):
    model, g = _mlp64(), torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 6, dtype=torch.float64, generator=g)
    xs = [x0 + 0.01 * t * torch.randn(2, 6, dtype=torch.float64, generator=g) for t in range(10)]  # a slow drift
    with torch.no_grad():
        expected = [model(x) for x in xs]
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(2, threads=1), balance=[6, 6], depth={1: solver},
                       input_spec=None)
    async with pipe:
        outputs = [f.data async for f in pipe.stream(xs)]
    assert all(torch.allclose(y, e, rtol=0, atol=1e-9) for y, e in zip(outputs, expected))
    stages = pipe.stats().stages
    assert stages[0].counters == {} and stages[1].counters["solver_frames"] == 10
    assert stages[1].counters["solver_fallbacks"] == 0 and stages[1].counters["solver_iterations"] >= 10
    assert 'partime_stage_counter_total{device="cpu:1",name="solver_frames",stage="1"} 10.0' in prometheus_text(pipe)
    assert pipe.metrics().stages[1].counters["solver_frames"] == 10


async def test_a_pipeline_learning_with_depth_learns_as_the_plain_one():
    g = torch.Generator().manual_seed(2)
    frames = [pa.Frame(t, torch.randn(1, 6, dtype=torch.float64, generator=g),
                       target=torch.randn(1, 6, dtype=torch.float64, generator=g)) for t in range(8)]
    weights = []
    for depth in (None, DeepPCR):
        model = _mlp64()
        learning = pa.OnlineLearning(loss=nn.MSELoss(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                                     mode="stashed")
        pipe = pa.Pipeline(model, devices=pa.cpu_devices(2, threads=1), balance=[6, 6], learning=learning,
                           depth=depth)
        async with pipe:
            async for _ in pipe.stream(frames):
                pass
        assert [learner.steps for learner in pipe.learners] == [8, 8]
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, rtol=0, atol=1e-9) for a, b in zip(*weights))


def test_depth_argument_errors():
    with pytest.raises(ValueError, match="depth names stage 2, but the pipeline has stages 0..1"):
        pa.Pipeline(_mlp64(), devices=pa.cpu_devices(2), depth={2: DeepPCR})
    with pytest.raises(TypeError, match="depth must be a solver class"):
        pa.Pipeline(_mlp64(), devices=pa.cpu_devices(2), depth="deeppcr")
    with pytest.raises(TypeError, match=r"depth\[0\] must be a solver class"):
        pa.Pipeline(_mlp64(), devices=pa.cpu_devices(2), depth={0: nn.Linear})
