"""The FastAPI app of examples/fastapi_app.py: through httpx's ASGI transport (its lifespan driven
here: the transport does not run it), and served for real by uvicorn on 127.0.0.1."""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch
from pa_helpers import FailOn, assert_clean
from torch import nn

import partime_async as pa

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
aiohttp = pytest.importorskip("aiohttp")  # its WebSocket client (httpx has none)
Image = pytest.importorskip("PIL.Image")
# uvicorn serves WebSockets with websockets (uvicorn[standard], in the `fastapi` extra) or wsproto
needs_websockets = pytest.mark.skipif(not any(importlib.util.find_spec(m) for m in ("websockets", "wsproto")),
                                      reason="uvicorn has no WebSocket library to serve with")

_spec = importlib.util.spec_from_file_location("fastapi_app",
                                               Path(__file__).resolve().parents[1] / "examples" / "fastapi_app.py")
fastapi_app = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fastapi_app)

NPY = fastapi_app.NPY
SHAPE = (1, 3, 32, 32)  # the conv net takes any size; a small one keeps the tests fast


def npy_bytes(x: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, x.numpy())
    return buffer.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def as_input(pixels: np.ndarray) -> torch.Tensor:
    """What the app makes of an RGB image of the model's size: (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).to(torch.float32) / 255


@contextlib.asynccontextmanager
async def client_of(app, *, lifespan: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client calling ``app`` in process, inside the app's lifespan (unless told not to)."""
    async with contextlib.AsyncExitStack() as stack:
        if lifespan:
            await stack.enter_async_context(app.router.lifespan_context(app))
        yield await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app"))


