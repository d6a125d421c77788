"""What each rank of a multi-process test runs (``test_distributed.py`` starts the ranks).

``python distributed_cases.py CASE OUT``: every rank runs ``CASE`` (the same script on every
rank, as under torchrun); the driving rank saves what the test checks to ``OUT/result.pt``.
"""
from __future__ import annotations

import asyncio
import collections
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import partime_async as pa
from partime_async.sinks import Checkpoint, Collect

WIDTH = 32


def model(seed: int = 0, layers: int = 4) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(WIDTH, WIDTH), nn.Tanh())])


def frames(n: int, rows: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(rows, WIDTH, generator=g) for _ in range(n)]


class OnMark(nn.Module):
    """Passes frames on; on the frame whose first value is ``marker``, calls ``act`` first."""

    def __init__(self, marker: float, act: Callable[[], None]) -> None:
        super().__init__()
        self.marker, self.act = marker, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x[0, 0]) == self.marker:
            self.act()
        return x


def bad_frame() -> None:
    raise ValueError("bad frame")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # no clean-up at all


def identity() -> nn.Linear:
    """A layer that passes its input on unchanged (a stage 0 of its own to put before)."""
    layer = nn.Linear(WIDTH, WIDTH)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(WIDTH))
        layer.bias.zero_()
    return layer


def marked(xs: list[torch.Tensor], at: int, marker: float) -> list[torch.Tensor]:
    xs = [x.clone() for x in xs]
    xs[at][0, 0] = marker
    return xs


