"""A pipelined model inside an aiohttp web backend: one event loop serves HTTP and drives the stages.

    python examples/web_backend.py [--host 127.0.0.1] [--port 8080] [--fps 10] [--smoke]

The pipeline starts and stops with the app (``cleanup_ctx``); handlers share it.

``POST /infer``
    A tensor in: ``.npy`` bytes (``Content-Type: application/x-npy``), or JSON (a nested list,
    or ``{"data": nested list, "dtype": "float32"}``). Its prediction out, via
    ``await pipe.submit(x)``: JSON ``{"shape", "dtype", "data"}`` (floats written with their
    exact repr, so they decode to the same bits), or ``.npy`` bytes with
    ``Accept: application/x-npy``. A malformed input gets 400 and leaves the pipeline running.
``GET /stream``
    Server-sent events: a summary of each output of a live stream (a synthetic video paced
    to ``--fps`` by ``RealTime``) flowing through the same pipeline, fanned out to every
    connected client. Each client has its own bounded ``latest`` channel: a slow client
    skips frames (counted in its events' ``dropped``) and never holds up the others.
    ``?frames=N`` ends the stream after N events.
``GET /metrics``
    JSON of ``pipe.stats()``: frames, throughput, per-stage busy fraction, stream clients.
    ``?format=prometheus`` gives the Prometheus text exposition format instead
    (``partime_async.observe.prometheus_text``), for a Prometheus scrape job.

``--smoke`` serves on an ephemeral port of 127.0.0.1, makes a few requests, checks each
answer against the unsplit model, and exits 0. Needs aiohttp, the ``web`` extra (in a
checkout: ``.venv/bin/pip install -e '.[web]'``).
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import io
import json
from typing import Any, AsyncIterator, Sequence

import numpy as np
import torch

try:
    import aiohttp
    from aiohttp import web
except ImportError:  # the `web` extra
    raise SystemExit("examples/web_backend.py needs aiohttp: in a checkout, `.venv/bin/pip install -e '.[web]'`")
from torch import nn

import partime_async as pa
from partime_async.cli import demo_model
from partime_async.sinks import summarize
from partime_async.sources import RealTime, SyntheticVideo

NPY = "application/x-npy"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "uint8": torch.uint8,
          "int64": torch.int64}
INPUT_SHAPE = (1, 3, 64, 64)


def make_model() -> nn.Sequential:
    """The served model: the demo conv net (8 conv layers, 64x64 RGB in and out), seeded."""
    torch.manual_seed(0)
    return demo_model().eval()


def reference(model: nn.Module, x: torch.Tensor, threads: int | None) -> torch.Tensor:
    """The unsplit model's output on ``x``, computed with ``threads`` intra-op threads: the
    count each CPU stage uses, since oneDNN's convolutions may round differently with another."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        torch.set_num_threads(previous)


# -- tensors over HTTP ---------------------------------------------------------------------------------------
def decode_npy(body: bytes) -> torch.Tensor:
    array = np.load(io.BytesIO(body), allow_pickle=False)
    return torch.from_numpy(np.require(array, requirements="W"))


