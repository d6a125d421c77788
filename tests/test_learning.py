"""Online learning: every mode against a hand-written reference, every stage learning.

The references below are written independently of partime_async.programs: a lock-step clock
as in PARTIME's own code (at clock c, stage k forwards frame c - k and applies the gradient of
frame c - k - 2(S-1-k), which stage k+1 produced at clock c - 1), with deep copies of the
stage modules as the stashed weight versions.
"""
import asyncio
import copy
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import partime_async as pa


def make_model(width: int = 6, depth: int = 6, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)])


def make_frames(n: int, width: int = 6, every_target: int = 1, seed: int = 1) -> list[pa.Frame]:
    g = torch.Generator().manual_seed(seed)
    return [pa.Frame(t, torch.randn(1, width, generator=g),
                     target=torch.randn(1, width, generator=g) if t % every_target == 0 else None)
            for t in range(n)]


def sgd(lr: float = 0.05):
    return lambda params: torch.optim.SGD(params, lr=lr)


async def learn(model, frames, mode, balance, *, optimizer=None, threads=1, **kwargs):
    learning = pa.OnlineLearning(loss=nn.MSELoss(), optimizer=optimizer or sgd(), mode=mode, **kwargs)
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(len(balance), threads=threads), balance=balance,
                       learning=learning)
    async with pipe:
        outputs = [f async for f in pipe.stream(frames)]
    return pipe, outputs


def split_copy(model, balance):
    stages, start = [], 0
    for n in balance:
        stages.append(copy.deepcopy(nn.Sequential(*list(model)[start:start + n])))
        start += n
    return stages


def reference(model, frames, mode, balance, lr=0.05, stage_lr=None):
    """PARTIME's lock-step schedule, written out; returns the stage modules after learning.
    ``stage_lr(k, delay)``: stage k's learning rate (default: ``lr`` for all)."""
    stages = split_copy(model, balance)
    S, N = len(stages), len(frames)
    delay = [2 * (S - 1 - k) for k in range(S)]
    opts = [torch.optim.SGD(s.parameters(), lr=stage_lr(k, delay[k]) if stage_lr else lr) for k, s in enumerate(stages)]
    inputs = {}        # (k, t) -> detached input of stage k for frame t
    kept = {}          # (k, t) -> (input requiring grad, output graph, module version used)
    grads = {}         # (k, t) -> gradient w.r.t. stage k's output for frame t
    for c in range(N + 3 * S):
        produced = {}
        for k in range(S):
            t = c - k
            if 0 <= t < N:  # forward frame t
                x = frames[t].data if k == 0 else inputs[(k, t)]
                x = x if k == 0 else x.detach().requires_grad_()
                version = copy.deepcopy(stages[k]) if mode == "stashed" else stages[k]
                out = version(x)
                kept[(k, t)] = (x, out, version)
                if k + 1 < S:
                    inputs[(k + 1, t)] = out.detach()
            owed = t - delay[k]
            if not 0 <= owed < N or frames[owed].target is None:
                continue
            if mode == "partime" and not 0 <= t < N:
                continue  # drain: no newer graph to carry it
            graph_of = t if mode == "partime" else owed
            x, out, version = kept[(k, graph_of)]
            params = list(version.parameters())
            if k == S - 1:
                loss = nn.functional.mse_loss(out, frames[owed].target)
                found = torch.autograd.grad(loss, params + ([x] if k > 0 else []))
            else:
                found = torch.autograd.grad(out, params + ([x] if k > 0 else []), grads.pop((k, owed)))
            for p, g in zip(stages[k].parameters(), found[:len(params)]):
                p.grad = g
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            if k > 0:
                produced[(k - 1, owed)] = found[len(params)]
        grads.update(produced)
    return stages


def stage_params(model, balance):
    out, start = [], 0
    for n in balance:
        out.append([p for layer in list(model)[start:start + n] for p in layer.parameters()])
        start += n
    return out


@pytest.mark.parametrize("mode", ["sequential", "partime", "stashed"])
async def test_one_stage_equals_plain_online_sgd(mode):
    model, frames = make_model(), make_frames(25, every_target=2)
    expected = copy.deepcopy(model)
    opt = torch.optim.SGD(expected.parameters(), lr=0.05)
    losses = []
    for f in frames:
        out = expected(f.data)
        if f.target is not None:
            loss = nn.functional.mse_loss(out, f.target)
            losses.append(loss.item())
            loss.backward()
            opt.step()
            opt.zero_grad()
    _, outputs = await learn(model, frames, mode, [6])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), expected.parameters()))
    assert [f.meta["loss"] for f in outputs if "loss" in f.meta] == losses


