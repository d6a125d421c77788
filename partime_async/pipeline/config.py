"""The checks of :class:`Pipeline`'s arguments, with messages that say what would be valid."""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch

from ..aio.channel import Channel, Policy
from ..core.validation import InputSpec
from ..depth import Solver
from ..devices import Device, resolve_devices
from ..partition import GraphSplit, Partitioner
from ..programs import OnlineLearning
from ..ranks.placement import DRIVING_RANK, is_ranked, rank, resolve_ranked

Balance = Sequence[int] | Literal["time", "params"]


def initial_balance(balance: Balance, split: Partitioner, devices: Sequence[Device]) -> list[int] | None:
    """The balance to start with (None: chosen on the first frame, by time, or for a model
    split as a graph, which is cut into units there)."""
    if not getattr(split, "captured", True):
        return None
    if len(devices) > split.units:
        raise ValueError(f"cannot split {split.units} layers over {len(devices)} devices; "
                         f"give at most {split.units} devices")
    if isinstance(balance, str):
        if balance not in ("time", "params"):
            raise ValueError(f"balance must be 'time', 'params' or a list of layer counts, got {balance!r}")
        return split.balance_by_params(len(devices)) if balance == "params" else None
    return split.check_balance(balance, len(devices))


def check_learning(learning: OnlineLearning | None, devices: Sequence[Device]) -> None:
    if learning is None:
        return
    if not isinstance(learning, OnlineLearning):
        raise TypeError(f"learning must be an OnlineLearning, got {type(learning).__name__}")
    if learning.mode == "sequential" and len(devices) != 1:
        raise ValueError(f"mode='sequential' runs the whole model on one device, got {len(devices)} "
                         "devices; pass devices=[one device] (or use mode='partime' / 'stashed')")


def check_options(*, on_error: str, output_spec: Any, input_spec: Any, window: Any, metrics: Any, capacity: Any,
                  policy: Policy) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if output_spec not in ("auto", "first", None):
        raise ValueError(f"output_spec must be 'auto', 'first' or None, got {output_spec!r}")
    if input_spec not in ("first", None) and not isinstance(input_spec, InputSpec):
        raise ValueError(f"input_spec must be 'first', None or an InputSpec, got {input_spec!r}")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if not isinstance(metrics, (bool, int)) or (not isinstance(metrics, bool) and metrics < 1):
        raise ValueError(f"metrics must be True, False or a span capacity >= 1, got {metrics!r}")
    Channel(capacity, policy)  # validates both, with the channel's own messages


Depth = type[Solver] | Mapping[int, type[Solver]] | None


def depth_by_stage(depth: Depth, n_stages: int) -> dict[int, type[Solver]]:
    """``depth=`` as ``{stage: solver class}``: one class for every stage, or a mapping."""
    if depth is None:
        return {}
    if isinstance(depth, type):
        depth = dict.fromkeys(range(n_stages), depth)
    if not isinstance(depth, Mapping):
        raise TypeError(f"depth must be a solver class (DeepPCR, Jacobi), a mapping stage -> solver class, or "
                        f"None, got {depth!r}")
    for stage, solver in depth.items():
        if not (isinstance(stage, int) and 0 <= stage < n_stages):
            raise ValueError(f"depth names stage {stage!r}, but the pipeline has stages 0..{n_stages - 1}")
        if not (isinstance(solver, type) and issubclass(solver, Solver)):
            raise TypeError(f"depth[{stage}] must be a solver class from partime_async.depth (DeepPCR, Jacobi), "
                            f"got {solver!r}")
    return dict(depth)


Width = bool | Collection[int]


