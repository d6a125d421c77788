"""A pipelined model behind FastAPI on uvicorn: one event loop serves HTTP and drives the stages.

    python examples/fastapi_app.py [--host 127.0.0.1] [--port 8000] [--fps 10] [--max-body-mb 16] [--smoke]
    uvicorn --factory --app-dir examples fastapi_app:create_app     # the same app (defaults), one worker

The pipeline starts and stops with the app (its lifespan) and lives on ``app.state``; the
handlers get it through a dependency that answers 503 while it is not running. One worker per
machine: the pipeline's stages already own the cores (another worker would be another pipeline).

``POST /predict``
    One input in, its prediction out, via ``await pipe.submit(x)``. The input is an image
    (``image/png``, ``image/jpeg``, …: converted to RGB, resized to the model's input, scaled to
    [0, 1]), a tensor as ``.npy`` bytes (``application/x-npy``; ``application/octet-stream`` is
    sniffed: ``.npy`` or an image), JSON (a nested list, or ``{"data": nested list, "dtype":
    "float32"}``), or any of these as the ``file`` field of a ``multipart/form-data`` upload
    (``curl -F file=@cat.png``). The answer is JSON ``{"shape", "dtype", "data"}`` (floats written
    with their exact repr, so they decode to the same bits), or ``.npy`` bytes with ``Accept:
    application/x-npy``. Errors, each with a ``detail`` that says what is wrong: 400 a body that
    cannot be decoded (not JSON, not ``.npy``, not an image), 413 a body over the size limit or an
    image of too many pixels, 415 a content type it does not take, 422 a tensor the model does
    not take (wrong shape or dtype), 500 a request that failed inside a stage (skipped alone:
    ``on_error="skip"``, the others go on), 503 while the pipeline is not running.
``WebSocket /stream``
    A summary of each output of a live stream (a synthetic video paced to ``--fps`` by
    ``RealTime``) flowing through the same pipeline, one JSON message per frame, fanned out to
    every connected client. Each client has its own ``latest`` channel: a slow client skips
    frames (counted in its messages' ``dropped``) and never holds up the others. ``?frames=N``
    closes the socket (1000) after N messages; with no live stream it closes at once with 1013.
``GET /metrics``
    The Prometheus text exposition of the pipeline (``partime_async.observe.prometheus_text``)
    and of the live stream's fan-out, for a Prometheus scrape job.
``GET /stats``, ``GET /health``
    JSON of ``pipe.stats()`` (pydantic models, in the OpenAPI schema at ``/docs``); whether the
    pipeline is running (200, or 503: a readiness probe).

``--smoke`` serves on an ephemeral port of 127.0.0.1 with uvicorn, makes a few requests (JSON,
``.npy``, a PNG image, a multipart upload, a bad input, the WebSocket stream, the metrics),
checks each answer against the unsplit model, and exits 0. Needs the ``fastapi`` extra (in a
checkout: ``.venv/bin/pip install -e '.[fastapi]'``).
"""
import argparse
import asyncio
import contextlib
import importlib.util
import io
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

import numpy as np
import torch
from torch import nn

try:
    import uvicorn
    from fastapi import Depends, FastAPI, HTTPException, Query, Request, WebSocket, status
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel
    from starlette.websockets import WebSocketDisconnect, WebSocketState
except ImportError:  # the `fastapi` extra
    raise SystemExit("examples/fastapi_app.py needs FastAPI and uvicorn: in a checkout, "
                     "`.venv/bin/pip install -e '.[fastapi]'`") from None

import partime_async as pa
from partime_async import sinks, sources
from partime_async.cli import demo_model

NPY = "application/x-npy"
NPY_MAGIC = b"\x93NUMPY"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "uint8": torch.uint8,
          "int64": torch.int64}
INPUT_SHAPE = (1, 3, 64, 64)
MAX_BODY_BYTES = 16 * 2**20  # a 12-megapixel photo as JPEG or PNG fits; a 1x3x64x64 float32 .npy is 48 KiB
MAX_IMAGE_PIXELS = 4096 * 4096  # checked on the image's header, before it is decoded
IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # the model's input channels -> the image mode they are read in
MULTIPART = any(importlib.util.find_spec(name) is not None for name in ("python_multipart", "multipart"))


def make_model() -> nn.Sequential:
    """The served model: the demo conv net (8 conv layers, 64x64 RGB in and out), seeded (as
    examples/web_backend.py serves)."""
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


