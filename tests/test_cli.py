"""The command line: the demo runs end to end and reports a same-run speed-up."""
import io
import subprocess
import sys

import pytest

from partime_async import cli


async def test_demo_runs_and_summarises():
    out = io.StringIO()
    summary = await cli.demo(frames=24, size=16, stages=2, out=out)
    text = out.getvalue()
    assert summary["frames"] == 24
    assert summary["pipeline_fps"] > 0 and summary["unsplit_fps"] > 0
    assert summary["speedup"] == pytest.approx(summary["pipeline_fps"] / summary["unsplit_fps"])
    assert "frames 24/24" in text and "stage busy" in text and "speed-up" in text


async def test_demo_explains_a_speed_up_below_one(monkeypatch):
    """A baseline measured before and after the run, the better taken; below 1x, the summary
    says how far the unsplit model itself scaled on this machine."""
    calls = []

    async def rates(model, frames, learning):
        calls.append(len(frames))
        return {1: 1e6, 2: 1.5e6} if len(calls) == 1 else {1: 2e6, 2: 1e6}

    monkeypatch.setattr(cli, "unsplit_rates", rates)
    monkeypatch.setattr(cli, "available_cores", lambda: 2)
    out = io.StringIO()
    summary = await cli.demo(frames=12, size=16, stages=2, out=out)
    assert calls == [12, 12] and summary["unsplit_fps"] == 2e6  # the best of both measurements
    text = out.getvalue()
    assert "the best of 1 and 2 thread(s), on 12 of the frames, before and after the run" in text
    assert "below 1x: the pipeline lost here" in text and "on 2 threads the unsplit model ran at 0.75x its 1-thread rate" in text


def test_cli_entry_point_demo_on_uvloop():
    for args in (["--loop", "uvloop", "demo"], ["demo", "--loop", "uvloop"]):  # the option also after `demo`
        result = subprocess.run([sys.executable, "-m", "partime_async.cli", *args,
                                 "--frames", "12", "--size", "16", "--stages", "2"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "speed-up" in result.stdout


def test_cli_rejects_unknown_benchmark():
    with pytest.raises(SystemExit, match="unknown benchmark"):
        cli.main(["bench", "no_such_benchmark"])


def test_bench_passes_its_options_and_the_loop_on(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "bench", lambda names, extra: calls.append((names, extra)) or 0)
    cli.main(["--loop", "asyncio", "bench", "cpu_scaling", "learning", "--repeats", "3", "--quick"])
    cli.main(["bench"])
    assert calls == [(["cpu_scaling", "learning"], ["--quick", "--loop", "asyncio", "--repeats", "3"]), ([], [])]
    with pytest.raises(SystemExit):
        cli.main(["demo", "--repeats", "3"])  # the demo takes no such option
    assert "unrecognized arguments: --repeats 3" in capsys.readouterr().err


@pytest.mark.parametrize("args, words", [(["--frames", "0"], "--frames: must be >= 1, got 0"),
                                         (["--stages", "-3"], "--stages: must be >= 1, got -3"),
                                         (["--size", "x"], "--size: expected an integer, got 'x'")])
def test_demo_rejects_bad_numbers(args, words, capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", *args])
    assert words in capsys.readouterr().err


def _must_not_run(*args, **kwargs):
    raise AssertionError("the demo ran before its options were checked")


@pytest.mark.parametrize("args, words", [
    (["--stages", "20"], "--stages: the demo's conv net has 9 layers, so at most 9 stages, got 20"),
    (["--mode", "sequential", "--stages", "2"], "--mode sequential runs the whole model as one stage"),
    (["--no-learn", "--mode", "stashed"], "--mode stashed sets how the demo learns, but --no-learn turns learning off"),
    (["--trace", "{missing}/t.json"], "--trace: the folder '{missing}' of '{missing}/t.json' does not exist"),
    (["--plot", "{missing}/t.png"], "--plot: the folder '{missing}' of '{missing}/t.png' does not exist"),
    (["--plot", "{tmp}"], "--plot: '{tmp}' is a folder"),
], ids=["too-many-stages", "sequential-split", "mode-without-learning", "no-trace-folder", "no-plot-folder",
        "plot-is-a-folder"])
def test_demo_rejects_options_it_cannot_honour_before_running(args, words, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "demo", _must_not_run)
    where = {"missing": tmp_path / "missing", "tmp": tmp_path}
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", *(a.format(**where) for a in args)])
    assert info.value.code == 2
    assert words.format(**where) in capsys.readouterr().err


async def test_demo_function_checks_its_options_up_front(monkeypatch):
    monkeypatch.setattr(cli, "unsplit_rates", _must_not_run)
    with pytest.raises(ValueError, match="at most 9 stages"):
        await cli.demo(stages=20, out=io.StringIO())
    with pytest.raises(ValueError, match="--no-learn"):
        await cli.demo(learn=False, mode="stashed", out=io.StringIO())


# -- --video -------------------------------------------------------------------------------------------
async def _clip(path, frames: int) -> str:
    """A small video made with the library's own sink (PyAV)."""
    import torch
    from partime_async.sinks import VideoSink
    from partime_async.sources import SyntheticVideo

    import partime_async as pa

    video = SyntheticVideo(frames, height=48, width=64, dtype=torch.uint8)
    await pa.run(video >> pa.Pipeline([torch.nn.Identity()], devices=pa.cpu_devices(1)) >> VideoSink(path, fps=25))
    return str(path)


async def test_demo_runs_on_a_video_and_stops_at_its_end(tmp_path, monkeypatch):
    pytest.importorskip("av")
    clip = await _clip(tmp_path / "clip.mp4", 10)

    async def rates(model, frames, learning):  # the baseline's speed is not what this test is about
        return {1: 1e3}

    monkeypatch.setattr(cli, "unsplit_rates", rates)
    out = io.StringIO()
    summary = await cli.demo(frames=24, size=16, stages=2, out=out, video=clip)
    text = out.getvalue()
    assert "9 frames of video clip.mp4 (64x48, resized to 16x16), learning next-frame prediction" in text
    assert summary["frames"] == 9 and "frames 9/9" in text  # 10 frames: each of the first 9 learns from the next
    summary = await cli.demo(frames=4, size=16, stages=2, learn=False, out=io.StringIO(), video=clip)
    assert summary["frames"] == 4


def test_demo_rejects_a_video_it_cannot_read_before_running(tmp_path, capsys, monkeypatch):
    pytest.importorskip("av")
    monkeypatch.setattr(cli, "demo", _must_not_run)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video" * 100)
    for path, words in ((tmp_path / "missing.mp4", "--video: there is no file"),
                        (broken, "--video: video broken.mp4: FFmpeg cannot read")):
        with pytest.raises(SystemExit) as info:
            cli.main(["demo", "--video", str(path)])
        assert info.value.code == 2 and words in capsys.readouterr().err


def test_demo_video_without_pyav_says_how_to_install(monkeypatch):
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install 'partime-async\[video\]'"):
        cli.check_demo_options(None, True, None, None, None, video="clip.mp4")
