"""A base class for custom sensors: open, read frames, reconnect with back-off, always close."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from partime_async.aio.threads import to_the_end
from partime_async.core.frame import Frame, Payload

from .base import Source


class SensorSource(Source):
    """Subclass it for a device; implement :meth:`read`, and :meth:`open` / :meth:`close`
    when the device has a connection::

        class Camera(SensorSource):
            name = "camera 0"
            async def open(self):  self.conn = await connect(...)
            async def read(self):  return decode(await self.conn.receive())   # a tensor or a Frame
            async def close(self): await self.conn.aclose()

    ``read()`` returns a payload (it gets seq 0, 1, 2, … in read order) or a :class:`Frame`
    (kept as is); returning ``None`` ends the stream, as does reaching ``frames``.

    **Reconnects.** When ``open()`` or ``read()`` raises an ``Exception`` (or ``read()`` takes
    longer than ``read_timeout``), the connection is closed, the source waits
    :meth:`backoff_delay` and opens it again, then reads again: up to ``attempts`` tries per
    frame. After the last one the last error is raised unchanged (with a note saying how many
    attempts failed), so a pipeline fails with a ``PipelineError`` naming this source whose
    ``__cause__`` is that error. Errors raised by ``close()`` while reconnecting are ignored
    (the connection is being replaced); nothing read is lost or duplicated by a reconnect.

    **Close.** ``close()`` is called once for every successful ``open()``: on reconnect, at
    the end of the stream, when the consumer stops early, on error and on cancellation. A
    ``close()`` under way runs to its end even if the consumer is cancelled meanwhile; an
    ``open()`` under way is cancelled (and then needs no ``close()``).

    **Timeouts and threads.** ``read_timeout`` cancels the awaiting ``read()``. A blocking
    driver call wrapped in ``asyncio.to_thread`` cannot be cancelled: it goes on in its thread
    while ``close()`` runs. Prefer the device API's own timeout for such reads.

    Counters (reset when an iteration starts): :attr:`read_count` frames read,
    :attr:`errors` failed tries, :attr:`reconnects` ``open()`` calls after a failure,
    :attr:`last_error`.

    Args:
        frames: stop after this many frames (None: until ``read()`` returns None).
        attempts: tries per frame, >= 1 (1: no reconnect).
        backoff: the first wait before a reconnect, in seconds; each further one doubles...
        backoff_max: ...up to this.
        read_timeout: seconds a ``read()`` may take before it counts as failed (None: no limit).
        fps: pace to a wall clock (None: as fast as consumed).
    """

    name = "sensor"

    def __init__(self, *, frames: int | None = None, attempts: int = 5, backoff: float = 0.05,
                 backoff_max: float = 2.0, read_timeout: float | None = None, fps: float | None = None,
                 name: str | None = None) -> None:
        super().__init__(fps=fps, name=name)
        if frames is not None and frames < 0:
            raise ValueError(f"frames must be >= 0 or None, got {frames}")
        if not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"attempts must be an int >= 1, got {attempts!r}")
        if backoff < 0 or backoff_max < backoff:
            raise ValueError(f"need 0 <= backoff <= backoff_max, got backoff={backoff}, backoff_max={backoff_max}")
        if read_timeout is not None and read_timeout <= 0:
            raise ValueError(f"read_timeout must be positive or None, got {read_timeout}")
        self.n_frames = frames
        self.attempts = attempts
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.read_timeout = read_timeout
        self.read_count = 0
        self.errors = 0
        self.reconnects = 0
        self.last_error: Exception | None = None
        self._connected = False

    # -- what a subclass implements ---------------------------------------------------------
    async def open(self) -> None:
        """Connect to the device (default: nothing to do)."""

    async def read(self) -> Frame | Payload | None:
        """The next frame or payload; None ends the stream."""
        raise NotImplementedError(f"{type(self).__name__} must implement `async def read(self)`")

    async def close(self) -> None:
        """Release the connection (default: nothing to do)."""

    # -- the machinery ------------------------------------------------------------------------
    def backoff_delay(self, failure: int) -> float:
        """Seconds to wait after the ``failure``-th failed try of a frame (1, 2, …):
        ``backoff * 2 ** (failure - 1)``, at most ``backoff_max``."""
        return min(self.backoff_max, self.backoff * 2 ** (failure - 1))

    async def frames(self) -> AsyncIterator[Frame]:
        self.read_count = self.errors = self.reconnects = 0
        self.last_error = None
        try:
            while self.n_frames is None or self.read_count < self.n_frames:
                item = await self._read_with_retries()
                if item is None:
                    return
                frame = item if isinstance(item, Frame) else Frame(self.read_count, item)
                self.read_count += 1
                yield frame
        finally:
            if self._connected:
                self._connected = False
                await to_the_end(self.close())  # even if cancelled again meanwhile

    async def _read_with_retries(self) -> Frame | Payload | None:
        failures = 0
        while True:
            try:
                if not self._connected:
                    if self.errors:
                        self.reconnects += 1
                    # Cancelled meanwhile: the open is cancelled too, and waited for, so that a
                    # connection made is recorded (and closed) and none is left half-made.
                    connecting = asyncio.ensure_future(self._connect())
                    await to_the_end(connecting, on_cancel=connecting.cancel)
                return await self._read_once()
            except Exception as exc:
                failures += 1
                self.errors += 1
                self.last_error = exc
                if self._connected:
                    self._connected = False
                    try:
                        await to_the_end(self.close())
                    except Exception:  # the connection is being replaced; its read error is what matters
                        pass
                if failures >= self.attempts:
                    exc.add_note(f"{self.name}: gave up after {failures} failed attempt(s) to read frame "
                                 f"{self.read_count} ({self.reconnects} reconnects in this stream)")
                    raise
                await asyncio.sleep(self.backoff_delay(failures))

    async def _connect(self) -> None:
        """``open()``, marked connected as soon as it returns (so that it is closed)."""
        await self.open()
        self._connected = True

    async def _read_once(self) -> Frame | Payload | None:
        try:
            async with asyncio.timeout(self.read_timeout) as deadline:
                return await self.read()
        except TimeoutError as exc:
            if not deadline.expired():  # the device's own timeout
                raise
            raise TimeoutError(f"read() took longer than read_timeout={self.read_timeout}s") from exc