# -- payloads ----------------------------------------------------------------------------------------------
class BadPayload(Exception):
    """A request body that cannot become the model's input; ``status`` is its 4xx code."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code, self.detail = status_code, detail


def decode_npy(body: bytes) -> torch.Tensor:
    array = np.load(io.BytesIO(body), allow_pickle=False)
    if not isinstance(array, np.ndarray):
        raise ValueError("an .npz archive, not one array")
    return torch.from_numpy(np.require(array, requirements="W"))


def decode_json(obj: Any) -> torch.Tensor:
    data, dtype = (obj.get("data"), obj.get("dtype", "float32")) if isinstance(obj, dict) else (obj, "float32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return torch.tensor(data, dtype=DTYPES[dtype])


def decode_image(body: bytes, input_shape: Sequence[int], max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """An image file as the model's input: ``(1, C, H, W)`` float32 in [0, 1], read in the mode
    of the model's ``C`` channels and resized (bilinear) to its ``H x W`` if it differs."""
    from PIL import Image, UnidentifiedImageError

    if len(input_shape) != 4 or input_shape[0] != 1 or input_shape[1] not in IMAGE_MODES:
        raise BadPayload(415, f"this model takes {tuple(input_shape)} tensors, not images: send .npy bytes or JSON")
    height, width = input_shape[-2:]
    try:
        image = Image.open(io.BytesIO(body))  # reads the header only
    except Image.DecompressionBombError as exc:
        raise BadPayload(413, f"the image is too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise BadPayload(400, "the body is not an image (not one that Pillow reads: PNG, JPEG, WebP, ...)") from exc
    except (OSError, ValueError) as exc:
        raise BadPayload(400, f"the body is not an image that Pillow can read ({exc})") from exc
    with image:
        if image.width * image.height > max_pixels:
            raise BadPayload(413, f"the image is {image.width}x{image.height} pixels; at most {max_pixels} pixels "
                                  "are taken")
        try:
            converted = image.convert(IMAGE_MODES[input_shape[1]])
            if converted.size != (width, height):
                converted = converted.resize((width, height), Image.Resampling.BILINEAR)
        except (OSError, ValueError, SyntaxError) as exc:  # a truncated or corrupt file fails here, when decoded
            raise BadPayload(400, f"the image cannot be decoded ({exc})") from exc
        pixels = np.asarray(converted, dtype=np.float32) / 255
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).contiguous()