@pytest.mark.parametrize("mode", ["partime", "stashed"])
@pytest.mark.parametrize("balance", [[3, 3], [2, 2, 2], [1, 2, 2, 1]])
async def test_pipelined_learning_equals_reference(mode, balance):
    model, frames = make_model(), make_frames(30)
    expected = reference(copy.deepcopy(model), frames, mode, balance)
    pipe, outputs = await learn(model, frames, mode, balance)
    assert [f.seq for f in outputs] == list(range(30))
    for k, (ours, ref) in enumerate(zip(stage_params(model, balance), expected)):
        for p, q in zip(ours, ref.parameters()):
            assert torch.equal(p, q), f"stage {k} differs from the reference"


@pytest.mark.parametrize("mode", ["partime", "stashed"])
async def test_learning_matches_gradients_by_admission_not_by_seq(mode):
    """Seqs need not be unique (two streams, or a stream and submit(), each count from 0):
    a stream whose seqs repeat learns exactly as the same frames numbered 0, 1, 2, …"""
    model, frames = make_model(), make_frames(30)
    expected = reference(copy.deepcopy(model), frames, mode, [3, 3])
    repeated = [pa.Frame(t // 3, f.data, f.target) for t, f in enumerate(frames)]  # 0, 0, 0, 1, 1, 1, …
    pipe, outputs = await learn(model, repeated, mode, [3, 3])
    assert [f.seq for f in outputs] == [t // 3 for t in range(30)]
    for k, (ours, ref) in enumerate(zip(stage_params(model, [3, 3]), expected)):
        for p, q in zip(ours, ref.parameters()):
            assert torch.equal(p, q), f"stage {k} differs from the reference"


async def test_two_streams_and_submits_learn_from_one_pipeline():
    """Concurrent feeds of one learning pipeline, each numbering its frames from 0: every
    frame is delivered to its own reader and learnt from (stashed: one step per frame)."""
    frames = make_frames(20)
    learning = pa.OnlineLearning(loss=nn.MSELoss(), optimizer=sgd(), mode="stashed")
    pipe = pa.Pipeline(make_model(), devices=pa.cpu_devices(2, threads=1), balance=[3, 3], learning=learning)

    async def paced():
        for f in frames:
            await asyncio.sleep(0)
            yield f

    async def read():
        return [f.seq async for f in pipe.stream(paced())]

    async def submits():
        return [await pipe.submit(f.data, target=f.target) for f in frames]

    async with pipe:
        a, b, c = await asyncio.wait_for(asyncio.gather(read(), read(), submits()), 120)  # a hang fails, not a time
    assert a == b == list(range(20)) and len(c) == 20
    assert [learner.steps for learner in pipe.learners] == [60, 60]


async def test_a_run_after_a_failed_one_starts_its_schedule_afresh():
    """A run that fails mid-stream leaves gradients owed and graphs kept for its frames; the
    next run (same pipeline, same optimisers) must not wait for or apply those."""
    frames = make_frames(12)

    def failing():
        yield from frames[:7]
        raise OSError("camera unplugged")

    learning = pa.OnlineLearning(loss=nn.MSELoss(), optimizer=sgd(), mode="stashed")
    pipe = pa.Pipeline(make_model(), devices=pa.cpu_devices(2, threads=1), balance=[3, 3], learning=learning)
    with pytest.raises(pa.PipelineError, match="camera unplugged"):
        async with pipe:
            async for _ in pipe.stream(failing()):
                pass
    before = [learner.steps for learner in pipe.learners]
    async with pipe:
        out = await asyncio.wait_for(asyncio.ensure_future(_read_all(pipe, frames)), 120)  # a hang fails
    assert [f.seq for f in out] == list(range(12))
    assert [learner.steps - b for learner, b in zip(pipe.learners, before)] == [12, 12]


async def _read_all(pipe: pa.Pipeline, frames: list[pa.Frame]) -> list[pa.Frame]:
    return [f async for f in pipe.stream(frames)]


async def test_submit_takes_a_frame_with_its_target_or_one_given_beside_it():
    frames = make_frames(3)
    learning = pa.OnlineLearning(loss=nn.MSELoss(), optimizer=sgd(), mode="sequential")
    pipe = pa.Pipeline(make_model(), devices=pa.cpu_devices(1, threads=1), learning=learning)
    async with pipe:
        await pipe.submit(frames[0])  # its own target
        await pipe.submit(pa.Frame(7, frames[1].data), target=frames[1].target)  # the target given beside it
        await pipe.submit(pa.Frame(8, frames[2].data))  # no target: flows, learns nothing
    assert pipe.learners[0].steps == 2


@pytest.mark.parametrize("mode", ["partime", "stashed"])
async def test_frames_without_targets_learn_nothing_but_flow(mode):
    model, frames = make_model(), make_frames(24, every_target=3)
    expected = reference(copy.deepcopy(model), frames, mode, [2, 2, 2])
    pipe, outputs = await learn(model, frames, mode, [2, 2, 2])
    assert len(outputs) == 24
    for ours, ref in zip(stage_params(model, [2, 2, 2]), expected):
        assert all(torch.equal(p, q) for p, q in zip(ours, ref.parameters()))


@pytest.mark.parametrize("mode", ["partime", "stashed"])
async def test_every_stage_receives_gradients_and_changes(mode):
    model, frames = make_model(), make_frames(20)
    before = copy.deepcopy(model)
    pipe, _ = await learn(model, frames, mode, [2, 2, 2])
    for k, (ours, old) in enumerate(zip(stage_params(model, [2, 2, 2]), stage_params(before, [2, 2, 2]))):
        assert all(not torch.equal(p, q) for p, q in zip(ours, old)), f"stage {k} did not learn"
    steps = [learner.steps for learner in pipe.learners]
    if mode == "stashed":  # every frame with a target updates every stage exactly once
        assert steps == [20, 20, 20]
        assert [learner.dropped_gradients for learner in pipe.learners] == [0, 0, 0]
    else:  # partime drops the last 2(S-1-k) gradients at stage k, and says so
        assert steps == [16, 18, 20]
        assert [learner.dropped_gradients for learner in pipe.learners] == [4, 2, 0]


@pytest.mark.parametrize("mode", ["partime", "stashed"])
@pytest.mark.parametrize("delay_lr, factor", [(0.5, lambda d: 1 / (1 + 0.5 * d)), (lambda d: 0.9 ** d, lambda d: 0.9 ** d)])
async def test_delay_aware_learning_rates_equal_reference(mode, delay_lr, factor):
    """delay_lr scales stage k's rate by 1/(1 + c*d_k) (or a given factor of d_k); otherwise
    the rule is the mode's own: the lock-step reference with per-stage SGD rates."""
    balance = [2, 2, 2]
    model, frames = make_model(), make_frames(30)
    expected = reference(copy.deepcopy(model), frames, mode, balance, stage_lr=lambda k, d: 0.05 * factor(d))
    pipe, _ = await learn(model, frames, mode, balance, delay_lr=delay_lr)
    # hand-computed: delays 4, 2, 0
    assert [g["lr"] for learner in pipe.learners for g in learner.optimizer.param_groups] == \
        pytest.approx([0.05 * factor(4), 0.05 * factor(2), 0.05])
    for k, (ours, ref) in enumerate(zip(stage_params(model, balance), expected)):
        for p, q in zip(ours, ref.parameters()):
            assert torch.equal(p, q), f"stage {k} differs from the reference"


async def test_delay_aware_learning_rates_leave_one_stage_and_schedulers_consistent():
    # one stage: delay 0, nothing changes (sequential is never touched)
    model, frames = make_model(), make_frames(10)
    plain = copy.deepcopy(model)
    await learn(model, frames, "stashed", [6], delay_lr=3.0)
    await learn(plain, frames, "stashed", [6])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))
    # a scheduler built by the factory scales the reduced rate
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    pipe, _ = await learn(make_model(), make_frames(10), "partime", [3, 3], delay_lr=1.0, scheduler=sched)
    assert pipe.learners[0].optimizer.param_groups[0]["lr"] == pytest.approx(0.05 / 3 * 0.25 * 2)  # 8 steps
    assert pipe.learners[1].optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.25)        # 10 steps
    with pytest.raises(ValueError, match="delay_lr"):
        pa.OnlineLearning(loss=nn.MSELoss(), delay_lr=-1.0)


