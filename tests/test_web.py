"""The aiohttp backend of examples/web_backend.py, served for real on 127.0.0.1 and called by a real client."""
from __future__ import annotations

import asyncio
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import partime_async as pa
from pa_helpers import assert_clean

aiohttp = pytest.importorskip("aiohttp")

_spec = importlib.util.spec_from_file_location("web_backend",
                                               Path(__file__).resolve().parents[1] / "examples" / "web_backend.py")
web_backend = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(web_backend)

NPY = web_backend.NPY


def npy_bytes(x: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, x.numpy())
    return buffer.getvalue()


async def sse_events(response, limit: int | None = None) -> list[dict]:
    events = []
    async for line in response.content:
        if line.startswith(b"data: "):
            events.append(json.loads(line[6:]))
            if len(events) == limit:
                break
    return events


async def test_200_concurrent_requests_are_answered_exactly_and_the_app_shuts_down_clean():
    model = web_backend.make_model()
    devices = pa.cpu_devices(2)
    shape = (1, 3, 32, 32)  # the conv net takes any size; a small one keeps the test fast
    app = web_backend.make_app(model, devices=devices, fps=20, input_shape=shape)  # a live stream flows meanwhile
    runner, url = await web_backend.serve(app)
    xs = [torch.rand(shape, generator=torch.Generator().manual_seed(i)) for i in range(200)]
    expected = [web_backend.reference(model, x, devices[0].threads) for x in xs]

    async def ask(session, i: int) -> torch.Tensor:
        if i % 4 == 1:  # JSON both ways: floats travel as their exact repr
            async with session.post(f"{url}/infer", json={"data": xs[i].tolist(), "dtype": "float32"}) as r:
                assert r.status == 200, await r.text()
                return web_backend.decode_json(await r.json())
        async with session.post(f"{url}/infer", data=npy_bytes(xs[i]),
                                headers={"Content-Type": NPY, "Accept": NPY}) as r:
            assert r.status == 200, await r.text()
            return web_backend.decode_npy(await r.read())

    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as session:
            answers = await asyncio.gather(*(ask(session, i) for i in range(200)))
            async with session.get(f"{url}/metrics") as r:
                metrics = await r.json()
            async with session.get(f"{url}/metrics?format=prometheus") as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
                prometheus = await r.text()
        pipe = app[web_backend.PIPE]
    finally:
        await runner.cleanup()

    assert len(answers) == 200
    for i, (got, want) in enumerate(zip(answers, expected)):
        assert got.dtype == torch.float32 and torch.equal(got, want), f"request {i} differs from the unsplit model"
    assert metrics["frames"]["delivered"] >= 200 and metrics["frames"]["dropped"] == 0
    assert len(metrics["stages"]) == 2 and all(s["frames"] > 0 and 0 <= s["busy"] <= 1 for s in metrics["stages"])
    assert metrics["throughput_fps"] > 0 and sum(metrics["balance"]) == len(model)
    delivered = [line for line in prometheus.splitlines() if line.startswith("partime_frames_delivered_total")]
    assert delivered and float(delivered[0].split()[-1]) >= 200
    assert not pipe.running
    await assert_clean()


async def test_bad_requests_get_400_and_the_pipeline_keeps_serving():
    app = web_backend.make_app(devices=pa.cpu_devices(2), fps=None)
    runner, url = await web_backend.serve(app)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/infer", json=[[1.0, 2.0]]) as r:  # the wrong shape
                assert r.status == 400 and "expected 4 dimensions (1, 3, 64, 64)" in await r.text()
            async with session.post(f"{url}/infer", data=b"{not json", headers={"Content-Type": "application/json"}) as r:
                assert r.status == 400 and "cannot decode" in await r.text()
            async with session.post(f"{url}/infer", data=b"x", headers={"Content-Type": "text/plain"}) as r:
                assert r.status == 400 and "send .npy bytes" in await r.text()
            async with session.post(f"{url}/infer", json={"data": [1], "dtype": "complex7"}) as r:
                assert r.status == 400 and "dtype must be one of" in await r.text()
            async with session.get(f"{url}/stream", params={"frames": "many"}) as r:
                assert r.status == 400 and "frames must be an integer" in await r.text()
            async with session.get(f"{url}/stream") as r:
                assert r.status == 503  # this app has no live stream
            x = torch.zeros(web_backend.INPUT_SHAPE)
            async with session.post(f"{url}/infer", data=npy_bytes(x), headers={"Content-Type": NPY}) as r:
                assert r.status == 200 and (await r.json())["shape"] == list(web_backend.INPUT_SHAPE)
    finally:
        await runner.cleanup()
    await assert_clean()


async def test_stream_fans_out_to_every_client_and_a_stalled_client_blocks_nobody():
    app = web_backend.make_app(devices=pa.cpu_devices(2), fps=100)
    runner, url = await web_backend.serve(app)
    try:
        async with aiohttp.ClientSession() as session:
            stalled = await session.get(f"{url}/stream")  # reads one event, then nothing more
            assert stalled.headers["Content-Type"] == "text/event-stream"
            first = await sse_events(stalled, limit=1)
            async with session.get(f"{url}/stream", params={"frames": "6"}) as r:
                events = await sse_events(r)  # ends after 6 events: the server closes the stream
            async with session.get(f"{url}/metrics") as r:
                metrics = await r.json()
            stalled.release()
    finally:
        await runner.cleanup()  # also ends the stalled client's stream
    seqs = [e["seq"] for e in events]
    assert len(events) == 6 and seqs == sorted(set(seqs)) and seqs[0] > first[0]["seq"]
    assert all(e["output"]["shape"] == list(web_backend.INPUT_SHAPE) and e["latency_ms"] >= 0 for e in events)
    assert metrics["stream"]["clients"] >= 1 and metrics["stream"]["published"] >= 7
    await assert_clean()


async def test_hub_gives_each_client_its_own_latest_channel():
    hub = web_backend.Hub()
    reader, stalled = hub.subscribe(), hub.subscribe()
    got = []
    for seq in range(10):
        hub.publish({"seq": seq})
        got.append((await reader.receive())["seq"])
    assert got == list(range(10)) and reader.dropped == 0
    assert stalled.dropped == 9 and (await stalled.receive())["seq"] == 9  # only its own stale events are lost
    hub.unsubscribe(reader)
    hub.close()
    hub.publish({"seq": 10})  # after close: ignored, never raises
    assert [e async for e in stalled] == [] and hub.published == 10
    with pytest.raises(aiohttp.web.HTTPServiceUnavailable):
        hub.subscribe()
