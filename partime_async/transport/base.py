"""The transport seam: how jobs move forward between neighbouring stages and gradients back.

A link between stage k and stage k + 1 has two ends. Stage k holds the :class:`Outlet`: it
sends its finished jobs (:class:`Sender`) and, when learning, receives the gradients of its
outputs (:class:`GradReceiver`). Stage k + 1 holds the :class:`Inlet`: it receives jobs
(:class:`Receiver`) and sends back the gradients of its inputs (:class:`GradSender`). The
pipeline's ingress is stage 0's inlet; its egress, the last stage's outlet.

Ends say exactly what happened, in the manner of trio's memory channels: a sender that
closes ends the stream (the receiver drains what is queued, then gets
:class:`~partime_async.aio.channel.EndOfStream`, and ``async for`` stops); one that aborts
ends it with an error that the other end raises (a runner that fails aborts its ends).
``local.py`` implements the ends on the event loop (a bounded channel forward, a gradient
box back). ``chain.py`` is the transport inside one runner: between the consecutive threaded
CPU stages it drives, frames go from worker thread to worker thread without the loop.

What a transport carries is a :class:`~partime_async.core.job.Job`: the frame, where its
output goes, a key unique in the run, and ``ready``, the event that marks the frame's data
complete on the device that produced it (a GPU's, or None). Every transport carries
``ready`` along and only devices wait on it (the CUDA ready-event hand-off: on the GPU, or
off the loop thread), so no transport ever synchronises with a device.

A transport to another process (torch.distributed point-to-point) fits the same ends:
blocking ``send``/``recv`` on one thread per peer and direction, in order (no tags needed),
handing what it receives to the loop with ``call_soon_threadsafe``. A message is a small
header tensor, then the payload's tensors: the kind (data, grad, skip, state, end, error),
the seq and job key, whether the frame has a target, the pytree structure, dtypes and shapes
(so shapes may change from frame to frame), then the data, the target and the capture time
and meta. The sender waits on ``ready`` before sending; the receiver makes jobs whose route
is a stand-in that reports their settling (a skip) back to the rank that admitted them.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ..core.frame import Payload
from ..core.job import Job

T_contra = TypeVar("T_contra", contravariant=True)  # what a sender takes
T_co = TypeVar("T_co", covariant=True)  # what a receiver gives


class Sender(Protocol[T_contra]):
    """The send end of a link (or the pipeline's egress after the last stage)."""

    def send_nowait(self, item: T_contra) -> bool:
        """Send ``item`` if that needs no waiting; False (nothing sent) means: await :meth:`send`."""

    async def send(self, item: T_contra) -> None:
        """Send ``item``, waiting for room (backpressure)."""

    def close(self) -> None:
        """No more items will come: the receiver drains, then sees the end."""

    def abort(self, exc: BaseException) -> None:
        """The stream ends with ``exc``: the receiver raises it (what is queued is dropped)."""


class Receiver(Protocol[T_co]):
    """The receive end of a link, read with ``async for`` (it stops at the end of the stream;
    an aborted link raises its error)."""

    def __aiter__(self) -> AsyncIterator[T_co]: ...

    async def __anext__(self) -> T_co: ...

    def __len__(self) -> int:
        """Items queued and not yet received."""


class GradSender(Protocol):
    """Where stage k + 1 sends the gradient of its input for the job of key ``key``."""

    def put(self, key: int, grad: Payload, ready: Any) -> None:
        """Send ``grad`` (with its ready event, or None) for job ``key``; never waits (the
        schedule bounds how many are in flight)."""

    def close(self) -> None:
        """No more gradients: a receiver waiting for one gets an error that says so."""

    def abort(self, exc: BaseException) -> None:
        """No more gradients, because of ``exc``: a receiver waiting for one raises it."""


class GradReceiver(Protocol):
    """Where stage k gets the gradients of its outputs, by job key, in any order."""

    async def get(self, key: int, seq: int) -> tuple[Payload, Any]:
        """The gradient and its ready event for job ``key`` (frame ``seq``, for the message
        if the sender closed without sending it)."""

    def forgo(self, key: int) -> None:
        """No gradient will come for job ``key`` (its frame was skipped by this end's stage):
        :meth:`get` gives :data:`~partime_async.core.job.NO_GRADIENT` for it."""

    def close(self) -> None:
        """Stop waiting: a pending :meth:`get` fails."""


@dataclass
class Inlet:
    """A stage's receiving end of the link before it: jobs in, gradients back (None when it
    is the first stage, or nobody learns)."""

    jobs: Receiver[Job]
    grads: GradSender | None = None


@dataclass
class Outlet:
    """A stage's sending end of the link after it: jobs out, gradients in (None when it is
    the last stage, or nobody learns)."""

    jobs: Sender[Job]
    grads: GradReceiver | None = None
