"""Replicas of a stage: its frames dealt to whichever of its devices is least busy.

A stage placed on several devices (``devices=[d0, [d1, d2]]``: stage 1 on d1 and d2) runs one
program per device (:class:`Replica`), each on the stage's module (shared on one device
type, a copy on another GPU). The runner submits each frame through a :class:`Dealer`, which
gives it to the replica with the fewest frames in flight (the lowest index on a tie) and
returns that replica's ticket; the runner awaits its tickets in submission order, so outputs
leave in frame order whichever replica finishes first, and nothing is lost or duplicated.
Inference only: a learning stage holds one set of weights and one schedule (the pipeline
refuses learning with replicas).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from ..core.frame import Payload
from ..core.stats import StageStats
from ..devices import Device, Ticket
from ..programs import StageProgram


@dataclass(frozen=True)
class Replica:
    """One device of a replicated stage, the program it runs there and what it did."""

    device: Device
    program: StageProgram
    stats: StageStats


class Dealer:
    """Submits each frame to the least busy of ``replicas``; see the module docstring."""

    def __init__(self, replicas: tuple[Replica, ...]) -> None:
        self.replicas = replicas
        self.in_flight = [0] * len(replicas)
        self._devices: dict[Any, Device] = {}  # ticket -> the replica's device, until asked

    def submit(self, payload: Payload, ready: Any, *, seq: int) -> Ticket:
        """``forward(payload)`` on the least busy replica; its ticket (loop thread)."""
        k = min(range(len(self.replicas)), key=self.in_flight.__getitem__)
        replica = self.replicas[k]
        ticket = replica.device.submit(replica.program.forward, payload, ready, seq=seq)
        self._devices[ticket] = replica.device
        self.in_flight[k] += 1
        ticket.add_done_callback(partial(self._done, k))  # type: ignore[attr-defined]  # a loop future
        return ticket

    def device_of(self, ticket: Any) -> Device:
        """The device whose result ``ticket`` gives (a GPU's result is downloaded by its own)."""
        return self._devices.pop(ticket, self.replicas[0].device)

    def _done(self, k: int, ticket: Any) -> None:
        self.in_flight[k] -= 1
        if not ticket.cancelled() and ticket.exception() is None:
            self.replicas[k].stats.frames += 1