async def test_stashed_recompute_learns_every_frame_at_current_weights():
    model, frames = make_model(), make_frames(20)
    pipe, _ = await learn(model, frames, "stashed", [3, 3], recompute=True)
    assert [learner.steps for learner in pipe.learners] == [20, 20]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def batch_frames(n: int, batch: int = 4, width: int = 6, seed: int = 1) -> list[pa.Frame]:
    """Frames of several rows each (a BatchNorm in train mode needs more than one)."""
    g = torch.Generator().manual_seed(seed)
    return [pa.Frame(t, torch.randn(batch, width, generator=g), target=torch.randn(batch, width, generator=g))
            for t in range(n)]


async def test_stashed_recompute_updates_batchnorm_statistics_once_per_frame():
    """The recompute runs at the current weights but must not change module state: a
    BatchNorm's running statistics are those of one forward per frame, as without recompute."""
    frames, norms = batch_frames(20), {}
    for recompute in (False, True):
        # first in the model: its statistics depend on the frames only, not on the weights learnt
        model = nn.Sequential(nn.BatchNorm1d(6), *make_model())
        await learn(model, frames, "stashed", [2, 5], recompute=recompute)
        norms[recompute] = model[0]
    assert int(norms[True].num_batches_tracked) == int(norms[False].num_batches_tracked) == 20
    assert torch.equal(norms[True].running_mean, norms[False].running_mean)
    assert torch.equal(norms[True].running_var, norms[False].running_var)


