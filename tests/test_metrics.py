"""Spans and the metrics report: accounting adds up on every execution path, injected delays
show, latency percentiles are ordered, and the Prometheus exposition parses."""
import asyncio
import time
from collections import Counter, defaultdict

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import partime_async as pa
import partime_async.observe.spans
from partime_async.observe import Columns, frame_ids, prometheus_text, wait_intervals
from pa_helpers import Sleep, run_stream

N = 24


def sleepy(*seconds: float) -> nn.Sequential:
    return nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), Sleep(s)) for s in seconds])


def xs(n: int = N) -> list[torch.Tensor]:
    return [torch.randn(1, 4) for _ in range(n)]


PATHS = {
    # worker-to-worker hand-off (ThreadChain)
    "chain": lambda: pa.cpu_devices(3, threads=1, inline=False),
    # loop-thread stages
    "inline": lambda: pa.cpu_devices(3, threads=1, inline=True),
    # an inline stage, then a lone threaded stage (windowed feeder/collector), then inline
    "mixed": lambda: [pa.CpuDevice(0, threads=1, inline=True), pa.CpuDevice(1, threads=1, inline=False),
                      pa.CpuDevice(2, threads=1, inline=True)],
}


def by_frame(spans, kind="compute"):
    frames = defaultdict(list)
    for s in spans:
        if s.kind == kind:
            frames[s.seq].append(s)
    return frames


@pytest.mark.parametrize("path", PATHS)
async def test_span_accounting_adds_up(path):
    pipe = pa.Pipeline(sleepy(0.001, 0.002, 0.001), devices=PATHS[path](), balance=[1, 1, 1])
    outs = await run_stream(pipe, xs())
    assert [f.seq for f in outs] == list(range(N))
    stats, spans = pipe.stats(), pipe.spans()
    wall = stats.elapsed_s
    compute = [s for s in spans if s.kind == "compute"]
    # one compute span per stage per frame, labelled with the right frame
    assert Counter(s.stage for s in compute) == {0: N, 1: N, 2: N}
    for k in range(3):
        assert sorted(s.seq for s in compute if s.stage == k) == list(range(N))
    for k, st in enumerate(stats.stages):
        assert st.frames == N
        worked = sum(s.duration for s in compute if s.stage == k)
        assert 0 < worked <= wall and st.busy_s <= wall
        assert worked == pytest.approx(st.busy_s)  # the same two clock reads
    # each frame's spans in stage order, each after the one before, delivered after the last
    delivered = {s.seq: s for s in spans if s.kind == "deliver"}
    assert sorted(delivered) == list(range(N))
    for seq, mine in by_frame(spans).items():
        mine.sort(key=lambda s: s.t0)
        assert [s.stage for s in mine] == [0, 1, 2]
        assert all(a.t1 <= b.t0 for a, b in zip(mine, mine[1:]))
        assert delivered[seq].t0 <= mine[0].t0 and mine[-1].t1 <= delivered[seq].t1
        assert delivered[seq].duration == pytest.approx(outs[seq].latency)


async def test_learning_records_backward_and_step_spans():
    learning = pa.OnlineLearning(loss=nn.MSELoss(), optimizer=lambda p: torch.optim.SGD(p, lr=1e-3), mode="stashed")
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(2, threads=1), balance=[2, 1], learning=learning)
    frames = [pa.Frame(i, torch.randn(1, 4), target=torch.randn(1, 4)) for i in range(N)]
    await run_stream(pipe, frames)
    spans = pipe.spans()
    counts = Counter((s.stage, s.kind) for s in spans)
    for k in range(2):  # stashed: every frame updates every stage once
        assert counts[k, "compute"] == counts[k, "backward"] == counts[k, "step"] == N
        assert counts[k, "step"] == pipe.learners[k].steps
    backward = {(s.stage, s.seq): s for s in spans if s.kind == "backward"}
    for step in (s for s in spans if s.kind == "step"):
        around = backward[step.stage, step.seq]  # the step runs inside its frame's backward
        assert around.t0 <= step.t0 <= step.t1 <= around.t1
    for k, st in enumerate(pipe.stats().stages):
        worked = sum(s.duration for s in spans if s.stage == k and s.kind in ("compute", "backward"))
        assert worked == pytest.approx(st.busy_s)
    # a restarted pipeline keeps its optimisers but not the hooks of the last run
    await run_stream(pipe, [pa.Frame(i, f.data, target=f.target) for i, f in enumerate(frames)])
    assert Counter(s.kind for s in pipe.spans())["step"] == 2 * N


