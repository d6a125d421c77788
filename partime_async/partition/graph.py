"""Any module that ``torch.export`` captures, cut into units that run one after another.

:class:`GraphSplit` captures the model on the first frame (``torch.export.export``, then
``ExportedProgram.module()``: a graph of ATen calls on the model's own parameters and buffers,
which it shares). Its compute nodes, in graph order, are grouped into *units*: a unit is a
run of consecutive nodes called from one top-level submodule (``nn_module_stack``), the
model's own operations between them (a residual ``+``, a ``torch.cat``) joining the unit
before. Each unit becomes a small module whose input is every value that crosses the cut
before it and whose output is every value that crosses the cut after it: the values it
makes that are used later, and the earlier ones it passes on (a skip connection that jumps
several stages travels with the frame through each of them). The units then compose one
after another, so the split, the balance, profiling, the learning programs and the
transports see what they see for an ``nn.Sequential``: a list of layers
(:class:`~partime_async.partition.sequential.SequentialSplit` over the units).

A frame's payload is the model's input: one argument, or, for a model whose ``forward``
takes several, a tuple of them. The output keeps the model's structure (a dict, a tuple).
Stages hold the model's parameters themselves (no copies): ``state_dict`` is the model's.

A model that cannot be captured (data-dependent control flow, say) gets a ``ValueError``
that gives torch's reason and says how to split it by hand.
"""
from __future__ import annotations

import inspect
import itertools
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree
from torch import fx, nn

from ..core.frame import Payload
from ..core.validation import InputSpec, sorted_keys
from ..devices import Device
from .plan import StagePlan
from .sequential import SequentialSplit

_COMPUTE = ("call_function", "call_method", "call_module")


class GraphSplit:
    """A model split as a graph; see the module docstring. A
    :class:`~partime_async.partition.plan.Partitioner` once :meth:`prepare` has captured it."""

    def __init__(self, model: nn.Module, *, spec: InputSpec | None = None) -> None:
        self.model = model
        self.spec = spec  # the pipeline's input spec: its free dimensions stay free in the graph
        self._units: SequentialSplit | None = None
        self._training = model.training

    @property
    def captured(self) -> bool:
        return self._units is not None

    def prepare(self, sample: Payload) -> None:
        """Capture the model on ``sample`` (the first frame's payload) and cut it into units; once."""
        if self._units is not None:
            if self.model.training != self._training:
                warnings.warn(f"{type(self.model).__name__} was captured in {'train' if self._training else 'eval'} "
                              "mode on this pipeline's first frame and its graph keeps that mode (Dropout, "
                              "BatchNorm); make a new Pipeline to run it in the other", RuntimeWarning, stacklevel=2)
            return
        if self.spec is not None:
            why = self.spec.mismatch(sample)
            if why is not None:  # the graph would be fixed to a frame that the door refuses
                raise ValueError(f"the first frame does not match the input spec ({why})")
        args = _as_args(self.model, sample)
        try:
            program = torch.export.export(self.model, args, strict=False,
                                          dynamic_shapes=_free_dims(args, self.spec) if self.spec else None)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(
                f"torch.export could not capture {type(self.model).__name__} to split it ({type(exc).__name__}: "
                f"{reason}); split it by hand: give the Pipeline an nn.Sequential (or a list) of the pieces a stage "
                "may hold, each taking the previous one's output") from exc
        self._training = self.model.training
        units, keys = _units(program.module())
        self._units = SequentialSplit(units)
        self._units.names = keys
        _share_buffers(self.model, units)

    def _split(self) -> SequentialSplit:
        if self._units is None:
            raise RuntimeError("the model is split into units on its first frame (torch.export needs an input)")
        return self._units

    # -- the Partitioner contract (after prepare) ---------------------------------------------
    @property
    def units(self) -> int:
        return self._split().units

    @property
    def layers(self) -> list[nn.Module]:
        return self._units.layers if self._units is not None else []

    @property
    def names(self) -> list[str]:
        """Each unit's top-level submodule (``stem``, ``layer1``; units of the same one get
        ``#2``, ``#3``)."""
        return self._units.names if self._units is not None else []

    def check_balance(self, balance: Sequence[int] | Sequence[str], n_stages: int) -> list[int]:
        """A balance of unit counts, or of names: the unit each stage after the first starts
        at (``["layer2", "layer4"]`` for three stages)."""
        names = self._split().names
        if balance and all(isinstance(b, str) for b in balance):
            wanted = [str(b) for b in balance]
            if len(wanted) != n_stages - 1:
                raise ValueError(f"{len(wanted)} cut names for {n_stages} stages; name the {n_stages - 1} units "
                                 f"where stages 1..{n_stages - 1} start, from: {', '.join(names)}")
            missing = [name for name in wanted if name not in names]
            if missing:
                raise ValueError(f"no unit named {', '.join(map(repr, missing))}; the units are: {', '.join(names)}")
            starts = [0, *(names.index(name) for name in wanted), len(names)]
            if any(b <= a for a, b in itertools.pairwise(starts)):
                raise ValueError(f"the cuts {wanted} are not in the model's order: {', '.join(names)}")
            balance = [b - a for a, b in itertools.pairwise(starts)]
        return self._split().check_balance([int(b) for b in balance], n_stages)

    def balance_by_params(self, n_stages: int) -> list[int]:
        return self._split().balance_by_params(n_stages)

    def profile(self, sample: Payload) -> list[float]:
        return self._split().profile(sample)

    def to(self, device: torch.device) -> None:
        self._split().to(device)
        _share_buffers(self.model, self._split().layers)

    def check_shared(self, balance: Sequence[int], *, learning: bool, one_device: bool) -> None:
        self._split().check_shared(balance, learning=learning, one_device=one_device)

    def plans(self, balance: Sequence[int], devices: Sequence[Device]) -> list[StagePlan]:
        plans = self._split().plans(balance, devices)
        _share_buffers(self.model, self._split().layers)
        for plan in plans:
            units = list(plan.module.children())
            first, last = units[0], units[-1]
            assert isinstance(first, _Unit) and isinstance(last, _Unit)  # SequentialSplit's of our units
            plan.inputs, plan.outputs = first.inputs, last.outputs  # the values crossing its cuts
            plan.model_key = _model_key  # a unit's keys are the model's, under its index and its graph
        return plans

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state)