async def test_predict_takes_each_input_kind_and_answers_exactly():
    model = fastapi_app.make_model()
    devices = pa.cpu_devices(2)
    app = fastapi_app.create_app(model, devices=devices, fps=None, input_shape=SHAPE)
    rng = np.random.default_rng(0)
    xs = [torch.rand(SHAPE, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    big = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)  # resized to 32x32 (bilinear) by the app
    resized = np.array(Image.fromarray(big).resize((32, 32), Image.Resampling.BILINEAR))
    png = png_bytes(pixels)
    requests = [  # (what is sent, the input it stands for)
        ({"json": xs[0].tolist()}, xs[0]),
        ({"json": {"data": xs[1].tolist(), "dtype": "float32"}}, xs[1]),
        ({"content": npy_bytes(xs[2]), "headers": {"Content-Type": NPY, "Accept": NPY}}, xs[2]),
        ({"content": npy_bytes(xs[2]), "headers": {"Content-Type": "application/octet-stream"}}, xs[2]),
        ({"content": png, "headers": {"Content-Type": "image/png"}}, as_input(pixels)),
        ({"content": png, "headers": {"Content-Type": "application/octet-stream"}}, as_input(pixels)),  # sniffed
        ({"content": png_bytes(big), "headers": {"Content-Type": "image/png"}}, as_input(resized)),
        ({"files": {"file": ("cat.png", png, "image/png")}}, as_input(pixels)),  # multipart, as curl -F sends
        ({"files": {"file": ("x.npy", npy_bytes(xs[0]), "application/octet-stream")}}, xs[0]),
    ]
    async with client_of(app) as client:
        responses = await asyncio.gather(*(client.post("/predict", **kwargs) for kwargs, _ in requests))
        health = await client.get("/health")
        stats = (await client.get("/stats")).json()
        metrics = await client.get("/metrics")
        pipe = app.state.pipe
    for i, (response, (_, x)) in enumerate(zip(responses, requests, strict=True)):
        assert response.status_code == 200, (i, response.text)
        if response.headers["content-type"] == NPY:
            got = fastapi_app.decode_npy(response.content)
        else:
            body = response.json()
            assert body["shape"] == list(SHAPE) and body["dtype"] == "float32", i
            got = fastapi_app.decode_json(body)
        assert torch.equal(got, fastapi_app.reference(model, x, devices[0].threads)), f"request {i} differs"
    assert responses[2].headers["content-type"] == NPY
    assert health.status_code == 200 and health.json() == {"running": True}
    assert stats["running"] and stats["frames"]["delivered"] == len(requests) and stats["frames"]["skipped"] == 0
    assert len(stats["stages"]) == 2 and sum(stats["balance"]) == len(model) and stats["stream"]["clients"] == 0
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    samples = dict(line.rsplit(" ", 1) for line in metrics.text.splitlines() if line and not line.startswith("#"))
    assert float(samples["partime_frames_delivered_total"]) == len(requests)
    assert float(samples['partime_stage_frames_total{device="cpu:1",stage="1"}']) == len(requests)
    assert float(samples["partime_stream_clients"]) == 0 and "partime_stream_client_dropped_total" in samples
    assert not pipe.running  # the lifespan stopped it
    await assert_clean()


async def test_bad_payloads_get_a_4xx_that_says_why_and_the_pipeline_keeps_serving():
    app = fastapi_app.create_app(devices=pa.cpu_devices(2), fps=None, input_shape=SHAPE, max_body_bytes=64 * 2**10,
                                 max_image_pixels=48 * 48)

    async def chunks():  # a body sent without Content-Length, over the limit
        for _ in range(10):
            yield bytes(10 * 2**10)

    bad = [  # (request, status, what the detail says)
        ({"json": [[1.0, 2.0]]}, 422, "expected 4 dimensions (1, 3, 32, 32)"),
        ({"json": torch.zeros(1, 3, 16, 16).tolist()}, 422, "expected shape (1, 3, 32, 32), got (1, 3, 16, 16)"),
        ({"content": npy_bytes(torch.zeros(SHAPE, dtype=torch.float64)), "headers": {"Content-Type": NPY}}, 422,
         "float"),
        ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "cannot decode"),
        ({"json": {"data": [1], "dtype": "complex7"}}, 400, "dtype must be one of"),
        ({"content": b"\x93NUMPY garbage", "headers": {"Content-Type": NPY}}, 400, "cannot decode"),
        ({"content": b"GIF89a, or not", "headers": {"Content-Type": "image/gif"}}, 400, "not an image"),
        ({"content": b"just bytes", "headers": {"Content-Type": "application/octet-stream"}}, 400, "not an image"),
        ({"content": b"x", "headers": {"Content-Type": "text/plain"}}, 415, "send an image"),
        ({"content": b"x"}, 415, "not no Content-Type"),
        ({"files": {"upload": ("x.png", b"x", "image/png")}}, 400, "`file` field"),
        ({"content": png_bytes(np.zeros((64, 64, 3), np.uint8)), "headers": {"Content-Type": "image/png"}}, 413,
         "the image is 64x64 pixels; at most 2304 pixels"),
        ({"content": bytes(65 * 2**10), "headers": {"Content-Type": NPY}}, 413, "the limit is 65536 bytes"),
        ({"content": chunks(), "headers": {"Content-Type": NPY}}, 413, "over the limit of 65536 bytes"),
    ]
    async with client_of(app) as client:
        for kwargs, code, detail in bad:
            response = await client.post("/predict", **kwargs)
            assert response.status_code == code and detail in response.json()["detail"], (kwargs, response.text)
        good = await client.post("/predict", json=torch.zeros(SHAPE).tolist())
        stats = (await client.get("/stats")).json()
    assert good.status_code == 200 and good.json()["shape"] == list(SHAPE)
    assert stats["running"] and stats["frames"]["delivered"] == 1 and stats["frames"]["skipped"] == 3  # the 422s
    await assert_clean()


async def test_a_request_that_fails_inside_a_stage_gets_500_alone():
    model = nn.Sequential(nn.Identity(), FailOn(7), nn.Identity())  # raises on inputs whose first element is 7
    app = fastapi_app.create_app(model, devices=pa.cpu_devices(2), fps=None, input_shape=(2, 4))
    async with client_of(app) as client:
        failed, answered = await asyncio.gather(client.post("/predict", json=[[7.0] * 4] * 2),
                                                client.post("/predict", json=[[1.0] * 4] * 2))
        after = await client.post("/predict", json=[[2.0] * 4] * 2)
    assert failed.status_code == 500 and "failed on request" in failed.json()["detail"]
    assert answered.status_code == 200 and answered.json()["data"] == [[1.0] * 4] * 2
    assert after.status_code == 200 and after.json()["data"] == [[2.0] * 4] * 2
    await assert_clean()


async def test_503_while_the_pipeline_is_not_running():
    app = fastapi_app.create_app(devices=pa.cpu_devices(2), fps=None, input_shape=SHAPE)
    x = {"content": npy_bytes(torch.zeros(SHAPE)), "headers": {"Content-Type": NPY}}
    async with client_of(app, lifespan=False) as client:  # never started
        before = [await client.post("/predict", **x), await client.get("/health"), await client.get("/metrics")]
    async with client_of(app) as client:
        running = await client.post("/predict", **x)
        await app.state.pipe.stop()  # as if it had stopped (or failed) while the app serves
        stopped = [await client.post("/predict", **x), await client.get("/health")]
        metrics = await client.get("/metrics")  # still readable: the numbers of the run that ended
    assert [r.status_code for r in before] == [503, 503, 503]
    assert before[0].headers["retry-after"] == "1" and "not running" in before[0].json()["detail"]
    assert running.status_code == 200
    assert [r.status_code for r in stopped] == [503, 503] and "not running" in stopped[0].json()["detail"]
    assert metrics.status_code == 200 and "partime_frames_delivered_total 1.0" in metrics.text
    await assert_clean()


