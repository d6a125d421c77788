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


def test_cli_entry_point_demo_on_uvloop():
    result = subprocess.run([sys.executable, "-m", "partime_async.cli", "--loop", "uvloop", "demo",
                             "--frames", "12", "--size", "16", "--stages", "2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "speed-up" in result.stdout


def test_cli_rejects_unknown_benchmark():
    with pytest.raises(SystemExit, match="unknown benchmark"):
        cli.main(["bench", "no_such_benchmark"])


@pytest.mark.parametrize("args, words", [(["--frames", "0"], "--frames: must be >= 1, got 0"),
                                         (["--stages", "-3"], "--stages: must be >= 1, got -3"),
                                         (["--size", "x"], "--size: expected an integer, got 'x'")])
def test_demo_rejects_bad_numbers(args, words, capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", *args])
    assert words in capsys.readouterr().err
