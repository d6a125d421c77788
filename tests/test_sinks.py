"""Sinks: files round-trip bit for bit, crashes leave no partial file, fan-out with independent policies."""
from __future__ import annotations

import asyncio
import json
import math
import os
import stat

import numpy as np
import pytest
import torch
from torch import nn

import partime_async as pa
from partime_async.checkpoint import load, save_atomic
from partime_async.sinks import AtomicFile, CallbackSink, Checkpoint, Collect, JsonlSink, NpySink, Sink, summarize
from partime_async.sources import NpyDirectory, SyntheticVideo, from_iterable
from pa_helpers import FailOn, marked


def identity_pipe(**kwargs) -> pa.Pipeline:
    return pa.Pipeline([nn.Identity(), nn.Identity()], devices=pa.cpu_devices(2), balance=[1, 1], **kwargs)


def listing(directory) -> list[str]:
    """Every entry of a folder, hidden (temporary) files included."""
    return sorted(p.name for p in directory.iterdir())


def special_frames(dtype: torch.dtype, n: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if dtype == torch.uint8:
        return [torch.randint(0, 256, (1, 3, 5, 7), dtype=dtype, generator=g) for _ in range(n)]
    frames = [torch.randn(1, 3, 5, 7, generator=g).to(dtype) * 1e3 for _ in range(n)]
    frames[0].view(-1)[:5] = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 1e-40], dtype=torch.float64).to(dtype)
    return frames


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


# -- NpySink -> NpyDirectory ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.float64])
async def test_npy_round_trip_is_bit_exact(tmp_path, dtype):
    xs = special_frames(dtype)
    sink = NpySink(tmp_path / "out")
    stats = await pa.run(from_iterable(xs) >> identity_pipe() >> sink)
    assert stats.delivered == sink.written == len(xs)
    assert listing(tmp_path / "out") == [f"frame_{i:08d}.npy" for i in range(len(xs))]  # no temporary file left
    frames = [f async for f in NpyDirectory(tmp_path / "out")]
    assert [f.seq for f in frames] == list(range(len(xs)))
    assert all(same_bits(f.data, x) for f, x in zip(frames, xs))


async def test_npy_sink_names_from_seq_read_back_by_index(tmp_path):
    xs = [pa.Frame(seq, torch.full((2, 2), float(seq))) for seq in (3, 9, 12)]
    sink = NpySink(tmp_path, prefix="out-", digits=4, fsync=False)
    await pa.run(from_iterable(xs) >> identity_pipe() >> sink)
    assert listing(tmp_path) == ["out-0003.npy", "out-0009.npy", "out-0012.npy"]
    assert sink.paths == [tmp_path / n for n in listing(tmp_path)]
    frames = [f async for f in NpyDirectory(tmp_path, order="index")]
    assert [f.seq for f in frames] == [3, 9, 12] and all(float(f.data[0, 0]) == f.seq for f in frames)


async def test_npy_sink_select_and_clear_errors(tmp_path):
    xs = [(torch.zeros(2), torch.ones(3)) for _ in range(2)]
    await pa.run(from_iterable(xs) >> identity_pipe(input_spec=None) >> NpySink(tmp_path / "a", select=lambda f: f.data[1]))
    assert [f.data.tolist() async for f in NpyDirectory(tmp_path / "a")] == [[1.0, 1.0, 1.0]] * 2
    with pytest.raises(pa.PipelineError, match="NpySink saves one tensor per frame, but frame 0 holds tuple") as info:
        await pa.run(from_iterable(xs) >> identity_pipe(input_spec=None) >> NpySink(tmp_path / "b"))
    assert info.value.component == "sink npy"
    with pytest.raises(pa.PipelineError, match="NumPy cannot hold a torch.bfloat16 tensor"):
        await pa.run(from_iterable([torch.zeros(2, dtype=torch.bfloat16)]) >> identity_pipe() >> NpySink(tmp_path / "c"))
    assert listing(tmp_path / "c") == []