@needs_websockets
async def test_uvicorn_serves_predictions_and_the_websocket_stream_and_shuts_down_clean():
    model = fastapi_app.make_model()
    devices = pa.cpu_devices(2)
    app = fastapi_app.create_app(model, devices=devices, fps=100, input_shape=SHAPE)  # a live stream flows meanwhile
    xs = [torch.rand(SHAPE, generator=torch.Generator().manual_seed(i)) for i in range(24)]

    async def ask(session, url: str, i: int) -> torch.Tensor:
        if i % 3 == 1:  # JSON both ways: floats travel as their exact repr
            async with session.post(f"{url}/predict", json={"data": xs[i].tolist(), "dtype": "float32"}) as r:
                assert r.status == 200, await r.text()
                return fastapi_app.decode_json(await r.json())
        async with session.post(f"{url}/predict", data=npy_bytes(xs[i]),
                                headers={"Content-Type": NPY, "Accept": NPY}) as r:
            assert r.status == 200, await r.text()
            return fastapi_app.decode_npy(await r.read())

    async with aiohttp.ClientSession() as session:
        async with fastapi_app.serving(app) as url:
            answers = await asyncio.gather(*(ask(session, url, i) for i in range(len(xs))))
            ws_url = url.replace("http", "ws", 1) + "/stream"
            stalled = await session.ws_connect(ws_url)  # reads one message, then nothing more
            first = await stalled.receive_json()
            async with session.ws_connect(ws_url, params={"frames": "6"}) as reader:
                events = [json.loads(message.data) async for message in reader]  # ends when the server closes
            assert reader.close_code == 1000
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:  # the query fails validation
                await session.ws_connect(ws_url, params={"frames": "-1"})
            assert refused.value.status == 403  # closed before it was accepted, which uvicorn answers so
            async with session.get(f"{url}/metrics") as r:
                metrics = await r.text()
            pipe = app.state.pipe
        # the server shut down with the stalled client still connected: its socket was closed
        while not stalled.closed:
            await stalled.receive()
        await stalled.close()
    for i, got in enumerate(answers):
        want = fastapi_app.reference(model, xs[i], devices[0].threads)
        assert got.dtype == torch.float32 and torch.equal(got, want), f"request {i} differs from the unsplit model"
    seqs = [e["seq"] for e in events]
    assert len(events) == 6 and seqs == sorted(set(seqs)) and seqs[0] > first["seq"]
    assert all(e["output"]["shape"] == list(SHAPE) and e["latency_ms"] >= 0 and e["dropped"] >= 0 for e in events)
    samples = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line and not line.startswith("#"))
    assert float(samples["partime_stream_clients"]) >= 1 and float(samples["partime_stream_published_total"]) >= 7
    assert not pipe.running
    await assert_clean()


@needs_websockets
async def test_the_websocket_closes_with_1013_without_a_live_stream():
    app = fastapi_app.create_app(devices=pa.cpu_devices(2), fps=None, input_shape=SHAPE)
    async with aiohttp.ClientSession() as session, fastapi_app.serving(app) as url:
        async with session.ws_connect(url.replace("http", "ws", 1) + "/stream") as ws:
            message = await ws.receive()
    assert message.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1013 and "no live stream" in message.extra
    await assert_clean()


async def test_hub_gives_each_client_its_own_latest_channel():
    hub = fastapi_app.Hub()
    reader, stalled = hub.subscribe(), hub.subscribe()
    got = []
    for seq in range(10):
        hub.publish({"seq": seq})
        got.append((await reader.receive())["seq"])
    assert got == list(range(10)) and reader.dropped == 0
    assert stalled.dropped == 9 and (await stalled.receive())["seq"] == 9  # only its own stale events are lost
    hub.unsubscribe(stalled)
    assert hub.client_drops == 9  # a client's drops stay counted after it left
    hub.close()
    hub.publish({"seq": 10})  # after close: ignored, never raises
    assert [e async for e in reader] == [] and hub.published == 10 and hub.subscribe() is None
