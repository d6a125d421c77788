"""A link to one peer rank over torch.distributed point-to-point: messages out on a thread of
their own, messages in through receives posted ahead.

Contract:

* :meth:`PeerLink.send` queues a message from any thread and never waits; the link's send
  thread encodes and sends the messages in order, with blocking ``dist.send`` (gloo's
  ``Work.is_completed()`` stays false until ``wait()`` is called, pytorch issue 30723, and
  ``wait(timeout)`` tears the connection down: a thread that blocks is the only safe way).
* :meth:`PeerLink.receive` is called by one thread (the one that consumes the peer's
  messages) and returns them in order. The link keeps :attr:`ahead` receives posted, so a
  peer's send completes as soon as its bytes arrive (a gloo send waits for its receive to be
  posted), whatever the receiving thread is doing meanwhile.
* A message of at most :attr:`chunk` bytes is one send, on tag 0, into a posted receive; a
  bigger one sends its first ``chunk`` bytes there (the head says the total) and the rest as
  one more message on tag 1, received into a buffer of the right size. No size is agreed
  in advance, and a payload whose shape changes costs nothing more.
* Closing: :meth:`close` sends :data:`BYE` then ``ahead - 1`` padding messages, which the
  peer's receives posted ahead take, so that no receive is left posted on the process
  group (a later link between the same ranks starts clean). The peer's :meth:`receive`
  returns the ``BYE`` and takes the padding.
* A message that cannot be encoded (a payload ``torch.save`` cannot write either) goes as
  an :data:`ERROR` describing why, in its place: whoever waits for its reply gets that.
* A peer that is gone (killed, or its connection broke) makes :meth:`receive` raise
  :class:`PeerLost`; the send thread records the same error in :attr:`error` and drops
  what was queued.
"""
from __future__ import annotations

import builtins
import queue
import threading
from collections import deque
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from ..core.errors import FrameError, PipelineError, StageLost
from .wire import HEAD_BYTES, Decoder, Encoder, Message

# What a message is about (the head's kind).
BUILD, FORWARD, BACKWARD, STATE = 1, 2, 3, 4  # requests, driving rank -> serving rank
RESULT, ERROR, FINAL = 10, 11, 12             # replies, serving rank -> driving rank
BYE, PAD = 20, 21                             # the end of a link
WANT_FINAL = 1  # BYE's flag: reply with FINAL (the stages' learnt state) before BYE
FATAL = 1       # ERROR's flag: the stage cannot run any frame (it failed to build)

_CLOSE = object()


class PeerLost(RuntimeError):
    """The peer rank is gone: killed, or its connection broke."""