async def test_npy_sink_crash_mid_write_leaves_only_complete_files(tmp_path, monkeypatch):
    real_write = AtomicFile.write

    async def failing_write(self, data):
        if self.path.name == "frame_00000003.npy":
            await real_write(self, bytes(data)[:40])  # half of it reaches the temporary file...
            raise OSError("disk full")               # ...and then the write fails
        await real_write(self, data)

    monkeypatch.setattr(AtomicFile, "write", failing_write)
    with pytest.raises(pa.PipelineError) as info:
        await pa.run(from_iterable(special_frames(torch.float32)) >> identity_pipe() >> NpySink(tmp_path))
    assert info.value.component == "sink npy" and info.value.seq == 3
    assert isinstance(info.value.__cause__, OSError)
    assert listing(tmp_path) == [f"frame_{i:08d}.npy" for i in range(3)]
    assert len([f async for f in NpyDirectory(tmp_path)]) == 3  # each one complete


# -- JsonlSink --------------------------------------------------------------------------------------------
async def test_jsonl_sink_writes_one_line_per_frame(tmp_path):
    video = SyntheticVideo(5, height=4, width=4)
    frames = [pa.Frame(f.seq, f.data, meta={"camera": "front", "loss": torch.tensor(0.25), "n": np.int64(3)})
              async for f in video]
    path = tmp_path / "sub" / "out.jsonl"
    sink = JsonlSink(path)
    await pa.run(from_iterable(frames) >> identity_pipe() >> sink)
    assert sink.committed == path and listing(path.parent) == ["out.jsonl"]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["seq"] for r in lines] == list(range(5))
    for record, frame in zip(lines, frames):
        assert record["meta"] == {"camera": "front", "loss": 0.25, "n": 3}
        assert record["latency"] == pytest.approx(record["t_done"] - record["t_capture"]) and record["latency"] >= 0
        x = frame.data
        assert record["output"] == {"shape": [1, 3, 4, 4], "dtype": "float32", "min": x.double().min().item(),
                                    "max": x.double().max().item(), "mean": x.double().mean().item()}


async def test_jsonl_sink_to_json_hook_and_summaries(tmp_path):
    sink = JsonlSink(tmp_path / "o.jsonl", to_json=lambda frame: {"sum": float(frame.data.sum())}, fsync=False)
    await pa.run(from_iterable([torch.ones(3), torch.zeros(3)]) >> identity_pipe() >> sink)
    assert [json.loads(line)["output"] for line in (tmp_path / "o.jsonl").read_text().splitlines()] == \
        [{"sum": 3.0}, {"sum": 0.0}]
    assert summarize({"a": torch.zeros(0), "b": (torch.tensor([1, 3]),)}) == {
        "a": {"shape": [0], "dtype": "float32"},
        "b": ({"shape": [2], "dtype": "int64", "min": 1.0, "max": 3.0, "mean": 2.0},)}


async def test_jsonl_sink_crash_mid_write_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    path.write_text("the previous run\n")
    real_write = AtomicFile.write
    calls = 0

    async def failing_write(self, data):
        nonlocal calls
        calls += 1
        if calls == 4:
            raise OSError("disk full")
        await real_write(self, data)

    monkeypatch.setattr(AtomicFile, "write", failing_write)
    with pytest.raises(pa.PipelineError) as info:
        await pa.run(from_iterable([torch.zeros(2)] * 8) >> identity_pipe() >> JsonlSink(path))
    assert info.value.component == "sink jsonl" and info.value.seq == 3
    assert listing(tmp_path) == ["out.jsonl"] and path.read_text() == "the previous run\n"


