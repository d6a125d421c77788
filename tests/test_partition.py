"""Partitioning: the optimal contiguous split, balance checks, layers_of, split, profiling."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import partime_async as pa
from partime_async.partition import GraphSplit
from partime_async.partition import (
    balance_by_params, check_balance, layers_of, min_max_partition, profile_layers, split,
)

HYPOTHESIS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def stage_costs(rows: list[list[float]], balance: list[int]) -> list[float]:
    out, start = [], 0
    for k, count in enumerate(balance):
        out.append(sum(rows[k][start:start + count]))
        start += count
    return out


def brute_force(rows: list[list[float]], n_stages: int) -> float:
    """The least max stage cost over every contiguous split (rows[k]: stage k's layer costs)."""
    n = len(rows[0])
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), n_stages - 1):
        bounds = [0, *cuts, n]
        balance = [bounds[i + 1] - bounds[i] for i in range(n_stages)]
        best = min(best, max(stage_costs(rows, balance)))
    return best


def assert_valid(balance: list[int], n_layers: int, n_stages: int) -> None:
    assert len(balance) == n_stages
    assert all(isinstance(b, int) and b >= 1 for b in balance)
    assert sum(balance) == n_layers


def greedy(costs: list[float], n_stages: int) -> list[int]:
    """The obvious heuristic: fill each stage up to the average, leave a layer for every later stage."""
    ideal = sum(costs) / n_stages
    out, total, count = [], 0.0, 0
    for i, c in enumerate(costs):
        must_cut = len(costs) - i < n_stages - len(out)
        if count and (total + c > ideal or must_cut) and len(out) < n_stages - 1:
            out.append(count)
            total, count = 0.0, 0
        total += c
        count += 1
    out.append(count)
    return out


# -- min_max_partition --------------------------------------------------------------------------
@st.composite
def cost_problems(draw):
    n = draw(st.integers(1, 9))
    stages = draw(st.integers(1, n))
    costs = draw(st.lists(st.integers(0, 50).map(float), min_size=n, max_size=n))
    return costs, stages


@given(cost_problems())
@HYPOTHESIS
def test_min_max_partition_is_optimal(problem):
    costs, n_stages = problem
    balance = min_max_partition(costs, n_stages)
    assert_valid(balance, len(costs), n_stages)
    rows = [costs] * n_stages
    assert max(stage_costs(rows, balance)) == brute_force(rows, n_stages)


@st.composite
def heterogeneous_problems(draw):
    n = draw(st.integers(1, 8))
    stages = draw(st.integers(1, n))
    rows = [draw(st.lists(st.integers(0, 50).map(float), min_size=n, max_size=n)) for _ in range(stages)]
    return rows, stages


@given(heterogeneous_problems())
@HYPOTHESIS
def test_min_max_partition_with_per_stage_cost_rows_is_optimal(problem):
    rows, n_stages = problem
    balance = min_max_partition(rows, n_stages)
    assert_valid(balance, len(rows[0]), n_stages)
    assert max(stage_costs(rows, balance)) == brute_force(rows, n_stages)


@pytest.mark.parametrize("costs, n_stages, optimum", [
    ([3, 3, 2, 2, 2], 3, 5),                     # greedy: [3] [3] [2 2 2] = 6
    ([6, 1, 1, 1, 1, 1, 1, 1, 1, 6], 3, 7),     # greedy: [6] [1 x 6] [1 1 6] = 8
])
def test_min_max_partition_beats_greedy(costs, n_stages, optimum):
    rows = [costs] * n_stages
    assert max(stage_costs(rows, greedy(costs, n_stages))) > optimum  # the trap is real
    balance = min_max_partition(costs, n_stages)
    assert max(stage_costs(rows, balance)) == optimum == brute_force(rows, n_stages)


def test_heterogeneous_rows_change_the_answer():
    # Stage 1's device is 10x slower: it should get only the cheapest tail.
    fast = [1.0] * 6
    slow = [10.0] * 6
    balance = min_max_partition([fast, slow], 2)
    assert balance == [5, 1]
    assert min_max_partition([fast, fast], 2) == [3, 3]