class Jitter(nn.Module):
    """Sleeps a seeded random time per call: stage speeds vary, results must not."""

    def __init__(self, seed: int, scale: float) -> None:
        super().__init__()
        self.rng = __import__("random").Random(seed)
        self.scale = scale

    def forward(self, x):
        time.sleep(self.rng.random() * self.scale)
        return x


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 1000), mode=st.sampled_from(["partime", "stashed"]))
def test_learning_is_deterministic_whatever_the_stage_speeds(seed, mode):
    frames = make_frames(16)

    def run_with(jitter_seed):
        torch.manual_seed(0)
        layers = list(make_model())
        layers.insert(2, Jitter(jitter_seed, 0.002))
        layers.insert(5, Jitter(jitter_seed + 1, 0.002))
        model = nn.Sequential(*layers)
        asyncio.run(learn(model, frames, mode, [3, 2, 3]))
        return [p.detach().clone() for p in model.parameters()]

    a, b = run_with(seed), run_with(seed + 7)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


async def test_adam_clipping_and_scheduler_per_stage():
    model, frames = make_model(), make_frames(12)
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    pipe, _ = await learn(model, frames, "stashed", [3, 3], optimizer=lambda p: torch.optim.Adam(p, 1e-2),
                          clip_grad_norm=0.5, scheduler=sched)
    assert all(isinstance(learner.optimizer, torch.optim.Adam) for learner in pipe.learners)
    assert [learner.scheduler.last_epoch for learner in pipe.learners] == [12, 12]
    assert pipe.learners[0].optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)


async def test_unsupervised_loss_needs_no_target():
    model = make_model()
    frames = [pa.Frame(f.seq, f.data) for f in make_frames(10)]
    learning = pa.OnlineLearning(loss=lambda out: out.pow(2).mean(), optimizer=sgd(), mode="stashed",
                                 needs_target=False)
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(2, threads=1), balance=[3, 3], learning=learning)
    async with pipe:
        outputs = [f async for f in pipe.stream(frames)]
    assert [learner.steps for learner in pipe.learners] == [10, 10]
    assert all("loss" in f.meta for f in outputs)


async def test_state_dict_round_trip_resumes_identically():
    frames = make_frames(20)
    model_a = make_model()
    pipe_a, _ = await learn(model_a, frames[:10], "stashed", [3, 3],
                            optimizer=lambda p: torch.optim.Adam(p, 1e-2))
    state = pipe_a.state_dict()
    assert state["position"] == 10 and len(state["learners"]) == 2

    model_b = make_model(seed=123)  # different weights: the state must overwrite them
    learning = pa.OnlineLearning(loss=nn.MSELoss(), optimizer=lambda p: torch.optim.Adam(p, 1e-2), mode="stashed")
    pipe_b = pa.Pipeline(model_b, devices=pa.cpu_devices(2, threads=1), balance=[3, 3], learning=learning)
    pipe_b.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))
    async with pipe_b:
        async for _ in pipe_b.stream(frames[state["position"]:]):
            pass
    async with pipe_a:  # the first pipeline goes on over the same frames
        async for _ in pipe_a.stream(frames[10:]):
            pass
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))
    for la, lb in zip(pipe_a.learners, pipe_b.learners):
        sa, sb = la.optimizer.state_dict()["state"], lb.optimizer.state_dict()["state"]
        assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    # Optimiser states fit only the stages they were saved from: another split is refused at once.
    pipe_c = pa.Pipeline(make_model(), devices=pa.cpu_devices(2, threads=1), balance=[4, 2], learning=learning)
    with pytest.raises(ValueError, match=r"saved from stages split \[3, 3\] but this pipeline splits \[4, 2\]"):
        pipe_c.load_state_dict(state)
    inference = pa.Pipeline(make_model(), devices=pa.cpu_devices(3, threads=1), balance=[2, 2, 2])
    inference.load_state_dict(state)  # no optimisers to fit: the weights are what it needs
    assert all(torch.equal(v, state["model"][k]) for k, v in inference.model.state_dict().items())