def decode_body(body: bytes, content_type: str, input_shape: Sequence[int],
                max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """The tensor that ``body`` of ``content_type`` (its media type, lower case) stands for."""
    try:
        if content_type.startswith("image/"):
            return decode_image(body, input_shape, max_pixels)
        if content_type in (NPY, "application/octet-stream"):
            if content_type == NPY or body.startswith(NPY_MAGIC):
                return decode_npy(body)
            return decode_image(body, input_shape, max_pixels)
        if content_type == "application/json" or content_type.endswith("+json"):
            return decode_json(json.loads(body))
    except BadPayload:
        raise
    except (ValueError, TypeError, RuntimeError, EOFError) as exc:  # json, numpy and torch say what is wrong
        raise BadPayload(400, f"cannot decode the {content_type} body as a tensor: {exc}") from exc
    raise BadPayload(415, f"send an image (image/png, image/jpeg, ...), .npy bytes ({NPY}) or JSON (application/json),"
                          " or one of them as the `file` field of multipart/form-data; "
                          f"not {content_type or 'no Content-Type'}")


def media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


async def read_tensor(request: Request, body: bytes) -> torch.Tensor:
    """The request's tensor, from its body (read already, within the size limit)."""
    settings = request.app.state.settings
    content_type = media_type(request.headers.get("content-type"))
    if content_type == "multipart/form-data":
        if not MULTIPART:
            raise BadPayload(415, "multipart uploads need python-multipart on the server: send the file as the body")

        async def replay() -> dict[str, Any]:  # the body, read already, for Starlette's form parser
            return {"type": "http.request", "body": body, "more_body": False}

        async with Request(request.scope, replay).form(max_files=1, max_fields=8) as form:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise BadPayload(400, "a multipart/form-data body carries the input as a file in its `file` field")
            data = await upload.read()
            part_type = media_type(upload.content_type) or "application/octet-stream"
        if part_type == "multipart/form-data":
            raise BadPayload(415, "a multipart upload's file cannot itself be multipart")
        return decode_body(data, part_type, settings["input_shape"], settings["max_image_pixels"])
    return decode_body(body, content_type, settings["input_shape"], settings["max_image_pixels"])


# -- the live stream's fan-out ---------------------------------------------------------------------------
class Hub:
    """Fans events out to the connected clients, each through its own ``latest`` channel:
    publishing never waits, a slow client only loses its own stale events (counted)."""

    def __init__(self) -> None:
        self.clients: set[pa.Channel[dict[str, Any]]] = set()
        self.published = 0
        self.dropped_by_gone = 0  # the drops of clients that have left
        self.closed = False

    @property
    def client_drops(self) -> int:
        """Events skipped by slow clients, over every client since start."""
        return self.dropped_by_gone + sum(c.dropped for c in self.clients)

    def subscribe(self) -> pa.Channel[dict[str, Any]] | None:
        """A new client's channel; None once the stream has ended (or if there never was one)."""
        if self.closed:
            return None
        channel: pa.Channel[dict[str, Any]] = pa.Channel(policy="latest", name="stream client")
        self.clients.add(channel)
        return channel

    def unsubscribe(self, channel: pa.Channel[dict[str, Any]]) -> None:
        if channel in self.clients:
            self.clients.discard(channel)
            self.dropped_by_gone += channel.dropped
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
            latency_ms = 1e3 * (frame.latency or 0.0)
            hub.publish({"seq": frame.seq, "latency_ms": latency_ms, "output": sinks.summarize(frame.data)})
    finally:
        hub.close()


# -- response models ------------------------------------------------------------------------------------------
class Prediction(BaseModel):
    """A tensor as JSON: its shape, dtype and values (nested lists, floats exact)."""

    shape: list[int]
    dtype: str
    data: list[Any]


class FrameCounts(BaseModel):
    admitted: int
    delivered: int
    dropped: int
    skipped: int


class StageInfo(BaseModel):
    name: str
    device: str
    layers: int
    frames: int
    busy_s: float
    busy: float


class StreamInfo(BaseModel):
    clients: int
    published: int
    client_drops: int


class Stats(BaseModel):
    running: bool
    frames: FrameCounts
    throughput_fps: float
    elapsed_s: float
    balance: list[int] | None
    stages: list[StageInfo]
    stream: StreamInfo


class Health(BaseModel):
    running: bool


def prediction_response(y: torch.Tensor, request: Request) -> Response:
    """``y`` as ``.npy`` bytes if the client accepts them, else as :class:`Prediction` JSON. A
    :class:`JSONResponse` built here (``json.dumps``: floats as their exact repr) rather than the
    model instance returned, so that a 12 288-float answer is not validated once more."""
    if NPY in request.headers.get("accept", ""):
        buffer = io.BytesIO()
        np.save(buffer, y.detach().cpu().numpy(), allow_pickle=False)
        return Response(buffer.getvalue(), media_type=NPY)
    return JSONResponse({"shape": list(y.shape), "dtype": str(y.dtype).removeprefix("torch."), "data": y.tolist()})


def stats_of(pipe: pa.Pipeline, hub: Hub) -> Stats:
    stats = pipe.stats()
    return Stats(
        running=pipe.running,
        frames=FrameCounts(admitted=stats.admitted, delivered=stats.delivered, dropped=stats.dropped,
                           skipped=stats.skipped),
        throughput_fps=stats.throughput, elapsed_s=stats.elapsed_s, balance=stats.balance,
        stages=[StageInfo(name=s.name, device=s.device, layers=s.layers, frames=s.frames, busy_s=s.busy_s, busy=busy)
                for s, busy in zip(stats.stages, stats.busy(), strict=True)],
        stream=StreamInfo(clients=len(hub.clients), published=hub.published, client_drops=hub.client_drops))


def stream_metrics_text(hub: Hub) -> str:
    """The live stream's fan-out in Prometheus' text format (appended to the pipeline's)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class Collector:
        def collect(self) -> Any:
            yield GaugeMetricFamily("partime_stream_clients", "WebSocket clients of the live stream now.",
                                    value=len(hub.clients))
            yield CounterMetricFamily("partime_stream_published", "Live-stream outputs published to the clients.",
                                      value=hub.published)
            yield CounterMetricFamily("partime_stream_client_dropped", "Live-stream outputs that slow clients skipped.",
                                      value=hub.client_drops)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return generate_latest(registry).decode()


# -- dependencies ------------------------------------------------------------------------------------------
# Every dependency and handler here is `async def`: FastAPI runs a plain `def` in a worker thread,
# a thread hop per request (contending for the GIL with the stages' threads), and the pipeline and
# the hub are the event loop's to touch.
async def running_pipeline(request: Request) -> pa.Pipeline:
    """The app's pipeline; 503 (with ``Retry-After``) while it is not running."""
    pipe: pa.Pipeline | None = getattr(request.app.state, "pipe", None)
    if pipe is None or not pipe.running:
        raise HTTPException(503, headers={"Retry-After": "1"},
                            detail="the pipeline is not running (starting, stopping, or stopped after a failure)")
    return pipe


async def started_pipeline(request: Request) -> pa.Pipeline:
    """The app's pipeline, running or not (its numbers stay readable once it stopped); 503 before one started."""
    pipe: pa.Pipeline | None = getattr(request.app.state, "pipe", None)
    if pipe is None:
        raise HTTPException(503, detail="the pipeline has not been started")
    return pipe


async def limited_body(request: Request) -> bytes:
    """The request body, read up to the app's limit: 413 as soon as it is known to be over it
    (from ``Content-Length`` before reading, or while reading a body sent without one)."""
    limit = request.app.state.settings["max_body_bytes"]
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(400, detail=f"bad Content-Length {declared!r}")
        if int(declared) > limit:
            raise HTTPException(413,
                                detail=f"the body is {int(declared)} bytes; the limit is {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413,
                                detail=f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


RunningPipeline = Annotated[pa.Pipeline, Depends(running_pipeline)]
StartedPipeline = Annotated[pa.Pipeline, Depends(started_pipeline)]
Body = Annotated[bytes, Depends(limited_body)]

PREDICT_BODY = {  # /predict reads its body itself (several media types); this documents them in the schema
    "requestBody": {"required": True, "content": {
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        NPY: {"schema": {"type": "string", "format": "binary"}},
        "application/json": {"schema": {"oneOf": [
            {"type": "array", "items": {}},
            {"type": "object", "properties": {"data": {"type": "array", "items": {}},
                                              "dtype": {"type": "string", "enum": list(DTYPES)}},
             "required": ["data"]}]}},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "string", "format": "binary"}}, "required": ["file"]}},
    }}}


