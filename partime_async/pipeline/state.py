"""What a pipeline keeps across runs and saves: the split, the learners, the stream position.

:meth:`Pipeline.state_dict` is :meth:`PipelineState.state_dict` (after the pipeline checked
that no stage is still applying updates); a checkpoint cut assembles the same dictionary from
the parts its stages copied in flight (:meth:`PipelineState.at_cut`).
"""
from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..partition import Partitioner
from ..programs import StageLearner


class PipelineState:
    """The state of one pipeline that outlives its runs.

    Attributes:
        partitioner: what splits the model (keys the model's state as its own).
        balance: the split, units per stage (None until the first run chooses it by time).
        learners: one per stage once a learning pipeline has built its stages (they keep
            their optimisers' state from run to run).
        modules: the stages' modules of the latest split.
        position: 1 + the seq of the last frame delivered: where a resumed source starts.
    """

    def __init__(self, partitioner: Partitioner, balance: list[int] | None, n_devices: int, *,
                 requested: Any = "time") -> None:
        self.partitioner = partitioner
        self.balance = balance
        self.requested = requested  # what balance= said, applied on the first frame if balance is None
        self.sample: Any = None  # a graph's first frame, which it was captured on (for serving ranks)
        self.learners: list[StageLearner] = []
        self.modules: list[nn.Module] = []
        self.position = 0
        self._n_devices = n_devices
        self._seq = itertools.count()  # what submit() numbers its frames with
        self._pending: dict[str, Any] | None = None  # learner states loaded before the learners exist

    def next_seq(self) -> int:
        """The seq for the next ``submit()``."""
        return next(self._seq)

    def peek_seq(self) -> int:
        """The seq that :meth:`next_seq` gives next, without taking it."""
        value = next(self._seq)
        self._seq = itertools.count(value)
        return value

    def state_dict(self) -> dict[str, Any]:
        """Weights, per-stage optimiser and scheduler state, and the stream position (a copy)."""
        state: dict[str, Any] = {
            "model": self.partitioner.state_dict(),  # keyed as the model's own state_dict
            "balance": list(self.balance) if self.balance is not None else None,
            "next_seq": self.peek_seq(),
            "position": self.position,
        }
        if self.learners:
            state["learners"] = [learner.state_dict() for learner in self.learners]
        elif self._pending is not None and "learners" in self._pending:
            state["learners"] = self._pending["learners"]
        return copy.deepcopy(state)

    def load_state_dict(self, state: dict[str, Any], *, learning: bool) -> None:
        """Restore :meth:`state_dict`'s output (never aliasing the caller's dict)."""
        saved = state.get("balance")
        if learning and state.get("learners") is not None and saved is not None \
                and self.balance is not None and list(saved) != list(self.balance):
            # Optimiser states are per stage: they fit only the stages they were saved from.
            raise ValueError(f"the state was saved from stages split {list(saved)} but this pipeline splits "
                             f"{list(self.balance)}: its optimiser states fit only that split; create the "
                             f"pipeline with balance={list(saved)} on {len(saved)} devices")
        state = copy.deepcopy(state)
        self.partitioner.load_state_dict(state["model"])
        if state.get("balance") is not None and self.balance is None:
            if getattr(self.partitioner, "captured", True):
                self.balance = self.partitioner.check_balance(state["balance"], self._n_devices)
            else:  # a graph is cut into units on its first frame: the saved split applies then
                self.requested = list(state["balance"])
        self._seq = itertools.count(state.get("next_seq", 0))
        self.position = state.get("position", 0)
        if self.learners:
            self._load_learners(state)
        else:
            self._pending = state  # optimisers are made when the stages are

    def load_pending(self) -> None:
        """Load into the learners a state that was loaded before they existed (at every
        build: one that failed to load is tried again)."""
        if self._pending is not None:
            self._load_learners(self._pending)
            self._pending = None

    def at_cut(self, parts: Sequence[tuple[dict[str, Any], dict[str, Any]]], seq: int) -> dict[str, Any]:
        """The state at a checkpoint cut at frame ``seq``, from each stage's part ``(its
        weights keyed as the model's, its learner's state)``: shaped like :meth:`state_dict`."""
        parts_model: dict[str, Any] = {}
        for module_state, _ in parts:
            parts_model.update(module_state)
        # Keyed as the model's state_dict, no more and no less: what no stage holds (a parameter
        # no unit of a graph uses) is the model's own, which learning never changes.
        own = self.partitioner.state_dict()
        model = {key: parts_model.get(key, value) for key, value in own.items()}
        assert self.balance is not None  # chosen by the build, before any frame is admitted
        return {"model": model, "balance": list(self.balance), "learners": [learner for _, learner in parts],
                "position": seq + 1, "next_seq": self.peek_seq()}

    def _load_learners(self, state: dict[str, Any]) -> None:
        saved = state.get("learners")
        if saved is None:
            return
        if len(saved) != len(self.learners):
            raise ValueError(f"the state has {len(saved)} learning stages but this pipeline has {len(self.learners)}; "
                             "load it into a pipeline with the same devices and balance")
        for learner, learner_state in zip(self.learners, saved, strict=True):
            learner.load_state_dict(learner_state)


def check_quiet(what: str, learning_frames: int) -> None:
    """Refuse ``what`` (taking or loading a state) once ``learning_frames`` frames have entered
    the running run of a learning pipeline: its stages may still apply the updates of frames
    already delivered, on their own threads."""
    if learning_frames > 0:
        raise RuntimeError(f"{what} of a learning pipeline while it streams: its stages may still be applying "
                           "the updates of frames already delivered, on their own threads (a torn state). Call "
                           "it after `await pipe.stop()`, or stream through "
                           "partime_async.sinks.Checkpoint(pipe, path, every=N), which takes consistent cuts "
                           "while frames flow")