@pytest.mark.parametrize("path", ["chain", "inline"])
async def test_a_slow_stage_is_the_bottleneck(path):
    pipe = pa.Pipeline(sleepy(0.002, 0.006, 0.002), devices=PATHS[path](), balance=[1, 1, 1])
    await run_stream(pipe, xs(30))
    report = pipe.metrics()
    slow, others = report.stages[1], [report.stages[0], report.stages[2]]
    assert report.bottleneck == slow.name == pipe.stats().stages[1].name
    assert slow.busy > 1.5 * max(s.busy for s in others)
    assert slow.compute_median_s > 2 * max(s.compute_median_s for s in others)
    assert all(s.frames_in == s.frames_out == 30 and s.queued == 0 for s in report.stages)


async def test_report_numbers_and_table():
    pipe = pa.Pipeline(sleepy(0.001, 0.001), devices=pa.cpu_devices(2, threads=1), balance=[1, 1])
    mid = None
    async with pipe:
        async for frame in pipe.stream(xs()):
            if frame.seq == N // 2:
                mid = pipe.metrics()  # while frames flow
    assert mid is not None and N // 2 < mid.delivered + 1 <= N
    report = pipe.metrics()
    assert (report.admitted, report.delivered, report.dropped, report.skipped) == (N, N, 0, 0)
    assert report.latency_frames == N
    assert 0 < report.latency_p50_s <= report.latency_p95_s <= report.latency_p99_s
    assert report.throughput == pytest.approx(pipe.stats().throughput)
    assert all(0 < s.busy <= 1 and s.wait_mean_s >= 0 for s in report.stages)
    assert report.spans == 3 * N  # two computes and a delivery per frame
    text = str(report)
    for needle in ("p50", "p95", "p99", "frames/s", "busy", "stage 0 (cpu:0)", "stage 1 (cpu:1)", "bottleneck"):
        assert needle in text


async def test_frames_of_equal_seq_are_told_apart():
    """A stream and submit() calls at once, then a second stream: every seq 0..N-1 is three
    frames. Each frame gets its own wait before each stage, none negative (a departure joined
    to the arrival of another frame of its seq would be)."""
    pipe = pa.Pipeline(sleepy(0.001, 0.002), devices=pa.cpu_devices(2, threads=1), balance=[1, 1])
    async with pipe:
        async def read() -> int:
            return len([f async for f in pipe.stream(xs())])

        reader = asyncio.create_task(read())
        await asyncio.gather(*(pipe.submit(x) for x in xs()))
        assert await reader == N
        assert [f.seq async for f in pipe.stream(xs())] == list(range(N))
    c = Columns.of(pipe.observation().spans)
    ids, frames = frame_ids(c)
    assert sorted(map(tuple, frames.tolist())) == [(seq, n) for seq in range(N) for n in range(3)]
    for k in (0, 1):  # a frame's compute at each stage, and its delivery, share its number
        assert sorted(ids[(c.kind == "compute") & (c.stage == k)].tolist()) == list(range(3 * N))
    assert sorted(ids[c.kind == "deliver"].tolist()) == list(range(3 * N))
    waits = wait_intervals(c)
    assert Counter(waits.stage.tolist()) == {0: 3 * N, 1: 3 * N}
    assert (waits.t1 >= waits.t0).all()
    assert pipe.metrics().stages[1].wait_mean_s >= 0


@pytest.mark.parametrize("seqs", [(7, 3), (1 << 62, -(1 << 62))])  # the second: too wide for one int64 key
def test_frame_ids_of_spans_made_by_hand(seqs):
    a, b = seqs
    spans = [(0, "mine", a, 0.0, 1.0), (0, "mine", b, 0.5, 1.5), (0, "mine", a, 2.0, 3.0), (1, "compute", a, 1.2, 1.8)]
    ids, frames = frame_ids(Columns.of(spans))
    assert [tuple(frames[i].tolist()) for i in ids] == [(a, 0), (b, 0), (a, 1), (a, 0)]


