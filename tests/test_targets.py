"""Targets while learning: checked like inputs, and a bad one never reaches the weights.

* ``check_finite=True`` rejects a non-finite target at the door (a FrameError naming it);
  without it, a non-finite loss or gradient skips that frame's update at every stage (counted,
  warned once), which leaves the weights exactly as if the frame had carried no target.
* A target must have the structure, shape and dtype of the output it is compared with (a
  FrameError naming the target, what was expected and what came); ``target_spec`` replaces
  that check by one at the door for losses whose targets differ from their outputs.
* ``on_error="skip"`` works with learning: a frame skipped by a stage owes no gradient, and the
  stages before it skip its update.
"""
from __future__ import annotations

import asyncio
import warnings

import pytest
import torch
from torch import nn

import partime_async as pa

MODES = ("partime", "stashed")


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(4)])


def make_frames(n: int = 12, seed: int = 1) -> list[pa.Frame]:
    g = torch.Generator().manual_seed(seed)
    return [pa.Frame(t, torch.randn(1, 6, generator=g), target=torch.randn(1, 6, generator=g)) for t in range(n)]


def with_target(frames: list[pa.Frame], seq: int, target: torch.Tensor | None) -> list[pa.Frame]:
    return [pa.Frame(f.seq, f.data, target if f.seq == seq else f.target) for f in frames]


def pipeline(model: nn.Module, mode: str, balance: tuple[int, ...] = (2, 2), **kwargs) -> pa.Pipeline:
    learning_args = {k: kwargs.pop(k) for k in ("target_spec", "loss") if k in kwargs}
    learning = pa.OnlineLearning(loss=learning_args.pop("loss", nn.MSELoss()),
                                 optimizer=lambda p: torch.optim.SGD(p, lr=0.05), mode=mode, **learning_args)
    return pa.Pipeline(model, devices=pa.cpu_devices(len(balance), threads=1), balance=list(balance),
                       learning=learning, **kwargs)


async def stream(pipe: pa.Pipeline, frames: list[pa.Frame]) -> list[pa.Frame]:
    async with pipe:
        return [f async for f in pipe.stream(frames)]


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


async def no_target_reference(mode: str, frames: list[pa.Frame], seq: int) -> list[torch.Tensor]:
    """The weights after learning on ``frames`` with frame ``seq``'s target removed."""
    model = make_model()
    await stream(pipeline(model, mode), with_target(frames, seq, None))
    return weights(model)


async def without_reference(mode: str, frames: list[pa.Frame], seq: int) -> list[torch.Tensor]:
    """The weights after learning on ``frames`` without frame ``seq`` at all."""
    model = make_model()
    await stream(pipeline(model, mode), [f for f in frames if f.seq != seq])
    return weights(model)


# -- non-finite targets ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
async def test_check_finite_rejects_a_nan_target_at_the_door(mode):
    frames = make_frames()
    bad = with_target(frames, 5, torch.full((1, 6), float("nan")))
    with pytest.raises(pa.FrameError) as info:
        await stream(pipeline(make_model(), mode, check_finite=True), bad)
    assert info.value.component == "target" and info.value.seq == 5 and "NaN or Inf" in str(info.value)
    # skipped and counted instead, the weights as if that frame had no target
    model = make_model()
    pipe = pipeline(model, mode, check_finite=True, on_error="skip")
    outputs = await stream(pipe, bad)
    assert [f.seq for f in outputs] == [s for s in range(12) if s != 5]
    assert pipe.stats().skipped_input == 1
    assert same(weights(model), await without_reference(mode, frames, 5))  # no stage saw it