async def test_learner_states_that_do_not_fit_fail_every_run_until_fixed():
    """Learner states loaded before the stages exist go into them at the build; states that do
    not fit fail that run, and the next one too (never a restart that silently drops them)."""
    state = (await learn(make_model(), make_frames(4), "stashed", [3, 3]))[0].state_dict()
    state["learners"] = state["learners"][:1]  # one stage's states for two stages
    learning = pa.OnlineLearning(loss=nn.MSELoss(), optimizer=sgd(), mode="stashed")
    pipe = pa.Pipeline(make_model(), devices=pa.cpu_devices(2, threads=1), balance=[3, 3], learning=learning)
    pipe.load_state_dict(state)
    for _ in range(2):
        with pytest.raises(pa.PipelineError, match="the state has 1 learning stages but this pipeline has 2"):
            await _stream_through(pipe, make_frames(4))
    assert [learner.steps for learner in pipe.learners] == [0, 0]


def _learning_pipeline(delay_lr: float | None, scheduler) -> pa.Pipeline:
    """A partime pipeline of make_model() over 2 stages, SGD, with ``delay_lr`` and ``scheduler``."""
    learning = pa.OnlineLearning(loss=nn.MSELoss(), optimizer=sgd(), mode="partime", delay_lr=delay_lr,
                                 scheduler=scheduler)
    return pa.Pipeline(make_model(), devices=pa.cpu_devices(2, threads=1), balance=[3, 3], learning=learning)


async def _stream_through(pipe: pa.Pipeline, frames) -> None:
    async with pipe:
        async for _ in pipe.stream(frames):
            pass


def _rates(pipe: pa.Pipeline) -> list[float]:
    """Every stage's learning rates, then its scheduler's base rates."""
    lrs = [g["lr"] for learner in pipe.learners for g in learner.optimizer.param_groups]
    return lrs + [lr for learner in pipe.learners for lr in getattr(learner.scheduler, "base_lrs", [])]


@pytest.mark.parametrize("scheduler", [
    None,
    lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5),     # steps from the current rate
    lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.9 ** step),  # from its base rates
    lambda opt: torch.optim.lr_scheduler.SequentialLR(  # its children's base rates
        opt, [torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.9 ** step),
              torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)], milestones=[14]),
])
async def test_a_loaded_state_takes_the_loading_pipelines_delay_lr(scheduler):
    """A state saved at one delay_lr and loaded into a pipeline with another continues at
    the other's rates: as if that pipeline had learnt from the start (rates only: the weights
    learnt differ); a state saved without the factor counts as saved at the loading one's."""
    frames = make_frames(20)

    def pipeline(delay_lr):
        return _learning_pipeline(delay_lr, scheduler)

    plain, reduced = pipeline(None), pipeline(20.0)  # stage 0's delay is 2: its factor 1/41
    await _stream_through(plain, frames[:10])
    await _stream_through(reduced, frames[:10])
    assert _rates(reduced)[0] == pytest.approx(_rates(plain)[0] / 41)
    states = {"plain": plain.state_dict(), "reduced": reduced.state_dict()}
    states["old"] = copy.deepcopy(states["reduced"])  # saved before the factor was recorded
    for learner_state in states["old"]["learners"]:
        del learner_state["lr_factor"]
    for pipe in (plain, reduced):  # the runs that resumed pipelines must match
        await _stream_through(pipe, frames[10:])
    for saved, into, like in [("plain", 20.0, reduced), ("old", 20.0, reduced), ("reduced", None, plain),
                              ("reduced", 20.0, reduced), ("plain", None, plain)]:
        resumed = pipeline(into)
        resumed.load_state_dict(states[saved])
        await _stream_through(resumed, frames[10:])  # learners made, state loaded: on the first frame
        assert [learner.steps for learner in resumed.learners] == [learner.steps for learner in like.learners]
        if (saved, into) in (("reduced", 20.0), ("plain", None)):  # the same factor: restored exactly
            assert _rates(resumed) == _rates(like)
        assert _rates(resumed) == pytest.approx(_rates(like), rel=1e-12)