def _share_buffers(model: nn.Module, units: Sequence[nn.Module]) -> None:
    """Make the model hold its units' buffers again. Moving a module to a device keeps its
    Parameter objects but replaces its buffers, and the units hold the model's tensors as
    their own attributes: after a unit moved, the model's running statistics would be stale
    copies (and loading a state into the model would not reach the stages)."""
    for unit in units:
        for name, buffer in unit.named_buffers():
            path, _, leaf = name.partition(".")[2].rpartition(".")  # under the unit's "graph."
            owner = model.get_submodule(path)
            if leaf in owner._buffers:
                owner._buffers[leaf] = buffer


def _model_key(key: str) -> str:
    """A stage's key (``"2.graph.layer1.0.conv1.weight"``: unit 2's) as the model's."""
    return key.split(".", 2)[2]


def _free_dims(args: tuple[Any, ...], spec: InputSpec) -> Any:
    """``dynamic_shapes`` for ``torch.export``: the dimensions ``spec`` leaves free (None),
    per tensor of ``args`` (the frame's payload as arguments), in its structure."""
    payload = args if len(args) > 1 else args[0]
    values, structure = pytree.tree_flatten(sorted_keys(payload))
    dims = [{i: torch.export.Dim.AUTO for i, d in enumerate(leaf.shape or ()) if d is None} or None
            if isinstance(value, torch.Tensor) else None for value, leaf in zip(values, spec.leaves, strict=False)]
    shapes = pytree.tree_unflatten(dims, structure)
    return shapes if len(args) > 1 else (shapes,)


