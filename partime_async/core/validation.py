"""Checking frames at the pipeline's door, so that bad input fails fast and clearly.

An :class:`InputSpec` fixes the structure of a payload and, per tensor leaf, its dtype, device
type and shape (``None`` in a shape is a free dimension). A pipeline built with
``input_spec="first"`` takes the spec from its first frame; a frame that does not match gets
a :class:`FrameError` that says what was expected and what came. The stage programs use the
same spec on their outputs (``Pipeline(output_spec=...)``): a stage's first output fixes its
later ones.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .errors import FrameError
from .frame import Payload


@dataclass(frozen=True)
class TensorSpec:
    """What one tensor leaf must be. ``None`` fields are not checked. ``other``: the leaf is
    not a tensor but a value of this Python type (a stage's output may carry such leaves,
    e.g. a label as an int)."""

    shape: tuple[int | None, ...] | None = None
    dtype: torch.dtype | None = None
    device_type: str | None = None
    other: type | None = None

    @classmethod
    def like(cls, t: Any) -> TensorSpec:
        if not isinstance(t, torch.Tensor):
            return cls(other=type(t))
        return cls(tuple(t.shape), t.dtype, t.device.type)

    def mismatch(self, t: Any) -> str | None:
        """Why ``t`` does not match, or None."""
        if self.other is not None:
            return None if isinstance(t, self.other) else f"expected {self.other.__name__}, got {type(t).__name__}"
        if not isinstance(t, torch.Tensor):
            return f"expected a tensor, got {type(t).__name__}"
        if self.dtype is not None and t.dtype != self.dtype:
            return f"expected dtype {self.dtype}, got {t.dtype}"
        if self.device_type is not None and t.device.type != self.device_type:
            return f"expected a tensor on {self.device_type}, got one on {t.device}"
        if self.shape is not None:
            if t.dim() != len(self.shape):
                return f"expected {len(self.shape)} dimensions {_shape(self.shape)}, got {t.dim()} {_shape(t.shape)}"
            if any(e is not None and e != s for e, s in zip(self.shape, t.shape, strict=True)):
                return f"expected shape {_shape(self.shape)}, got {_shape(t.shape)}"
        return None


def _shape(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"


class InputSpec:
    """The structure of a payload and a :class:`TensorSpec` per leaf."""

    def __init__(self, structure: pytree.TreeSpec, leaves: Sequence[TensorSpec]) -> None:
        self.structure = structure
        self.leaves = list(leaves)
        # Fast path for the common payload, one plain tensor with a fixed shape: a few
        # attribute compares instead of a pytree walk (this runs on every frame).
        self._plain: tuple[torch.Size, torch.dtype | None, str | None] | None = None
        if structure.is_leaf() and len(self.leaves) == 1:
            spec = self.leaves[0]
            if spec.shape is not None:
                fixed = [d for d in spec.shape if d is not None]
                if len(fixed) == len(spec.shape):  # no free dimension
                    self._plain = (torch.Size(fixed), spec.dtype, spec.device_type)

    @classmethod
    def of(cls, specs: Any) -> InputSpec:
        """The spec of payloads shaped like ``specs``: a :class:`TensorSpec`, or a tuple, list
        or dict of them (nested), one per tensor leaf. ``InputSpec.of(TensorSpec((1, 3, None,
        None), torch.float32))`` takes images of any size, one at a time."""
        values, structure = pytree.tree_flatten(sorted_keys(specs))
        wrong = [type(v).__name__ for v in values if not isinstance(v, TensorSpec)]
        if wrong or not values:
            raise TypeError(f"InputSpec.of takes TensorSpecs (alone, or in tuples, lists and dicts), got "
                            f"{', '.join(wrong) or 'no TensorSpec'}")
        return cls(structure, values)

    @classmethod
    def like(cls, payload: Payload) -> InputSpec:
        """The spec that ``payload`` satisfies exactly."""
        values, structure = pytree.tree_flatten(sorted_keys(payload))
        return cls(structure, [TensorSpec.like(v) for v in values])

    def mismatch(self, payload: Payload) -> str | None:
        """Why ``payload`` does not match, or None."""
        plain = self._plain
        if plain is not None and type(payload) is torch.Tensor and payload.shape == plain[0] \
                and (plain[1] is None or payload.dtype == plain[1]) \
                and (plain[2] is None or payload.device.type == plain[2]):
            return None
        values, structure = pytree.tree_flatten(sorted_keys(payload))
        if structure != self.structure:
            return f"expected a payload shaped like {self.structure}, got {structure}"
        for i, (spec, value) in enumerate(zip(self.leaves, values, strict=False)):
            why = spec.mismatch(value)
            if why is not None:
                return why if len(values) == 1 else f"leaf {i}: {why}"
        return None

    def check(self, payload: Payload, seq: int, *, component: str = "input", hint: str = "") -> None:
        """Raise :class:`FrameError` (naming ``component`` and frame ``seq``, followed by
        ``hint``) if ``payload`` does not match."""
        why = self.mismatch(payload)
        if why is not None:
            raise FrameError(why + hint, component=component, seq=seq)


def sorted_keys(payload: Payload) -> Payload:
    """``payload`` with every dict's keys in one order: a model reads a dict by key, so two
    frames whose dicts hold the same keys in another order have the same structure."""
    if isinstance(payload, dict):
        return {key: sorted_keys(payload[key]) for key in sorted(payload, key=repr)}
    if type(payload) in (list, tuple):
        return type(payload)(map(sorted_keys, payload))
    return payload


def _leaf_name(payload: Payload, i: int, what: str = "payload") -> str:
    """Leaf ``i`` of ``payload`` by its key path (``payload['depth'][0]``), for a message;
    ``payload leaf i`` where its type has no keys to name it by (``what``: ``"payload"`` or
    ``"target"``)."""
    try:
        path = pytree.tree_flatten_with_path(payload)[0][i][0]
    except (ValueError, IndexError):  # a pytree type registered without key paths
        return f"{what} leaf {i}"
    return f"{what}{pytree.keystr(path)}"


def check_tensors(payload: Payload, seq: int | None, *, finite: bool, component: str = "input") -> None:
    """Every leaf must be a tensor; with ``finite``, floating leaves must hold no NaN or Inf.
    ``component``: ``"input"`` (a frame's payload) or ``"target"`` (its target), which the
    :class:`FrameError` names."""
    if not finite and type(payload) is torch.Tensor:
        return
    what = "target" if component == "target" else "payload"
    for i, value in enumerate(pytree.tree_leaves(payload)):
        if not isinstance(value, torch.Tensor):
            raise FrameError(
                f"{_leaf_name(payload, i, what)} is a {type(value).__name__}, not a tensor; convert it with "
                f"torch.as_tensor ({what}s are tensors or tuples/lists/dicts of tensors)",
                component=component, seq=seq)
        if finite and value.device.type == "meta":
            raise FrameError(f"{_leaf_name(payload, i, what)} is a meta tensor: it holds no values to check",
                             component=component, seq=seq)
        if finite and (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            raise FrameError(f"{what} holds NaN or Inf (check_finite=True forbids them)", component=component,
                             seq=seq)