# -- the app ------------------------------------------------------------------------------------------------
def create_app(model: nn.Module | None = None, *, devices: Any = "auto", fps: float | None = 10.0,
               input_shape: Sequence[int] = INPUT_SHAPE, max_body_bytes: int = MAX_BODY_BYTES,
               max_image_pixels: int = MAX_IMAGE_PIXELS) -> FastAPI:
    """The app: ``model`` (default :func:`make_model`) pipelined over ``devices`` with
    ``on_error="skip"``; a live stream of ``input_shape`` frames at ``fps`` on ``/stream`` (None:
    no live stream); request bodies of at most ``max_body_bytes``, images of at most
    ``max_image_pixels``. (Also ``uvicorn --factory fastapi_app:create_app``.)"""
    model = model if model is not None else make_model()
    input_shape = tuple(input_shape)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        """Start the pipeline (and the live stream) with the app; stop them with it."""
        # on_error="skip": a request that fails inside a stage fails alone, the server goes on.
        pipe = pa.Pipeline(model, devices=devices, balance="time", on_error="skip")
        await pipe.start(torch.zeros(input_shape))  # split now, not on the first request; fixes the input spec
        hub = Hub()
        app.state.pipe, app.state.hub = pipe, hub
        live = None
        if fps:
            channels, height, width = input_shape[-3:]
            video = sources.SyntheticVideo(None, height=height, width=width, channels=channels)
            live = asyncio.create_task(broadcast(pipe, sources.RealTime(video, fps=fps), hub), name="live stream")
        else:
            hub.close()
        try:
            yield
        finally:
            hub.close()  # ends the WebSocket streams still open (uvicorn closes their connections first)
            try:
                if live is not None:
                    live.cancel()
                    await asyncio.wait([live])
                    error = None if live.cancelled() else live.exception()
                    if error is not None:
                        raise error
            finally:
                await pipe.stop()

    app = FastAPI(title="partime_async: a pipelined model", lifespan=lifespan,
                  description="A model split over devices by partime_async, served by FastAPI.")
    app.state.settings = {"input_shape": input_shape, "max_body_bytes": max_body_bytes,
                          "max_image_pixels": max_image_pixels}

    @app.post("/predict", response_model=Prediction, openapi_extra=PREDICT_BODY,
              responses={200: {"content": {NPY: {}}, "description": "The prediction (JSON, or .npy bytes with "
                                                                       f"`Accept: {NPY}`)"},
                         400: {"description": "The body cannot be decoded"}, 413: {"description": "Too large"},
                         415: {"description": "Not an image, .npy or JSON"},
                         422: {"description": "Not the shape or dtype the model takes"},
                         503: {"description": "The pipeline is not running"}})
    async def predict(request: Request, pipe: RunningPipeline, body: Body) -> Response:
        """One input through the pipeline (``await pipe.submit(x)``), its prediction back."""
        try:
            x = await read_tensor(request, body)
            y = await pipe.submit(x)
        except BadPayload as exc:
            raise HTTPException(exc.status_code, detail=exc.detail) from exc
        except pa.FrameError as exc:  # not the shape/dtype the model takes
            raise HTTPException(422, detail=str(exc)) from exc
        except (pa.PipelineClosed, pa.FrameDropped) as exc:  # stopped meanwhile; or full, with a dropping policy
            raise HTTPException(503, detail=str(exc), headers={"Retry-After": "1"}) from exc
        except pa.PipelineError as exc:  # this request failed inside a stage (skipped); the others go on
            raise HTTPException(500, detail=str(exc)) from exc
        return prediction_response(y, request)

    @app.websocket("/stream")
    async def stream(websocket: WebSocket, frames: Annotated[int, Query(ge=0)] = 0) -> None:
        """The live stream's outputs, one JSON message each, through this client's ``latest`` channel."""
        await websocket.accept()
        hub: Hub | None = getattr(websocket.app.state, "hub", None)
        channel = hub.subscribe() if hub is not None else None
        if hub is None or channel is None:
            await websocket.close(status.WS_1013_TRY_AGAIN_LATER,
                                  reason="no live stream: it has ended, or this app was started without one")
            return

        async def until_disconnect() -> None:  # the client's messages are ignored; its leaving ends the stream
            try:
                while (await websocket.receive())["type"] != "websocket.disconnect":
                    pass
            finally:
                channel.close()

        watcher = asyncio.create_task(until_disconnect(), name="stream client watcher")
        try:
            sent = 0
            async for event in channel:
                await websocket.send_json({**event, "dropped": channel.dropped})
                sent += 1
                if sent == frames:
                    break
            if websocket.client_state == WebSocketState.CONNECTED:
                await websocket.close(1000 if frames and sent == frames else status.WS_1001_GOING_AWAY)
        except WebSocketDisconnect:
            pass  # the client went away: its stream simply ends
        finally:
            hub.unsubscribe(channel)
            watcher.cancel()
            await asyncio.wait([watcher])
            if not watcher.cancelled():
                watcher.exception()  # retrieved: a receive that failed once the socket was gone says nothing new

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition"}})
    async def metrics(pipe: StartedPipeline, request: Request) -> Response:
        """The pipeline's metrics and the live stream's, in Prometheus' text exposition format."""
        from prometheus_client import CONTENT_TYPE_LATEST

        from partime_async.observe import prometheus_text

        text = prometheus_text(pipe) + stream_metrics_text(request.app.state.hub)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/stats", response_model=Stats)
    async def stats(pipe: StartedPipeline, request: Request) -> Stats:
        """``pipe.stats()``: frames, throughput, per-stage busy fraction, stream clients."""
        return stats_of(pipe, request.app.state.hub)

    @app.get("/health", response_model=Health, responses={503: {"description": "The pipeline is not running"}})
    async def health(request: Request) -> Health:
        """200 while the pipeline runs, else 503: a readiness probe."""
        await running_pipeline(request)
        return Health(running=True)

    return app