async def test_drops_show_in_the_report():
    pipe = pa.Pipeline(sleepy(0.003), devices=pa.cpu_devices(1, threads=1, inline=False), balance=[1],
                       policy="drop_oldest", capacity=1)
    outs = await run_stream(pipe, xs(30))
    report = pipe.metrics()
    assert report.dropped > 0 and report.stages[0].dropped == report.dropped
    assert report.delivered == len(outs) == 30 - report.dropped == report.latency_frames


async def test_metrics_off_records_nothing(tmp_path):
    pipe = pa.Pipeline(sleepy(0.001, 0.001), devices=pa.cpu_devices(2, threads=1), balance=[1, 1], metrics=False)
    await run_stream(pipe, xs())
    assert pipe.spans() == []
    report = pipe.metrics()  # the counters still work
    assert report.delivered == N and report.latency_p50_s is None and report.stages[0].compute_median_s is None
    assert all(s.busy > 0 for s in report.stages)
    assert "metrics=False" in str(report)
    with pytest.raises(RuntimeError, match="metrics=False"):
        pipe.export_trace(tmp_path / "t.json")
    for bad in ("yes", 0, -5, 2.5):
        with pytest.raises(ValueError, match="metrics must be True, False or a span capacity >= 1"):
            pa.Pipeline(nn.Sequential(nn.Identity()), devices="cpu", metrics=bad)


async def test_the_ring_is_bounded(monkeypatch):
    monkeypatch.setattr(partime_async.observe.spans, "SPAN_CAPACITY", 50)
    pipe = pa.Pipeline(sleepy(0, 0), devices=pa.cpu_devices(2, threads=1), balance=[1, 1])
    await run_stream(pipe, xs(100))
    spans = pipe.spans()
    assert len(spans) == 50
    report = pipe.metrics()
    assert report.delivered == 100 and 0 < report.latency_frames < 50  # over the spans kept
    assert report.stages[0].frames_out == 100  # counters are not bounded


async def test_metrics_n_keeps_the_latest_n_spans():
    """``metrics=n``: a ring of n spans (the newest kept), whatever the default capacity."""
    pipe = pa.Pipeline(sleepy(0, 0), devices=pa.cpu_devices(2, threads=1), balance=[1, 1], metrics=30)
    assert pipe.metrics_enabled
    await run_stream(pipe, xs(100))
    spans = pipe.spans()
    assert len(spans) == 30
    assert max(s.seq for s in spans) == 99 and min(s.seq for s in spans) > 80  # 3 spans a frame: the last ones
    assert pipe.metrics().stages[1].frames_out == 100


async def test_prometheus_exposition():
    pipe = pa.Pipeline(sleepy(0.001, 0.001), devices=pa.cpu_devices(2, threads=1), balance=[1, 1])
    await run_stream(pipe, xs())
    text = prometheus_text(pipe)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["partime_frames_delivered"].type == "counter"
    assert families["partime_frames_delivered"].samples[0].value == N
    busy = {s.labels["stage"]: s for s in families["partime_stage_busy_ratio"].samples}
    assert set(busy) == {"0", "1"} and busy["1"].labels["device"] == "cpu:1"
    assert all(0 < s.value <= 1 for s in busy.values())
    frames = [s for s in families["partime_stage_frames"].samples if s.name.endswith("_total")]
    assert [s.value for s in frames] == [N, N]
    latency = families["partime_latency_seconds"]
    assert latency.type == "summary"
    quantiles = {s.labels["quantile"]: s.value for s in latency.samples if "quantile" in s.labels}
    assert 0 < quantiles["0.5"] <= quantiles["0.95"] <= quantiles["0.99"]
    assert [s.value for s in latency.samples if s.name.endswith("_count")] == [N]
    assert prometheus_text(pipe) != "" and "partime_throughput_fps" in text  # callable again: own registry


async def test_stats_is_a_snapshot_the_running_pipeline_leaves_alone():
    pipe = pa.Pipeline(nn.Sequential(nn.Identity(), nn.Identity()), devices=pa.cpu_devices(2, inline=False),
                       balance=[1, 1])
    async with pipe:
        for _ in range(5):
            await pipe.submit(torch.zeros(1, 4))
        early = pipe.stats()
        for _ in range(5):
            await pipe.submit(torch.zeros(1, 4))
        late = pipe.stats()
    assert [s.frames for s in early.stages] == [5, 5] and [s.frames for s in late.stages] == [10, 10]
    assert early.delivered == 5 and late.delivered == 10