async def test_partime_says_why_frame_shapes_must_not_change_within_the_delay():
    """partime carries frame t-d's gradient through frame t's graph: when the shapes change
    between them it fails with an error that says so (not autograd's), and stashed, which
    takes each gradient through its own frame's graph, learns from the same stream."""
    frames = [pa.Frame(t, torch.randn(1 if t < 6 else 2, 6), target=torch.randn(1 if t < 6 else 2, 6))
              for t in range(12)]
    learning = pa.OnlineLearning(loss=nn.MSELoss(), optimizer=sgd(), mode="partime")
    pipe = pa.Pipeline(make_model(), devices=pa.cpu_devices(2, threads=1), balance=[3, 3], learning=learning,
                       input_spec=None, output_spec=None)
    with pytest.raises(pa.PipelineError) as failed:
        async with pipe:
            async for _ in pipe.stream(frames):
                pass
    # stage 0 owes frame 4's gradient after its forward of frame 6, the first with 2 rows
    assert failed.value.seq == 4 and isinstance(failed.value.__cause__, ValueError)
    message = str(failed.value)
    assert "gradient of frame t-2 through the graph of frame t" in message and "mode='stashed'" in message
    assert "has shape (1, 6) but the output of frame t has shape (2, 6)" in message
    pipe = pa.Pipeline(make_model(), devices=pa.cpu_devices(2, threads=1), balance=[3, 3], input_spec=None,
                       output_spec=None, learning=pa.OnlineLearning(loss=nn.MSELoss(), optimizer=sgd(), mode="stashed"))
    async with pipe:
        assert len(await _read_all(pipe, frames)) == 12


def test_learning_configuration_errors():
    with pytest.raises(ValueError, match="unknown learning mode"):
        pa.OnlineLearning(loss=nn.MSELoss(), mode="async")
    with pytest.raises(ValueError, match="recompute"):
        pa.OnlineLearning(loss=nn.MSELoss(), mode="partime", recompute=True)
    with pytest.raises(ValueError, match="one device"):
        pa.Pipeline(make_model(), devices=pa.cpu_devices(2), learning=pa.OnlineLearning(loss=nn.MSELoss(), mode="sequential"))
    with pytest.raises(ValueError, match="target_spec must be 'output', an InputSpec or None"):
        pa.OnlineLearning(loss=nn.MSELoss(), target_spec="first")


async def test_next_frame_prediction_targets_join_by_seq():
    from partime_async.sources import SyntheticVideo, next_frame_targets

    video = SyntheticVideo(6, height=8, width=8)
    frames = [f async for f in next_frame_targets(video)]
    assert [f.seq for f in frames] == [0, 1, 2, 3, 4]
    assert all(torch.equal(f.data, video.render(f.seq)) and torch.equal(f.target, video.render(f.seq + 1))
               for f in frames)


async def test_a_next_frame_target_survives_a_model_that_modifies_its_input_in_place():
    """Frame t's target is a copy of frame t+1's payload, which then enters the model: a first
    ReLU(inplace=True) must not rewrite the target of the frame before."""
    from partime_async.sinks import Collect
    from partime_async.sources import from_iterable, next_frame_targets

    xs = [torch.randn(1, 8) for _ in range(12)]
    sink = Collect()
    pipe = pa.Pipeline(nn.Sequential(nn.ReLU(inplace=True), nn.Linear(8, 8)), devices=pa.cpu_devices(2, threads=1),
                       balance=[1, 1])
    await pa.run(next_frame_targets(from_iterable(x.clone() for x in xs)) >> pipe >> sink)
    assert [f.seq for f in sink.frames] == list(range(11))
    assert all(torch.equal(f.target, xs[f.seq + 1]) for f in sink.frames)  # before: 10 of 11 had lost their negatives


