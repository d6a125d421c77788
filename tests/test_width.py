"""Parallel in width (partime_async.width, issue 22): RePurpose's restructuring of a trained model
into K sub-models that exchange few activations, and the width-split stage that runs them.

What is asserted: budget 1.0 is an exact permutation with balanced workers; a model with a
planted block structure whose neurons were shuffled is recovered exactly, with no
communication at budget 0; refit is never worse than masking (and on a dense trained model at
budget 0.25 it at least halves masking's error); the budget is used, not only respected; the
balanced Hungarian assignment equals brute force on tiny layers; the width-split stage,
driven by a StageRunner, equals ``plan.model``, exchanges exactly the plan's communication,
and reports a worker's error naming its stage and frame."""
from __future__ import annotations

import asyncio
import itertools
import re
import threading

import pytest
import torch
from torch import nn

import partime_async as pa
from partime_async.aio import Channel
from partime_async.core.stats import StageStats
from partime_async.partition import SequentialSplit
from partime_async.pipeline.routes import Route
from partime_async.programs.width import WidthProgram
from partime_async.stage import Stage, StageRunner
from partime_async.transport import Inlet, Job, Outlet, local_link
from partime_async.width import SplitConv2d, SplitLinear, balanced_assignment, repurpose


@pytest.fixture(autouse=True)
def one_thread():
    """Small models: one intra-op thread is the fastest, and steady on a shared machine (the
    suite's leak check restores the count after each test)."""
    torch.set_num_threads(1)


