"""Splitting a model into contiguous stages.

``balance`` is one of

* a list of layer counts, one per device (``[3, 5]``: layers 0-2 on the first device),
* ``"params"``: equalise parameter counts,
* ``"time"``: profile every layer on the device that may run it, then pick the contiguous
  split that minimises the slowest stage (optimal by dynamic programming; a greedy split can
  be far off when costs are uneven).
"""
from __future__ import annotations

import statistics
from typing import Sequence

import torch
from torch import nn

from .frame import Payload, clone, now


class LayerFailed(RuntimeError):
    """A layer raised while being profiled; the original exception is the ``__cause__``."""

    def __init__(self, index: int, layer: nn.Module) -> None:
        self.index = index
        super().__init__(f"layer {index} ({type(layer).__name__})")


def layers_of(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    """The layers a model is split between: the children of an ``nn.Sequential``, or a list.
    A module that appears twice (one ``nn.ReLU()`` used after two layers) is two layers, as
    the ``nn.Sequential`` runs it twice (``children()`` would list it once)."""
    if isinstance(model, nn.Sequential):
        layers = list(model)
    elif isinstance(model, (list, tuple)) and all(isinstance(m, nn.Module) for m in model):
        layers = list(model)
    else:
        raise TypeError(
            f"a pipeline splits an nn.Sequential or a list of nn.Modules, got {type(model).__name__}; "
            "wrap a custom model's blocks in nn.Sequential (each block's output is the next one's input)"
        )
    if not layers:
        raise ValueError("the model has no layers to split")
    return layers


def check_balance(balance: Sequence[int], n_layers: int, n_devices: int) -> list[int]:
    """Validate an explicit balance; errors say what would be valid."""
    balance = list(balance)
    if len(balance) != n_devices:
        raise ValueError(f"balance has {len(balance)} entries but there are {n_devices} devices; give one layer count per device")
    if any(not isinstance(b, int) or b < 1 for b in balance):
        raise ValueError(f"every stage needs at least one layer; balance {balance} has an entry < 1 or not an int")
    if sum(balance) != n_layers:
        raise ValueError(f"balance {balance} covers {sum(balance)} layers but the model has {n_layers}")
    return balance


def check_unshared(layers: Sequence[nn.Module], names: Sequence[str], balance: Sequence[int], *, learning: bool,
                   one_device: bool) -> None:
    """Raise ``ValueError`` if a tensor is in two stages where that cannot work: a trainable
    parameter when learning (each stage's optimiser would step it, from its own thread), any
    parameter or buffer with the stages on different devices (placing one stage would move
    it from under the other). Tied weights within one stage, frozen ones, and any shared
    tensor read by stages on one device that only infer are fine. ``names``: the layers'
    names in the model, for the message."""
    if not learning and one_device:
        return
    stage_of = [k for k, count in enumerate(balance) for _ in range(count)]
    owner: dict[int, tuple[int, str]] = {}
    for layer, name, k in zip(layers, names, stage_of):
        tensors = [*layer.named_parameters(prefix=name), *layer.named_buffers(prefix=name)]
        if one_device:  # learning: the optimisers step trainable parameters only
            tensors = [(key, t) for key, t in tensors if isinstance(t, nn.Parameter) and t.requires_grad]
        for key, tensor in tensors:
            j, first = owner.setdefault(id(tensor), (k, key))
            if j != k:
                why = "the stages are on different devices" if not one_device else \
                    "each stage's optimiser would update it"
                raise ValueError(f"{first!r} (stage {j}) and {key!r} (stage {k}) are one tensor: {why}; put the "
                                 "layers that share it in one stage (balance=...), or untie them")


def split(layers: Sequence[nn.Module], balance: Sequence[int]) -> list[nn.Sequential]:
    """Contiguous stages: ``balance[k]`` consecutive layers in stage k (parameters are shared)."""
    stages, start = [], 0
    for count in balance:
        stages.append(nn.Sequential(*layers[start:start + count]))
        start += count
    return stages


def min_max_partition(costs: Sequence[float] | Sequence[Sequence[float]], n_stages: int) -> list[int]:
    """The contiguous partition into ``n_stages`` non-empty parts minimising the costliest part.

    ``costs`` is either one cost per layer, or one such row per stage (heterogeneous devices:
    ``costs[k][i]`` is layer i's cost on stage k's device). Ties go to the earliest split.
    Exact dynamic programme, O(n_stages * n_layers^2).
    """
    rows = [list(costs)] * n_stages if not costs or not isinstance(costs[0], (list, tuple)) else [list(r) for r in costs]
    n = len(rows[0])
    if len(rows) != n_stages or any(len(r) != n for r in rows):
        raise ValueError("costs must have one row per stage, each with one cost per layer")
    if n_stages < 1 or n < n_stages:
        raise ValueError(f"cannot split {n} layers into {n_stages} non-empty stages; use at most {n} devices")
    prefix = []
    for row in rows:
        acc = [0.0]
        for c in row:
            acc.append(acc[-1] + c)
        prefix.append(acc)
    inf = float("inf")
    # best[k][j]: least max-cost of putting layers [0, j) on stages 0..k; cut[k][j]: start of stage k
    best = [[inf] * (n + 1) for _ in range(n_stages)]
    cut = [[0] * (n + 1) for _ in range(n_stages)]
    for j in range(1, n + 1):
        best[0][j] = prefix[0][j]
    for k in range(1, n_stages):
        p = prefix[k]
        for j in range(k + 1, n + 1):
            for i in range(k, j):
                value = max(best[k - 1][i], p[j] - p[i])
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    balance, j = [], n
    for k in range(n_stages - 1, 0, -1):
        i = cut[k][j]
        balance.append(j - i)
        j = i
    balance.append(j)
    return balance[::-1]


def balance_by_params(layers: Sequence[nn.Module], n_stages: int) -> list[int]:
    """Equalise parameter counts (a layer without parameters weighs as much as one parameter)."""
    costs = [max(1, sum(p.numel() for p in layer.parameters())) for layer in layers]
    return min_max_partition(costs, n_stages)


def profile_layers(layers: Sequence[nn.Module], sample: Payload, *, repeats: int = 7, warmup: int = 2) -> list[float]:
    """Median seconds of each layer on ``sample``'s device, run in order (layer i sees layer
    i-1's output). Each pass starts from a copy of ``sample``, which is left as it was (a layer
    may modify its input in place).

    Whole passes are timed layer by layer, ``warmup`` passes discarded, so that a transient
    (a cold cache, another process) spreads over all layers instead of biasing one. Runs
    without autograd; buffers (e.g. BatchNorm statistics) are restored, so profiling leaves
    the model as it found it.
    """
    saved = [{k: b.clone() for k, b in layer.named_buffers()} for layer in layers]
    cuda = any(p.is_cuda for layer in layers for p in layer.parameters())
    samples: list[list[float]] = [[] for _ in layers]
    try:
        with torch.no_grad():
            for rep in range(warmup + repeats):
                x = clone(sample)
                for i, layer in enumerate(layers):
                    t0 = now()
                    try:
                        x = layer(x)
                    except Exception as exc:
                        raise LayerFailed(i, layer) from exc
                    if cuda:
                        torch.cuda.synchronize()
                    if rep >= warmup:
                        samples[i].append(now() - t0)
    finally:
        for layer, buffers in zip(layers, saved):
            for name, value in layer.named_buffers():
                value.copy_(buffers[name])
    return [statistics.median(s) for s in samples]