async def test_set_up_does_not_rewind_the_random_numbers_others_draw():
    """Profiling the first frame takes a while on the workers; a task drawing from torch's
    global generator meanwhile gets fresh numbers (the generator is not restored behind it)."""
    class Slow(nn.Module):
        def forward(self, x):
            time.sleep(0.02)
            return x

    torch.manual_seed(0)
    pipe = pa.Pipeline(nn.Sequential(Slow(), Slow()), devices=pa.cpu_devices(2, inline="auto"), balance="time")
    drawn: list[float] = []

    async def draw() -> None:
        while True:
            drawn.append(float(torch.rand(1)))
            await asyncio.sleep(0.001)

    drawing = asyncio.ensure_future(draw())
    async with pipe:
        await pipe.submit(torch.zeros(1, 4))  # the first frame: profiling, then the frame
    drawing.cancel()
    assert len(drawn) > 20 and len(set(drawn)) == len(drawn)


async def test_prometheus_latency_sum_and_count_are_counters_beyond_the_ring():
    """A summary's ``_sum`` and ``_count`` only grow (``rate(_sum) / rate(_count)`` needs it):
    they cover every delivered frame, not the frames whose spans the ring still holds."""
    pipe = pa.Pipeline(sleepy(0, 0), devices=pa.cpu_devices(2, threads=1), balance=[1, 1], metrics=16)
    seen = []
    async with pipe:
        for n in (10, 40, 100):
            async for _ in pipe.stream(xs(n)):
                pass
            families = {f.name: f for f in text_string_to_metric_families(prometheus_text(pipe))}
            samples = {s.name: s.value for s in families["partime_latency_seconds"].samples}
            seen.append((samples["partime_latency_seconds_count"], samples["partime_latency_seconds_sum"]))
    assert [count for count, _ in seen] == [10, 50, 150]
    assert 0 < seen[0][1] < seen[1][1] < seen[2][1]


async def test_counters_only_grow_and_latency_covers_delivered_frames_only():
    """Frames waiting for a stream's reader are delivered when read: a stream closed with
    frames unread makes them discarded without taking back what was counted (Prometheus reads
    a counter going down as a reset)."""
    def scrape(pipe):
        families = text_string_to_metric_families(prometheus_text(pipe))
        return {s.name: s.value for f in families for s in f.samples
                if s.name in ("partime_frames_delivered_total", "partime_latency_seconds_count",
                              "partime_latency_seconds_sum")}

    pipe = pa.Pipeline(sleepy(0, 0), devices=pa.cpu_devices(2, threads=1), balance=[1, 1], capacity=4)
    async with pipe:
        outputs = pipe.stream(xs(100))
        await anext(outputs)
        while pipe.stats().discarded == 0 and len(outputs._route.out) < 4:  # its output queue fills, unread
            await asyncio.sleep(0.01)
        before = scrape(pipe)
        await outputs.aclose()
        after = scrape(pipe)
    assert before == after == {"partime_frames_delivered_total": 1, "partime_latency_seconds_count": 1,
                               "partime_latency_seconds_sum": pytest.approx(before["partime_latency_seconds_sum"])}
    report = pipe.metrics()
    assert report.delivered == 1 and report.discarded >= 4
    assert report.admitted == report.delivered + report.discarded  # nothing dropped or skipped


async def test_a_restarted_pipeline_reports_only_its_new_run():
    pipe = pa.Pipeline(sleepy(0.001, 0.001), devices=pa.cpu_devices(2, threads=1), balance=[1, 1])
    await run_stream(pipe, xs(30))
    async with pipe:  # started again; no frame yet
        stats, report = pipe.stats(), pipe.metrics()
        assert (stats.admitted, stats.delivered, stats.stages) == (0, 0, [])
        assert report.stages == [] and report.bottleneck is None  # before: the last run's, at 400% busy
        assert len([f async for f in pipe.stream(xs(5))]) == 5
        assert [s.frames for s in pipe.stats().stages] == [5, 5]
        assert all(0 < s.busy <= 1 for s in pipe.metrics().stages)