@pytest.mark.parametrize("mode", MODES)
async def test_a_nan_target_skips_its_update_at_every_stage_and_warns_once(mode):
    frames = make_frames()
    bad = with_target(frames, 5, torch.full((1, 6), float("nan")))
    bad = with_target(bad, 8, torch.full((1, 6), float("inf")))
    model = make_model()
    pipe = pipeline(model, mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = await stream(pipe, bad)
    assert [f.seq for f in outputs] == list(range(12))  # the frames are delivered; only the updates are not made
    nonfinite = [w for w in caught if "not finite" in str(w.message)]
    assert len(nonfinite) == 1 and "frame 5" in str(nonfinite[0].message)  # the last stage found it
    assert [learner.skipped_updates for learner in pipe.learners] == [2, 2]
    assert [s.counters["skipped_updates"] for s in pipe.stats().stages] == [2, 2]
    assert all(torch.isfinite(w).all() for w in weights(model))
    reference = make_model()
    await stream(pipeline(reference, mode), with_target(with_target(frames, 5, None), 8, None))
    assert same(weights(model), weights(reference))


async def test_a_nan_target_by_submit_is_rejected_at_the_door_to_that_caller_only():
    frames = make_frames(6)
    model = make_model()
    pipe = pipeline(model, "stashed", check_finite=True)
    async with pipe:
        results = await asyncio.gather(*(pipe.submit(f.data, target=torch.full((1, 6), float("nan")) if i == 2
                                                     else f.target) for i, f in enumerate(frames)),
                                       return_exceptions=True)
    assert isinstance(results[2], pa.FrameError) and results[2].component == "target"
    assert all(isinstance(r, torch.Tensor) for i, r in enumerate(results) if i != 2)
    assert all(torch.isfinite(w).all() for w in weights(model))


# -- targets that do not fit the output ----------------------------------------------------------
BAD_TARGETS = {
    "wrong shape": (torch.zeros(1, 3), "expected shape (1, 6), got (1, 3)"),
    "broadcastable": (torch.zeros(1), "expected 2 dimensions (1, 6), got 1 (1)"),
    "integer": (torch.zeros(1, 6, dtype=torch.long), "expected dtype torch.float32, got torch.int64"),
}


@pytest.mark.parametrize("kind", BAD_TARGETS)
@pytest.mark.parametrize("mode", MODES)
async def test_a_target_that_does_not_fit_the_output_is_a_frame_error_naming_it(mode, kind):
    target, expected = BAD_TARGETS[kind]
    frames = make_frames()
    with pytest.raises(pa.FrameError) as info:
        await stream(pipeline(make_model(), mode), with_target(frames, 5, target))
    assert info.value.component == "target" and info.value.seq == 5
    assert expected in str(info.value) and "target_spec" in str(info.value)
    # with on_error="skip": that frame is skipped at the last stage and owes no gradient
    model = make_model()
    pipe = pipeline(model, mode, on_error="skip")
    outputs = await stream(pipe, with_target(frames, 5, target))
    assert [f.seq for f in outputs] == [s for s in range(12) if s != 5]
    stats = pipe.stats()
    assert [s.skipped for s in stats.stages] == [0, 1] and list(stats.stages[1].skipped_seqs) == [5]
    assert [learner.skipped_updates for learner in pipe.learners] == [1, 1]
    assert stats.admitted == stats.delivered + stats.skipped
    assert same(weights(model), await no_target_reference(mode, frames, 5))


async def test_concurrent_submits_with_skip_fail_only_the_one_with_a_bad_target():
    frames = make_frames(8)
    pipe = pipeline(make_model(), "partime", on_error="skip")
    async with pipe:
        results = await asyncio.gather(*(pipe.submit(f.data, target=torch.zeros(1, 3) if i == 4 else f.target)
                                         for i, f in enumerate(frames)), return_exceptions=True)
    assert isinstance(results[4], pa.FrameError) and results[4].component == "target"
    assert all(isinstance(r, torch.Tensor) for i, r in enumerate(results) if i != 4)


async def test_a_target_spec_lets_class_indices_through_and_checks_them_at_the_door():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(2)
    frames = [pa.Frame(t, torch.randn(1, 6, generator=g), target=torch.randint(0, 3, (1,), generator=g))
              for t in range(10)]
    spec = pa.InputSpec.like(torch.zeros(1, dtype=torch.long))
    pipe = pipeline(model, "stashed", (2, 1), loss=nn.CrossEntropyLoss(), target_spec=spec)
    assert len(await stream(pipe, frames)) == 10 and [learner.steps for learner in pipe.learners] == [10, 10]
    bad = frames[:4] + [pa.Frame(4, frames[4].data, target=torch.zeros(1, 3))]
    with pytest.raises(pa.FrameError) as info:
        await stream(pipeline(model, "stashed", (2, 1), loss=nn.CrossEntropyLoss(), target_spec=spec), bad)
    assert info.value.component == "target" and info.value.seq == 4  # at the door: before any stage ran it


# -- on_error="skip" with learning --------------------------------------------------------------
class FailOnCall(nn.Module):
    """Identity that raises on its ``n``-th call (0-based): a stage calls it once per frame, in order."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.calls = n, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls - 1 == self.n:
            raise ValueError(f"bad call {self.n}")
        return x


@pytest.mark.parametrize("mode", MODES)
async def test_a_frame_a_middle_stage_skips_owes_no_gradient_and_learning_goes_on(mode):
    def model() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), FailOnCall(5), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))

    frames = make_frames()
    runs = []
    for _ in range(2):
        m = model()
        learning = pa.OnlineLearning(loss=nn.MSELoss(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05), mode=mode)
        pipe = pa.Pipeline(m, devices=pa.cpu_devices(3, threads=1), balance=[2, 2, 2], learning=learning,
                           on_error="skip", input_spec=None, output_spec=None)
        outputs = await stream(pipe, frames)
        runs.append(weights(m))
        assert [f.seq for f in outputs] == [s for s in range(12) if s != 5]
        assert [s.skipped for s in pipe.stats().stages] == [0, 1, 0]
        # Stage 1 skips frame 5's update (its forward failed) and stage 0 gets no gradient for
        # it. In partime, frame 5's graph was also to carry frame 3's gradient at stage 1: that
        # update is skipped too (one more at stages 1 and 0).
        assert [learner.skipped_updates for learner in pipe.learners] == ([2, 2, 0] if mode == "partime" else [1, 1, 0])
        assert all(torch.isfinite(w).all() for w in runs[-1])
    assert same(*runs)  # deterministic


class FailOnMark(nn.Module):
    """``Linear(6, 6)`` that raises on a frame marked by a first element above 100."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x[0, 0]) > 100:
            raise ValueError("marked frame")
        return self.lin(x)


def marked(frames: list[pa.Frame], seqs: set[int], *, target: bool = True) -> list[pa.Frame]:
    """``frames`` with those of ``seqs`` marked (their first element 1000; no target unless ``target``)."""
    out = []
    for f in frames:
        if f.seq in seqs:
            x = f.data.clone()
            x[0, 0] = 1000.0
            f = pa.Frame(f.seq, x, f.target if target else None)
        out.append(f)
    return out


@pytest.mark.parametrize("n_stages", [3, 4])
@pytest.mark.parametrize("mode", MODES)
async def test_more_skipped_frames_than_a_stage_delay_allows_keep_every_schedule_in_step(mode, n_stages):
    """Frames skipped by stage 0 travel on as markers that the later stages count: stage 0
    owes frame t's gradient 2(n-1) frames after t, whatever was skipped meanwhile. (Counting
    only the frames that arrive, three skips in a row left stage 0 waiting for ever.)"""
    def model() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(FailOnMark(), *[nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(n_stages - 1)])

    bad = {5, 6, 7, 9}
    frames = marked(make_frames(20), bad)
    runs = []
    for _ in range(2):
        m = model()
        pipe = pipeline(m, mode, balance=(1,) * n_stages, on_error="skip", input_spec=None)
        outputs = await asyncio.wait_for(stream(pipe, frames), 60)
        assert [f.seq for f in outputs] == [s for s in range(20) if s not in bad]
        stats = pipe.stats()
        assert [s.skipped for s in stats.stages] == [len(bad)] + [0] * (n_stages - 1)
        assert [s.frames for s in stats.stages] == [20 - len(bad)] * n_stages  # markers are not frames
        assert stats.admitted == stats.delivered + sum(s.skipped for s in stats.stages)
        runs.append(weights(m))
    assert same(*runs)  # deterministic
    if mode == "stashed":
        # Each gradient goes through its own frame's graph, so skipping a frame only removes its
        # update: the weights are those of the same stream with those frames carrying no target.
        reference = model()
        await stream(pipeline(reference, mode, balance=(1,) * n_stages, input_spec=None),
                     [pa.Frame(f.seq, f.data, None if f.seq in bad else f.target) for f in make_frames(20)])
        assert same(runs[0], weights(reference))


class GrowOnMark(nn.Module):
    """``Linear(6, 6)`` whose output doubles its rows on a marked frame (first element above 100)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return torch.cat([y, y]) if float(x[0, 0]) > 100 else y


@pytest.mark.parametrize("mode", MODES)
async def test_a_frame_whose_output_fails_the_stage_check_is_skipped_and_no_update_uses_its_graph(mode):
    """The output check runs after the forward: a frame it rejects is forgotten by the learner
    too (in partime the owed gradient would otherwise go through that frame's graph)."""
    def model() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(GrowOnMark(), nn.Tanh(), nn.Linear(6, 6))

    frames = marked(make_frames(12), {5})
    m = model()
    pipe = pipeline(m, mode, balance=(1, 2), on_error="skip")
    outputs = await stream(pipe, frames)
    assert [f.seq for f in outputs] == [s for s in range(12) if s != 5]
    assert [s.skipped for s in pipe.stats().stages] == [1, 0]
    # stashed: frame 5's own update; partime: also frame 3's, which frame 5's graph was to carry
    assert [learner.skipped_updates for learner in pipe.learners] == ([2, 0] if mode == "partime" else [1, 0])
    if mode == "stashed":
        reference = model()
        await stream(pipeline(reference, mode, balance=(1, 2)), [pa.Frame(f.seq, f.data, None if f.seq == 5 else f.target)
                                                 for f in make_frames(12)])
        assert same(weights(m), weights(reference))


async def test_frames_skipped_without_a_target_leave_no_gradient_behind():
    """A skipped frame that would not have learnt owes no gradient: nothing is kept for it
    between the stages, however long the stream."""
    torch.manual_seed(0)
    pipe = pipeline(nn.Sequential(FailOnMark(), nn.Linear(6, 6)), "stashed", balance=(1, 1), on_error="skip",
                    input_spec=None)
    frames = make_frames(200)
    frames = [pa.Frame(f.seq, f.data, None) if f.seq % 2 else f for f in frames]
    async with pipe:
        outputs = [f async for f in pipe.stream(marked(frames, {s for s in range(200) if s % 2}, target=False))]
        box = pipe._run.runners[0].outlet.grads
    assert len(outputs) == 100
    assert len(box) == 0  # the gradients stage 0 was sent and never took