def decode_json(obj: Any) -> torch.Tensor:
    data, dtype = (obj.get("data"), obj.get("dtype", "float32")) if isinstance(obj, dict) else (obj, "float32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return torch.tensor(data, dtype=DTYPES[dtype])


async def read_tensor(request: web.Request) -> torch.Tensor:
    """The request's tensor; ``ValueError`` says what is wrong with it."""
    body = await request.read()
    try:
        if request.content_type in (NPY, "application/octet-stream"):
            return decode_npy(body)
        if request.content_type == "application/json":
            return decode_json(json.loads(body))
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ValueError(f"cannot decode the {request.content_type} body as a tensor: {exc}") from exc
    raise ValueError(f"send .npy bytes ({NPY}) or JSON (application/json), not {request.content_type}")


def tensor_response(y: torch.Tensor, request: web.Request) -> web.Response:
    """``y`` as ``.npy`` bytes if the client accepts them, else as JSON with exact floats."""
    if NPY in request.headers.get("Accept", ""):
        buffer = io.BytesIO()
        np.save(buffer, y.detach().cpu().numpy(), allow_pickle=False)
        return web.Response(body=buffer.getvalue(), content_type=NPY)
    return web.json_response({"shape": list(y.shape), "dtype": str(y.dtype).removeprefix("torch."),
                              "data": y.tolist()})


# -- the live stream's fan-out ----------------------------------------------------------------------------------
class Hub:
    """Fans events out to the connected clients, each through its own ``latest`` channel:
    publishing never waits, a slow client only loses its own stale events (counted)."""

    def __init__(self) -> None:
        self.clients: set[pa.Channel[dict[str, Any]]] = set()
        self.published = 0
        self.closed = False

    def subscribe(self) -> pa.Channel[dict[str, Any]]:
        if self.closed:
            raise web.HTTPServiceUnavailable(text="no live stream: it has ended, or this app was started without one")
        channel: pa.Channel[dict[str, Any]] = pa.Channel(policy="latest", name="stream client")
        self.clients.add(channel)
        return channel

    def unsubscribe(self, channel: pa.Channel[dict[str, Any]]) -> None:
        self.clients.discard(channel)
        channel.close()

    def publish(self, event: dict[str, Any]) -> None:
        if self.closed:  # shutting down: the clients' streams are ending
            return
        self.published += 1
        for channel in self.clients:
            channel.send_nowait(event)

    def close(self) -> None:
        """End every client's stream (after the events already queued for it)."""
        self.closed = True
        for channel in list(self.clients):
            channel.close()


async def broadcast(pipe: pa.Pipeline, source: Any, hub: Hub) -> None:
    """The live stream through ``pipe``, each output published to ``hub``."""
    try:
        async for frame in pipe.stream(source):
            hub.publish({"seq": frame.seq, "latency_ms": 1e3 * frame.latency, "output": summarize(frame.data)})
    finally:
        hub.close()


# -- the app ------------------------------------------------------------------------------------------------
PIPE = web.AppKey("pipe", pa.Pipeline)
HUB = web.AppKey("hub", Hub)


async def lifecycle(app: web.Application, model: nn.Module, devices: Any, fps: float | None,
                    input_shape: Sequence[int]) -> AsyncIterator[None]:
    """Start the pipeline (and the live stream) with the app; stop them with it."""
    # on_error="skip": a request that fails inside a stage fails alone, the server goes on.
    pipe = pa.Pipeline(model, devices=devices, balance="time", on_error="skip")
    await pipe.start(torch.zeros(input_shape))  # split now, not on the first request; fixes the input spec
    hub = Hub()
    app[PIPE], app[HUB] = pipe, hub
    live = None
    if fps:
        video = SyntheticVideo(None, height=input_shape[-2], width=input_shape[-1], channels=input_shape[-3])
        live = asyncio.create_task(broadcast(pipe, RealTime(video, fps=fps), hub), name="live stream")
    else:
        hub.close()
    try:
        yield
    finally:
        try:
            if live is not None:
                live.cancel()
                await asyncio.wait([live])
                if not live.cancelled() and live.exception() is not None:
                    raise live.exception()
        finally:
            await pipe.stop()


async def end_streams(app: web.Application) -> None:
    """On shutdown: end the open ``/stream`` responses so that their handlers return."""
    app[HUB].close()


async def infer(request: web.Request) -> web.Response:
    try:
        x = await read_tensor(request)
        y = await request.app[PIPE].submit(x)
    except (ValueError, pa.FrameError) as exc:  # FrameError: not the shape/dtype the model takes
        raise web.HTTPBadRequest(text=str(exc)) from exc
    except pa.PipelineClosed as exc:
        raise web.HTTPServiceUnavailable(text=str(exc)) from exc
    except pa.PipelineError as exc:  # this request failed inside a stage (skipped)
        raise web.HTTPInternalServerError(text=str(exc)) from exc
    return tensor_response(y, request)


async def stream(request: web.Request) -> web.StreamResponse:
    try:
        limit = int(request.query.get("frames", 0))
    except ValueError:
        raise web.HTTPBadRequest(text=f"frames must be an integer, got {request.query['frames']!r}") from None
    hub = request.app[HUB]
    channel = hub.subscribe()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    try:
        await response.prepare(request)
        sent = 0
        async for event in channel:
            await response.write(f"data: {json.dumps({**event, 'dropped': channel.dropped})}\n\n".encode())
            sent += 1
            if sent == limit:
                break
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away: its stream simply ends
    finally:
        hub.unsubscribe(channel)
    return response


def metrics_of(pipe: pa.Pipeline, hub: Hub) -> dict[str, Any]:
    stats = pipe.stats()
    return {
        "frames": {"admitted": stats.admitted, "delivered": stats.delivered, "dropped": stats.dropped,
                   "skipped": stats.skipped},
        "throughput_fps": stats.throughput,
        "elapsed_s": stats.elapsed_s,
        "balance": stats.balance,
        "stages": [{"name": s.name, "device": s.device, "layers": s.layers, "frames": s.frames, "busy_s": s.busy_s,
                    "busy": busy} for s, busy in zip(stats.stages, stats.busy())],
        "stream": {"clients": len(hub.clients), "published": hub.published,
                   "client_drops": sum(c.dropped for c in hub.clients)},
    }


async def metrics(request: web.Request) -> web.Response:
    if request.query.get("format") == "prometheus":
        from prometheus_client import CONTENT_TYPE_LATEST

        from partime_async.observe import prometheus_text

        return web.Response(body=prometheus_text(request.app[PIPE]).encode(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})
    return web.json_response(metrics_of(request.app[PIPE], request.app[HUB]))


def make_app(model: nn.Module | None = None, *, devices: Any = "auto", fps: float | None = 10.0,
             input_shape: Sequence[int] = INPUT_SHAPE) -> web.Application:
    """The app: ``model`` (default :func:`make_model`) pipelined over ``devices``; a live stream
    of ``input_shape`` frames at ``fps`` on ``/stream`` (None: no live stream)."""
    app = web.Application(client_max_size=64 * 2**20)
    app.cleanup_ctx.append(functools.partial(lifecycle, model=model if model is not None else make_model(),
                                             devices=devices, fps=fps, input_shape=tuple(input_shape)))
    app.on_shutdown.append(end_streams)
    app.router.add_post("/infer", infer)
    app.router.add_get("/stream", stream)
    app.router.add_get("/metrics", metrics)
    return app


# -- running --------------------------------------------------------------------------------------------------
async def serve(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, str]:
    """Start ``app``; returns its runner (``await runner.cleanup()`` stops it) and base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    return runner, f"http://{bound_host}:{bound_port}"


async def smoke(fps: float) -> None:
    model = make_model()
    devices = pa.cpu_devices(2)
    runner, url = await serve(make_app(model, devices=devices, fps=fps))
    try:
        async with aiohttp.ClientSession() as session:
            xs = [torch.rand(INPUT_SHAPE, generator=torch.Generator().manual_seed(i)) for i in range(2)]
            async with session.post(f"{url}/infer", json=xs[0].tolist()) as r:
                assert r.status == 200, await r.text()
                y0 = decode_json(await r.json())
            buffer = io.BytesIO()
            np.save(buffer, xs[1].numpy())
            async with session.post(f"{url}/infer", data=buffer.getvalue(),
                                    headers={"Content-Type": NPY, "Accept": NPY}) as r:
                assert r.status == 200, await r.text()
                y1 = decode_npy(await r.read())
            want = [reference(model, x, devices[0].threads) for x in xs]
            assert torch.equal(y0, want[0]) and torch.equal(y1, want[1]), "an answer differs from the unsplit model"
            async with session.post(f"{url}/infer", json=[1.0, 2.0]) as r:
                assert r.status == 400
            events = []
            async with session.get(f"{url}/stream", params={"frames": "3"}) as r:
                async for line in r.content:
                    if line.startswith(b"data: "):
                        events.append(json.loads(line[6:]))
            async with session.get(f"{url}/metrics") as r:
                stats = await r.json()
    finally:
        await runner.cleanup()
    print(f"smoke ok: 2 predictions equal to the model's, 1 bad input refused, {len(events)} stream events "
          f"(seqs {[e['seq'] for e in events]}), {stats['frames']['delivered']} frames delivered, "
          f"stage busy {[round(s['busy'], 2) for s in stats['stages']]}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--fps", type=float, default=10.0, help="rate of the live stream on /stream (0: none)")
    parser.add_argument("--smoke", action="store_true", help="serve on an ephemeral port, make a few requests, exit")
    args = parser.parse_args(argv)
    if args.smoke:
        asyncio.run(smoke(args.fps or 50.0))
    else:
        web.run_app(make_app(fps=args.fps or None), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