async def test_next_frame_targets_pair_by_seq_across_gaps_and_restarts():
    """A frame is joined only to the frame ``horizon`` seqs later; a frame whose target was
    skipped (a gap) or never comes (the end, or seqs going back) is counted, not emitted."""
    from partime_async.sources import from_iterable, next_frame_targets

    seqs = [0, 1, 5, 6, 7, 9, 10, 2, 3]  # gaps after 1 and 7; back to 2 (a new sequence) after 10
    joined = next_frame_targets(from_iterable([pa.Frame(s, torch.tensor([float(s)])) for s in seqs]))
    with pytest.warns(RuntimeWarning, match="frame 1 gets no target, frame 2 never came") as warned:
        pairs = [(f.seq, int(f.target.item())) async for f in joined]
    assert len(warned) == 1  # once per stream
    assert pairs == [(0, 1), (5, 6), (6, 7), (9, 10), (2, 3)]
    assert joined.unpaired == 4  # 1 and 7 (gaps), 10 (seqs went back), 3 (the end)
    two_ahead = next_frame_targets(from_iterable([pa.Frame(s, torch.tensor([float(s)])) for s in seqs]), horizon=2)
    with pytest.warns(RuntimeWarning):
        assert [(f.seq, int(f.target.item())) async for f in two_ahead] == [(5, 7), (7, 9)]


async def test_checkpoint_is_the_cut_at_its_frame_and_resumes(tmp_path):
    from partime_async.checkpoint import load
    from partime_async.sinks import Checkpoint

    frames = make_frames(30)
    balance = [2, 2, 2]
    learning = lambda: pa.OnlineLearning(loss=nn.MSELoss(), optimizer=lambda p: torch.optim.Adam(p, 1e-2), mode="partime")

    model = make_model()
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(3, threads=1), balance=balance, learning=learning())
    sink = Checkpoint(pipe, tmp_path / "ckpt-{seq}.pt", every=10)
    await pa.run(frames >> pipe >> sink)
    assert [p.name for p in sink.saved] == ["ckpt-9.pt", "ckpt-19.pt", "ckpt-29.pt"]
    assert not list(tmp_path.glob("*.tmp"))  # written atomically: no temporary file left
    state = load(tmp_path / "ckpt-19.pt")
    assert state["position"] == 20

    # In partime mode a run over frames 0..19 ends in exactly the state of the cut at frame
    # 19 (its drain drops the owed gradients, as the cut leaves them out).
    short = make_model()
    short_pipe, _ = await learn(short, frames[:20], "partime", balance, optimizer=lambda p: torch.optim.Adam(p, 1e-2))
    expected = short_pipe.state_dict()
    assert state["model"].keys() == expected["model"].keys()
    assert all(torch.equal(state["model"][k], expected["model"][k]) for k in expected["model"])
    for ours, ref in zip(state["learners"], expected["learners"]):
        assert ours["steps"] == ref["steps"]
        assert all(torch.equal(ours["optimizer"]["state"][i]["exp_avg"], ref["optimizer"]["state"][i]["exp_avg"])
                   for i in ref["optimizer"]["state"])

    # Resume: a new pipeline loads the checkpoint and continues from its position, exactly as
    # the short run continues when streamed the rest.
    resumed = make_model(seed=5)
    pipe2 = pa.Pipeline(resumed, devices=pa.cpu_devices(3, threads=1), balance=balance, learning=learning())
    pipe2.load_state_dict(state)
    async with pipe2:
        async for _ in pipe2.stream(frames[state["position"]:]):
            pass
    async with short_pipe:
        async for _ in short_pipe.stream(frames[20:]):
            pass
    assert all(torch.equal(p, q) for p, q in zip(resumed.parameters(), short.parameters()))


async def test_checkpoint_without_learning_saves_model_and_position(tmp_path):
    from partime_async.checkpoint import load
    from partime_async.sinks import Checkpoint

    model = make_model().eval()
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(2, threads=1), balance=[3, 3])
    await pa.run(make_frames(7) >> pipe >> Checkpoint(pipe, tmp_path / "model.pt", every=3))
    state = load(tmp_path / "model.pt")
    assert state["position"] == 6
    assert all(torch.equal(state["model"][k], v) for k, v in nn.Sequential(*model).state_dict().items())


