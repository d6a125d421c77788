"""Every example runs, in a short smoke mode."""
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_example():
    result = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py"), "--frames", "12"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "streamed 12 frames" in result.stdout and "graph: 12 frames, 12 collected" in result.stdout


@pytest.mark.parametrize("mode", ["partime", "stashed"])
def test_online_learning_example(mode, tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "online_learning.py"), "--frames", "16", "--mode", mode,
                             "--dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"{mode}: 16 frames" in result.stdout and "resumed at frame 16" in result.stdout
    assert (tmp_path / "latest.pt").exists()