def unsplit(m: nn.Module, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [m(x) for x in xs]


async def exact(out: Path) -> None:
    """Two runs on 2 or 3 ranks (stream, then submits), and a graph whose sink only the
    driving rank opens: outputs bit-equal to the unsplit model, in order."""
    m = model()
    pa.ranks.init()
    devices = pa.ranks.one_stage_per_rank() if pa.ranks.world_size() == 3 else ["cpu", "rank1:cpu"]
    pipe = pa.Pipeline(m, devices=devices, balance=[3, 3, 2] if len(devices) == 3 else [4, 4])
    xs = frames(30)
    sink = Collect() if pipe.driving else None
    if not pipe.driving:
        for _ in range(3):
            async with pipe:
                pass
        return
    async with pipe:
        streamed = [f.data async for f in pipe.stream(xs)]
    async with pipe:
        submitted = list(await asyncio.gather(*(pipe.submit(x) for x in xs[:8])))
    await pa.run(xs >> pipe >> sink)
    torch.save({"streamed": streamed, "submitted": submitted, "graph": [f.data for f in sink.frames],
                "seqs": [f.seq for f in sink.frames], "expected": unsplit(m, xs), "stats": pipe.stats(),
                "devices": [d.name for d in pipe.devices]}, out / "result.pt")


class Skip(nn.Module):
    """Not an nn.Sequential: its first value is used again at the end (crossing the cut)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.a(x))
        return {"out": self.c(torch.cat([torch.tanh(self.b(h)), h], 1)), "h": h}


async def graph(out: Path) -> None:
    """A model split as a graph, its second stage on rank 1 (captured there on the first frame
    rank 0 sends): exact, with a value crossing the cut and a dict output."""
    torch.manual_seed(0)
    m = Skip()
    pipe = pa.Pipeline(m, devices=["cpu", "rank1:cpu"], balance=["b"])
    xs = frames(10)
    async with pipe:
        got = [f.data async for f in pipe.stream(xs)] if pipe.driving else None
    if pipe.driving:
        torch.save({"got": got, "expected": unsplit(m, xs)}, out / "result.pt")


async def shapes(out: Path) -> None:
    """Frames whose batch size changes from frame to frame, and tuples of tensors."""
    m = model()
    pipe = pa.Pipeline(m, devices=["cpu", "rank1:cpu"], balance=[4, 4], input_spec=None, output_spec=None)
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(1 + k % 3, WIDTH, generator=g) for k in range(12)]
    async with pipe:
        got = [f.data async for f in pipe.stream(xs)] if pipe.driving else None
    if pipe.driving:
        torch.save({"got": got, "expected": unsplit(m, xs)}, out / "result.pt")


def learning_config(mode: str) -> pa.OnlineLearning:
    return pa.OnlineLearning(mode=mode, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
                             loss=nn.functional.mse_loss)


async def learns(out: Path) -> None:
    """partime and stashed over two ranks give the weights (and optimiser state) that the same
    pipeline gives in one process; the driving rank's state_dict holds what rank 1 learnt."""
    results = {}
    g = torch.Generator().manual_seed(3)
    data = [pa.Frame(seq=k, data=torch.randn(1, WIDTH, generator=g), target=torch.randn(1, WIDTH, generator=g))
            for k in range(24)]
    for mode in ("partime", "stashed"):
        ranked = pa.Pipeline(model(), devices=[pa.CpuDevice(0, threads=1), "rank1:cpu"], balance=[4, 4],
                             learning=learning_config(mode))
        if not ranked.driving:
            async with ranked:
                pass
            continue
        async with ranked:
            outs = [f.data async for f in ranked.stream(_copies(data))]
        local = pa.Pipeline(model(), devices=pa.cpu_devices(2, threads=1), balance=[4, 4],
                            learning=learning_config(mode))
        async with local:
            expected = [f.data async for f in local.stream(_copies(data))]
        results[mode] = {"ranked": ranked.state_dict(), "local": local.state_dict(), "outs": outs,
                         "expected": expected, "initial": model().state_dict()}
    # Checkpoints while frames flow: the cuts of a stage on rank 1 are taken there, in order.
    ranked = pa.Pipeline(model(), devices=[pa.CpuDevice(0, threads=1), "rank1:cpu"], balance=[4, 4],
                         learning=learning_config("partime"))
    await pa.run(_copies(data) >> ranked >> Checkpoint(ranked, out / "ranked-{seq}.pt", every=12))
    if pa.ranks.rank() == 0:
        local = pa.Pipeline(model(), devices=pa.cpu_devices(2, threads=1), balance=[4, 4],
                            learning=learning_config("partime"))
        await pa.run(_copies(data) >> local >> Checkpoint(local, out / "local-{seq}.pt", every=12))
        torch.save(results, out / "result.pt")


def _copies(data: list[pa.Frame]) -> list[pa.Frame]:
    return [pa.Frame(seq=f.seq, data=f.data.clone(), target=f.target.clone()) for f in data]


async def resumes(out: Path) -> None:
    """A state learnt over two ranks, saved on rank 0 and loaded there alone into a pipeline
    whose model starts elsewhere on every rank, resumes as one process resumes it."""
    g = torch.Generator().manual_seed(5)
    data = [pa.Frame(seq=k, data=torch.randn(1, WIDTH, generator=g), target=torch.randn(1, WIDTH, generator=g))
            for k in range(24)]

    def ranked(seed: int) -> pa.Pipeline:
        return pa.Pipeline(model(seed), devices=[pa.CpuDevice(0, threads=1), "rank1:cpu"], balance=[4, 4],
                           learning=learning_config("partime"))

    first, second = ranked(0), ranked(7)
    if not first.driving:
        for _ in range(2):
            async with first:  # the serving rank never loads anything: rank 0's state travels
                pass
        return
    async with first:
        async for _ in first.stream(_copies(data[:12])):
            pass
    second.load_state_dict(first.state_dict())
    async with second:
        async for _ in second.stream(_copies(data[12:])):
            pass
    local = [pa.Pipeline(model(seed), devices=pa.cpu_devices(2, threads=1), balance=[4, 4],
                         learning=learning_config("partime")) for seed in (0, 7)]
    async with local[0]:
        async for _ in local[0].stream(_copies(data[:12])):
            pass
    local[1].load_state_dict(local[0].state_dict())
    async with local[1]:
        async for _ in local[1].stream(_copies(data[12:])):
            pass
    torch.save({"ranked": second.state_dict(), "local": local[1].state_dict()}, out / "result.pt")


async def remote_error(out: Path) -> None:
    """A stage on rank 1 raises on frame 7: with on_error="raise" the driving rank delivers
    frames 0-6, then raises naming the stage, the rank and the frame; with "skip" the frame is
    skipped and counted and the rest delivered."""
    xs = marked(frames(20), 7, 777.0)
    result = {}
    for on_error in ("raise", "skip"):
        m = nn.Sequential(identity(), OnMark(777.0, bad_frame), nn.Linear(WIDTH, WIDTH))
        pipe = pa.Pipeline(m, devices=["cpu", "rank1:cpu"], balance=[1, 2], on_error=on_error)
        if not pipe.driving:
            async with pipe:
                pass
            continue
        got: list[int] = []
        error = None
        try:
            async with pipe:
                async for f in pipe.stream(xs):
                    got.append(f.seq)
        except pa.PipelineError as exc:
            error = str(exc)
        stats = pipe.stats()
        result[on_error] = {"seqs": got, "error": error, "skipped": stats.stages[1].skipped_seqs,
                            "abandoned": stats.abandoned, "admitted": stats.admitted, "delivered": stats.delivered}
    if pa.ranks.rank() == 0:
        torch.save(result, out / "result.pt")


async def killed(out: Path) -> None:
    """Rank 1 is killed (SIGKILL) on frame 10: the driving rank stops with an error that
    names the lost rank; nothing hangs."""
    m = nn.Sequential(identity(), OnMark(555.0, die), nn.Linear(WIDTH, WIDTH))
    pipe = pa.Pipeline(m, devices=["cpu", "rank1:cpu"], balance=[1, 2])
    xs = marked(frames(40), 10, 555.0)
    if not pipe.driving:
        async with pipe:
            pass
        return
    error = None
    got = []
    try:
        async with pipe:
            async for f in pipe.stream(xs):
                got.append(f.seq)
    except pa.PipelineError as exc:
        error = str(exc)
    torch.save({"error": error, "seqs": got}, out / "result.pt")


async def interrupted(out: Path) -> None:
    """Ctrl-C on the driving rank while it streams an endless source: every rank stops."""
    pipe = pa.Pipeline(model(), devices=["cpu", "rank1:cpu"], balance=[4, 4])
    if not pipe.driving:
        async with pipe:
            pass
        (out / "rank1.done").write_text("served")
        return

    async def endless():
        g = torch.Generator().manual_seed(4)
        while True:
            await asyncio.sleep(0.005)
            yield torch.randn(1, WIDTH, generator=g)

    async with pipe:
        async for f in pipe.stream(endless()):
            if f.seq == 20:
                signal.raise_signal(signal.SIGINT)


async def cuda_stage(out: Path) -> None:
    """Stage 1 on rank 1's GPU (cuda:0: one GPU can host it): frames reach it through the host."""
    m = model()
    pipe = pa.Pipeline(m, devices=["cpu", "rank1:cuda:0"], balance=[4, 4])
    async with pipe:
        got = [f.data async for f in pipe.stream(frames(16))] if pipe.driving else None
    if pipe.driving:
        torch.save({"got": got, "expected": unsplit(model(), frames(16))}, out / "result.pt")


Pair = collections.namedtuple("Pair", "a b")


class MakesPair(nn.Module):
    def forward(self, x: torch.Tensor) -> Pair:
        return Pair(x, x * 2)


class UsesPair(nn.Module):
    def forward(self, p: Pair) -> torch.Tensor:
        return p.a + p.b


class Slow(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        return x


async def survives(out: Path) -> None:
    """What must not break the link: a run abandoned with requests still queued (the next one
    streams), a payload that cannot travel (its frames fail, skipped), a run idle for longer
    than the time the ranks had to join."""
    pa.ranks.init(timeout=3)
    slow = pa.Pipeline(nn.Sequential(identity(), Slow(), identity()), devices=["cpu", "rank1:cpu"],
                       balance=[1, 2], window=4)
    pairs = pa.Pipeline(nn.Sequential(MakesPair(), UsesPair()), devices=["cpu", "rank1:cpu"], balance=[1, 1],
                        on_error="skip", input_spec=None, output_spec=None)
    if not slow.driving:
        for pipe in (slow, slow, pairs, slow):
            async with pipe:
                pass
        return
    result = {}
    try:
        async with slow:
            async for f in slow.stream(frames(100)):
                if f.seq == 5:
                    raise RuntimeError("the reader stops")
    except RuntimeError as exc:
        result["abandoned"] = str(exc)
    async with slow:
        result["next_run"] = [f.seq async for f in slow.stream(frames(10))]
    async with pairs:
        result["pairs"] = [f.seq async for f in pairs.stream(frames(3))]
    result["pairs_skipped"] = list(pairs.stats().stages[1].skipped_seqs)
    async with slow:
        await asyncio.sleep(5)  # longer than init's 3 s
        result["after_idling"] = (await slow.submit(frames(1)[0])).shape
    torch.save(result, out / "result.pt")


async def never_joins(out: Path) -> None:
    """One rank of two starts: joining times out with a message that says what to do."""
    try:
        pa.ranks.init(timeout=3)
    except RuntimeError as exc:
        torch.save({"error": str(exc)}, out / "result.pt")


CASES = {f.__name__: f for f in (exact, graph, shapes, learns, resumes, remote_error, killed, interrupted, survives,
                                  cuda_stage, never_joins)}

if __name__ == "__main__":
    asyncio.run(CASES[sys.argv[1]](Path(sys.argv[2])))
