"""Splitting an ``nn.Sequential`` (or a list of modules) into contiguous runs of its layers.

``balance`` is one of

* a list of layer counts, one per device (``[3, 5]``: layers 0-2 on the first device),
* ``"params"``: equalise parameter counts,
* ``"time"``: profile every layer on the device that may run it, then pick the contiguous
  split that minimises the slowest stage (:func:`~partime_async.partition.balance.min_max_partition`).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..core.frame import Payload
from ..devices import Device
from .balance import min_max_partition
from .plan import StagePlan
from .profile import profile_layers


class SequentialSplit:
    """A model whose layers run one after another (each one's output is the next one's
    input), cut into contiguous runs of layers: a :class:`~partime_async.partition.plan.Partitioner`.

    Stage modules share the model's parameters (they are new ``nn.Sequential`` s of the same
    layer objects). ``layers`` are the units; ``names`` their names in the model (an
    ``nn.Sequential``'s child names, a list's indices), so that states are keyed as the model's.
    """

    def __init__(self, model: nn.Module | Sequence[nn.Module]) -> None:
        self.layers = layers_of(model)
        self.names = (list(model._modules) if isinstance(model, nn.Sequential)  # a repeated module too
                      else [str(i) for i in range(len(self.layers))])

    @property
    def units(self) -> int:
        return len(self.layers)

    def check_balance(self, balance: Sequence[int], n_stages: int) -> list[int]:
        return check_balance(balance, len(self.layers), n_stages)

    def balance_by_params(self, n_stages: int) -> list[int]:
        return balance_by_params(self.layers, n_stages)

    def profile(self, sample: Payload) -> list[float]:
        return profile_layers(self.layers, sample)

    def to(self, device: torch.device) -> None:
        for layer in self.layers:
            layer.to(device)

    def check_shared(self, balance: Sequence[int], *, learning: bool, one_device: bool) -> None:
        check_unshared(self.layers, self.names, balance, learning=learning, one_device=one_device)

    def plans(self, balance: Sequence[int], devices: Sequence[Device]) -> list[StagePlan]:
        plans, start = [], 0
        for k, (module, device) in enumerate(zip(split(self.layers, balance), devices, strict=True)):
            end = start + balance[k]
            module.to(device.torch_device)
            plans.append(StagePlan(
                index=k, module=module, devices=(device,), inputs=(self.names[start - 1] if start else "input",),
                outputs=(self.names[end - 1],), units=balance[k], model_key=_renamer(self.names[start:end]),
                last=k == len(balance) - 1))
            start = end
        return plans

    def state_dict(self) -> dict[str, Any]:
        return self._named().state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        named, numbered = self._named(), nn.Sequential(*self.layers)
        if state.keys() == numbered.state_dict().keys() != named.state_dict().keys():
            numbered.load_state_dict(state)  # saved before states took the model's names
        else:
            named.load_state_dict(state)

    def _named(self) -> nn.Sequential:
        """A new ``nn.Sequential`` of the layers themselves (no copies) under their names in
        the model: its ``state_dict`` is keyed as the model's."""
        return nn.Sequential(OrderedDict(zip(self.names, self.layers, strict=True)))


def _renamer(names: Sequence[str]) -> Callable[[str], str]:
    """A stage module's state key (``"1.weight"``: its child 1's) as the model's (the name of
    that layer in the model)."""
    def model_key(key: str) -> str:
        child, _, rest = key.partition(".")
        return f"{names[int(child)]}.{rest}"

    return model_key


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
        raise ValueError(f"balance has {len(balance)} entries but there are {n_devices} devices; "
                         "give one layer count per device")
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
    for layer, name, k in zip(layers, names, stage_of, strict=True):
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


def balance_by_params(layers: Sequence[nn.Module], n_stages: int) -> list[int]:
    """Equalise parameter counts (a layer without parameters weighs as much as one parameter)."""
    costs = [max(1, sum(p.numel() for p in layer.parameters())) for layer in layers]
    return min_max_partition(costs, n_stages)