async def test_jsonl_sink_leaves_no_file_when_another_component_fails(tmp_path):
    def gated_source(written: asyncio.Event):
        async def frames():
            for i in range(4):
                yield marked(i)
            await written.wait()  # the sink has written lines before the failure comes:
            while sink.written < 4:  # frame 3's write has returned too, not only begun
                await asyncio.sleep(0.001)
            for i in range(4, 10):
                yield marked(i)
        return frames()

    def noting(event: asyncio.Event):
        def to_json(frame):
            if frame.seq == 3:
                event.set()
            return None
        return to_json

    written = asyncio.Event()
    sink = JsonlSink(tmp_path / "stage.jsonl", to_json=noting(written))
    with pytest.raises(pa.PipelineError, match="stage 1"):
        await pa.run(gated_source(written) >> pa.Pipeline([nn.Identity(), FailOn(6)], devices=pa.cpu_devices(2),
                                                          balance=[1, 1]) >> sink)
    assert sink.written >= 4 and listing(tmp_path) == []

    class Broken(Sink):
        async def write(self, frame):
            if frame.seq == 5:
                raise RuntimeError("broken sink")

    written = asyncio.Event()
    sink = JsonlSink(tmp_path / "sink.jsonl", to_json=noting(written))
    with pytest.raises(pa.PipelineError, match="broken sink"):
        await pa.run(gated_source(written) >> identity_pipe() >> [sink, Broken(name="broken")])
    assert sink.written >= 4 and listing(tmp_path) == []


async def test_jsonl_sink_cancelled_mid_stream_leaves_no_file(tmp_path):
    third = asyncio.Event()

    def to_json(frame):
        if frame.seq == 3:
            third.set()
        return None

    sink = JsonlSink(tmp_path / "out.jsonl", to_json=to_json)
    run = asyncio.create_task(pa.run(SyntheticVideo(None, height=4, width=4) >> identity_pipe() >> sink))
    await third.wait()
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert sink.written >= 3 and listing(tmp_path) == []


