"""Requests per second and latency of the pipelined web backend, against the same model called
in the handler, in the same run; and the same pipelined backend on FastAPI (uvicorn) against aiohttp.

Four servers, each in its own process (started once, kept over the repeats), all serving one
request with the same model (``partime_async.cli.demo_model()``, seeded, on 1x3x64x64 inputs),
``.npy`` bytes in and out:

* ``pipelined``        examples/web_backend.py's aiohttp app (``POST /infer``), served by aiohttp's
                       own server on asyncio's event loop: ``await pipe.submit(x)``, the model split
                       over 2 CPU stages (``pa.cpu_devices(2)``, one intra-op thread each on 2 cores),
                       no live stream;
* ``fastapi``          examples/fastapi_app.py's FastAPI app (``POST /predict``), the same pipeline,
                       served by uvicorn as its docs advise for production: one worker, uvloop and
                       httptools where installed, access log off (left out, and said so, without
                       FastAPI and uvicorn: the ``fastapi`` extra);
* ``direct_loop``      aiohttp, the same request code as ``pipelined``; the handler runs
                       ``model(x)`` on the event-loop thread (torch's intra-op threads = all cores);
* ``direct_executor``  the same, the handler awaiting ``loop.run_in_executor(pool, model, x)`` on a
                       1-thread pool (same intra-op threads).

The client is this process: aiohttp on loopback, ``--concurrency`` requests in flight (default
32), ``--requests`` per run. A run's req/s is requests / wall time; p50 and p99 are over its
requests' latencies (send to answer). Variants alternate order from repeat to repeat; medians
are reported. Each server's answers are checked against the unsplit model first (with the
intra-op thread count its compute uses). The headline, printed last, is pipelined req/s over
the better baseline's, then fastapi req/s over pipelined's (FastAPI on uvicorn / aiohttp, the same
pipeline behind both).

    python bench/web.py [--quick] [--repeats N] [--requests N] [--concurrency C] [--no-record | --record]
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import io
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench._common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

try:
    import aiohttp
    from aiohttp import web
except ImportError as exc:  # pragma: no cover - aiohttp is in the dev and web extras
    raise SystemExit("bench/web.py needs aiohttp: pip install 'partime-async[web]'") from exc

import partime_async as pa
from bench import _common as C
from partime_async.devices import available_cores

ROOT = Path(__file__).resolve().parent.parent
FASTAPI = all(importlib.util.find_spec(name) is not None for name in ("fastapi", "uvicorn"))
VARIANTS = ("pipelined", "fastapi", "direct_loop", "direct_executor") if FASTAPI else \
    ("pipelined", "direct_loop", "direct_executor")
BASELINES = ("direct_loop", "direct_executor")
PATHS = {"fastapi": "/predict"}  # the others serve /infer


def load_example(name: str = "web_backend") -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fastapi_server() -> str:
    """How the fastapi variant is served: uvicorn, its event loop, its HTTP parser."""
    http = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
    return f"uvicorn/{C.loop_name('auto')}/{http}"


# -- the servers (each runs as `python bench/web.py --serve VARIANT`) ---------------------------------
def direct_app(wb: Any, model: torch.nn.Module, variant: str) -> web.Application:
    """The baseline: the same decode/encode as the pipelined app, the model called in the handler."""
    cores = available_cores()
    pool = ThreadPoolExecutor(1, thread_name_prefix="model", initializer=torch.set_num_threads, initargs=(cores,))

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    async def infer(request: web.Request) -> web.Response:
        x = await wb.read_tensor(request)
        if variant == "direct_loop":
            y = forward(x)
        else:
            y = await asyncio.get_running_loop().run_in_executor(pool, forward, x)
        return wb.tensor_response(y, request)

    async def shutdown_pool(app: web.Application) -> None:
        pool.shutdown(wait=True)

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/infer", infer)
    app.on_cleanup.append(shutdown_pool)
    return app


async def serve_forever(variant: str) -> None:
    wb = load_example()
    model = wb.make_model()
    torch.set_num_threads(available_cores())
    if variant == "fastapi":
        await serve_fastapi(model)
        return
    if variant == "pipelined":
        app = wb.make_app(model, devices=pa.cpu_devices(2), fps=None)
    else:
        app = direct_app(wb, model, variant)
    runner, url = await wb.serve(app)
    print(f"URL {url}", flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)  # until the bench closes stdin
    finally:
        await runner.cleanup()


async def serve_fastapi(model: torch.nn.Module) -> None:
    """examples/fastapi_app.py's app on uvicorn (run on uvloop where installed, by ``main``); one
    worker (this process), httptools where installed (uvicorn's ``http="auto"``), no access log."""
    fa = load_example("fastapi_app")
    app = fa.create_app(model, devices=pa.cpu_devices(2), fps=None)
    async with fa.serving(app, http="auto", access_log=False) as url:
        print(f"URL {url}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)  # until the bench closes stdin


def spawn_server(variant: str) -> subprocess.Popen:
    """A server process; it prints ``URL <base url>`` once serving, and stops when its stdin closes."""
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", variant],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def server_url(variant: str, proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    if not line.startswith("URL "):
        proc.kill()
        raise RuntimeError(f"the {variant} server did not start (exit {proc.wait()})")
    return line.split()[1]


def stop_server(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- the client ----------------------------------------------------------------------------------------
def npy_bytes(x: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, x.numpy())
    return buffer.getvalue()


async def post(session: Any, url: str, body: bytes) -> bytes:
    """One request to ``url`` (the server's base URL and its endpoint)."""
    async with session.post(url, data=body,
                            headers={"Content-Type": "application/x-npy", "Accept": "application/x-npy"}) as r:
        answer = await r.read()
        if r.status != 200:
            raise RuntimeError(f"{url} answered {r.status}: {answer[:200]!r}")
        return answer


async def load_run(session: Any, url: str, bodies: Sequence[bytes], requests: int,
                   concurrency: int) -> tuple[float, list[float]]:
    """``requests`` requests, ``concurrency`` in flight; (wall seconds, per-request latencies)."""
    todo = iter(range(requests))
    latencies: list[float] = []

    async def worker() -> None:
        for i in todo:
            t0 = time.perf_counter()
            await post(session, url, bodies[i % len(bodies)])
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0, latencies


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


async def bench(args: argparse.Namespace, requests: int, repeats: int) -> dict[str, Any]:
    wb = load_example()
    model = wb.make_model()
    xs = [torch.rand(wb.INPUT_SHAPE, generator=torch.Generator().manual_seed(i)) for i in range(16)]
    bodies = [npy_bytes(x) for x in xs]
    cores = available_cores()
    stage_threads = pa.cpu_devices(2)[0].threads
    threads = {"pipelined": stage_threads, "fastapi": stage_threads, "direct_loop": cores, "direct_executor": cores}

    procs = {variant: spawn_server(variant) for variant in VARIANTS}  # they start up in parallel
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    sessions: dict[str, Any] = {}
    try:
        for variant in VARIANTS:
            servers[variant] = procs[variant], server_url(variant, procs[variant]) + PATHS.get(variant, "/infer")
            sessions[variant] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency))
        exact = {}
        for variant in VARIANTS:  # warm-up (connections, allocator, code paths) and exactness
            url = servers[variant][1]
            answers = await asyncio.gather(*(post(sessions[variant], url, b) for b in bodies[:4]))
            exact[variant] = all(torch.equal(wb.decode_npy(a), wb.reference(model, x, threads[variant]))
                                 for a, x in zip(answers, xs[:4], strict=True))
            await load_run(sessions[variant], url, bodies, args.concurrency, args.concurrency)

        walls: dict[str, list[float]] = {v: [] for v in VARIANTS}
        p50: dict[str, list[float]] = {v: [] for v in VARIANTS}
        p99: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(repeats):
            for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                wall, latencies = await load_run(sessions[variant], servers[variant][1], bodies, requests,
                                                 args.concurrency)
                walls[variant].append(wall)
                p50[variant].append(percentile(latencies, 50))
                p99[variant].append(percentile(latencies, 99))
            print(f"  repeat {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    finally:
        for session in sessions.values():
            await session.close()
        for proc in procs.values():
            stop_server(proc)
    return {"walls": walls, "p50": p50, "p99": p99, "exact": exact}


# -- main -----------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, default_repeats=5)
    parser.add_argument("--requests", type=int, default=None, help="requests per run (default 1000; quick: 32)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)  # a server process of this bench
    args = parser.parse_args(argv)
    if args.serve:  # aiohttp's servers on asyncio's loop (as before); uvicorn on uvloop where installed
        with C.runner("auto" if args.serve == "fastapi" else "asyncio") as runner:
            runner.run(serve_forever(args.serve))
        return 0
    requests = args.requests or (32 if args.quick else 1000)
    repeats = args.repeats or (2 if args.quick else 5)
    if requests < 1 or repeats < 1 or args.concurrency < 1:
        parser.error("--requests, --repeats and --concurrency must be >= 1")

    print(f"web: {requests} POST /infer per run (1x3x64x64 float32 as .npy), {args.concurrency} in flight, "
          f"{repeats} interleaved repeats (medians), demo conv net", flush=True)
    if FASTAPI:
        print(f"fastapi: the same pipeline behind FastAPI (POST /predict) on {fastapi_server()}, one worker",
              flush=True)
    else:
        print("fastapi: not measured (FastAPI or uvicorn missing: pip install 'partime-async[fastapi]')", flush=True)
    result = asyncio.run(bench(args, requests, repeats))

    rps = {v: C.median([requests / w for w in result["walls"][v]]) for v in VARIANTS}
    p50 = {v: 1e3 * C.median(result["p50"][v]) for v in VARIANTS}
    p99 = {v: 1e3 * C.median(result["p99"][v]) for v in VARIANTS}
    noise = max(C.spread(result["walls"][v]) for v in VARIANTS)
    print(f"\n{'variant':18s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s}  spread  exact")
    for v in VARIANTS:
        print(f"{v:18s} {rps[v]:8.1f} {p50[v]:8.2f} {p99[v]:8.2f}  {C.spread(result['walls'][v]):5.0%}  "
              f"{result['exact'][v]}")
    print("(spread: (max - min) / median of a variant's wall times; large spreads mean a busy machine: rerun)")

    best = max(BASELINES, key=lambda v: rps[v])
    ratio = rps["pipelined"] / rps[best]
    numbers: dict[str, object] = {"requests": requests, "concurrency": args.concurrency, "repeats": repeats}
    for v in VARIANTS:
        numbers.update({f"{v}_rps": rps[v], f"{v}_p50_ms": p50[v], f"{v}_p99_ms": p99[v]})
    numbers.update(best_baseline=best, p50_ratio=p50["pipelined"] / p50[best])
    headline = f"req/s ratio pipelined / best baseline ({best}) = {ratio:.2f} (> 1: pipelining pays)"
    if FASTAPI:
        fastapi_ratio = rps["fastapi"] / rps["pipelined"]
        numbers.update(fastapi_server=fastapi_server(), aiohttp_loop="asyncio", fastapi_over_aiohttp=fastapi_ratio,
                       fastapi_p50_over_aiohttp=p50["fastapi"] / p50["pipelined"])
        headline += f"; req/s ratio FastAPI (uvicorn) / aiohttp, same pipeline = {fastapi_ratio:.2f}"
    numbers.update(exact="/".join(str(result["exact"][v]) for v in VARIANTS), noise=noise)
    C.record_run("web", args, argv, numbers, headline)
    return 0 if all(result["exact"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
