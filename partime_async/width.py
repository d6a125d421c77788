"""Parallel in width: RePurpose restructuring of a trained model into K sub-models that talk little.

RePurpose (Abdi, Rashidi, Fekri, Krishna, 2020, arXiv 2008.08289) splits an already-trained
model across K workers by width: every layer's neurons are shared out among the workers
(without changing the topology), the connections between workers are pruned under a budget,
and the kept weights are refit so that the accuracy survives. The result runs as K blocks,
one per worker, exchanging only the kept cross activations each layer
(:class:`~partime_async.programs.width.WidthProgram`)::

    from partime_async.width import repurpose
    plan = repurpose(model, calibration, workers=K, budget=0.25, refit=True)
    plan.model          # the restructured network: same inputs, outputs in the original order
    plan.assignment     # one LongTensor per Linear/Conv2d layer: the worker of each output neuron
    plan.communication  # per sample: (hidden activation, other worker that needs it) pairs

**Supported models.** An ``nn.Sequential`` whose weight layers are ``nn.Linear`` (each output
feature is a neuron) or ``nn.Conv2d`` (each output channel is a neuron; ``groups=1``, numeric
padding, ``padding_mode="zeros"``), with between two weight layers only

* elementwise activations (``ReLU``, ``ReLU6``, ``LeakyReLU``, ``ELU``, ``SELU``, ``CELU``,
  ``GELU``, ``SiLU``, ``Mish``, ``Tanh``, ``Sigmoid``, ``Softplus``, ``Softsign``,
  ``Hardtanh``, ``Hardswish``, ``Hardsigmoid``, ``Tanhshrink``, ``Identity``, ``Dropout``);
* a ``BatchNorm1d``/``BatchNorm2d`` right after a weight layer: folded into it (its running
  statistics, as in eval mode; the restructured model has no BatchNorm);
* after a ``Conv2d``: per-channel pooling (``MaxPool2d``, ``AvgPool2d``,
  ``AdaptiveAvgPool2d``, ``AdaptiveMaxPool2d``) and one ``nn.Flatten()`` before the first
  ``Linear`` (each channel's flattened positions stay that channel's).

Modules before the first weight layer run once on the input (which every worker receives
anyway), and modules after the last one run on the gathered outputs; both are kept as they
are. Anything else between two weight layers (a residual block, a softmax over features,
a ``Conv2d`` with groups, ...) raises a ``ValueError`` that names it.

**What counts as communication.** The input is broadcast to every worker and the final
outputs are gathered; neither counts. A hidden activation counts once per other worker
that needs it: per sample, one per feature of a ``Linear`` layer's input, and ``H*W`` per
channel map of a ``Conv2d``'s input (or per channel flattened into a ``Linear``).
``budget`` is the fraction of the *dense split's* communication that may be kept (that of
the plan's own assignment with nothing pruned: for a dense model, every hidden activation to
every other worker); it is applied to every layer alike.

**The steps.**

1. *Assignment* (per layer, balanced: worker sizes differ by at most one). The cost of
   placing neuron ``j`` with worker ``w`` is minus the weight mass linking it to the neurons
   already placed there, with ``m[j, i] = W[j, i]**2 * E[a_i**2]`` (the energy that input
   ``i`` contributes to ``j`` on the calibration data; normalised to total 1 per layer). The
   balanced minimum is the Hungarian algorithm (:func:`balanced_assignment`:
   ``scipy.optimize.linear_sum_assignment`` with each worker's column repeated ``n // K``
   times, plus one spare column per worker when ``K`` does not divide ``n``). The first
   layer reads the broadcast input, so it has no previous layer to follow: its neurons are
   clustered (balanced) by the cosine of what the next layer draws from them (farthest-first
   seeds, then a few Hungarian rounds). Each later layer follows the one before it (mass to
   the previous layer's neurons on ``w``); then refining sweeps reassign every layer with
   the mass to the next layer's neurons added, each change lowering the total cut mass.
   Activation *correlations* enter this cost only through ``E[a**2]``: costs built from the
   full correlations (the budget-0 refit error of neuron ``j`` on worker ``w``'s
   activations; the Optimal-Brain-Surgeon saliency ``W**2 / [G^-1]_ii``; spreading
   correlated neurons over the workers) were tried and did no better once refit
   (``bench/repurpose.py``, ``a`` against ``d``, shows what the assignment adds).
2. *Pruning* under the budget: per layer, the (activation, receiving worker) pairs to keep.
   With ``refit=True``, greedily (in a few rounds) those that most reduce the error left
   after refitting the receiving worker's neurons on what it already has (the gain of a
   candidate is its squared covariance with the current residual over its conditional
   variance); with ``refit=False``, those whose masked weights carry the most energy on the
   calibration data.
3. *Refit* (``refit=True``): layer by layer, each worker's neurons are refit by ridge-damped
   least squares on their kept inputs, as the restructured network computes them on the
   calibration data, to the original network's pre-activations (so that each layer also
   corrects the errors of the layers before it). Each worker's neurons share one Gram
   matrix (their kept inputs are the same), so a layer costs one Cholesky factor per worker.
   A refit that fits the calibration data worse than plain masking is not taken; a worker
   that lost no non-zero weight keeps its weights exactly (so ``budget=1.0`` is an exact
   permutation of the model).
4. *Bookkeeping*: each layer's neurons are reordered worker by worker (original order within
   a worker); the biases follow their neurons, the next layer's columns follow its inputs,
   and the last layer restores the original output order.

The restructured model (:attr:`WidthPlan.model`) is an ``nn.Sequential`` in which each weight
layer is a :class:`SplitLinear` or :class:`SplitConv2d`: per worker, a block of weights over
its own inputs, the kept cross connections (an index set into the other workers' outputs and
their weights) and a bias. It runs in one thread as any module does (and can be trained: the
pruned connections do not exist in it, so they stay zero), or as K blocks in parallel.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CHANNELWISE", "ELEMENTWISE", "SplitConv2d", "SplitLayer", "SplitLinear", "WidthPlan", "balanced_assignment",
           "repurpose"]

ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
    nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Tanhshrink, nn.Identity, nn.Dropout)
"""Modules that act on every activation on its own: allowed between two weight layers."""
CHANNELWISE: tuple[type[nn.Module], ...] = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
"""Modules that act on every channel on its own: allowed after a ``Conv2d``."""

_MAX_ROWS = 1 << 16  # calibration rows (samples x positions) a Conv2d's least squares uses at most
_RIDGE = 1e-4        # least-squares damping, relative to the mean diagonal of the Gram matrix
_ROUNDS = 4          # greedy rounds of the refit-aware pruning
_SWEEPS = 2          # refining sweeps of the assignment
_CLUSTERING = 3      # rounds of the first layer's clustering


@dataclass
class WidthPlan:
    """What :func:`repurpose` returns.

    Attributes:
        model: the restructured network (an ``nn.Sequential`` of :class:`SplitLinear` /
            :class:`SplitConv2d` and the model's other modules): same inputs, outputs in the
            original order.
        assignment: one LongTensor per weight layer (``Linear``/``Conv2d``), in model order:
            the worker of each output neuron, in the original neuron order.
        communication: per sample, the (hidden activation, other worker that needs it) pairs
            that the plan exchanges (a ``Conv2d`` channel map counts ``H*W``).
        dense_communication: the same for this assignment with nothing pruned.
        workers: K.
        budget: the budget asked for.
        layer_communication: :attr:`communication` layer by layer (0 for the first).
    """

    model: nn.Sequential = field(repr=False)
    assignment: list[torch.Tensor] = field(repr=False)
    communication: float
    dense_communication: float
    workers: int
    budget: float
    layer_communication: list[float] = field(default_factory=list, repr=False)


# -- the restructured layers ------------------------------------------------------------------
class SplitLayer(nn.Module):
    """A weight layer split in width over K workers (see :class:`SplitLinear`)."""

    dim: int  # the feature (channel) dimension of inputs and outputs
    order: torch.Tensor | None  # a buffer: the permutation that restores the outputs' order (last layer)

    def __init__(self, sizes: Sequence[int], in_sizes: Sequence[int] | None, local: Sequence[torch.Tensor],
                 cross: Sequence[torch.Tensor], cross_index: Sequence[torch.Tensor], bias: Sequence[torch.Tensor],
                 order: torch.Tensor | None, unit: int = 1) -> None:
        super().__init__()
        self.workers = len(sizes)
        self.sizes = tuple(int(s) for s in sizes)
        self.in_sizes = None if in_sizes is None else tuple(int(s) for s in in_sizes)
        self.unit = unit  # input features (columns) per input neuron: >1 for a Linear after a Flatten
        self.local = nn.ParameterList([nn.Parameter(t.detach().clone()) for t in local])
        self.cross = nn.ParameterList([nn.Parameter(t.detach().clone()) for t in cross])
        self.bias = nn.ParameterList([nn.Parameter(t.detach().clone()) for t in bias])
        for w, index in enumerate(cross_index):
            self.register_buffer(f"cross_index_{w}", index.detach().clone().long())
        self.register_buffer("order", None if order is None else order.detach().clone().long())

    @property
    def broadcast(self) -> bool:
        """Every worker reads the whole input (the first layer)."""
        return self.in_sizes is None

    def cross_index(self, w: int) -> torch.Tensor:
        """The input features (positions in the whole, worker-major input) that worker ``w``
        receives from the others, ascending; :attr:`cross` ``[w]`` has one column per entry."""
        return getattr(self, f"cross_index_{w}")

    def in_range(self, w: int) -> tuple[int, int]:
        """Worker ``w``'s own input features: ``[start, stop)`` of the whole input."""
        assert self.in_sizes is not None
        start = sum(self.in_sizes[:w]) * self.unit
        return start, start + self.in_sizes[w] * self.unit

    def out_range(self, w: int) -> tuple[int, int]:
        start = sum(self.sizes[:w])
        return start, start + self.sizes[w]

    def sources(self, w: int) -> list[tuple[int, torch.Tensor]]:
        """``(s, positions)``: what worker ``w`` receives from each other worker ``s``, as
        positions in ``s``'s own slice of the input (in the order of :attr:`cross` ``[w]``'s columns)."""
        if self.broadcast:
            return []
        index, out = self.cross_index(w), []
        for s in range(self.workers):
            start, stop = self.in_range(s)
            mine = index[(index >= start) & (index < stop)]
            if s != w and mine.numel():
                out.append((s, mine - start))
        return out

    def communication(self) -> int:
        """Input features received from other workers, per sample and position."""
        return sum(self.cross_index(w).numel() for w in range(self.workers))

    def block(self, w: int, x: torch.Tensor, received: torch.Tensor | None) -> torch.Tensor:
        """Worker ``w``'s output from its own input ``x`` (the whole input for the first layer)
        and what it ``received`` from the others (None: nothing)."""
        y = self._op(x, self.local[w], self.bias[w])
        if received is not None:
            y = y + self._op(received, self.cross[w], None)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for w in range(self.workers):
            if self.broadcast:
                own = x
            else:
                start, stop = self.in_range(w)
                own = x.narrow(self.dim, start, stop - start)
            index = self.cross_index(w)
            received = x.index_select(self.dim, index) if index.numel() else None
            outs.append(self.block(w, own, received))
        y = torch.cat(outs, self.dim)
        return y if self.order is None else y.index_select(self.dim, self.order)

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        kept = self.communication() // self.unit if not self.broadcast else 0
        return (f"workers={self.workers}, sizes={list(self.sizes)}, "
                f"{'broadcast input' if self.in_sizes is None else f'in_sizes={list(self.in_sizes)}'}, "
                f"received={kept}, restores_order={self.order is not None}")


class SplitLinear(SplitLayer):
    """An ``nn.Linear`` split in width over K workers.

    Inputs and outputs are worker-major: worker ``w`` owns a contiguous slice of the features
    (:meth:`in_range`, :meth:`out_range`). Worker ``w`` computes its ``sizes[w]`` outputs as
    ``local[w] @ own + cross[w] @ x[cross_index(w)] + bias[w]``: ``own`` its slice of the
    input (the whole input on the first layer, ``in_sizes=None``: broadcast), ``cross_index``
    the kept activations it receives from the others. ``order`` (the last layer) puts the
    outputs back in the original order.
    """

    dim = -1

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)


