"""A serving rank's run: this rank's stages answer the driving rank's requests for one of its
runs (see :mod:`partime_async.ranks`)."""
from __future__ import annotations

import asyncio
import threading
from functools import partial

from ..aio.threads import in_thread
from ..core.errors import PipelineError
from ..ranks.placement import DRIVING_RANK, rank
from ..ranks.serve import serve
from .build import BuildSettings, serve_stage
from .state import PipelineState


async def serve_run(settings: BuildSettings, state: PipelineState, here: set[int]) -> None:
    """Serve one session of the driving rank's requests for the stages ``here``, until it says
    bye, on a thread of its own (it blocks on the link: a daemon thread, which a cancelled
    caller leaves behind). Raises a :class:`PipelineError` naming this rank if the session
    failed (a lost peer)."""
    if not here:  # no stage on this rank: the driving rank never calls
        return
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()

    def session() -> None:
        try:
            serve(DRIVING_RANK, partial(serve_stage, settings, state))
        except BaseException as exc:
            loop.call_soon_threadsafe(_settle, ended, exc)
        else:
            loop.call_soon_threadsafe(_settle, ended, None)

    thread = threading.Thread(target=session, name="partime-serving", daemon=True)
    thread.start()
    try:
        await ended
        # The session's last objects (its link, gloo's work handles) go with its thread: let it
        # end before this rank goes on, maybe to exit and tear the process group down.
        await in_thread(thread.join)
    except Exception as exc:
        raise PipelineError(f"{type(exc).__name__}: {exc}", component=f"rank {rank()} (serving)") from exc


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if not future.done():
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)