def test_min_max_partition_rejects_impossible_splits():
    with pytest.raises(ValueError, match="cannot split 2 layers into 3"):
        min_max_partition([1.0, 2.0], 3)
    with pytest.raises(ValueError, match="one row per stage"):
        min_max_partition([[1.0, 2.0]], 2)
    with pytest.raises(ValueError, match="one row per stage"):
        min_max_partition([[1.0, 2.0], [1.0]], 2)


def test_balance_by_params_equalises_parameter_counts():
    layers = [nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 100)]
    balance = balance_by_params(layers, 3)
    assert_valid(balance, 5, 3)
    costs = [10100, 1, 10100, 1, 10100]
    assert max(stage_costs([costs] * 3, balance)) == 10101


# -- check_balance ------------------------------------------------------------------------------
def test_check_balance_accepts_a_valid_balance():
    assert check_balance((2, 3), 5, 2) == [2, 3]


@pytest.mark.parametrize("balance, match", [
    ([5], "1 entries but there are 2 devices"),
    ([2, 2, 1], "3 entries but there are 2 devices"),
    ([0, 5], "at least one layer"),
    ([-1, 6], "at least one layer"),
    ([2.5, 2.5], "at least one layer"),
    ([2, 2], "covers 4 layers but the model has 5"),
    ([3, 3], "covers 6 layers but the model has 5"),
])
def test_check_balance_messages(balance, match):
    with pytest.raises(ValueError, match=match):
        check_balance(balance, 5, 2)


def test_pipeline_rejects_a_bad_explicit_balance():
    layers = [nn.Identity() for _ in range(4)]
    with pytest.raises(ValueError, match="covers 3 layers"):
        pa.Pipeline(layers, devices=pa.cpu_devices(2), balance=[1, 2])
    with pytest.raises(ValueError, match="balance must be"):
        pa.Pipeline(layers, devices=pa.cpu_devices(2), balance="speed")


# -- layers_of and split --------------------------------------------------------------------------
def test_layers_of_sequential_and_lists():
    a, b = nn.Linear(2, 2), nn.ReLU()
    assert layers_of(nn.Sequential(a, b)) == [a, b]
    assert layers_of([a, b]) == [a, b]
    assert layers_of((a, b)) == [a, b]


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 2)

    def forward(self, x):
        return self.a(x)


@pytest.mark.parametrize("model", [Custom(), nn.Linear(2, 2), nn.ModuleList([nn.ReLU()]), [nn.ReLU(), "relu"]])
def test_layers_of_rejects_non_sequential(model):
    with pytest.raises(TypeError, match="nn.Sequential"):
        layers_of(model)


def test_layers_of_rejects_an_empty_model():
    with pytest.raises(ValueError, match="no layers"):
        layers_of(nn.Sequential())


def test_pipeline_rejects_what_is_not_a_model():
    with pytest.raises(TypeError, match="nn.Sequential"):
        pa.Pipeline([Custom(), "relu"], devices=pa.cpu_devices(1))
    assert isinstance(pa.Pipeline(Custom(), devices=pa.cpu_devices(1))._split, GraphSplit)  # split as a graph


def test_more_devices_than_layers_is_an_error():
    with pytest.raises(ValueError, match="cannot split 2 layers over 3 devices"):
        pa.Pipeline(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), devices=pa.cpu_devices(3))


def test_split_shares_parameters_with_the_model():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.BatchNorm1d(4))
    stages = split(layers_of(model), [1, 3])
    assert [len(s) for s in stages] == [1, 3]
    assert stages[0][0] is model[0] and stages[1][2] is model[3]
    split_params = [p for s in stages for p in s.parameters()]
    assert len(split_params) == len(list(model.parameters()))
    assert all(p is q for p, q in zip(split_params, model.parameters()))
    split_buffers = [b for s in stages for b in s.buffers()]
    assert all(b is c for b, c in zip(split_buffers, model.buffers()))
    with torch.no_grad():
        model[2].weight.add_(1.0)  # an in-place update is seen by the stage
    assert stages[1][1].weight is model[2].weight