class SplitConv2d(SplitLayer):
    """An ``nn.Conv2d`` split in width (channels) over K workers; see :class:`SplitLinear`
    (the feature dimension is the channel dimension, 1)."""

    dim = 1

    def __init__(self, *args, stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)


# -- the balanced assignment --------------------------------------------------------------------
def balanced_assignment(cost: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The balanced assignment of minimum total cost: ``cost[j, w]`` of putting item ``j`` with
    worker ``w``; every worker gets ``n // K`` or ``n // K + 1`` items. Returns the worker of
    each item (LongTensor).

    The Hungarian algorithm (``scipy.optimize.linear_sum_assignment``) on the ``n x K`` costs
    with each worker's column repeated ``n // K`` times, plus one spare column per worker when
    ``K`` does not divide ``n``; the repeated columns get a bonus larger than any difference
    of costs, so that all are filled and the spares take only the remainder.

    Two shifts that change no optimum make the search fast: each item's costs less their
    minimum (every item is placed once), and each worker's repeated columns less an estimate
    of that worker's dual price (every worker fills exactly ``n // K`` of them). Without the
    prices, costs where most items prefer the same worker (common: one worker's neurons carry
    more of the mass) make the search 10-50x slower at 4096 x 4."""
    from scipy.optimize import linear_sum_assignment

    c = np.asarray(cost.detach().cpu().double() if isinstance(cost, torch.Tensor) else cost, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] < 1:
        raise ValueError(f"cost must be an n x K matrix, got shape {c.shape}")
    if not np.isfinite(c).all():
        raise ValueError("cost has non-finite entries")
    n, k = c.shape
    c = c - c.min(axis=1, keepdims=True)
    base, extra = divmod(n, k)
    columns: list[np.ndarray] = []
    worker_of_column: list[np.ndarray] = []
    if base:
        shifted = c - _prices(c, base)
        bonus = (shifted.max() - c.min()) + (c.max() - c.min()) + 1.0
        columns.append(np.repeat(shifted - bonus, base, axis=1))
        worker_of_column.append(np.repeat(np.arange(k), base))
    if extra:
        columns.append(c)
        worker_of_column.append(np.arange(k))
    rows, cols = linear_sum_assignment(np.concatenate(columns, axis=1))
    owner = np.empty(n, dtype=np.int64)
    owner[rows] = np.concatenate(worker_of_column)[cols]
    return torch.from_numpy(owner)


def _prices(c: np.ndarray, target: int, iterations: int = 200) -> np.ndarray:
    """Per-worker prices under which about ``target`` items prefer each worker (``argmin(c - p)``):
    a damped price adjustment. Only a preconditioner: any prices give the same optimum."""
    n, k = c.shape
    prices = np.zeros(k)
    step = float(np.median(c.max(axis=1) - c.min(axis=1)))
    if k == 1 or step <= 0:
        return prices
    for _ in range(iterations):
        counts = np.bincount(np.argmin(c - prices, axis=1), minlength=k)
        gap = target - counts
        if np.abs(gap).max() <= max(1, n // 1000):
            break
        prices += step * gap / target
        step *= 0.97
    return prices


# -- the model, as weight layers ---------------------------------------------------------------
@dataclass
class _Layer:
    """One weight layer of the model, BatchNorm folded, with what runs before it."""

    kind: str                       # "linear" or "conv"
    weight: torch.Tensor            # [out, in] or [out, in, kh, kw] (folded)
    bias: torch.Tensor              # [out]
    before: list[nn.Module]         # modules between the previous weight layer and this one
    conv: dict = field(default_factory=dict)  # stride, padding, dilation, kernel_size
    in_units: int = 0               # neurons of the previous layer that feed it (its input channels)
    k: int = 1                      # design columns per input neuron
    unit_size: int = 1              # scalar activations per input neuron per sample (communication)

    @property
    def out(self) -> int:
        return self.weight.shape[0]

    @property
    def flat_weight(self) -> torch.Tensor:
        """[out, in_units * k]"""
        return self.weight.reshape(self.out, -1)


def _fold_bn(weight: torch.Tensor, bias: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm
             ) -> tuple[torch.Tensor, torch.Tensor]:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{bn} keeps no running statistics (track_running_stats=False): it cannot be folded")
    scale = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    w = weight.double() * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    b = bias.double() * scale + shift
    return w.to(weight.dtype), b.to(weight.dtype)


def _parse(model: nn.Module) -> tuple[list[nn.Module], list[_Layer], list[nn.Module]]:
    """(prefix, weight layers, suffix) of ``model``, or a ValueError that says what is unsupported."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"repurpose() restructures an nn.Sequential, got {type(model).__name__}")
    prefix: list[nn.Module] = []
    layers: list[_Layer] = []
    pending: list[nn.Module] = []
    for position, module in enumerate(model):
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if isinstance(module, nn.Conv2d):
                if module.groups != 1:
                    raise ValueError(f"layer {position} ({module}): a Conv2d with groups={module.groups} is not "
                                     "supported (channels as neurons needs groups=1)")
                if module.padding_mode != "zeros" or isinstance(module.padding, str):
                    raise ValueError(f"layer {position} ({module}): only numeric zero padding is supported")
            weight = module.weight.detach().clone()
            bias = (module.bias.detach().clone() if module.bias is not None
                    else torch.zeros(module.weight.shape[0], dtype=module.weight.dtype, device=module.weight.device))
            if not layers:
                prefix = pending
            else:
                _check_between(layers[-1], pending, module, position)
            layer = _Layer("conv" if isinstance(module, nn.Conv2d) else "linear", weight, bias,
                           before=[] if not layers else pending)
            if isinstance(module, nn.Conv2d):
                layer.conv = {"stride": tuple(module.stride), "padding": tuple(module.padding),
                              "dilation": tuple(module.dilation), "kernel_size": tuple(module.kernel_size)}
            layers.append(layer)
            pending = []
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and layers and not pending:
            last = layers[-1]
            expected = nn.BatchNorm2d if last.kind == "conv" else nn.BatchNorm1d
            if not isinstance(module, expected) or module.num_features != last.out:
                raise ValueError(f"layer {position} ({module}) does not match the weight layer before it")
            last.weight, last.bias = _fold_bn(last.weight, last.bias, module)
        else:
            pending.append(module)
    if not layers:
        raise ValueError("the model has no Linear or Conv2d layer to split")
    return prefix, layers, pending


def _check_between(previous: _Layer, modules: list[nn.Module], nxt: nn.Module, position: int) -> None:
    flattened = False
    for module in modules:
        if isinstance(module, ELEMENTWISE):
            continue
        if previous.kind == "conv" and not flattened and isinstance(module, CHANNELWISE):
            continue
        if previous.kind == "conv" and isinstance(module, nn.Flatten) and not flattened \
                and isinstance(nxt, nn.Linear) and module.start_dim == 1 and module.end_dim == -1:
            flattened = True
            continue
        raise ValueError(
            f"{type(module).__name__} between two weight layers (before layer {position}) is not supported: "
            "between Linear/Conv2d layers repurpose() allows elementwise activations, Dropout, a BatchNorm right "
            "after a weight layer, per-channel pooling after a Conv2d, and nn.Flatten() before the first Linear "
            "(see partime_async.width)")
    if previous.kind == "conv" and isinstance(nxt, nn.Linear) and not flattened:
        raise ValueError(f"a Linear after a Conv2d (layer {position}) needs an nn.Flatten() between them")
    if previous.kind == "linear" and isinstance(nxt, nn.Conv2d):
        raise ValueError(f"a Conv2d after a Linear (layer {position}) is not supported")


def _run(modules: Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for module in modules:
        x = module(x)
    return x


def _forward(layer: _Layer, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    if layer.kind == "linear":
        return F.linear(x, weight, bias)
    c = layer.conv
    return F.conv2d(x, weight, bias, c["stride"], c["padding"], c["dilation"])


def _design(layer: _Layer, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The layer's input as rows of a least-squares problem: one row per sample (and position,
    for a Conv2d: its receptive field), columns grouped by input neuron (``k`` each)."""
    if layer.kind == "linear":
        d = x.reshape(-1, x.shape[-1])
    else:
        c = layer.conv
        d = F.unfold(x, c["kernel_size"], dilation=c["dilation"], padding=c["padding"], stride=c["stride"])
        d = d.transpose(1, 2).reshape(-1, d.shape[1])
    return d if rows is None else d.index_select(0, rows)


def _outputs(layer: _Layer, z: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The layer's outputs ``z`` as rows matching :func:`_design`'s (one per sample and position)."""
    z = z.reshape(-1, z.shape[-1]) if layer.kind == "linear" else z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    return z if rows is None else z.index_select(0, rows)


def _shape_layers(prefix: list[nn.Module], layers: list[_Layer], sample: torch.Tensor) -> None:
    """Fill each layer's ``in_units``, ``k`` and ``unit_size`` from a forward pass on ``sample``."""
    x = _run(prefix, sample)
    for index, layer in enumerate(layers):
        if index:
            before_flatten = x
            for module in layer.before:
                if isinstance(module, nn.Flatten):
                    before_flatten = x
                x = module(x)
            if layer.kind == "linear" and any(isinstance(m, nn.Flatten) for m in layer.before):
                channels = before_flatten.shape[1]
                spatial = before_flatten[0, 0].numel()
                layer.in_units, layer.k, layer.unit_size = channels, spatial, spatial
            elif layer.kind == "linear":
                layer.in_units, layer.k, layer.unit_size = x.shape[-1], 1, 1
            else:
                layer.in_units = x.shape[1]
                layer.k = math.prod(layer.conv["kernel_size"])
                layer.unit_size = x[0, 0].numel()
            if layer.in_units != layers[index - 1].out:
                raise ValueError(f"weight layer {index} reads {layer.in_units} neurons but the layer before it has "
                                 f"{layers[index - 1].out}")
        else:
            layer.in_units = x.shape[-1] if layer.kind == "linear" else x.shape[1]
            layer.k = 1 if layer.kind == "linear" else math.prod(layer.conv["kernel_size"])
        x = _forward(layer, x, layer.weight, layer.bias)


# -- the assignment ---------------------------------------------------------------------------------
def _unit_mass(layer: _Layer, power: torch.Tensor) -> torch.Tensor:
    """``m[j, i]``: the energy input neuron ``i`` contributes to neuron ``j`` (``W**2 * E[a**2]``
    summed over the neuron's columns), normalised to total 1."""
    w = layer.flat_weight.double()
    m = (w * w * power.double()).reshape(layer.out, layer.in_units, layer.k).sum(2)
    total = m.sum()
    return m / total if total > 0 else m


def _onehot(owner: torch.Tensor, k: int) -> torch.Tensor:
    return F.one_hot(owner, k).double()


def _assign(masses: Mapping[int, torch.Tensor], sizes: list[int], k: int, sweeps: int = _SWEEPS
            ) -> list[torch.Tensor]:
    """Balanced owners for every layer; ``masses[i]``: layer i's ``m`` (every layer but the first)."""
    n = len(sizes)
    owners: list[torch.Tensor] = []
    # The first layer reads the broadcast input: seed it by clustering its neurons by the
    # next layer's use of them (cosine of their columns of m), else deal them out in turn.
    if n > 1:
        owners.append(_cluster(masses[1], k))
    else:
        owners.append(torch.arange(sizes[0]) % k)
    for i in range(1, n):
        owners.append(balanced_assignment(-masses[i] @ _onehot(owners[i - 1], k)))
    for _ in range(sweeps):
        changed = False
        for i in range(n):
            cost = torch.zeros(sizes[i], k, dtype=torch.float64)
            if i > 0:
                cost -= masses[i] @ _onehot(owners[i - 1], k)
            if i + 1 < n:
                cost -= masses[i + 1].T @ _onehot(owners[i + 1], k)
            new = balanced_assignment(cost)
            if (cost.gather(1, new[:, None]).sum() < cost.gather(1, owners[i][:, None]).sum() - 1e-12
                    and not torch.equal(new, owners[i])):
                owners[i], changed = new, True
        if not changed:
            break
    return owners


def _cluster(mass: torch.Tensor, k: int, iterations: int = _CLUSTERING) -> torch.Tensor:
    """A balanced clustering of the input neurons of ``mass`` ([out, in]) by the cosine of
    their columns (neurons that feed the same next-layer neurons go together): farthest-first
    seeds, then Hungarian assignments to the clusters' summed similarity until stable."""
    profile = mass.T  # [in, out]
    norm = profile.norm(dim=1, keepdim=True).clamp_min(1e-30)
    unit = profile / norm
    sim = unit @ unit.T  # [in, in], in [0, 1]
    n = sim.shape[0]
    seeds = [int(torch.argmax(profile.sum(1)))]
    while len(seeds) < min(k, n):
        closeness = sim[:, seeds].max(1).values
        closeness[seeds] = math.inf
        seeds.append(int(torch.argmin(closeness)))
    seeds += seeds[:1] * (k - len(seeds))
    owner = balanced_assignment(-sim[:, seeds])
    for _ in range(iterations):
        cost = -(sim @ _onehot(owner, k)) / torch.bincount(owner, minlength=k).clamp_min(1).double()
        new = balanced_assignment(cost)
        if torch.equal(new, owner):
            break
        owner = new
    return owner


# -- pruning and refit --------------------------------------------------------------------------------
def _needed(layer: _Layer, prev: torch.Tensor, owner: torch.Tensor, k: int) -> torch.Tensor:
    """[in_units, K]: worker ``w`` needs input neuron ``i`` from another worker (a non-zero weight)."""
    nonzero = (layer.flat_weight != 0).reshape(layer.out, layer.in_units, layer.k).any(2).double()
    uses = (nonzero.T @ _onehot(owner, k)) > 0  # [in_units, K]
    uses[torch.arange(layer.in_units), prev] = False
    return uses


class _Gram:
    """Second moments of a layer's (restructured) input ``[d, 1]`` and its cross moments with the
    original pre-activations ``z``: ``G = E[g g^T]``, ``R = E[g z^T]`` (float64)."""

    def __init__(self, design: torch.Tensor, target: torch.Tensor) -> None:
        rows = design.shape[0]
        g = torch.cat([design, torch.ones(rows, 1, dtype=design.dtype)], 1)
        self.G = (g.T @ g).double() / rows
        self.R = (g.T @ target).double() / rows
        self.zz = (target.double() ** 2).sum(0) / rows
        self.bias = self.G.shape[0] - 1
        diag = torch.diagonal(self.G)
        self.ridge = _RIDGE * float(diag[:-1].mean()) if self.bias else _RIDGE

    def solve(self, cols: torch.Tensor, neurons: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(beta, L): the damped least squares of ``neurons`` on columns ``cols`` (bias last
        in ``cols``), and the Cholesky factor used."""
        gkk = self.G[cols[:, None], cols]
        gkk.diagonal().add_(self.ridge)
        L = torch.linalg.cholesky(gkk)
        beta = torch.cholesky_solve(self.R[cols[:, None], neurons], L)
        return beta, L

    def error(self, cols: torch.Tensor, neurons: torch.Tensor, beta: torch.Tensor) -> float:
        """E||z - g_cols beta||^2 summed over ``neurons`` (without damping)."""
        gkk = self.G[cols[:, None], cols]
        return float((beta * (gkk @ beta)).sum() - 2 * (beta * self.R[cols[:, None], neurons]).sum()
                     + self.zz[neurons].sum())

    def solved_error(self, cols: torch.Tensor, neurons: torch.Tensor, beta: torch.Tensor) -> float:
        """:meth:`error` of :meth:`solve`'s ``beta`` (``G beta = R - ridge beta``: no product with G)."""
        return float(self.zz[neurons].sum() - (beta * self.R[cols[:, None], neurons]).sum()
                     - self.ridge * (beta * beta).sum())


def _select(layer: _Layer, needed: torch.Tensor, prev: torch.Tensor, owner: torch.Tensor, quota: int,
            gram: _Gram | None, power: torch.Tensor | None, how: str, k: int) -> torch.Tensor:
    """[in_units, K] bool: the (input neuron, receiving worker) pairs kept, ``quota`` of the
    ``needed`` ones (``how``: ``"refit"``, ``"mask"`` or ``"magnitude"``; see the module docstring)."""
    kept = torch.zeros_like(needed)
    quota = min(quota, int(needed.sum()))
    if quota <= 0:
        return kept
    w2 = layer.flat_weight.double() ** 2
    if how in ("mask", "magnitude"):
        if how == "magnitude":
            energy = w2
        else:
            assert power is not None  # the calibration data's, for "mask"
            energy = w2 * power.double()
        per_unit = energy.reshape(layer.out, layer.in_units, layer.k).sum(2)  # [out, in_units]
        score = (per_unit.T @ _onehot(owner, k))  # [in_units, K]
        score[~needed] = -math.inf
        top = torch.topk(score.reshape(-1), quota).indices
        kept.view(-1)[top] = True
        return kept
    assert gram is not None
    unit_cols = torch.arange(layer.in_units * layer.k).reshape(layer.in_units, layer.k)
    bias_col = torch.tensor([gram.bias])
    for r in range(_ROUNDS):
        left = quota - int(kept.sum())
        if left <= 0:
            break
        take = math.ceil(left / (_ROUNDS - r))
        gains = torch.full(needed.shape, -math.inf, dtype=torch.float64)
        for w in range(k):
            candidates = torch.nonzero(needed[:, w] & ~kept[:, w]).reshape(-1)
            if not len(candidates):
                continue
            neurons = torch.nonzero(owner == w).reshape(-1)
            have = torch.nonzero((prev == w) | kept[:, w]).reshape(-1)
            cols = torch.cat([unit_cols[have].reshape(-1), bias_col])
            beta, L = gram.solve(cols, neurons)
            fcols = unit_cols[candidates].reshape(-1)
            gfk = gram.G[fcols[:, None], cols]
            resid = gram.R[fcols[:, None], neurons] - gfk @ beta
            v = torch.linalg.solve_triangular(L, gfk.T, upper=False)
            var = torch.diagonal(gram.G)[fcols] - (v * v).sum(0)
            floor = 1e-9 * torch.diagonal(gram.G)[fcols].clamp_min(1e-30) + 1e-30
            gain = (resid * resid).sum(1) / torch.maximum(var, floor)
            gains[candidates, w] = gain.reshape(len(candidates), layer.k).sum(1)
        finite = torch.isfinite(gains).reshape(-1)
        take = min(take, int(finite.sum()))
        if take <= 0:
            break
        top = torch.topk(torch.where(finite, gains.reshape(-1), torch.tensor(-math.inf, dtype=torch.float64)),
                         take).indices
        kept.view(-1)[top] = True
    return kept


def _refit(layer: _Layer, prev: torch.Tensor, owner: torch.Tensor, kept: torch.Tensor, gram: _Gram | None,
           k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's new (flat) weight and bias in the original order, zero outside each worker's
    kept inputs: masked, or refit where that fits the calibration data better."""
    weight = layer.flat_weight.clone()
    bias = layer.bias.clone()
    unit_cols = torch.arange(layer.in_units * layer.k).reshape(layer.in_units, layer.k)
    for w in range(k):
        neurons = torch.nonzero(owner == w).reshape(-1)
        if not len(neurons):
            continue
        keep = (prev == w) | kept[:, w]
        cols = unit_cols[keep].reshape(-1)
        dropped = unit_cols[~keep].reshape(-1)
        rows = weight[neurons]
        lost = rows[:, dropped]
        rows[:, dropped] = 0
        weight[neurons] = rows
        if gram is None or not bool((lost != 0).any()):
            continue  # masking only, or nothing of weight was pruned: exact
        allcols = torch.cat([cols, torch.tensor([gram.bias])])
        beta, _ = gram.solve(allcols, neurons)
        masked = torch.cat([layer.flat_weight[neurons][:, cols].T, layer.bias[neurons][None, :]]).double()
        if gram.solved_error(allcols, neurons, beta) < gram.error(allcols, neurons, masked):
            new = torch.zeros(len(neurons), weight.shape[1], dtype=torch.float64)
            new[:, cols] = beta[:-1].T
            weight[neurons] = new.to(weight.dtype)
            bias[neurons] = beta[-1].to(bias.dtype)
    return weight, bias


# -- building the restructured model -----------------------------------------------------------------
def _build(prefix: list[nn.Module], layers: list[_Layer], suffix: list[nn.Module], owners: list[torch.Tensor],
           weights: list[torch.Tensor], biases: list[torch.Tensor], kept: Mapping[int, torch.Tensor], k: int
           ) -> nn.Sequential:
    modules: list[nn.Module] = [copy.deepcopy(m) for m in prefix]
    perms = [torch.argsort(o, stable=True) for o in owners]
    for i, layer in enumerate(layers):
        if i:
            modules += [copy.deepcopy(m) for m in layer.before]
        owner, perm = owners[i], perms[i]
        sizes = torch.bincount(owner, minlength=k).tolist()
        w = weights[i].reshape(layer.out, layer.in_units, layer.k)
        shape = (layer.k,) if layer.kind == "linear" else tuple(layer.conv["kernel_size"])
        local, cross, index, bias = [], [], [], []
        if i == 0:
            in_sizes = None
            for worker in range(k):
                rows = perm[owner[perm] == worker]
                local.append(weights[i][rows].reshape(len(rows), *layer.weight.shape[1:]))
                cross.append(weights[i].new_zeros(len(rows), 0, *layer.weight.shape[2:]))
                index.append(torch.zeros(0, dtype=torch.long))
                bias.append(biases[i][rows])
        else:
            prev, pperm = owners[i - 1], perms[i - 1]
            in_sizes = torch.bincount(prev, minlength=k).tolist()
            position = torch.empty_like(pperm)
            position[pperm] = torch.arange(len(pperm))  # input neuron -> its place in worker-major order
            for worker in range(k):
                rows = perm[owner[perm] == worker]
                own = pperm[prev[pperm] == worker]
                received = torch.nonzero(kept[i][:, worker]).reshape(-1)
                received = received[torch.argsort(position[received])]
                blk = w[rows]
                local.append(_shape(blk[:, own], layer, shape))
                cross.append(_shape(blk[:, received], layer, shape))
                cols = (position[received][:, None] * layer.k + torch.arange(layer.k)[None, :]).reshape(-1) \
                    if layer.kind == "linear" else position[received]
                index.append(cols)
                bias.append(biases[i][rows])
        order = None
        if i == len(layers) - 1:
            order = torch.empty_like(perm)
            order[perm] = torch.arange(len(perm))
        if layer.kind == "linear":
            modules.append(SplitLinear(sizes, in_sizes, local, cross, index, bias, order,
                                       unit=layer.k if i else 1))
        else:
            c = layer.conv
            modules.append(SplitConv2d(sizes, in_sizes, local, cross, index, bias, order, unit=1,
                                       stride=c["stride"], padding=c["padding"], dilation=c["dilation"]))
    modules += [copy.deepcopy(m) for m in suffix]
    return nn.Sequential(*modules)


def _shape(block: torch.Tensor, layer: _Layer, kernel: tuple[int, ...]) -> torch.Tensor:
    """[rows, units, k] -> a Linear's [rows, units * k] or a Conv2d's [rows, units, kh, kw]."""
    if layer.kind == "linear":
        return block.reshape(block.shape[0], -1)
    return block.reshape(block.shape[0], block.shape[1], *kernel)


# -- the entry point ----------------------------------------------------------------------------------
def _calibration(calibration: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(calibration, torch.Tensor):
        x = calibration
    else:
        parts = list(calibration)
        if not parts or not all(isinstance(p, torch.Tensor) for p in parts):
            raise TypeError("calibration must be a tensor of inputs or a sequence of input tensors")
        x = torch.cat(parts)
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"calibration must be a batch of inputs (samples first), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("calibration has non-finite values")
    return x.detach()


def repurpose(model: nn.Module, calibration: torch.Tensor | Sequence[torch.Tensor], workers: int = 2,
              budget: float = 0.25, refit: bool = True, *, assignment: Sequence[torch.Tensor] | None = None,
              selection: str = "data", seed: int = 0) -> WidthPlan:
    """Restructure a trained ``model`` into ``workers`` sub-models that exchange at most
    ``budget`` of the dense split's activations (see the module docstring).

    Args:
        model: an ``nn.Sequential`` of ``Linear``/``Conv2d`` layers with elementwise
            activations between them (the module docstring lists exactly what is supported).
        calibration: inputs (a tensor, samples first, or a sequence of such tensors) on which
            the costs, the pruning and the refit are measured; for a refit, comfortably more
            samples than the widest layer has neurons.
        workers: K, at least 1.
        budget: in [0, 1]: 1.0 prunes nothing (an exact permutation of the model), 0.0 leaves
            K independent blocks.
        refit: refit each neuron's kept weights by least squares (False: masking only).
        assignment: the workers of every layer's neurons, one LongTensor per weight layer, to
            use instead of the Hungarian assignment (e.g. a random baseline).
        selection: ``"data"`` (the default: the pairs that matter most on the calibration data,
            see the module docstring) or ``"magnitude"`` (the largest weights).
        seed: the seed of the calibration rows a ``Conv2d`` subsamples.

    Returns:
        a :class:`WidthPlan`.
    """
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if not (isinstance(budget, (int, float)) and 0.0 <= float(budget) <= 1.0):
        raise ValueError(f"budget must be in [0, 1], got {budget!r}")
    if selection not in ("data", "magnitude"):
        raise ValueError(f"selection must be 'data' or 'magnitude', got {selection!r}")
    k, budget = workers, float(budget)
    prefix, layers, suffix = _parse(model)
    x = _calibration(calibration)
    param = next(iter(model.parameters()))
    if param.device.type != "cpu":
        raise ValueError("repurpose() runs on CPU: move the model there first (model.cpu())")
    x = x.to(param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _repurpose(prefix, layers, suffix, x, k, budget, refit, assignment, selection, seed)
    finally:
        model.train(was_training)


def _repurpose(prefix: list[nn.Module], layers: list[_Layer], suffix: list[nn.Module], x: torch.Tensor, k: int,
               budget: float, refit: bool, assignment: Sequence[torch.Tensor] | None, selection: str,
               seed: int) -> WidthPlan:
    _shape_layers(prefix, layers, x[:2])
    for i, layer in enumerate(layers):
        if layer.out < k:
            raise ValueError(f"weight layer {i} has {layer.out} neurons, fewer than workers={k}")
    generator = torch.Generator().manual_seed(seed)
    # The original network on the calibration data: each layer's input power per column
    # (the assignment's masses), and the row subsets of the Conv2d least squares.
    x0 = _run(prefix, x)
    rows: list[torch.Tensor | None] = []
    powers: list[torch.Tensor] = []
    a = x0
    for i, layer in enumerate(layers):
        if i:
            a = _run(layer.before, a)
        if layer.kind == "conv":
            total = a.shape[0] * _forward(layer, a[:1], layer.weight, layer.bias)[0, 0].numel()
            rows.append(torch.randperm(total, generator=generator)[:_MAX_ROWS] if total > _MAX_ROWS else None)
        else:
            rows.append(None)
        powers.append(_design(layer, a, rows[-1]).pow(2).mean(0).double())
        a = _forward(layer, a, layer.weight, layer.bias)
    if assignment is None:
        masses = {i: _unit_mass(layer, powers[i]) for i, layer in enumerate(layers) if i}
        owners = _assign(masses, [layer.out for layer in layers], k)
    else:
        owners = _check_assignment(assignment, layers, k)
    # Prune and refit layer by layer, on the restructured network's own activations.
    needed = {i: _needed(layer, owners[i - 1], owners[i], k) for i, layer in enumerate(layers) if i}
    dense = [0.0] + [float(needed[i].sum()) * layer.unit_size for i, layer in enumerate(layers) if i]
    quotas = _quotas([int(needed[i].sum()) if i else 0 for i in range(len(layers))],
                     [layer.unit_size for layer in layers], budget)
    weights: list[torch.Tensor] = []
    biases: list[torch.Tensor] = []
    kept: dict[int, torch.Tensor] = {}  # every layer's but the first's
    how = "magnitude" if selection == "magnitude" else ("refit" if refit else "mask")
    a, ahat = x0, x0  # the original network's activations (for a refit's targets), the restructured one's
    for i, layer in enumerate(layers):
        if i:
            ahat = _run(layer.before, ahat)
            if refit:
                a = _run(layer.before, a)
        z = _forward(layer, a, layer.weight, layer.bias) if refit else None  # its pre-activations
        if i == 0:
            weights.append(layer.flat_weight.clone())
            biases.append(layer.bias.clone())
        else:
            gram = power = None
            if how != "magnitude":
                design = _design(layer, ahat, rows[i])
                if z is not None:  # refit
                    gram = _Gram(design, _outputs(layer, z, rows[i]))
                power = design.pow(2).mean(0).double()
                del design
            keep = _select(layer, needed[i], owners[i - 1], owners[i], quotas[i], gram, power, how, k)
            weight, bias = _refit(layer, owners[i - 1], owners[i], keep, gram, k)
            weights.append(weight)
            biases.append(bias)
            kept[i] = keep
        ahat = _forward(layer, ahat, weights[i].reshape(layer.weight.shape), biases[i])
        if z is not None:  # refit
            a = z
    built = _build(prefix, layers, suffix, owners, weights, biases, kept, k)
    per_layer = [0.0] + [float(kept[i].sum()) * layer.unit_size for i, layer in enumerate(layers) if i]
    return WidthPlan(model=built, assignment=[o.clone() for o in owners], communication=float(sum(per_layer)),
                     dense_communication=float(sum(dense)), workers=k, budget=budget, layer_communication=per_layer)


def _quotas(pairs: list[int], unit: list[int], budget: float) -> list[int]:
    """Pairs to keep per layer: ``budget`` of each layer's, rounded down, then the largest
    remainders rounded up while the total stays within ``budget`` of the whole."""
    exact = [budget * p for p in pairs]
    quotas = [min(p, math.floor(e + 1e-9)) for p, e in zip(pairs, exact, strict=True)]
    allowed = budget * sum(p * u for p, u in zip(pairs, unit, strict=True)) + 1e-9
    used = sum(q * u for q, u in zip(quotas, unit, strict=True))
    for i in sorted(range(len(pairs)), key=lambda i: quotas[i] - exact[i]):
        if quotas[i] < pairs[i] and exact[i] > quotas[i] and used + unit[i] <= allowed:
            quotas[i] += 1
            used += unit[i]
    return quotas


def _check_assignment(assignment: Sequence[torch.Tensor], layers: list[_Layer], k: int) -> list[torch.Tensor]:
    owners = list(assignment)
    if len(owners) != len(layers):
        raise ValueError(f"assignment has {len(owners)} entries for {len(layers)} weight layers")
    out = []
    for i, (owner, layer) in enumerate(zip(owners, layers, strict=True)):
        owner = torch.as_tensor(owner).long().reshape(-1)
        if owner.numel() != layer.out or (owner.numel() and (owner.min() < 0 or owner.max() >= k)):
            raise ValueError(f"assignment[{i}] must give each of the {layer.out} neurons a worker in [0, {k})")
        out.append(owner.clone())
    return out