class PeerLink:
    """Messages to and from rank ``peer``; see the module docstring."""

    def __init__(self, peer: int, *, sentinels: Mapping[str, object], ahead: int = 4, chunk: int = 64 * 1024,
                 name: str = "") -> None:
        if ahead < 1 or chunk < HEAD_BYTES:
            raise ValueError(f"a link needs ahead >= 1 and chunk >= {HEAD_BYTES}, got {ahead} and {chunk}")
        self.peer = peer
        self.ahead = ahead
        self.chunk = chunk
        self.name = name or f"rank {peer}"
        self.error: BaseException | None = None
        self._encoder = Encoder(sentinels)
        self._decoder = Decoder(sentinels)
        self._out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._posted: deque[tuple[Any, torch.Tensor]] = deque()
        self._said_bye = False
        self._sender = threading.Thread(target=self._sending, name=f"partime-send-{self.name}", daemon=True)

    def start(self) -> None:
        """Post the receives and start the send thread."""
        for _ in range(self.ahead):
            self._post()
        self._sender.start()

    # -- out -----------------------------------------------------------------------------------
    def send(self, kind: int, stage: int, seq: int, payload: Any = None, *, flags: int = 0, busy: float = 0.0,
             ready: Any = None) -> None:
        """Queue a message (any thread; never waits). ``ready``: an event the payload's data
        waits for (a GPU's), synchronised on the send thread."""
        self._out.put((kind, stage, seq, payload, flags, busy, ready))

    def close(self, *, flags: int = 0, timeout: float | None = None) -> None:
        """Send ``BYE`` (with ``flags``) after what is queued, and wait (up to ``timeout`` s)
        for the send thread."""
        self._out.put((_CLOSE, flags))
        if self._sender.is_alive():
            self._sender.join(timeout)

    def _sending(self) -> None:
        try:
            while (item := self._out.get())[0] is not _CLOSE:
                kind, stage, seq, payload, flags, busy, ready = item
                try:
                    if ready is not None:
                        ready.synchronize()
                    message = self._encoder.encode(kind, stage, seq, payload, flags=flags, busy=busy)
                except Exception as exc:  # goes as an error in its place: the order of replies holds
                    message = self._encoder.encode(ERROR, stage, seq, describe(exc), busy=busy)
                self._send(message)
            self._send(self._encoder.encode(BYE, -1, -1, None, flags=item[1]))
            for _ in range(self.ahead - 1):
                self._send(self._encoder.encode(PAD, -1, -1, None))
        except Exception as exc:  # the peer is gone: what is queued can never go
            self.error = PeerLost(f"{self.name} is lost ({type(exc).__name__}: {exc})")

    def _send(self, message: torch.Tensor) -> None:
        n = message.numel()
        if n <= self.chunk:
            dist.send(message, self.peer, tag=0)
        else:
            dist.send(message[:self.chunk], self.peer, tag=0)
            dist.send(message[self.chunk:], self.peer, tag=1)

    # -- in ------------------------------------------------------------------------------------
    def receive(self) -> Message:
        """The peer's next message (one thread only); the last is :data:`BYE`."""
        if self._said_bye:
            raise RuntimeError(f"{self.name} has said bye: no more messages come")
        work, buffer = self._posted.popleft()
        try:
            work.wait()
            kind, total = Decoder.head(buffer)
            if kind == BYE:
                self._said_bye = True
                while self._posted:  # the padding that takes the receives still posted
                    self._posted.popleft()[0].wait()
            else:
                self._post()
            if total > self.chunk:
                whole = torch.empty(total, dtype=torch.uint8)
                whole[:self.chunk] = buffer
                dist.recv(whole[self.chunk:], self.peer, tag=1)
                buffer = whole
        except Exception as exc:
            raise PeerLost(f"{self.name} is lost ({type(exc).__name__}: {exc})") from exc
        return self._decoder.decode(buffer)

    def _post(self) -> None:
        buffer = torch.empty(self.chunk, dtype=torch.uint8)
        self._posted.append((dist.irecv(buffer, self.peer, tag=0), buffer))


class RemoteStageError(RuntimeError):
    """An exception raised on another rank, of a type that is not built in: its message
    names the type."""


def describe(exc: BaseException) -> dict[str, Any]:
    """What travels of an exception: its type's module and name, its message; for our own
    errors, where they say it happened."""
    about: dict[str, Any] = {"module": type(exc).__module__, "type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, PipelineError):
        about.update(detail=exc.detail, component=exc.component, seq=exc.seq, frame_error=isinstance(exc, FrameError))
    return about


def rebuild(about: dict[str, Any], rank: int, device: Any, *, fatal: bool = False) -> BaseException:
    """The exception that :func:`describe` described, raised on rank ``rank``: of the same
    type if it is built in or ours (so ``on_error`` treats it as in one process), else a
    :class:`RemoteStageError` naming the type; :class:`StageLost` (for ``device``) where the
    stage cannot run at all (``fatal``)."""
    message = f"{about['message']} (on rank {rank})"
    if fatal:
        return StageLost(f"{about['type']}: {message}; the stage could not be built there", device)
    if "component" in about:
        kind = FrameError if about["frame_error"] else PipelineError
        return kind(f"{about['detail']} (on rank {rank})", component=about["component"], seq=about["seq"])
    cls = getattr(builtins, about["type"], None) if about["module"] == "builtins" else None
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except TypeError:  # a built-in whose constructor wants more (UnicodeError's kin)
            pass
    return RemoteStageError(f"{about['module']}.{about['type']}: {message}")