async def test_atomic_file(tmp_path):
    async with AtomicFile(tmp_path / "a.bin") as f:
        await f.write(b"abc")
        assert listing(tmp_path) == [f".a.bin.{f.tmp.name.split('.')[-2]}.tmp"]
    assert (tmp_path / "a.bin").read_bytes() == b"abc"
    with pytest.raises(KeyError):
        async with AtomicFile(tmp_path / "a.bin", fsync=False) as f:
            await f.write(b"new")
            raise KeyError("boom")
    assert listing(tmp_path) == ["a.bin"] and (tmp_path / "a.bin").read_bytes() == b"abc"
    f = AtomicFile(tmp_path / "b.bin")
    with pytest.raises(RuntimeError, match="open"):
        await f.write(b"x")
    await f.open()
    await f.discard()
    await f.discard()
    assert listing(tmp_path) == ["a.bin"]


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=oct)
async def test_atomic_files_get_the_mode_of_a_plain_open(tmp_path, umask):
    """Not mkstemp's 0o600: 0o666 less the umask, as open() and torch.save would give."""
    previous = os.umask(umask)
    try:
        save_atomic({"w": torch.zeros(1)}, tmp_path / "ckpt.pt")
        async with AtomicFile(tmp_path / "a.bin") as f:
            await f.write(b"abc")
        await pa.run(from_iterable([torch.zeros(2)]) >> identity_pipe() >> [NpySink(tmp_path / "npy", fsync=False),
                                                                            JsonlSink(tmp_path / "log.jsonl")])
    finally:
        os.umask(previous)
    for path in (tmp_path / "ckpt.pt", tmp_path / "a.bin", tmp_path / "npy" / "frame_00000000.npy",
                 tmp_path / "log.jsonl"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


# -- Checkpoint paths -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["run-{step}.pt", "run-{}.pt", "c{1}.pt", "c{.pt", "c}.pt", "c-{seq:q}.pt"])
def test_checkpoint_rejects_a_bad_file_name_template_when_made(tmp_path, name):
    with pytest.raises(ValueError, match=r"only field is \{seq\}.*literal brace as '\{\{' or '\}\}'"):
        Checkpoint(identity_pipe(), tmp_path / name, every=2)


def test_checkpoint_refuses_seq_in_a_folder(tmp_path):
    with pytest.raises(ValueError, match=r"only the file name may hold \{seq\}"):
        Checkpoint(identity_pipe(), tmp_path / "runs" / "{seq}" / "state.pt", every=2)


def test_checkpoint_refuses_a_drop_policy(tmp_path):
    with pytest.raises(ValueError, match="Checkpoint sink sees every frame.*policy is 'block', not 'latest'"):
        Checkpoint(identity_pipe(), tmp_path / "state.pt", every=2, policy="latest")


async def test_a_file_sink_aimed_at_a_folder_fails_before_the_stream_runs(tmp_path):
    read = []

    def frames():
        for i in range(50):
            read.append(i)
            yield torch.zeros(1)

    with pytest.raises(pa.PipelineError, match="sink jsonl failed.*IsADirectoryError.*give the path of a file"):
        await pa.run(frames() >> identity_pipe() >> JsonlSink(tmp_path))
    assert read == []  # before: the error came at the rename, after the whole stream
    with pytest.raises(IsADirectoryError, match="give the path of a file"):
        save_atomic({"a": 1}, tmp_path)
    assert listing(tmp_path) == []


async def test_a_jsonl_sink_open_already_is_refused(tmp_path):
    sink = JsonlSink(tmp_path / "out.jsonl")
    await sink.open()
    with pytest.raises(RuntimeError, match="already open"):
        await sink.open()
    await sink.abort()
    assert listing(tmp_path) == []  # the first temporary file is not left behind
    (tmp_path / "taken").mkdir()
    sink = JsonlSink(tmp_path / "taken")
    with pytest.raises(IsADirectoryError):
        await sink.open()
    sink.path = tmp_path / "out.jsonl"  # a sink that failed to open may be opened again
    results = await asyncio.gather(sink.open(), sink.open(), return_exceptions=True)  # two graphs at once
    assert results[0] is None and isinstance(results[1], RuntimeError)
    await sink.abort()
    assert listing(tmp_path) == ["taken"]
    await sink.open()
    await sink.write(pa.Frame(0, torch.zeros(1)))
    await sink.close()
    assert sink.committed == tmp_path / "out.jsonl"


@pytest.mark.parametrize("fsync", [True, False])
async def test_a_commit_with_fsync_also_flushes_the_folder(tmp_path, monkeypatch, fsync):
    """A rename is durable only once the folder's entry is on the disk."""
    import partime_async.checkpoint as checkpoint
    import partime_async.sinks.files as files

    flushed = []
    monkeypatch.setattr(files, "_fsync_folder", lambda folder: _record(flushed, folder))
    f = AtomicFile(tmp_path / "a.bin", fsync=fsync)
    await f.open()
    await f.write(b"x")
    await f.commit()
    assert flushed == ([tmp_path] if fsync else [])
    synced = []
    monkeypatch.setattr(checkpoint, "fsync_folder", synced.append)
    save_atomic({"a": 1}, tmp_path / "s.pt")
    assert synced == [tmp_path]
    monkeypatch.undo()
    checkpoint.fsync_folder(tmp_path)  # the real one, on a real folder


async def _record(seen: list, folder) -> None:
    seen.append(folder)


async def test_checkpoint_formats_only_the_file_name_and_its_folders_are_literal(tmp_path):
    folder = tmp_path / "exp{1}" / "{x}"
    pipe = identity_pipe()
    numbered = Checkpoint(pipe, folder / "c-{seq:03d}.pt", every=2)
    literal = Checkpoint(pipe, folder / "last{{x}}.pt", every=3)
    await pa.run(from_iterable([torch.zeros(2)] * 6) >> pipe >> [numbered, literal])
    assert numbered.saved == [folder / "c-001.pt", folder / "c-003.pt", folder / "c-005.pt"]
    assert literal.saved == [folder / "last{x}.pt"] * 2
    assert sorted(p.name for p in folder.iterdir()) == ["c-001.pt", "c-003.pt", "c-005.pt", "last{x}.pt"]
    assert load(folder / "last{x}.pt")["position"] == 6


# -- fan-out --------------------------------------------------------------------------------------------
async def test_fan_out_sinks_have_independent_backpressure_policies(tmp_path):
    n = 12
    gate = asyncio.Event()

    class Fast(Collect):
        async def write(self, frame):
            await super().write(frame)
            if frame.seq == n - 1:
                gate.set()  # the slow sinks stay stuck on their first frame until all n went by

    def slow(name, **kwargs):
        seen = []

        async def write(frame):
            seen.append(frame.seq)
            await gate.wait()
        sink = CallbackSink(write, name=name, **kwargs)
        sink.seen = seen
        return sink

    fast = Fast()
    latest = slow("latest", policy="latest")
    oldest = slow("oldest", policy="drop_oldest", capacity=3)
    jsonl = JsonlSink(tmp_path / "all.jsonl", fsync=False)
    stats = await pa.run(from_iterable([torch.zeros(2)] * n) >> identity_pipe() >> [fast, latest, oldest, jsonl])

    assert stats.delivered == n
    assert [f.seq for f in fast.frames] == list(range(n)) and fast.dropped == 0
    assert len((tmp_path / "all.jsonl").read_text().splitlines()) == n and jsonl.dropped == 0
    for sink, kept in ((latest, 1), (oldest, 3)):
        assert sink.written + sink.dropped == n
        assert sink.written == 1 + kept and sink.dropped == n - 1 - kept  # the first, then the newest `kept`
        assert sink.seen == sorted(sink.seen) and sink.seen[-kept:] == list(range(n - kept, n))


async def test_jsonl_sink_commits_on_close_and_discards_on_abort_or_a_failed_write(tmp_path):
    """The outcome is said, not guessed: close() commits, abort() discards (what pa.run calls
    after a failure anywhere), and a write that failed makes close() discard. A close() that
    runs while some unrelated exception is being handled still commits (a graph run from an
    ``except`` block succeeded all the same)."""
    sink = JsonlSink(tmp_path / "out.jsonl")
    await sink.open()
    await sink.write(pa.Frame(0, torch.zeros(1)))
    await sink.abort()
    assert listing(tmp_path) == []

    failing = JsonlSink(tmp_path / "bad.jsonl", to_json=lambda frame: 1 / 0)
    await failing.open()
    with pytest.raises(ZeroDivisionError):
        await failing.write(pa.Frame(0, torch.zeros(1)))
    await failing.close()
    assert listing(tmp_path) == []

    await sink.open()
    try:
        raise KeyError("unrelated")
    except KeyError:
        await sink.write(pa.Frame(0, torch.zeros(1)))
        await sink.close()
    assert listing(tmp_path) == ["out.jsonl"]


async def test_atomic_file_cancelled_while_closing_is_closed_and_gone_when_its_task_ends(tmp_path, monkeypatch):
    """A sink task cancelled while aiofiles' thread closes its temporary file waits for the
    close: when the task has ended no descriptor is left open and no file is left behind."""
    import os

    import aiofiles.threadpool.binary as binary

    real_close = binary.AsyncBufferedIOBase.close

    async def slow_close(self):
        await asyncio.sleep(0.1)  # the cancellation arrives while this close is under way
        return await real_close(self)

    monkeypatch.setattr(binary.AsyncBufferedIOBase, "close", slow_close)
    file = AtomicFile(tmp_path / "out.bin", fsync=False)
    await file.open()
    await file.write(b"partial")
    fd_path = str(file.tmp)
    task = asyncio.ensure_future(file.discard())
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    open_now = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not [p for p in open_now if p.startswith(fd_path)]
    assert listing(tmp_path) == []


async def test_a_jsonl_file_is_committed_only_when_the_whole_graph_succeeds(tmp_path):
    """A file sink that has written every frame still leaves no file when another sink of
    the graph fails afterwards: sinks close once the whole graph has ended."""
    async def fail_on_last(frame: pa.Frame) -> None:
        await asyncio.sleep(0.001)  # behind the file sink
        if frame.seq == 19:
            raise RuntimeError("upload failed on the last frame")

    path = tmp_path / "log.jsonl"
    pipe = pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1))
    with pytest.raises(pa.PipelineError, match="upload failed"):
        await pa.run(from_iterable(marked(i) for i in range(20)) >> pipe
                     >> [JsonlSink(path, fsync=False), CallbackSink(fail_on_last, capacity=32)])
    assert not path.exists() and list(tmp_path.iterdir()) == []
    # the failed run leaves this task as it found it: not "being cancelled" (Python 3.11's
    # TaskGroup left it so when a sink failed after the group's body had ended)
    assert asyncio.current_task().cancelling() == 0

    try:  # a run from an except block (say, a fallback) that succeeds commits all the same
        raise KeyError("unrelated")
    except KeyError:
        await pa.run(from_iterable(marked(i) for i in range(20)) >> pipe >> [JsonlSink(path, fsync=False), Collect()])
    assert len(path.read_text().splitlines()) == 20


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest", "latest"])
async def test_a_cut_whose_frame_is_dropped_moves_to_the_next_frame(tmp_path, policy):
    """Overload is when drop policies act, and when a checkpoint matters: a checkpoint cut due
    on a frame that the ingress drops is taken on the next frame admitted instead of lost.
    Stage 0 is held shut while 30 frames come (most dropped, cuts of both sinks among them);
    once all is out, frame 30 comes (the 31st admitted: due for neither period). The dropped
    cuts are taken on the newest frame the ingress kept: 29 with drop_oldest / latest, an
    early one with drop_newest (a cut taken earlier than due, never lost)."""
    import threading

    from pa_helpers import Gate

    gate = threading.Event()
    out = Collect()

    async def frames():
        for i in range(30):
            yield marked(i)
            await asyncio.sleep(0)
        gate.set()
        while len(out.frames) < pipe.stats().admitted - pipe.stats().dropped:  # everything admitted is out
            await asyncio.sleep(0.001)
        yield marked(30)

    pipe = pa.Pipeline([Gate(gate), nn.Identity()], devices=pa.cpu_devices(2, inline=False), balance=[1, 1],
                       capacity=1, policy=policy)
    fours, fives = (Checkpoint(pipe, tmp_path / f"p{n}" / "c-{seq}.pt", every=n) for n in (4, 5))
    stats = await asyncio.wait_for(pa.run(frames() >> pipe >> [out, fours, fives]), 60)
    assert stats.dropped > 10 and out.frames[-1].seq == 30
    kept = out.frames[-2].seq  # the newest frame of the burst that was not dropped
    for sink in (fours, fives):
        assert load(sink.saved[-1])["position"] - 1 == kept, [p.name for p in sink.saved]


