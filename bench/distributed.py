"""Two ranks on one host: our stages on two processes against torch.distributed.pipelining.

The model: 8 x (Linear(1024, 1024) + ReLU), batch-1 frames of shape (1, 1024), inference
under ``torch.no_grad()``. Two processes started as ``torchrun --nproc-per-node 2`` starts
them (this script launches them: ``python bench/distributed.py``), gloo on loopback, one
intra-op thread per process. In the same run, with interleaved repeats (order alternating),
medians, on the same processes and frames:

* ``ours``: ``Pipeline(model, devices=[CpuDevice(0, threads=1), "rank1:cpu"], balance=[8, 8])``:
  stage 0 on rank 0, stage 1 on rank 1, every output delivered back on rank 0 (where a
  stream's reader is); rank 1 serves. Also measured while it streams: the lag of rank 0's
  event loop (a task asks to sleep 5 ms and records how late it wakes; p99; goal <= 5 ms).
* ``peer_mbN``: torch.distributed.pipelining as its docs recommend: ``pipeline(model,
  mb_args=..., split_spec={"8": SplitPoint.BEGINNING})``, ``build_stage``, ``ScheduleGPipe``
  with N = 1, 8, 32 micro-batches of one frame per ``step()``; outputs stay on rank 1 (it
  delivers nothing back: one message per frame fewer than ours). The best N is the peer.
* ``unsplit_1t`` / ``unsplit_2t``: the model on rank 0 alone (rank 1 waits), 1 and 2 threads.
* ``one_process``: our pipeline in rank 0's process, ``cpu_devices(2, threads=1)``.
* ``ceiling`` (a reference): the two halves on two plain threads of rank 0, one intra-op
  thread each, no hand-off at all (``_common.on_threads``).

Goals: ours >= 0.9 of the ceiling and >= 1.7x the best peer; at least 1.5x. The last line
printed is ours / best peer.

    python bench/distributed.py [--quick] [--repeats N] [--frames N] [--no-record | --record]
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

WIDTH, LAYERS = 1024, 8
PEER_MICROBATCHES = (1, 8, 32)


def build_model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(LAYERS) for m in (nn.Linear(WIDTH, WIDTH), nn.ReLU())]).eval()


# -- what each rank runs ------------------------------------------------------------------------
def worker(n_frames: int, repeats: int, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import ScheduleGPipe, SplitPoint, pipeline

    import partime_async as pa

    pa.ranks.init()
    rank = dist.get_rank()
    torch.set_num_threads(1)
    model = build_model()
    g = torch.Generator().manual_seed(1)
    frames = [torch.randn(1, WIDTH, generator=g) for _ in range(n_frames)]
    half = LAYERS  # children of the Sequential: 2 per layer
    lags: list[float] = []

    async def ours_driving() -> float:
        pipe = pa.Pipeline(model, devices=[pa.CpuDevice(0, threads=1), "rank1:cpu"], balance=[half, half],
                           metrics=False)
        stop = asyncio.Event()
        monitors = []
        try:
            return await C.time_stream(pipe, frames, on_start=lambda: monitors.append(
                asyncio.create_task(_lag(stop, lags))), on_end=stop.set)
        finally:
            stop.set()
            await asyncio.gather(*monitors)

    async def ours_serving() -> float:
        pipe = pa.Pipeline(model, devices=[pa.CpuDevice(0, threads=1), "rank1:cpu"], balance=[half, half])
        async with pipe:
            pass
        return 0.0

    def ours() -> float:
        return asyncio.run(ours_driving() if rank == 0 else ours_serving())

    def peer(microbatches: int):
        example = torch.randn(1, WIDTH)
        # pipeline() rewrites the module it traces (a second call on it recurses): a copy each
        pipe = pipeline(copy.deepcopy(model), mb_args=(example,), split_spec={str(half): SplitPoint.BEGINNING})
        stage = pipe.build_stage(rank, device=torch.device("cpu"))
        schedule = ScheduleGPipe(stage, n_microbatches=microbatches)
        batches = [torch.cat(frames[i:i + microbatches]) for i in range(0, n_frames - microbatches + 1, microbatches)]

        def run() -> float:
            dist.barrier()
            t0 = time.perf_counter()
            with torch.no_grad():
                for batch in batches:
                    if rank == 0:
                        schedule.step(batch)
                    else:
                        schedule.step()
            dist.barrier()  # rank 1 has the last outputs
            return (time.perf_counter() - t0) * n_frames / (len(batches) * microbatches)

        return run

    def on_rank0(fn):
        def run() -> float:
            dist.barrier()
            seconds = fn() if rank == 0 else 0.0
            dist.barrier()
            return seconds

        return run

    def unsplit(threads: int):
        def run() -> float:
            torch.set_num_threads(threads)
            try:
                with torch.no_grad():
                    return C.time_call(lambda: [model(x) for x in frames])
            finally:
                torch.set_num_threads(1)

        return on_rank0(run)

    async def one_process() -> float:
        pipe = pa.Pipeline(model, devices=pa.cpu_devices(2, threads=1), balance=[half, half], metrics=False)
        return await C.time_stream(pipe, frames)

    def ceiling() -> float:
        first, second = model[:half], model[half:]
        mids = [first(x) for x in frames[:1]]
        mid = mids[0]

        def stage(m, x):
            def work() -> None:
                with torch.no_grad():
                    for _ in range(n_frames):
                        m(x)
            return work

        return C.on_threads([stage(first, frames[0]), stage(second, mid.detach())])

    variants = {"ours": ours, **{f"peer_mb{m}": peer(m) for m in PEER_MICROBATCHES},
                "unsplit_1t": unsplit(1), "unsplit_2t": unsplit(2),
                "one_process": on_rank0(lambda: asyncio.run(one_process())), "ceiling": on_rank0(ceiling)}
    results = C.interleaved(variants, repeats, verbose=rank == 0)
    if rank == 0:
        (out / "results.json").write_text(json.dumps({"seconds": results, "lags": lags}))
    dist.barrier()


LAG_PERIOD_S = 0.005


async def _lag(stop: asyncio.Event, lags: list[float]) -> None:
    """How late the loop wakes from a sleep of :data:`LAG_PERIOD_S`, until ``stop`` (seconds,
    appended). Not much shorter: every wake-up is loop work that the frames would not cost."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t0 = loop.time()
        await asyncio.sleep(LAG_PERIOD_S)
        lags.append(loop.time() - t0 - LAG_PERIOD_S)


