"""Perfetto traces and timeline pictures: valid JSON with the expected tracks and one flow per
frame, a PNG that is really a PNG, and the demo's --trace / --plot."""
import io
import json
from collections import Counter, defaultdict

import pytest
import torch
from torch import nn

import partime_async as pa
from partime_async import cli
from partime_async.observe import Span
from partime_async.observe import timeline
from partime_async.observe import chrome_trace
from pa_helpers import Sleep, run_stream

N = 20
PNG = b"\x89PNG\r\n\x1a\n"


def sleepy(*seconds: float) -> nn.Sequential:
    return nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), Sleep(s)) for s in seconds])


def xs(n: int = N) -> list[torch.Tensor]:
    return [torch.randn(1, 4) for _ in range(n)]


def load(path) -> list[dict]:
    with open(path) as f:
        return json.load(f)["traceEvents"]


def tracks(events: list[dict]) -> dict[int, str]:
    return {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}


def flows(events: list[dict]) -> dict[int, list[dict]]:
    by_id = defaultdict(list)
    for e in events:
        if e["ph"] in ("s", "t", "f"):
            by_id[e["id"]].append(e)
    return by_id


def check_flows(events: list[dict], n_frames: int, stages: int) -> None:
    """Exactly one flow per frame, s (t…) f, each point inside a forward slice of that frame,
    following the stages in order."""
    slices = [e for e in events if e["ph"] == "X"]
    by_id = flows(events)
    assert sorted(by_id) == list(range(n_frames))
    names = tracks(events)
    for seq, points in by_id.items():
        phases = [p["ph"] for p in points]
        assert phases.count("s") == 1 and phases.count("f") == 1
        assert phases == (["s", *["t"] * (stages - 2), "f"] if stages > 1 else ["s", "f"])
        assert [p["ts"] for p in points] == sorted(p["ts"] for p in points)
        stages_seen = []
        for p in points:
            inside = [x for x in slices if x["tid"] == p["tid"] and x["args"]["seq"] == seq
                      and x["ts"] <= p["ts"] <= x["ts"] + x["dur"]]
            assert len(inside) == 1 and inside[0]["name"] == "compute"
            stages_seen.append(names[p["tid"]])
        if stages > 1:
            assert stages_seen == [f"stage {k} (cpu:{k})" for k in range(stages)]


@pytest.mark.parametrize("inline", [False, True])
async def test_trace_has_a_track_per_stage_and_one_flow_per_frame(tmp_path, inline):
    pipe = pa.Pipeline(sleepy(0.001, 0.002, 0.001), devices=pa.cpu_devices(3, threads=1, inline=inline),
                       balance=[1, 1, 1])
    await run_stream(pipe, xs())
    path = pipe.export_trace(tmp_path / "trace.json")
    events = load(path)
    names = tracks(events)
    assert sorted(names.values()) == sorted(["stage 0 (cpu:0)", "stage 1 (cpu:1)", "stage 2 (cpu:2)", "deliver"])
    tid_of = {name: tid for tid, name in names.items()}
    compute = Counter(e["tid"] for e in events if e["ph"] == "X" and e["name"] == "compute")
    assert compute == {tid_of[f"stage {k} (cpu:{k})"]: N for k in range(3)}
    assert all(isinstance(e["args"]["seq"], int) and e["dur"] >= 0 for e in events if e["ph"] == "X")
    delivered = [e for e in events if e["ph"] == "i"]
    assert sorted(e["args"]["seq"] for e in delivered) == list(range(N))
    assert {e["tid"] for e in delivered} == {tid_of["deliver"]}
    assert min(e["ts"] for e in events if "ts" in e) >= 0
    check_flows(events, N, 3)
    waits = Counter((e["name"], e["ph"]) for e in events if e.get("cat") == "wait")
    assert all(waits[f"stage {k} wait", "b"] == waits[f"stage {k} wait", "e"] == N for k in range(3))


async def test_frames_of_equal_seq_get_a_flow_each(tmp_path):
    """Two streams in one run number their frames 0..N-1 each: 2N flows, the second stream's
    with ids seq + N (ints: Perfetto drops a flow whose string id is not hex), each through
    its own frame's slices."""
    pipe = pa.Pipeline(sleepy(0.001, 0.001), devices=pa.cpu_devices(2, threads=1), balance=[1, 1])
    async with pipe:
        for _ in range(2):
            async for _ in pipe.stream(xs()):
                pass
    events = load(pipe.export_trace(tmp_path / "t.json"))
    by_id = flows(events)
    assert sorted(by_id) == list(range(2 * N))
    slices = [e for e in events if e["ph"] == "X"]
    for flow_id, points in by_id.items():
        assert [p["ph"] for p in points] == ["s", "f"]
        seq = flow_id % N
        for p in points:
            inside = [x for x in slices if x["tid"] == p["tid"] and x["ts"] <= p["ts"] <= x["ts"] + x["dur"]]
            assert len(inside) == 1 and inside[0]["args"]["seq"] == seq
    waits = [e for e in events if e.get("cat") == "wait"]
    assert len({e["id"] for e in waits}) == 2 * 2 * N  # a wait per frame and stage, each its own id
    assert Counter(e["ph"] for e in waits) == {"b": 4 * N, "e": 4 * N}