def mlp(widths, act=nn.ReLU):
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def clusters(n, d=8, classes=6, per=6, seed=0):
    """A small classification problem: ``per`` Gaussian clusters per class in ``d`` dimensions."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes * per, d, generator=g) * 1.5
    pick = torch.randint(0, classes * per, (n,), generator=g)
    return centers[pick] + 0.4 * torch.randn(n, d, generator=g), pick // per


@pytest.fixture(scope="module")
def trained():
    """A dense MLP (8 -> 48 -> 48 -> 48 -> 6) trained for a few hundred steps, calibration and
    held-out inputs."""
    torch.manual_seed(0)
    x, y = clusters(6000)
    model = mlp([8, 48, 48, 48, 6])
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: threads would only contend (a module fixture: before one_thread)
    try:
        for step in range(400):
            batch = torch.randint(0, 4000, (128,))
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model, x[:4000], x[4000:]


def output_error(model, plan, x):
    with torch.no_grad():
        return float(((plan.model(x) - model(x)) ** 2).mean())


def split_layers(plan):
    return [m for m in plan.model if isinstance(m, (SplitLinear, SplitConv2d))]


# -- budget 1.0 --------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [2, 3, 4])
@pytest.mark.parametrize("refit", [True, False])
def test_budget_one_is_an_exact_permutation_with_balanced_workers(trained, workers, refit):
    model, calibration, heldout = trained
    plan = repurpose(model, calibration, workers=workers, budget=1.0, refit=refit)
    with torch.no_grad():
        torch.testing.assert_close(plan.model(heldout), model(heldout), rtol=1e-5, atol=1e-5)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert len(plan.assignment) == len(linears)
    for owner, layer in zip(plan.assignment, linears):
        assert owner.dtype == torch.long and owner.shape == (layer.out_features,)
        sizes = torch.bincount(owner, minlength=workers)
        assert int(sizes.max() - sizes.min()) <= 1, sizes
    # Nothing pruned: every hidden activation goes to every other worker (the dense split).
    assert plan.communication == plan.dense_communication == (workers - 1) * 48 * 3
    # The blocks hold exactly the model's weights, permuted: one block per worker and layer.
    for split, layer, owner in zip(split_layers(plan), linears, plan.assignment):
        assert split.sizes == tuple(torch.bincount(owner, minlength=workers).tolist())
        assert sum(p.numel() for p in split.parameters()) == layer.weight.numel() + layer.bias.numel()


def test_budget_one_is_exact_for_convolutions_with_batchnorm_folded():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12 * 3 * 3, 10))
    bn = model[1]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(200, 3, 14, 14)
    plan = repurpose(model, x, workers=3, budget=1.0)
    with torch.no_grad():
        torch.testing.assert_close(plan.model(x), model(x), rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plan.model)  # folded
    # A channel map is H*W activations: 8 channels of 14x14 and 12 of 3x3, to 2 others each.
    assert plan.communication == plan.dense_communication == 2 * (8 * 14 * 14 + 12 * 3 * 3)
    half = repurpose(model, x, workers=3, budget=0.5)
    assert plan.dense_communication / 4 <= half.communication <= plan.dense_communication / 2
    masked = repurpose(model, x, workers=3, budget=0.5, refit=False)
    assert output_error(model, half, x) < output_error(model, masked, x)


@pytest.mark.parametrize("model, message", [
    (nn.Sequential(nn.Linear(4, 8), nn.Softmax(-1), nn.Linear(8, 2)), "Softmax between two weight layers"),
    (nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 4, 1)), "groups=2"),
    (nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Linear(8, 2)), "needs an nn.Flatten"),
    (nn.Sequential(nn.ReLU()), "no Linear or Conv2d"),
])
def test_unsupported_models_are_refused_with_the_reason(model, message):
    x = torch.randn(16, 4, 6, 6) if isinstance(model[0], nn.Conv2d) else torch.randn(16, 4)
    with pytest.raises(ValueError, match=message):
        repurpose(model, x, workers=2)
    with pytest.raises(TypeError, match="nn.Sequential"):
        repurpose(nn.Linear(4, 4), torch.randn(8, 4))
    with pytest.raises(ValueError, match="budget"):
        repurpose(mlp([4, 8, 2]), torch.randn(8, 4), budget=1.5)


# -- planted structure -----------------------------------------------------------------------------
def planted(workers=4, width=32, inputs=12, outputs=8, seed=3):
    """A model of ``workers`` independent blocks after a dense first layer (its input is
    broadcast anyway), whose neurons are then shuffled in every layer; and the true block of
    each (shuffled) neuron, layer by layer."""
    g = torch.Generator().manual_seed(seed)
    widths = [width, width, width, outputs]
    blocks = [torch.arange(n) * workers // n for n in widths]  # block of each neuron, before the shuffle
    layers, shuffled = [], []
    previous = None
    fan_in = inputs
    for n, block in zip(widths, blocks):
        weight = torch.randn(n, fan_in, generator=g) / fan_in ** 0.5
        if previous is not None:
            weight = weight * (block[:, None] == previous[None, :])  # only within a block
        perm = torch.randperm(n, generator=g)
        layer = nn.Linear(fan_in, n)
        with torch.no_grad():
            w = weight[perm]
            if shuffled:
                w = w[:, shuffled[-1]]
            layer.weight.copy_(w)
            layer.bias.copy_(torch.randn(n, generator=g)[perm] * 0.1)
        layers.append(layer)
        shuffled.append(perm)
        previous, fan_in = block, n
    model = nn.Sequential(layers[0], nn.Tanh(), layers[1], nn.ReLU(), layers[2], nn.ReLU(), layers[3])
    truth = [block[perm] for block, perm in zip(blocks, shuffled)]
    return model, truth


@pytest.mark.parametrize("refit", [True, False])
def test_a_planted_block_structure_is_recovered_exactly_with_no_communication(refit):
    model, truth = planted()
    x = torch.randn(1000, 12)
    plan = repurpose(model, x, workers=4, budget=0.0, refit=refit)
    assert plan.communication == plan.dense_communication == 0
    # The same worker holds a block in every layer: worker = relabelling of block, shared by all layers.
    relabel = {}
    for owner, block in zip(plan.assignment, truth):
        for w, b in zip(owner.tolist(), block.tolist()):
            assert relabel.setdefault(b, w) == w
    assert sorted(relabel.values()) == [0, 1, 2, 3]
    with torch.no_grad():
        torch.testing.assert_close(plan.model(x), model(x), rtol=1e-5, atol=1e-6)
    assert all(layer.communication() == 0 for layer in split_layers(plan))


# -- refit and budget --------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [2, 4])
def test_refit_is_never_worse_than_masking_and_halves_its_error_on_a_dense_model(trained, workers):
    model, calibration, heldout = trained
    errors = {}
    for budget in (0.0, 0.1, 0.25, 0.5):
        refit = output_error(model, repurpose(model, calibration, workers=workers, budget=budget), heldout)
        masked = output_error(model, repurpose(model, calibration, workers=workers, budget=budget, refit=False),
                              heldout)
        errors[budget] = (refit, masked)
        assert refit <= masked, errors
    refit, masked = errors[0.25]
    assert refit <= 0.5 * masked, errors


@pytest.mark.parametrize("workers", [2, 3, 4])
@pytest.mark.parametrize("refit, selection", [(True, "data"), (False, "data"), (False, "magnitude")])
def test_the_budget_is_used_not_only_respected(trained, workers, refit, selection):
    model, calibration, _ = trained
    for budget in (0.05, 0.1, 0.25, 0.5):
        plan = repurpose(model, calibration, workers=workers, budget=budget, refit=refit, selection=selection)
        dense = plan.dense_communication
        assert budget / 2 * dense <= plan.communication <= budget * dense, (budget, plan.communication, dense)
        # What the plan reports is what its blocks receive.
        assert plan.communication == sum(layer.communication() for layer in split_layers(plan))
        assert plan.communication == sum(plan.layer_communication)
    zero = repurpose(model, calibration, workers=workers, budget=0.0, refit=refit, selection=selection)
    assert zero.communication == 0


def test_random_assignments_can_be_given_and_are_kept(trained):
    model, calibration, _ = trained
    g = torch.Generator().manual_seed(0)
    given = [torch.randperm(n, generator=g) % 3 for n in (48, 48, 48, 6)]
    plan = repurpose(model, calibration, workers=3, budget=0.25, assignment=given)
    assert all(torch.equal(a, b) for a, b in zip(plan.assignment, given))
    with pytest.raises(ValueError, match="assignment"):
        repurpose(model, calibration, workers=3, assignment=given[:2])


# -- the Hungarian step -------------------------------------------------------------------------------
def brute_force(cost):
    """The balanced assignment of least total cost, by enumeration."""
    n, k = cost.shape
    best, best_owner = None, None
    for owner in itertools.product(range(k), repeat=n):
        sizes = [owner.count(w) for w in range(k)]
        if max(sizes) - min(sizes) > 1:
            continue
        total = float(sum(cost[j, w] for j, w in enumerate(owner)))
        if best is None or total < best:
            best, best_owner = total, owner
    return torch.tensor(best_owner)


@pytest.mark.parametrize("n, k", [(4, 2), (5, 2), (6, 3), (7, 3), (8, 4), (7, 4), (3, 3)])
def test_the_balanced_assignment_equals_brute_force(n, k):
    g = torch.Generator().manual_seed(n * 10 + k)
    for _ in range(5):
        cost = torch.randn(n, k, generator=g, dtype=torch.float64)
        assert torch.equal(balanced_assignment(cost), brute_force(cost))


@pytest.mark.parametrize("workers", [2, 3])
def test_a_tiny_layer_is_assigned_as_brute_force_would(workers):
    """The last layer's neurons (no next layer to weigh) go where the weight mass from the
    previous layer's neurons is largest, ``m[j, i] = W[j, i]**2 * E[a_i**2]``: the balanced
    minimum of ``-sum(m[j, i] for i on w)``, found by brute force."""
    torch.manual_seed(workers)
    model = mlp([5, 9, 7, 6], act=nn.Tanh)
    x = torch.randn(400, 5)
    plan = repurpose(model, x, workers=workers, budget=0.5)
    with torch.no_grad():
        a = model[:4](x)
    mass = model[4].weight.detach().double() ** 2 * (a.double() ** 2).mean(0)
    previous = plan.assignment[1]
    cost = torch.stack([-mass[:, previous == w].sum(1) for w in range(workers)], 1)
    assert torch.equal(plan.assignment[2], brute_force(cost))


# -- the width-split stage ---------------------------------------------------------------------------------
class Recorder:
    def __init__(self):
        self.items, self.closed, self.aborted = [], False, None

    def send_nowait(self, job):
        self.items.append(job)
        return True

    async def send(self, job):
        self.items.append(job)

    def close(self):
        self.closed = True

    def abort(self, exc):
        self.aborted, self.closed = exc, True


async def drive(plans, programs, xs):
    """Stream ``xs`` through one runner per plan (as tests/test_seams.py does); the sink."""
    loop = asyncio.get_running_loop()
    devices = [plan.device for plan in plans]
    for device in devices:
        device.start(loop)
    ingress: Channel[Job] = Channel(4, name="ingress")
    sink = Recorder()
    inlet, runners = Inlet(ingress), []
    for k, (plan, program) in enumerate(zip(plans, programs)):
        if k + 1 < len(plans):
            outlet, next_inlet = local_link(2, name=f"after stage {k}")
        else:
            outlet, next_inlet = Outlet(sink), None
        stats = program.stats
        runners.append(StageRunner([Stage(plan, program, stats)], inlet, outlet))
        inlet = next_inlet

    async def feed():
        for seq, x in enumerate(xs):
            await ingress.send(Job(pa.Frame(seq, x), route=Route(), key=seq))
        ingress.close()

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(feed())
            for runner in runners:
                tg.create_task(runner.run())
    finally:
        for device in devices:
            device.close()
    return sink


def programs_for(plans, **kwargs):
    out = []
    for plan in plans:
        stats = StageStats(plan.name, plan.device.name, plan.units)
        program = WidthProgram(plan, stats, spans=None, check_outputs=True, **kwargs)
        program.stats = stats
        out.append(program)
    return out


@pytest.mark.parametrize("workers, budget", [(2, 0.25), (3, 0.1), (4, 0.0), (4, 1.0)])
async def test_the_width_split_stage_equals_the_plan_model(trained, workers, budget):
    model, calibration, heldout = trained
    plan = repurpose(model, calibration, workers=workers, budget=budget)
    plans = SequentialSplit(plan.model).plans([len(plan.model)], pa.cpu_devices(1, threads=1))
    programs = programs_for(plans)
    xs = [heldout[i * 16:(i + 1) * 16] for i in range(12)]
    sink = await drive(plans, programs, xs)
    assert [job.frame.seq for job in sink.items] == list(range(12)) and sink.closed
    with torch.no_grad():
        for job, x in zip(sink.items, xs):
            torch.testing.assert_close(job.frame.data, plan.model(x), rtol=0, atol=1e-6)
    stats = programs[0].stats
    assert stats.frames == 12 and stats.busy_s > 0
    # Only the kept cross activations were exchanged: the plan's communication per sample.
    assert stats.counters["exchanged_activations"] == plan.communication * 16 * 12
    assert (stats.counters["exchanges"] == 0) == (plan.communication == 0)


async def test_a_width_split_model_cut_in_depth_runs_as_two_width_split_stages(trained):
    model, calibration, heldout = trained
    plan = repurpose(model, calibration, workers=3, budget=0.25)
    plans = SequentialSplit(plan.model).plans([3, 4], pa.cpu_devices(2, threads=1))
    programs = programs_for(plans, threads=1)
    xs = [heldout[i * 8:(i + 1) * 8] for i in range(6)]
    sink = await drive(plans, programs, xs)
    with torch.no_grad():
        for job, x in zip(sink.items, xs):
            torch.testing.assert_close(job.frame.data, plan.model(x), rtol=0, atol=1e-6)
    exchanged = sum(p.stats.counters["exchanged_activations"] for p in programs)
    assert exchanged == plan.communication * 8 * 6


async def test_a_worker_error_fails_the_run_naming_the_stage_and_frame(trained):
    model, calibration, heldout = trained
    plan = repurpose(model, calibration, workers=2, budget=0.25)
    plans = SequentialSplit(plan.model).plans([len(plan.model)], pa.cpu_devices(1, threads=1))
    programs = programs_for(plans)
    xs = [heldout[:4], heldout[4:8], torch.randn(4, 5), heldout[8:12]]  # frame 2 has the wrong width
    with pytest.raises(ExceptionGroup) as info:
        await drive(plans, programs, xs)
    error = info.value
    while isinstance(error, ExceptionGroup):  # the run's task group holds the runner's
        error = error.exceptions[0]
    assert isinstance(error, pa.PipelineError) and error.seq == 2 and error.component == plans[0].name
    assert not programs[0]._threads  # detached: the workers were joined


def test_the_restructured_model_learns_with_its_pruned_connections_absent(trained):
    """Fine-tuning ``plan.model`` as an ordinary module (or through a Pipeline) never brings a
    pruned connection back: it has no parameter for one."""
    model, calibration, heldout = trained
    plan = repurpose(model, calibration, workers=2, budget=0.1)
    before = [layer.communication() for layer in split_layers(plan)]
    with torch.no_grad():
        target = model(calibration)
    opt = torch.optim.Adam(plan.model.parameters(), 1e-3)
    first = None
    for step in range(30):
        loss = nn.functional.mse_loss(plan.model(calibration[:512]), target[:512])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    assert [layer.communication() for layer in split_layers(plan)] == before


# -- the Pipeline's width= -----------------------------------------------------------------------
@pytest.mark.parametrize("width", [True, {1}])
async def test_a_pipeline_runs_a_repurposed_model_split_in_width(trained, width):
    model, calibration, heldout = trained
    plan = repurpose(model, calibration, workers=2, budget=0.25)
    head = nn.Identity()
    pipe = pa.Pipeline([head, *plan.model], devices=pa.cpu_devices(2, threads=1), balance=[1, len(plan.model)],
                       width=width)
    xs = [heldout[i * 16:(i + 1) * 16] for i in range(8)]
    async with pipe:
        outputs = [f.data async for f in pipe.stream(xs)]
    with torch.no_grad():
        for y, x in zip(outputs, xs):
            torch.testing.assert_close(y, plan.model(x), rtol=0, atol=1e-6)
    stages = pipe.stats().stages
    assert not stages[1].inline and stages[0].counters == {}
    assert stages[1].counters["exchanged_activations"] == plan.communication * 16 * 8


def test_width_argument_errors(trained):
    model, calibration, _ = trained
    plan = repurpose(model, calibration, workers=2, budget=0.25)
    learning = pa.OnlineLearning(loss=nn.MSELoss())
    with pytest.raises(ValueError, match="width-split stages infer only"):
        pa.Pipeline(plan.model, devices=pa.cpu_devices(1), width=True, learning=learning)
    with pytest.raises(ValueError, match="width must be True, False or a collection of stage indices in 0..0"):
        pa.Pipeline(plan.model, devices=pa.cpu_devices(1), width={3})


async def test_a_width_stage_without_split_layers_fails_the_set_up_with_the_reason(trained):
    model, _, _ = trained
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(2), balance=[len(model) - 1, 1], width={1})
    with pytest.raises(pa.PipelineError, match=r"pipeline set-up failed on frame 0: .*stage 1 \(cpu:1\): the stage "
                                               r"holds no SplitLinear/SplitConv2d layer"):
        async with pipe:
            async for _ in pipe.stream([torch.randn(4, model[0].in_features)]):
                pass


def test_a_frame_handed_to_workers_that_the_run_then_detached_fails_instead_of_waiting(trained):
    """The run ends (detach) while the device thread hands a frame to the workers it saw
    attached: the frame fails, saying the workers left, rather than waiting for ever (which
    would hang the device's close)."""
    model, calibration, heldout = trained
    plan = repurpose(model, calibration, workers=2, budget=0.25)
    plans = SequentialSplit(plan.model).plans([len(plan.model)], pa.cpu_devices(1, threads=1))
    (program,) = programs_for(plans)
    program.attach()
    seen = program._running()  # what the device thread read just before the run detached
    program.detach()
    program._running = lambda: seen
    outcome: list[BaseException] = []

    def forward() -> None:
        try:
            program.forward(heldout[:4], 0)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=forward)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert len(outcome) == 1 and re.search(r"width worker thread\(s\) .* left", str(outcome[0]))