# -- the launcher -------------------------------------------------------------------------------
def launch(n_frames: int, repeats: int, out: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), __file__, "--worker", str(n_frames), str(repeats), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"distributed: the ranks failed ({done.returncode}):\n{done.stdout[-4000:]}\n"
                         f"{done.stderr[-4000:]}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, default_repeats=3)
    parser.add_argument("--frames", type=int, default=None, help="frames per run (default 2000; quick: 64)")
    args = parser.parse_args(argv)
    n_frames = args.frames or (64 if args.quick else 2000)
    repeats = args.repeats or (2 if args.quick else 3)
    if repeats < 1 or n_frames < 32:
        parser.error("--repeats must be >= 1 and --frames >= 32")
    print(f"distributed: {LAYERS} x (Linear({WIDTH}, {WIDTH}) + ReLU), {n_frames} batch-1 frames, 2 ranks "
          f"(gloo, loopback, 1 intra-op thread each), {repeats} interleaved repeats (medians)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        launch(n_frames, repeats, Path(tmp))
        data = json.loads((Path(tmp) / "results.json").read_text())
    fps = {name: C.throughput(n_frames, C.median(seconds)) for name, seconds in data["seconds"].items()
           if name in ("ours", "ceiling") or seconds}
    peers = {name: value for name, value in fps.items() if name.startswith("peer")}
    best_peer = max(peers, key=peers.__getitem__)
    lags_ms = sorted(1e3 * v for v in data["lags"])
    p99 = lags_ms[min(len(lags_ms) - 1, int(0.99 * len(lags_ms)))] if lags_ms else float("nan")
    for name, value in fps.items():
        print(f"  {name:<12} {value:8.1f} frames/s", flush=True)
    print(f"  rank 0's loop lag while ours streams: p50 {statistics.median(lags_ms):.2f} ms, p99 {p99:.2f} ms "
          f"(goal <= 5 ms)", flush=True)
    ratio_peer = fps["ours"] / peers[best_peer]
    ratio_ceiling = fps["ours"] / fps["ceiling"]
    numbers = {**{f"{k}_fps": round(v, 1) for k, v in fps.items()}, "loop_lag_p99_ms": round(p99, 2),
               "ours_over_ceiling": round(ratio_ceiling, 3)}
    headline = (f"ours / best peer ({best_peer}) = {ratio_peer:.2f} (goal >= 1.7, at least 1.5); "
                f"ours / ceiling = {ratio_ceiling:.2f} (goal >= 0.9)")
    C.record_run("distributed", args, argv, numbers, headline)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
    else:
        sys.exit(main())
