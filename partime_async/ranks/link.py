"""A link to one peer rank over torch.distributed point-to-point: messages out posted without
waiting, messages in through receives posted ahead.

Contract:

* :meth:`PeerLink.send` encodes a message and posts it (``isend``) on the calling thread,
  in order, without waiting: gloo's ``Work.is_completed()`` stays false until ``wait()`` is
  called (pytorch issue 30723) and ``wait(timeout)`` tears the connection down, so a send
  is waited for (blocking, no timeout) only once it is surely done: when
  :attr:`in_flight` newer ones have been posted to a peer that keeps its receives posted.
  A hand-off to a send thread per message would cost a thread wake-up each (measured: on
  the 2-vCPU VM a wake-up and gloo's own syscalls cost more than the frame's compute
  saves). Only a message whose data waits for a GPU's event goes through a send thread
  (which waits for it), and every later one after it, to keep the order.
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
* A message this rank cannot read (a pickled payload ``weights_only`` refuses) becomes an
  :data:`ERROR` in its place too: one frame fails, not the link.
* A peer that is gone (killed, or its connection broke) makes :meth:`receive` and
  :meth:`send` raise :class:`PeerLost` (a send thread, where there is one, keeps it in
  :attr:`error` and drops what was queued).
"""
from __future__ import annotations

import builtins
import datetime
import os
import queue
import threading
from collections import deque
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from ..core.errors import FrameError, PipelineError, StageLost
from .wire import BATCH, HEAD_BYTES, Decoder, Encoder, Message

# What a message is about (the head's kind).
BUILD, FORWARD, BACKWARD, STATE = 1, 2, 3, 4  # requests, driving rank -> serving rank
RESULT, ERROR, FINAL = 10, 11, 12             # replies, serving rank -> driving rank
BYE, PAD = 20, 21                             # the end of a link
WANT_FINAL = 1  # BYE's flag: reply with FINAL (the stages' learnt state) before BYE
FATAL = 1       # ERROR's flag: the stage cannot run any frame (it failed to build)

_CLOSE = object()

LINK_TIMEOUT = datetime.timedelta(days=30)
"""How long a link's receive may wait for its peer: a pipeline may idle between frames (a
server waiting for requests) for as long as it likes. A peer that dies closes its
connection, which the link notices at once; only one that hangs alive waits this long."""

_group: list[Any] = []  # the process group of the links, made once by links_group()


