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


def test_web_backend_example():
    pytest.importorskip("aiohttp")
    result = subprocess.run([sys.executable, str(EXAMPLES / "web_backend.py"), "--smoke"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "smoke ok: 2 predictions equal to the model's, 1 bad input refused, 3 stream events" in result.stdout


def test_fastapi_app_example():
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("websockets")  # uvicorn serves WebSockets with it (the `fastapi` extra's uvicorn[standard])
    result = subprocess.run([sys.executable, str(EXAMPLES / "fastapi_app.py"), "--smoke"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert ("smoke ok: 4 predictions equal to the model's (JSON, .npy, PNG, multipart PNG), 1 bad input refused, "
            "3 stream events") in result.stdout


def test_custom_sensor_example():
    result = subprocess.run([sys.executable, str(EXAMPLES / "custom_sensor.py"), "--frames", "16"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "streamed 16 frames from the simulated camera" in result.stdout
    assert "every frame delivered in order and equal to the unsplit model's output" in result.stdout
    assert "reconnects" in result.stdout and " 0 reconnects" not in result.stdout
    assert "dead camera: 'source simulated camera' gave up after 3 attempts (ConnectionResetError" in result.stdout


def test_gpu_stream_example_runs_anywhere():
    """On CPU stages without CUDA (tests/gpu has the GPU path); outputs checked against the model."""
    result = subprocess.run([sys.executable, str(EXAMPLES / "gpu_stream.py"), "--frames", "12", "--height", "48",
                             "--width", "64"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "12 frames of 48x64 uint8" in result.stdout and "checked against the unsplit model's: 0 of 2 differ" in result.stdout


def test_any_model_example():
    result = subprocess.run([sys.executable, str(EXAMPLES / "any_model.py"), "--frames", "4"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "ResNet-18" in result.stdout or "resnet18" in result.stdout
    assert "4 frames over 2 stages" in result.stdout and "exact: True" in result.stdout