async def test_pipeline_stages_share_the_models_parameters():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(2), balance=[2, 1])
    async with pipe:
        await pipe.submit(torch.randn(1, 4))
        stage_params = [p for s in pipe.stages for p in s.parameters()]
    assert all(p is q for p, q in zip(stage_params, model.parameters()))
    assert len(stage_params) == 4


async def test_a_module_used_twice_is_two_layers():
    """One ReLU after two layers: the nn.Sequential runs it twice, so must the pipeline (it
    was listed once, and the pipeline ran another network)."""
    torch.manual_seed(0)
    act = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 4), act, nn.Linear(4, 4), act, nn.Linear(4, 4))
    assert len(layers_of(model)) == 5
    xs = [torch.randn(1, 4) for _ in range(6)]
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(2), balance=[2, 3])
    async with pipe:
        outs = [f.data async for f in pipe.stream(xs)]
    with torch.no_grad():
        assert all(torch.equal(y, model(x)) for y, x in zip(outs, xs))
    assert pipe.layer_names == ["0", "1", "2", "3", "4"]
    assert list(pipe.state_dict()["model"]) == list(model.state_dict())


async def test_a_tensor_shared_between_learning_stages_is_refused_with_its_names():
    enc, dec = nn.Linear(4, 4), nn.Linear(4, 4)
    dec.weight = enc.weight  # tied: two stages' optimisers would step it (it failed at a random frame)
    learning = pa.OnlineLearning(loss=nn.MSELoss(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    pipe = pa.Pipeline(nn.Sequential(enc, nn.ReLU(), dec), devices=pa.cpu_devices(2), balance=[2, 1], learning=learning)
    frames = [pa.Frame(i, torch.randn(1, 4), target=torch.randn(1, 4)) for i in range(4)]
    with pytest.raises(pa.PipelineError, match=r"'0.weight' \(stage 0\) and '2.weight' \(stage 1\) are one tensor: "
                                               r"each stage's optimiser would update it; put the layers"):
        async with pipe:
            async for _ in pipe.stream(frames):
                pass
    # in one stage, or read by CPU stages that only infer: fine
    for balance, learn in (([3], learning), ([2, 1], None)):
        devices = pa.cpu_devices(len(balance))
        pipe = pa.Pipeline(nn.Sequential(enc, nn.ReLU(), dec), devices=devices, balance=balance, learning=learn)
        async with pipe:
            assert len([f async for f in pipe.stream(frames)]) == 4
    # frozen, or a constant buffer: no optimiser steps it
    enc.weight.requires_grad_(False)
    scale = torch.ones(4)
    enc.register_buffer("scale", scale)
    dec.register_buffer("scale", scale)
    pipe = pa.Pipeline(nn.Sequential(enc, nn.ReLU(), dec), devices=pa.cpu_devices(2), balance=[2, 1], learning=learning)
    async with pipe:
        assert len([f async for f in pipe.stream(frames)]) == 4


# -- profile_layers -----------------------------------------------------------------------------
def test_profile_layers_restores_buffers_and_returns_one_time_per_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.BatchNorm1d(8, momentum=None)).train()
    before = copy.deepcopy(model.state_dict())
    times = profile_layers(list(model), torch.randn(16, 8), repeats=3, warmup=1)
    assert len(times) == 4 and all(t >= 0 for t in times)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_profile_layers_passes_each_layers_output_on():
    seen = []

    class Shape(nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape))
            return x

    profile_layers([nn.Linear(3, 5), Shape(), nn.Linear(5, 2), Shape()], torch.randn(1, 3), repeats=1, warmup=0)
    assert seen == [(1, 5), (1, 2)]