async def test_one_stage_flows_and_learning_slices(tmp_path):
    learning = pa.OnlineLearning(loss=nn.MSELoss(), optimizer=lambda p: torch.optim.SGD(p, lr=1e-3), mode="stashed")
    pipe = pa.Pipeline(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), devices=pa.cpu_devices(1, threads=1),
                       balance=[2], learning=learning)
    await run_stream(pipe, [pa.Frame(i, torch.randn(1, 4), target=torch.randn(1, 4)) for i in range(N)])
    events = load(pipe.export_trace(tmp_path / "t.json"))
    kinds = Counter(e["name"] for e in events if e["ph"] == "X")
    assert kinds == {"compute": N, "backward": N, "step": N}
    check_flows(events, N, 1)  # the flow follows the forwards only


def test_copy_streams_get_their_own_tracks():
    # The spans a CUDA pipeline records (synthetic here: no GPU needed to check the layout).
    spans = []
    for seq in range(3):
        t = 0.01 * seq
        spans += [Span(0, "h2d", seq, t, t + 0.001), Span(0, "compute", seq, t + 0.001, t + 0.004),
                  Span(1, "d2d", seq, t + 0.004, t + 0.005), Span(1, "compute", seq, t + 0.005, t + 0.008),
                  Span(1, "d2h", seq, t + 0.008, t + 0.009), Span(-1, "deliver", seq, t, t + 0.0095)]
    doc = chrome_trace(spans, ["stage 0 (cuda:0)", "stage 1 (cuda:1)"])
    events = doc["traceEvents"]
    assert [tracks(events)[tid] for tid in sorted(tracks(events))] == [
        "stage 0 (cuda:0)", "stage 0 copy-in", "stage 1 (cuda:1)", "stage 1 copy-in", "stage 1 copy-out", "deliver"]
    by_id = flows(events)
    assert sorted(by_id) == [0, 1, 2]
    assert all([p["ph"] for p in points] == ["s", "t", "t", "t", "f"] for points in by_id.values())
    json.dumps(doc)  # serialisable as is


def test_flow_ids_of_repeated_huge_seqs_stay_exact_ints():
    spans = [Span(0, "compute", seq, t, t + 0.001) for t, seq in enumerate([0, 1 << 62, 0, 1 << 62, 0])]
    flows_by_id = flows(chrome_trace(spans)["traceEvents"])
    assert len(flows_by_id) == 5 and all(isinstance(i, int) and 0 <= i < 1 << 53 for i in flows_by_id)


def test_back_to_back_slices_never_overlap_after_rounding():
    t = [1000.0]  # as CUDA events time consecutive kernels: each span ends where the next begins
    for i in range(2000):
        t.append(t[-1] + 50e-6 + 450e-6 * ((i * 0.618034) % 1))
    spans = [Span(0, "compute", i, t[i], t[i + 1]) for i in range(2000)]
    slices = [e for e in chrome_trace(spans, origin=999.0)["traceEvents"] if e["ph"] == "X"]
    ns = [(round(e["ts"] * 1000), round((e["ts"] + e["dur"]) * 1000)) for e in slices]  # Perfetto: integer ns
    assert all(end <= start for (_, end), (start, _) in zip(ns, ns[1:]))  # before: about 1 in 8 over by 1 ns


def is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG and len(data) > 10_000


async def test_timeline_png_from_a_pipeline_and_from_spans(tmp_path):
    pipe = pa.Pipeline(sleepy(0.001, 0.002), devices=pa.cpu_devices(2, threads=1), balance=[1, 1])
    await run_stream(pipe, xs(40))
    assert is_png(timeline(pipe, tmp_path / "pipe.png"))
    spans = [tuple(s) for s in pipe.spans()]  # plain tuples, as the ring holds them
    assert is_png(timeline(spans, tmp_path / "spans.png", title="from spans"))
    with pytest.raises(ValueError, match="no spans"):
        timeline([], tmp_path / "empty.png")
    idle = pa.Pipeline(sleepy(0.001, 0.002), devices=pa.cpu_devices(2, threads=1), balance=[1, 1])
    with pytest.raises(ValueError, match="stream some frames through the pipeline first"):
        timeline(idle, tmp_path / "idle.png")
    quiet = pa.Pipeline(sleepy(0.001, 0.002), devices=pa.cpu_devices(2, threads=1), balance=[1, 1], metrics=False)
    await run_stream(quiet, xs(3))
    with pytest.raises(ValueError, match="metrics=False"):
        timeline(quiet, tmp_path / "quiet.png")


def test_demo_writes_trace_and_plot(tmp_path):
    trace, picture = tmp_path / "demo.json", tmp_path / "demo.png"
    assert cli.main(["--loop", "asyncio", "demo", "--frames", "12", "--size", "16", "--stages", "2",
                     "--trace", str(trace), "--plot", str(picture)]) == 0
    events = load(trace)
    assert {"stage 0 (cpu:0)", "stage 1 (cpu:1)", "deliver"} <= set(tracks(events).values())
    assert sorted(flows(events)) == list(range(12))
    assert {"compute", "backward"} <= {e["name"] for e in events if e["ph"] == "X"}  # the demo learns
    assert is_png(picture)


async def test_demo_function_reports_the_files(tmp_path):
    out = io.StringIO()
    await cli.demo(frames=8, size=16, stages=2, learn=False, out=out, trace=tmp_path / "t.json")
    assert f"trace written to {tmp_path / 't.json'}" in out.getvalue()
    assert "timeline written" not in out.getvalue()