def local_world_size() -> int:
    """The processes of this job on this host (torchrun's ``LOCAL_WORLD_SIZE``; 1 outside one)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def links_group() -> Any:
    """The process group the links use: the job's ranks, gloo, with :data:`LINK_TIMEOUT` (the
    default group's timeout is how long ranks may take to join). Made on first use, which
    every rank reaches in the same order (building its pipeline): making a group is a
    collective call."""
    if not _group:
        _group.append(dist.new_group(backend="gloo", timeout=LINK_TIMEOUT))
    return _group[0]


class PeerLost(RuntimeError):
    """The peer rank is gone: killed, or its connection broke."""


class PeerLink:
    """Messages to and from rank ``peer``; see the module docstring."""

    def __init__(self, peer: int, *, sentinels: Mapping[str, object], ahead: int = 4, chunk: int = 64 * 1024,
                 in_flight: int = 32, name: str = "") -> None:
        if ahead < 1 or chunk < HEAD_BYTES or in_flight < 1:
            raise ValueError(f"a link needs ahead >= 1, chunk >= {HEAD_BYTES} and in_flight >= 1, got {ahead}, "
                             f"{chunk} and {in_flight}")
        self.peer = peer
        self.ahead = ahead
        self.chunk = chunk
        self.in_flight = in_flight
        self.name = name or f"rank {peer}"
        self.error: BaseException | None = None
        self._encoder = Encoder(sentinels)
        self._decoder = Decoder(sentinels, undecodable=_undecodable)
        self._sent: deque[tuple[Any, torch.Tensor]] = deque()  # sends posted, not yet waited for
        self._out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sender: threading.Thread | None = None  # once a message waits for a device
        self._posted: deque[tuple[Any, torch.Tensor]] = deque()
        self._said_bye = False

    def start(self) -> None:
        """Post the receives."""
        for _ in range(self.ahead):
            self._post()

    # -- out -----------------------------------------------------------------------------------
    def send(self, kind: int, stage: int, seq: int, payload: Any = None, *, flags: int = 0, busy: float = 0.0,
             ready: Any = None) -> None:
        """Send a message after the ones sent before (one thread at a time). It is encoded
        and posted here (``isend``), without waiting for the peer: a send is waited for only
        once :attr:`in_flight` newer ones are posted, when the peer, which keeps receives
        posted, has long taken it. A message whose data waits for ``ready`` (a GPU's event)
        goes through a send thread that waits for it, and so does every later one (order).
        Raises :class:`PeerLost` if the peer is gone."""
        if ready is not None and self._sender is None:
            self._sender = threading.Thread(target=self._sending, name=f"partime-send-{self.name}", daemon=True)
            self._sender.start()
        if self._sender is not None:
            self._out.put((kind, stage, seq, payload, flags, busy, ready))
            return
        self._post_send(self._encode(kind, stage, seq, payload, flags, busy, None))

    def send_batch(self, items: list[tuple[int, int, int, Any, int, float, Any]]) -> None:
        """Send several messages as one (``(kind, stage, seq, payload, flags, busy, ready)``
        each; the peer's :meth:`receive` gives a :data:`~partime_async.ranks.wire.BATCH`
        message holding them): one transfer's cost for all. Otherwise as :meth:`send`."""
        if len(items) == 1:
            self.send(*items[0][:4], flags=items[0][4], busy=items[0][5], ready=items[0][6])
            return
        if self._sender is None and any(item[6] is not None for item in items):
            self._sender = threading.Thread(target=self._sending, name=f"partime-send-{self.name}", daemon=True)
            self._sender.start()
        if self._sender is not None:
            self._out.put((BATCH, items))
            return
        self._post_send(self._encoder.encode_batch([self._encode(*item) for item in items]))

    def close(self, *, flags: int = 0, timeout: float | None = None) -> None:
        """Send ``BYE`` (with ``flags``) after what was sent, then the padding, and wait (up
        to ``timeout`` s, where a send thread sends) until every send is done. Errors of a
        peer that is gone are kept in :attr:`error`, not raised."""
        if self._sender is not None:
            self._out.put((_CLOSE, flags))
            self._sender.join(timeout)
            return
        try:
            self._say_bye(flags)
        except PeerLost as exc:
            self.error = exc

    def _say_bye(self, flags: int) -> None:
        self._post_send(self._encoder.encode(BYE, -1, -1, None, flags=flags))
        for _ in range(self.ahead - 1):
            self._post_send(self._encoder.encode(PAD, -1, -1, None))
        self._wait_sends(0)

    def _sending(self) -> None:
        try:
            while (item := self._out.get())[0] is not _CLOSE:
                if item[0] == BATCH:
                    self._post_send(self._encoder.encode_batch([self._encode(*each) for each in item[1]]))
                else:
                    self._post_send(self._encode(*item))
            self._say_bye(item[1])
        except PeerLost as exc:  # the peer is gone: what is queued can never go
            self.error = exc

    def _encode(self, kind: int, stage: int, seq: int, payload: Any, flags: int, busy: float,
                ready: Any) -> torch.Tensor:
        try:
            if ready is not None:
                ready.synchronize()
            return self._encoder.encode(kind, stage, seq, payload, flags=flags, busy=busy)
        except Exception as exc:  # goes as an error in its place: the order of replies holds
            return self._encoder.encode(ERROR, stage, seq, describe(exc), busy=busy)

    def _post_send(self, message: torch.Tensor) -> None:
        try:
            n = message.numel()
            if n <= self.chunk:
                self._sent.append((dist.isend(message, self.peer, group=links_group(), tag=0), message))
            else:
                self._sent.append((dist.isend(message[:self.chunk], self.peer, group=links_group(), tag=0), message))
                self._sent.append((dist.isend(message[self.chunk:], self.peer, group=links_group(), tag=1), message))
        except Exception as exc:
            raise PeerLost(f"{self.name} is lost ({type(exc).__name__}: {exc})") from exc
        self._wait_sends(self.in_flight)

    def _wait_sends(self, keep: int) -> None:
        """Wait for the oldest sends until at most ``keep`` are posted and not waited for."""
        try:
            while len(self._sent) > keep:
                self._sent.popleft()[0].wait()
        except Exception as exc:
            raise PeerLost(f"{self.name} is lost ({type(exc).__name__}: {exc})") from exc

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
                dist.recv(whole[self.chunk:], self.peer, group=links_group(), tag=1)
                buffer = whole
        except Exception as exc:
            raise PeerLost(f"{self.name} is lost ({type(exc).__name__}: {exc})") from exc
        return self._decoder.decode(buffer)

    def _post(self) -> None:
        buffer = torch.empty(self.chunk, dtype=torch.uint8)
        self._posted.append((dist.irecv(buffer, self.peer, group=links_group(), tag=0), buffer))


def _undecodable(kind: int, stage: int, seq: int, exc: Exception) -> Message:
    """A message this rank cannot read, as an error in its place (that frame fails)."""
    error = ValueError(f"a payload that cannot travel between ranks ({type(exc).__name__}: {exc}); tensors, "
                       "tuples, lists and dicts of them, Python numbers, strings and None travel")
    return Message(ERROR, stage, seq, describe(error))


class RemoteStageError(RuntimeError):
    """An exception raised on another rank, of a type that is not built in: its message
    names the type."""


def describe(exc: BaseException) -> dict[str, Any]:
    """What travels of an exception: its type's module and name, its message; for our own
    errors, where they say it happened."""
    about: dict[str, Any] = {"module": type(exc).__module__, "type": type(exc).__name__, "message": str(exc),
                             "lost": isinstance(exc, StageLost)}
    if isinstance(exc, PipelineError):
        about.update(detail=exc.detail, component=exc.component, seq=exc.seq, request=exc.request,
                     frame_error=isinstance(exc, FrameError))
    return about


def rebuild(about: dict[str, Any], rank: int, device: Any, *, fatal: bool = False) -> BaseException:
    """The exception that :func:`describe` described, raised on rank ``rank``: of the same
    type if it is built in or ours (so ``on_error`` treats it as in one process), else a
    :class:`RemoteStageError` naming the type; :class:`StageLost` (for ``device``) where the
    stage cannot run at all (``fatal``)."""
    message = f"{about['message']} (on rank {rank})"
    if fatal:
        return StageLost(f"{about['type']}: {message}; the stage could not be built there", device)
    if about.get("lost"):  # what ran the stage there is gone: no later frame could run either
        return StageLost(message, device)
    if "component" in about:
        kind = FrameError if about["frame_error"] else PipelineError
        return kind(f"{about['detail']} (on rank {rank})", component=about["component"], seq=about["seq"],
                    request=about.get("request", False))
    cls = getattr(builtins, about["type"], None) if about["module"] == "builtins" else None
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except TypeError:  # a built-in whose constructor wants more (UnicodeError's kin)
            pass
    return RemoteStageError(f"{about['module']}.{about['type']}: {message}")