@pytest.mark.parametrize("mode", [None, "stashed"])
async def test_checkpoint_sinks_each_keep_their_own_period(tmp_path, mode):
    """Two checkpoint sinks on one pipeline cut at their own periods; a sink that is not in
    the running graph asks for no cuts; the cuts travel as frame.checkpoint, not in meta."""
    from partime_async.checkpoint import load
    from partime_async.sinks import Checkpoint, Collect

    learning = pa.OnlineLearning(loss=nn.MSELoss(), optimizer=sgd(), mode=mode) if mode else None
    pipe = pa.Pipeline(make_model(), devices=pa.cpu_devices(2, threads=1), balance=[3, 3], learning=learning)
    every4 = Checkpoint(pipe, tmp_path / "a_{seq}.pt", every=4)
    every6 = Checkpoint(pipe, tmp_path / "b_{seq}.pt", every=6)
    Checkpoint(pipe, tmp_path / "unused.pt", every=1)  # made, never run
    outputs = Collect()
    await pa.run(make_frames(13) >> pipe >> [every4, every6, outputs])
    assert [p.name for p in every4.saved] == ["a_3.pt", "a_7.pt", "a_11.pt"]
    assert [p.name for p in every6.saved] == ["b_5.pt", "b_11.pt"]
    assert load(tmp_path / "a_11.pt")["position"] == load(tmp_path / "b_11.pt")["position"] == 12
    assert not (tmp_path / "unused.pt").exists()
    assert [f.seq for f in outputs.frames if f.checkpoint is not None] == [3, 5, 7, 11]
    assert all(set(f.meta) <= {"loss"} for f in outputs.frames)  # learning adds the frame's loss, nothing else
    await pa.run(make_frames(5) >> pipe >> outputs)  # the sinks closed: no more cuts
    assert all(f.checkpoint is None for f in outputs.frames[13:])


async def test_a_checkpoint_sink_writes_only_once_opened_and_opening_twice_asks_once(tmp_path):
    from partime_async.sinks import Checkpoint

    pipe = pa.Pipeline(make_model(), devices=pa.cpu_devices(2, threads=1), balance=[3, 3])
    sink = Checkpoint(pipe, tmp_path / "c.pt", every=2)
    with pytest.raises(RuntimeError, match="not open"):
        await sink.write(make_frames(1)[0])
    await sink.open()
    await pa.run(make_frames(4) >> pipe >> sink)  # run() opens it again, and closes it
    assert [p.name for p in sink.saved] == ["c.pt", "c.pt"]
    assert not pipe.cuts.periods  # no cuts asked for any more


async def test_state_dict_refuses_while_a_learning_pipeline_streams():
    """Updates are applied on the stages' threads after a frame's output has left: a copy
    taken while frames flow would be torn, so it raises and says what to do instead."""
    learning = pa.OnlineLearning(loss=nn.MSELoss(), optimizer=sgd(), mode="sequential")
    pipe = pa.Pipeline(make_model(), devices=pa.cpu_devices(1, threads=1), balance=[6], learning=learning)
    before = pipe.state_dict()  # before start: fine
    frames = make_frames(4)
    async with pipe:
        pipe.load_state_dict(before)  # running, no frame yet: fine
        await pipe.submit(frames[0].data, target=frames[0].target)
        with pytest.raises(RuntimeError, match=r"after `await pipe.stop\(\)`.*Checkpoint"):
            pipe.state_dict()
        with pytest.raises(RuntimeError, match="load_state_dict"):
            pipe.load_state_dict(before)
    state = pipe.state_dict()  # after stop: fine
    assert state["next_seq"] == 1 and state["position"] == 0  # a submit() is a request, not a stream's position


@pytest.mark.parametrize("scheduler", [
    lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, 100),
    lambda opt: torch.optim.lr_scheduler.SequentialLR(  # one run by another
        opt, [torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, 100), torch.optim.lr_scheduler.ConstantLR(opt)],
        milestones=[50]),
])
async def test_a_scheduler_that_sets_its_own_rates_resumes_at_them_whatever_the_delay_lr(scheduler):
    """OneCycleLR and CyclicLR set the rates from their own bounds (delay_lr does not change
    them when made): a state loaded under another delay_lr resumes at the same rates."""
    frames = make_frames(12)
    plain = _learning_pipeline(None, scheduler)
    await _stream_through(plain, frames[:6])
    state = plain.state_dict()
    await _stream_through(plain, frames[6:])
    resumed = _learning_pipeline(20.0, scheduler)
    resumed.load_state_dict(state)
    await _stream_through(resumed, frames[6:])
    assert _rates(resumed) == _rates(plain)