def _as_args(model: nn.Module, sample: Payload) -> tuple[Any, ...]:
    """The positional arguments a frame's payload stands for: itself, or (a tuple, for a
    ``forward`` with several required arguments) its items."""
    if isinstance(sample, tuple):
        required = [p for p in inspect.signature(model.forward).parameters.values()
                    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
        if len(required) == len(sample) > 1:
            return sample
    return (sample,)


class _Unit(nn.Module):
    """One unit: the values crossing the cut before it in (one as itself, several as a tuple;
    the first unit takes the frame's payload), those crossing the cut after it out (the last
    unit gives the model's output, in its structure)."""

    def __init__(self, graph: fx.GraphModule, *, flatten: Callable[[Payload], list[Any]] | None,
                 unflatten: Callable[[list[Any]], Payload] | None, many_in: bool, inputs: tuple[str, ...],
                 outputs: tuple[str, ...]) -> None:
        super().__init__()
        self.graph = graph
        self.inputs, self.outputs = inputs, outputs  # the names of the values that cross its cuts
        self._flatten = flatten
        self._unflatten = unflatten
        self._many_in = many_in

    def forward(self, x: Payload) -> Payload:
        if self._flatten is not None:
            values = self._flatten(x)
        else:
            values = list(x) if self._many_in else [x]
        y = self.graph(*values)
        return self._unflatten(list(y)) if self._unflatten is not None else y


def _units(gm: fx.GraphModule) -> tuple[list[nn.Module], list[str]]:
    """``gm`` (an unlifted exported program) as unit modules in order, and their names."""
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    output = next(n for n in nodes if n.op == "output")
    compute = [n for n in nodes if n.op in _COMPUTE and not (n.op == "call_module" and n.target == "_guards_fn")]
    groups: list[list[fx.Node]] = []
    keys: list[str | None] = []
    for node in compute:
        stack = list(node.meta.get("nn_module_stack", {}).values())
        key = stack[1][0] if len(stack) > 1 else None
        if not groups or (key is not None and key != keys[-1]):
            groups.append([])
            keys.append(key)
        groups[-1].append(node)
    if not groups:
        raise ValueError("the captured model computes nothing to split")
    # Where each value is made (-1: an input) and the last unit that uses it (len: the output).
    made = dict.fromkeys(inputs, -1)
    for i, group in enumerate(groups):
        for n in group:
            made[n] = i
    last_use: dict[fx.Node, int] = {}
    for i, group in enumerate(groups):
        for n in group:
            for arg in n.all_input_nodes:
                if arg in made:
                    last_use[arg] = i
    flat_out = list(pytree.tree_leaves(output.args[0]))
    results = [n for n in flat_out if isinstance(n, fx.Node)]  # the others are constants (None, 3)
    for n in results:
        last_use[n] = len(groups)
    crossing = [[n for n in made if made[n] < cut <= last_use.get(n, -1)] for cut in range(len(groups) + 1)]
    out_spec, in_spec = gm._out_spec, gm._in_spec  # set by torch.export's unlifting
    assert out_spec is not None and in_spec is not None
    units: list[nn.Module] = []
    for i, group in enumerate(groups):
        ins = inputs if i == 0 else crossing[i]
        outs = results if i == len(groups) - 1 else crossing[i + 1]
        graph = _graph(gm, group, ins, outs, one=i < len(groups) - 1 and len(outs) == 1)
        flatten = _flattener(in_spec, [_captured_shape(n) for n in inputs]) if i == 0 else None
        unflatten = _unflattener(out_spec, flat_out) if i == len(groups) - 1 else None
        units.append(_Unit(graph, flatten=flatten, unflatten=unflatten, many_in=len(ins) != 1,
                           inputs=tuple(n.name for n in ins), outputs=tuple(n.name for n in outs)))
    return units, _names(keys)


def _graph(gm: fx.GraphModule, group: list[fx.Node], ins: Sequence[fx.Node], outs: Sequence[fx.Node], *,
           one: bool) -> fx.GraphModule:
    """The nodes of ``group`` as a module of their own: ``ins`` in, ``outs`` out (a tuple; the
    value itself where ``one``), on ``gm``'s parameters."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {n: graph.placeholder(n.name) for n in ins}
    # An input this unit changes in place (an inplace ReLU right after a cut) is copied first:
    # it arrived from another stage (a learning stage's input is a leaf of its own graph, which
    # autograd forbids changing in place); the unit's later uses read the copy, as they would
    # have read the changed value.
    for n in {arg for node in group for arg in _written(node) if arg in env}:
        env[n] = graph.call_function(torch.ops.aten.clone.default, (env[n],))

    def value(arg: fx.Node) -> fx.Node:
        if arg not in env:
            if arg.op != "get_attr":
                raise RuntimeError(f"the graph's node {arg.name} is used before it is made: not a split point")
            env[arg] = graph.get_attr(str(arg.target))
        return env[arg]

    for node in group:
        env[node] = graph.node_copy(node, value)
    graph.output(value(outs[0]) if one else tuple(value(n) for n in outs))
    return fx.GraphModule(gm, graph)


def _captured_shape(node: fx.Node) -> tuple[int | None, ...] | None:
    """The shape the graph assumes for an input: its sizes, None where it is free (symbolic)."""
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return None
    return tuple(d if isinstance(d, int) else None for d in value.shape)


Shape = tuple[int | None, ...] | None


def _written(node: fx.Node) -> list[fx.Node]:
    """The arguments ``node`` changes in place (per its ATen schema)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.is_mutable:
        return []
    return [arg for arg, spec in zip(node.args, schema.arguments, strict=False)
            if isinstance(arg, fx.Node) and spec.alias_info is not None and spec.alias_info.is_write]


def _flattener(in_spec: pytree.TreeSpec, shapes: Sequence[Shape]) -> Callable[[Payload], list[Any]]:
    """The first unit's: a frame's payload (the model's arguments) as the graph's inputs, each
    checked against the shape the graph was captured for (a graph fixed to other sizes would
    compute something else without a word)."""
    def flatten(x: Payload) -> list[Any]:
        args = x if isinstance(x, tuple) and in_spec.child(0).num_children == len(x) > 1 else (x,)
        try:  # by the captured structure: a dict's keys in any order
            values = fx_pytree.tree_flatten_spec((list(args), {}), in_spec)
        except Exception as exc:
            raise ValueError(f"the input's structure differs from the first frame's ({exc}): the graph was "
                             "captured for that one") from exc
        for i, (value, shape) in enumerate(zip(values, shapes, strict=True)):
            if shape is not None and isinstance(value, torch.Tensor) and (value.dim() != len(shape) or any(
                    s is not None and s != d for s, d in zip(shape, value.shape, strict=True))):
                wanted = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
                raise ValueError(f"input {i} has shape {tuple(value.shape)}, but the graph was captured for {wanted} "
                                 "(* free): give the Pipeline an input_spec whose free dimensions (None) cover those "
                                 "that change")
        return list(values)

    return flatten


def _unflattener(out_spec: pytree.TreeSpec, flat: Sequence[Any]) -> Callable[[list[Any]], Payload]:
    """The last unit's: the graph's results as the model's output, in its structure, with the
    constants (None, a number) the model returns beside them."""
    def unflatten(values: list[Any]) -> Payload:
        it = iter(values)
        return pytree.tree_unflatten([next(it) if isinstance(leaf, fx.Node) else leaf for leaf in flat], out_spec)

    return unflatten


def _names(keys: Sequence[str | None]) -> list[str]:
    """Unique unit names: the top-level submodule, ``#2`` on its second unit, ``ops`` where
    the model's own operations start it."""
    seen: dict[str, int] = {}
    names = []
    for key in keys:
        base = key or "ops"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return names


def partitioner_for(model: nn.Module | Sequence[nn.Module], spec: Any = None) -> SequentialSplit | GraphSplit:
    """What splits ``model``: an ``nn.Sequential`` or a list of modules keeps its layers (the
    fast path); any other ``nn.Module`` is captured as a graph on its first frame, with the
    dimensions that ``spec`` (the pipeline's input spec) leaves free kept free."""
    if isinstance(model, nn.Module) and not isinstance(model, nn.Sequential):
        return GraphSplit(model, spec=spec if isinstance(spec, InputSpec) else None)
    return SequentialSplit(model)
