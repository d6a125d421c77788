"""Every example runs, in a short smoke mode."""
import subprocess
import sys
from pathlib import Path


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_example():
    result = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py"), "--frames", "12"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "streamed 12 frames" in result.stdout and "graph: 12 frames, 12 collected" in result.stdout
