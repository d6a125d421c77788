"""What a stage holds (:class:`StagePlan`), and what makes plans out of a model (:class:`Partitioner`).

Partitioning is the only place that knows how a model is cut: downstream, the programs, the
runners and the pipeline see plans, a module per stage and the names of the values that
cross its cuts, never "a list of layers".
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..core.frame import Payload
from ..devices import Device


@dataclass
class StagePlan:
    """One stage of a split model.

    Attributes:
        index: the stage's position, 0 first.
        module: what the stage runs: its output for its input (the stage's part of the
            model; it shares the model's parameters).
        devices: where it runs: one device (a stage split in width over several devices
            would hold them all).
        inputs: the values that cross the stage's cut in, by name (a sequential split names
            each by the layer whose output it is; ``"input"``: the frame's payload); the
            payload a stage receives is these values, one as itself, several as a tuple.
        outputs: the values that cross its cut out, likewise: the next stage's ``inputs``.
        units: the indivisible pieces of the model it holds (layers), for the statistics.
        model_key: the key in the model's ``state_dict`` of a key of ``module``'s.
        last: the last stage (it owes no gradient to a next one; its output is delivered).
    """

    index: int
    module: nn.Module
    devices: tuple[Device, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    units: int
    model_key: Callable[[str], str]
    last: bool = False

    @property
    def device(self) -> Device:
        """The stage's device."""
        return self.devices[0]

    @property
    def name(self) -> str:
        """How errors, statistics and traces name the stage: ``"stage 1 (cpu:1)"``."""
        return f"stage {self.index} ({self.device.name})"

    def model_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """``module``'s ``state_dict`` keyed as the model's own."""
        return {self.model_key(key): value for key, value in state.items()}


class Partitioner(Protocol):
    """Makes :class:`StagePlan` s out of a model (see :class:`~partime_async.partition.sequential.SequentialSplit`).

    ``units`` indivisible pieces are shared out over the stages as a ``balance``: one count
    per stage, in order.
    """

    @property
    def units(self) -> int:
        """The number of indivisible pieces (read-only: a property or an attribute)."""

    def check_balance(self, balance: Sequence[int], n_stages: int) -> list[int]:
        """A valid balance for ``n_stages``, or a ValueError that says what would be valid."""

    def balance_by_params(self, n_stages: int) -> list[int]:
        """The balance that equalises parameter counts."""

    def profile(self, sample: Payload) -> list[float]:
        """Seconds of each unit on ``sample`` (on the calling thread, on the units' device;
        leaves the model as it found it)."""

    def to(self, device: torch.device) -> None:
        """Move every unit to ``device`` (for profiling there)."""

    def check_shared(self, balance: Sequence[int], *, learning: bool, one_device: bool) -> None:
        """Raise ValueError where a tensor shared between stages cannot work."""

    def plans(self, balance: Sequence[int], devices: Sequence[Device]) -> list[StagePlan]:
        """One plan per stage, each module placed on its device; each plan's ``outputs`` are
        the next plan's ``inputs``."""

    def state_dict(self) -> dict[str, Any]:
        """The model's state, keyed as its own ``state_dict``."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