async def test_discarded_frames_keep_the_frames_of_a_repeated_seq_apart():
    """A stream closed with frames unread, then the same seqs again: every frame that left the
    last stage has its stage -1 span (``discard`` if its reader had gone), so the second
    stream's frames are matched to their own (no negative wait)."""
    pipe = pa.Pipeline(sleepy(0.002, 0.002), devices=pa.cpu_devices(2, threads=1), balance=[1, 1])
    frames = xs(20)
    async with pipe:
        outputs = pipe.stream(frames)
        await anext(outputs)
        while len(outputs._route.out) < pipe.capacity:  # frames wait unread
            await asyncio.sleep(0.01)
        await outputs.aclose()
        assert len([f async for f in pipe.stream(frames)]) == 20
    stats, spans = pipe.stats(), pipe.spans()
    assert stats.admitted == 21 + stats.discarded
    assert len([s for s in spans if s.stage == -1]) == stats.admitted  # each frame left the last stage once
    assert Counter(s.kind for s in spans if s.stage == -1)["discard"] > 0  # those that left after the close
    waits = wait_intervals(Columns.of(pipe.observation().spans))
    assert (waits.t1 >= waits.t0).all() and pipe.metrics().stages[0].wait_mean_s >= 0  # before: -0.2 s


async def test_frames_waiting_unread_do_not_shift_another_feeds_frames():
    """Frames of stream A wait unread while stream B runs the same seqs and is read: each
    frame's stage -1 span is recorded as it leaves the last stage, so B's frames are matched
    to their own (a span recorded only at reading paired them with A's: negative waits)."""
    pipe = pa.Pipeline(sleepy(0.003, 0.003), devices=pa.cpu_devices(2, threads=1), balance=[1, 1], capacity=4)
    async with pipe:
        a = pipe.stream([pa.Frame(s, torch.randn(1, 4)) for s in range(3)])
        await asyncio.create_task(anext(a))  # A's frames 1 and 2 stay unread
        assert [f.seq async for f in pipe.stream([pa.Frame(s, torch.randn(1, 4)) for s in range(3)])] == [0, 1, 2]
        waits = wait_intervals(Columns.of(pipe.observation().spans))
        assert len(waits.stage) == 2 * 6 and (waits.t1 >= waits.t0).all()
        await a.aclose()


async def test_frames_left_unread_at_stop_count_in_no_later_run():
    pipe = pa.Pipeline(sleepy(0, 0), devices=pa.cpu_devices(2, threads=1), balance=[1, 1], capacity=4)
    await pipe.start()
    outputs = pipe.stream(xs(3))
    await asyncio.create_task(anext(outputs))  # read by another task: stop() leaves the stream alone
    while not outputs._route.out.closed:  # complete: it keeps its frames for its reader
        await asyncio.sleep(0.01)
    await pipe.stop()
    stats = pipe.stats()
    assert (stats.admitted, stats.delivered, stats.discarded) == (3, 1, 0)  # two wait for the reader
    await pipe.start()
    assert len([f async for f in outputs]) == 2
    stats = pipe.stats()
    assert (stats.admitted, stats.delivered, stats.discarded) == (0, 0, 0)  # not the new run's
    assert pipe.metrics().latency_frames == 0
    await pipe.stop()


async def test_the_report_tells_no_frame_yet_from_metrics_off():
    on = pa.Pipeline(sleepy(0), devices=pa.cpu_devices(1, threads=1))
    off = pa.Pipeline(sleepy(0), devices=pa.cpu_devices(1, threads=1), metrics=False)
    async with on, off:
        assert "no frame delivered yet" in str(on.metrics())
        assert "metrics=False" in str(off.metrics())


async def test_a_learning_stage_without_spans_has_no_forward_time_to_report():
    """"compute mean" is a stage's forward. Without spans a learning stage's busy time also
    holds its backward and step: the report leaves its compute mean out rather than pass
    that off as the forward (an inference stage's busy time is its forward)."""
    learning = pa.OnlineLearning(loss=nn.MSELoss(), optimizer=lambda p: torch.optim.SGD(p, lr=0.01), mode="partime")
    frames = [pa.Frame(i, torch.randn(1, 4), target=torch.randn(1, 4)) for i in range(8)]
    learner = pa.Pipeline(sleepy(0, 0), devices=pa.cpu_devices(2, threads=1), balance=[1, 1], learning=learning,
                          metrics=False)
    await run_stream(learner, frames)
    assert [s.compute_mean_s for s in learner.metrics().stages] == [None, None]
    plain = pa.Pipeline(sleepy(0, 0), devices=pa.cpu_devices(2, threads=1), balance=[1, 1], metrics=False)
    await run_stream(plain, xs(8))
    assert all(s.compute_mean_s > 0 for s in plain.metrics().stages)
