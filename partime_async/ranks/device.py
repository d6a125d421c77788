"""A stage on another rank, as the driving rank sees it: a :class:`Device` whose work runs there.

The driving rank keeps every stage's runner, schedule and bookkeeping; a stage placed on rank
r is a :class:`RankDevice` here, and its program runs in rank r's process (which built the
same program from the same script). :meth:`RankDevice.submit` sends the work, the frame's
payload (with its target, for the last stage) and the seq to rank r over the link to it, and
the ticket resolves when the reply comes back. Requests and replies keep their order per
rank (rank r runs them one after another), so the runner's contract holds unchanged: FIFO
work, results in order, learning submitted forward(t), backward(owed at t), forward(t + 1).

* The stage's weights and learner state travel with the build, from the driving rank (the
  truth, whatever the serving rank's script loaded); a learning run's learnt state comes
  back when the run ends (so ``state_dict()`` and checkpoints on the driving rank see it;
  checkpoint cuts in flight fetch it as any stage's ``state`` work).
* A remote exception comes back as an exception of the same built-in type (or
  :class:`RemoteStageError`), so ``on_error`` applies as in one process; a stage that
  failed to build, and a rank that is lost, fail with :class:`StageLost`: the run stops.
* Work that is not the stage's program (profiling and timing at set-up) runs on this rank,
  on a CPU stand-in.

One link per peer rank, shared by the stages placed there, with one receiving thread here
that resolves the tickets on the loop in batches (:class:`~partime_async.aio.threads.LoopNotifier`).
"""
from __future__ import annotations

import asyncio
import threading
import warnings
from collections import deque
from collections.abc import Hashable
from typing import Any, ClassVar

import torch

from ..aio.threads import LoopNotifier
from ..core.errors import PipelineClosed, StageLost
from ..core.frame import Payload
from ..core.job import NO_GRADIENT
from ..core.stats import StageStats
from ..devices import CpuDevice, Device, Ticket, Work, available_cores
from ..programs import StageProgram
from ..programs.learn import SKIPPED
from .link import (
    BACKWARD,
    BUILD,
    BYE,
    FATAL,
    FINAL,
    FORWARD,
    RESULT,
    STATE,
    WANT_FINAL,
    PeerLink,
    PeerLost,
    local_world_size,
    rebuild,
)
from .wire import BATCH, Message

WORK = {"forward": FORWARD, "backward": BACKWARD, "state": STATE}
"""The program's work a stage on another rank runs there, by the message kind that asks for it."""

SENTINELS: dict[str, object] = {"skipped": SKIPPED, "no_gradient": NO_GRADIENT}
"""The objects of ours that travel by name (a learning marker, a missing gradient)."""

MESSAGES_IN_FLIGHT = 2
"""Request messages out to a peer at a time: the peer works on one while the other's reply
travels back and the next requests gather here."""

CLOSE_TIMEOUT_S = 60.0
"""How long closing waits for a peer's last messages (its learnt state) before it gives up."""