async def test_states_and_checkpoints_are_keyed_as_the_models_own_state_dict(tmp_path):
    """A named nn.Sequential's state_dict, a pipeline's and a checkpoint's have the same keys:
    ``model.load_state_dict(load(path)["model"])`` works; a state keyed by layer number
    (as saved before) still loads."""
    from collections import OrderedDict

    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(enc=nn.Linear(4, 8), act=nn.ReLU(), dec=nn.Linear(8, 4)))
    learning = pa.OnlineLearning(loss=nn.MSELoss(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1), mode="partime")
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(2), balance=[2, 1], learning=learning)
    assert pipe.state_dict()["model"].keys() == model.state_dict().keys()
    xs = [pa.Frame(i, torch.randn(1, 4), target=torch.randn(1, 4)) for i in range(8)]
    checkpoint = Checkpoint(pipe, tmp_path / "c-{seq}.pt", every=4)
    await pa.run(from_iterable(xs) >> pipe >> checkpoint)
    state = load(checkpoint.saved[-1])
    assert state["model"].keys() == model.state_dict().keys()
    fresh = nn.Sequential(OrderedDict(enc=nn.Linear(4, 8), act=nn.ReLU(), dec=nn.Linear(8, 4)))
    fresh.load_state_dict(state["model"])

    numbered = {f"{0 if k.startswith('enc') else 2}.{k.split('.', 1)[1]}": v for k, v in state["model"].items()}
    other = pa.Pipeline(fresh, devices=pa.cpu_devices(2), balance=[2, 1], learning=learning)
    other.load_state_dict(dict(state, model=numbered))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state["model"].items())