# -- running --------------------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0, **config: Any) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on this event loop (its lifespan included) while the block runs;
    yields the base URL (``port=0``: an ephemeral port). ``config``: more ``uvicorn.Config`` options.
    The server is shut down on the way out: open connections are closed, then the lifespan ends."""
    config.setdefault("log_config", None)  # leave the process's logging as it is
    config.setdefault("access_log", False)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, lifespan="on", **config))

    async def serve() -> None:
        try:
            await server.serve()
        except SystemExit as exc:  # uvicorn exits when the lifespan's startup fails
            raise RuntimeError(f"uvicorn could not start the app (exit status {exc.code}); see its log") from None

    task = asyncio.create_task(serve(), name="uvicorn")
    try:
        while not server.started:
            if task.done():
                await task
                raise RuntimeError("uvicorn stopped before it served")
            await asyncio.sleep(0.02)
        bound_host, bound_port = server.servers[0].sockets[0].getsockname()[:2]
        yield f"http://{bound_host}:{bound_port}"
    finally:
        server.should_exit = True
        await asyncio.wait([task])
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         ) -> tuple[int, dict[str, str], bytes]:
    """One blocking HTTP request with the standard library (the smoke test's client): status, headers, body."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


def npy_bytes(x: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, x.numpy())
    return buffer.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    """``pixels`` (H x W x 3 uint8) as a PNG file."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def multipart(name: str, filename: str, content_type: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with one file; (body, its Content-Type)."""
    boundary = "partime-smoke-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def smoke(fps: float) -> None:
    from websockets.asyncio.client import connect  # uvicorn[standard] serves WebSockets with it

    model = make_model()
    devices = pa.cpu_devices(2)
    threads = devices[0].threads
    xs = [torch.rand(INPUT_SHAPE, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    pixels = np.random.default_rng(0).integers(0, 256, (INPUT_SHAPE[-2], INPUT_SHAPE[-1], 3), dtype=np.uint8)
    image = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).to(torch.float32) / 255
    png = png_bytes(pixels)
    async with serving(create_app(model, devices=devices, fps=fps)) as url:
        def post(body: bytes, content_type: str, accept: str = "application/json") -> bytes:
            code, _, answer = http("POST", f"{url}/predict", body, {"Content-Type": content_type, "Accept": accept})
            assert code == 200, (code, answer)
            return answer

        answers = await asyncio.gather(
            asyncio.to_thread(post, json.dumps(xs[0].tolist()).encode(), "application/json"),
            asyncio.to_thread(post, npy_bytes(xs[1]), NPY, NPY),
            asyncio.to_thread(post, png, "image/png"),
            asyncio.to_thread(post, *multipart("file", "frame.png", "image/png", png)))
        got = [decode_json(json.loads(answers[0])), decode_npy(answers[1]), decode_json(json.loads(answers[2])),
               decode_json(json.loads(answers[3]))]
        want = [reference(model, x, threads) for x in (xs[0], xs[1], image, image)]
        assert all(map(torch.equal, got, want)), "an answer differs from the unsplit model"
        code, _, detail = await asyncio.to_thread(http, "POST", f"{url}/predict", b"[1.0, 2.0]",
                                                  {"Content-Type": "application/json"})
        assert code == 422, (code, detail)
        async with connect(url.replace("http", "ws", 1) + "/stream?frames=3") as websocket:
            events = [json.loads(message) async for message in websocket]
        code, _, text = await asyncio.to_thread(http, "GET", f"{url}/metrics")
        assert code == 200, (code, text)
        code, _, body = await asyncio.to_thread(http, "GET", f"{url}/stats")
        stats = json.loads(body)
    delivered = [line for line in text.decode().splitlines() if line.startswith("partime_frames_delivered_total")]
    print(f"smoke ok: 4 predictions equal to the model's (JSON, .npy, PNG, multipart PNG), 1 bad input refused, "
          f"{len(events)} stream events (seqs {[e['seq'] for e in events]}), "
          f"{float(delivered[0].split()[-1]):.0f} frames delivered, "
          f"stage busy {[round(s['busy'], 2) for s in stats['stages']]}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--fps", type=float, default=10.0, help="rate of the live stream on /stream (0: none)")
    parser.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / 2**20, help="request size limit, MiB")
    parser.add_argument("--smoke", action="store_true", help="serve on an ephemeral port, make a few requests, exit")
    args = parser.parse_args(argv)
    if args.smoke:
        asyncio.run(smoke(args.fps or 50.0))
    else:  # uvicorn's defaults: uvloop and httptools where installed
        uvicorn.run(create_app(fps=args.fps or None, max_body_bytes=int(args.max_body_mb * 2**20)),
                    host=args.host, port=args.port)


if __name__ == "__main__":
    main()