class RankDevice(Device):
    """Stage work that runs on rank ``rank``'s device ``spec`` (``"cpu"``, ``"cuda:0"``)."""

    on_host = True      # results arrive as host tensors
    host_timed = False  # the peer times its work; the reply says how long it took
    ahead = 8           # frames in flight beyond the window: requests gather while replies travel

    def __init__(self, rank: int, spec: str) -> None:
        self.rank = rank
        self.spec = spec
        self.torch_device = torch.device("cpu")  # this rank's copy of the stage lives on the host
        self._peer: _Peer | None = None
        self._ops: dict[Any, int] = {}
        self._stage = -1
        self._stats: StageStats | None = None
        self._stand_in: CpuDevice | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def name(self) -> str:
        return f"rank{self.rank}:{self.spec}"

    def __repr__(self) -> str:
        return f"RankDevice({self.rank}, {self.spec!r})"

    @property
    def profile_key(self) -> Hashable:
        return ("cpu", self._stand_in_threads())

    def _stand_in_threads(self) -> int:
        """The intra-op threads the stage has there by default (the host's cores shared by its
        processes): the CPU stand-in profiles with as many."""
        return max(1, available_cores() // local_world_size())

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._peer is not None:
            raise RuntimeError(f"{self.name} is already started; a device serves one pipeline at a time")
        self._loop = loop
        self._peer = _Peer.acquire(self.rank, loop)
        self._ops = {}

    def bind(self, index: int, program: StageProgram, balance: list[int], learner_state: Any,
             sample: Any = None) -> None:
        """This run's stage ``index`` runs ``program`` (the split being ``balance``): rank
        ``rank`` builds the same, with this rank's weights and learner state (and, for a model
        split as a graph, the first frame's ``sample`` to capture it on)."""
        assert self._peer is not None  # started by the run before its stages are built
        self._stage = index
        self._ops = {getattr(program, name): op for name, op in WORK.items() if hasattr(program, name)}
        self._peer.bind(index, self, program)
        build = {"balance": balance, "module": program.plan.module.state_dict(), "learner": learner_state,
                 "sample": sample}
        self._peer.request(BUILD, index, -1, build, None).add_done_callback(_retrieve)

    def record_into(self, track: int, stats: StageStats, spans: deque[Any] | None) -> None:
        self._stats = stats

    def submit(self, fn: Work, payload: Payload, ready: Any = None, *, seq: int = -1,
               kind: str = "compute") -> Ticket:
        op = self._ops.get(fn)
        if op is None:  # set-up work (profiling, timing): here, on a CPU stand-in
            if self.spec != "cpu" and not self.spec.startswith("cpu:"):
                raise ValueError(f"balance='time' cannot time a stage on {self.name} from this rank (it would time "
                                 "this rank's CPU instead of that GPU): pass balance=[layers per stage] or 'params'")
            return self._local().submit(fn, payload, ready, seq=seq, kind=kind)
        assert self._peer is not None  # bound, so started
        return self._peer.request(op, self._stage, seq, payload, ready)

    async def download(self, payload: Payload, ready: Any, *, seq: int = -1) -> Payload:
        return payload

    @property
    def queued(self) -> int:
        return self._peer.waiting(self._stage) if self._peer is not None else 0

    def close(self) -> None:
        peer, self._peer = self._peer, None
        if self._stand_in is not None:
            self._stand_in.close()
            self._stand_in = None
        if peer is not None:
            peer.release(self)
            if peer.lost is not None and self._stage in peer.bound:
                self.died = peer.lost

    def add_busy(self, seconds: float) -> None:
        """Time the peer spent on this stage's work (from its replies; the receiving thread)."""
        if self._stats is not None:
            self._stats.busy_s += seconds

    def _local(self) -> CpuDevice:
        if self._stand_in is None:
            assert self._loop is not None
            self._stand_in = CpuDevice(self.rank, threads=self._stand_in_threads(), inline=False)
            self._stand_in.start(self._loop)
        return self._stand_in


class _Peer:
    """The driving rank's side of the link to one serving rank, shared by the stages placed
    there (see the module docstring)."""

    _open: ClassVar[dict[int, _Peer]] = {}  # by rank: the links open now (one per peer)

    @classmethod
    def acquire(cls, rank: int, loop: asyncio.AbstractEventLoop) -> _Peer:
        peer = cls._open.get(rank)
        if peer is None:
            peer = cls._open[rank] = _Peer(rank, loop)
        peer.users += 1
        return peer

    def __init__(self, rank: int, loop: asyncio.AbstractEventLoop) -> None:
        self.rank = rank
        self.users = 0
        self.link = PeerLink(rank, sentinels=SENTINELS, name=f"rank {rank}")
        self.bound: dict[int, tuple[RankDevice, StageProgram]] = {}
        self.lost: StageLost | None = None
        self.closing = False
        self._notifier = LoopNotifier(loop)
        self._pending: deque[tuple[asyncio.Future[Any], int]] = deque()  # (ticket, stage) in request order
        self._waiting: list[tuple[int, int, int, Any, int, float, Any]] = []  # requests not sent yet
        self._out = 0  # messages sent and not answered
        self._lock = threading.Lock()  # the loop appends requests; the receiving thread settles them
        self._loop = loop
        self.link.start()
        self._receiver = threading.Thread(target=self._receiving, name=f"partime-recv-rank{rank}", daemon=True)
        self._receiver.start()

    def bind(self, index: int, device: RankDevice, program: StageProgram) -> None:
        self.bound[index] = device, program

    def request(self, kind: int, stage: int, seq: int, payload: Any, ready: Any) -> asyncio.Future[Any]:
        """Send work ``kind`` for ``stage``; the future of its reply (loop thread).

        At most :data:`MESSAGES_IN_FLIGHT` messages are out at a time; requests made
        meanwhile wait here and leave together, as one message, when a reply comes (see the
        module docstring)."""
        future = self._loop.create_future()
        with self._lock:
            if self.lost is not None:
                raise self.lost
            self._pending.append((future, stage))
            self._waiting.append((kind, stage, seq, payload, 0, 0.0, ready))
            if self._out < MESSAGES_IN_FLIGHT:
                self._flush()
        return future

    def _flush(self) -> None:
        """Send the requests waiting here as one message (under the lock: the order holds)."""
        items, self._waiting = self._waiting, []
        self._out += 1
        try:
            self.link.send_batch(items)
        except PeerLost as exc:
            raise self._lose(exc, locked=True) from exc

    def waiting(self, stage: int) -> int:
        with self._lock:  # the receiving thread pops meanwhile
            return sum(1 for _, s in self._pending if s == stage)

    def release(self, device: RankDevice) -> None:
        """One stage less; the last one closes the link (after the peer's learnt state came
        back, if any of its stages learns)."""
        self.users -= 1
        if self.users > 0:
            return
        del _Peer._open[self.rank]
        with self._lock:  # nothing is sent after the BYE: requests not sent yet are dropped
            self.closing = True
            dropped, self._waiting = self._waiting, []
            for _ in dropped:
                future, _stage = self._pending.pop()  # the newest tickets are the unsent requests'
                if not future.done():
                    future.set_exception(PipelineClosed(f"rank {self.rank}: the run ended before this work was sent"))
                    future.exception()
        want_final = any(program.learns for _, program in self.bound.values())
        # Synchronous, as a CpuDevice's close joins its worker: the peer finishes the work
        # already sent, then says bye (with the learnt state first, when asked).
        self.link.close(flags=WANT_FINAL if want_final and self.lost is None else 0, timeout=CLOSE_TIMEOUT_S)
        self._receiver.join(CLOSE_TIMEOUT_S)
        if self._receiver.is_alive():
            warnings.warn(f"rank {self.rank} did not say bye within {CLOSE_TIMEOUT_S:g} s"
                          + (": the learnt state of its stages did not come back" if want_final else ""),
                          RuntimeWarning, stacklevel=2)

    def _receiving(self) -> None:
        try:
            while True:
                message = self.link.receive()
                if message.kind == BYE:
                    if not self.closing:  # it left by itself: nothing pending will be answered
                        self._lose(PeerLost(f"rank {self.rank} stopped serving its stages"))
                    break
                if message.kind == FINAL:
                    self._apply_final(message.payload)
                    continue
                with self._lock:
                    self._out -= 1
                    if self._waiting and not self.closing:
                        self._flush()
                for reply in message.payload if message.kind == BATCH else (message,):
                    self._settle(reply)
        except PeerLost as exc:
            self._lose(exc)
        except BaseException as exc:
            self._lose(PeerLost(f"rank {self.rank}: the link broke ({type(exc).__name__}: {exc})"))
            raise

    def _settle(self, reply: Message) -> None:
        """Resolve the oldest ticket with ``reply`` (the receiving thread)."""
        with self._lock:
            if not self._pending:  # failed already (the peer was lost, or the run ended)
                return
            future, stage = self._pending.popleft()
        device = self.bound[stage][0] if stage in self.bound else None
        if device is not None and reply.busy:
            device.add_busy(reply.busy)
        if reply.kind == RESULT:
            self._notifier.notify(future, (reply.payload, None), None)
        else:
            self._notifier.notify(future, None, rebuild(reply.payload, self.rank, device,
                                                        fatal=bool(reply.flags & FATAL)))

    def _lose(self, exc: BaseException, *, locked: bool = False) -> StageLost:
        """The peer is gone: every ticket waiting for it fails, and so will every request
        (``locked``: the caller holds the lock)."""
        device = next(iter(self.bound.values()))[0] if self.bound else None
        if not locked:
            with self._lock:
                return self._lose(exc, locked=True)
        lost = self.lost = self.lost or StageLost(f"{exc}; every rank stops", device)
        pending, self._pending, self._waiting = list(self._pending), deque(), []
        self._fail(pending, lost)
        return lost

    def _fail(self, pending: list[tuple[asyncio.Future[Any], int]], lost: StageLost) -> None:
        for future, _ in pending:
            try:
                self._notifier.notify(future, None, lost)
            except RuntimeError:  # the loop is closed: nobody waits
                break

    def _apply_final(self, states: dict[int, tuple[dict[str, Any], Any]]) -> None:
        """The learnt weights and learner state of the peer's stages, into this rank's copies."""
        for index, (module_state, learner_state) in states.items():
            _, program = self.bound[index]
            program.plan.module.load_state_dict(module_state)
            learner = getattr(program, "learner", None)
            if learner is not None and learner_state is not None:
                learner.load_state_dict(learner_state)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # a failed build is reported by the stage's first frame (FATAL)