def width_stages(width: Width, n_stages: int, learning: OnlineLearning | None,
                 depth: Mapping[int, Any]) -> bool | frozenset[int]:
    """``width=`` checked: True (every stage that holds width-split layers), or the stages named."""
    if isinstance(width, bool):
        stages: bool | frozenset[int] = width
    elif isinstance(width, Collection) and all(isinstance(k, int) and 0 <= k < n_stages for k in width):
        stages = frozenset(width)
    else:
        raise ValueError(f"width must be True, False or a collection of stage indices in 0..{n_stages - 1}, "
                         f"got {width!r}")
    if stages and learning is not None:
        raise ValueError("width-split stages infer only: to fine-tune a restructured model, learn on plan.model as "
                         "a plain module (its pruned connections have no weights, so they stay pruned) and run "
                         "it width-split afterwards")
    both = set(depth) & (set(stages) if isinstance(stages, frozenset) else set())
    if both:
        raise ValueError(f"stage {min(both)} cannot be solved in depth and split in width at once")
    return stages


def replica_groups(devices: Any) -> tuple[Any, list[int]]:
    """``devices=`` with its replica groups flattened (``[d0, [d1, d2]]``: stage 1 on d1 and
    d2), and the number of devices of each stage; ``devices`` as given when it has no group."""
    if isinstance(devices, (str, torch.device, Device)) or not isinstance(devices, Sequence):
        return devices, []
    flat: list[Any] = []
    sizes: list[int] = []
    for entry in devices:
        group = list(entry) if isinstance(entry, (list, tuple)) else [entry]
        if not group:
            raise ValueError("a stage's replica group is empty; give it one device or more, e.g. [d0, [d1, d2]]")
        flat.extend(group)
        sizes.append(len(group))
    return flat, sizes


def check_replicas(replicas: Mapping[int, Sequence[Device]], *, learning: Any, depth: Any, width: Any) -> None:
    """Replicas infer: a learning stage keeps one set of weights and one schedule."""
    if not replicas:
        return
    stages = sorted(replicas)
    if learning is not None:
        raise ValueError(f"stage(s) {stages} are replicated, and learning with replicas is not supported (each "
                         "replica would update its own copy of the weights); give one device per stage to learn, "
                         "or infer with replicas")
    if set(stages) & (set(depth) | (set(width) if isinstance(width, (set, frozenset)) else set())):
        raise ValueError(f"stage(s) {stages} are replicated: a replicated stage runs its layers plainly (no "
                         "depth= or width= for it)")


class Placement(NamedTuple):
    """Where a pipeline's stages run, as this process sees it (see :func:`place`)."""

    devices: list[Device]
    """One per stage (a replicated stage's first: it stands for the stage in plans and profiling)."""
    replicas: dict[int, tuple[Device, ...]]
    """Every device of each replicated stage, by stage index."""
    driving: bool
    """Whether this process streams and submits (rank 0, or the only process)."""
    here: set[int]
    """The stages this rank runs, in a pipeline whose devices name ranks (else empty)."""


def place(devices: Any, split: Partitioner) -> Placement:
    """``devices=`` resolved for a model that ``split`` cuts: replica groups (``[d0, [d1,
    d2]]``), ranks (``"rank1:cpu"``)."""
    # A graph is cut into units on its first frame; until then, its top-level submodules
    # (which its units are calls of) bound how many stages devices="auto" makes.
    n_units = split.units if not isinstance(split, GraphSplit) or split.captured \
        else max(1, len(list(split.model.children())))
    if isinstance(devices, str) and devices != "auto":
        devices = [devices]  # one device, maybe on a rank
    devices, sizes = replica_groups(devices)
    if is_ranked(devices):
        if any(n > 1 for n in sizes):
            raise ValueError("replicas are not supported yet in a pipeline whose devices name ranks: give "
                             "each stage one device")
        resolved, here = resolve_ranked(devices, n_units)
        driving = rank() == DRIVING_RANK
    else:
        resolved, here, driving = resolve_devices(devices, n_units), set(), True
    if not sizes:
        return Placement(resolved, {}, driving, here)
    groups = [tuple(resolved[sum(sizes[:k]):sum(sizes[:k + 1])]) for k in range(len(sizes))]
    return Placement([group[0] for group in groups], {k: g for k, g in enumerate(groups) if len(g) > 1},
                     driving, here)


def every_device(devices: Sequence[Device], replicas: Mapping[int, tuple[Device, ...]]) -> list[Device]:
    """The devices a run starts: one per stage and every further replica."""
    return [*devices, *(d for group in replicas.values() for d in group[1:])]