async def test_a_run_cancelled_while_its_sinks_close_still_closes_every_one(tmp_path):
    """Cleanup is never cut short: cancelled while the first sink closes (the graph itself
    had succeeded), the run still closes the others (the file sink commits its complete
    file, a checkpoint sink stops asking for cuts), then the cancellation goes on."""
    closing, release = asyncio.Event(), asyncio.Event()

    class SlowClose(Collect):
        async def close(self) -> None:
            closing.set()
            await release.wait()

    pipe = pa.Pipeline([nn.Identity()], devices=pa.cpu_devices(1))
    slow, jsonl = SlowClose(), JsonlSink(tmp_path / "x.jsonl", fsync=False)
    checkpoint = Checkpoint(pipe, tmp_path / "c.pt", every=2)
    run = asyncio.create_task(pa.run(from_iterable(marked(i) for i in range(4)) >> pipe >> [slow, jsonl, checkpoint]))
    await closing.wait()
    run.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert len((tmp_path / "x.jsonl").read_text().splitlines()) == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    assert not pipe.cuts.periods


@pytest.mark.parametrize("scheduler", [
    lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 0.9 ** step),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.1, total_steps=100),
    lambda o: torch.optim.lr_scheduler.SequentialLR(o, [torch.optim.lr_scheduler.LinearLR(o),
                                                       torch.optim.lr_scheduler.ExponentialLR(o, 0.9)], [3]),
], ids=["lambda", "one-cycle", "sequential"])
async def test_a_learning_checkpoint_holds_only_plain_data_and_loads_without_running_code(tmp_path, scheduler):
    """Checkpoints (weights, optimiser and scheduler states, the position) load with
    ``weights_only=True``, so a resumed pipeline gets exactly the state it saved."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
    learning = pa.OnlineLearning(loss=nn.MSELoss(), optimizer=lambda p: torch.optim.Adam(p, 1e-3, amsgrad=True),
                                 scheduler=scheduler, mode="stashed")
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(2), balance=[2, 1], learning=learning)
    xs = [pa.Frame(i, torch.randn(2, 4), target=torch.randn(2, 4)) for i in range(8)]
    checkpoint = Checkpoint(pipe, tmp_path / "c.pt", every=4)
    await pa.run(from_iterable(xs) >> pipe >> checkpoint)
    state = load(checkpoint.saved[-1])
    assert state["position"] == 8 and state["model"].keys() == model.state_dict().keys()
    resumed = pa.Pipeline(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4)),
                          devices=pa.cpu_devices(2), balance=[2, 1], learning=learning)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict()["model"].values(), state["model"].values()))


class _RunsCode:
    ran = False

    def __reduce__(self):
        return (_RunsCode._run, ())

    @staticmethod
    def _run():
        _RunsCode.ran = True
        return "ran"


def test_a_checkpoint_carrying_a_pickled_object_is_refused_and_runs_nothing(tmp_path):
    import pickle

    path = save_atomic({"model": {"w": torch.zeros(2)}, "extra": _RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError, match=r"evil\.pt: this checkpoint holds more than tensors, numbers, "
                                                     r"strings and plain containers.*weights_only=False"):
        load(path)
    assert not _RunsCode.ran
