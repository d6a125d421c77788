"""Every benchmark runs end to end in its --quick mode (numbers are not checked: speed lives in
bench/, and quick runs never write bench/RESULTS.md)."""
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

from partime_async import cli

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "RESULTS.md"
BENCHMARKS = sorted(p.stem for p in RESULTS.parent.glob("*.py")
                    if not p.stem.startswith("_") and p.stem not in cli.LONG_BENCHMARKS)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_quick_mode(name, capsys):
    before = RESULTS.read_text() if RESULTS.exists() else None
    assert cli.main(["bench", name, "--quick"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == f"== {name}" and "not recorded" in out[-2]
    assert (RESULTS.read_text() if RESULTS.exists() else None) == before


def test_soak_quick_mode(capsys):
    """The soak (bench/soak.py, not run in CI) in its 16-second mode: the injected fault crashes
    the learning pipeline, and every crash is resumed from the last checkpoint with the
    checkpoint's weights and optimiser state."""
    before = RESULTS.read_text() if RESULTS.exists() else None
    assert cli.main(["bench", "soak", "--quick"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "== soak" and "not recorded" in out[-2]
    numbers = dict(re.findall(r"(\w+)=([^,|]+)", out[-2]))
    crashes, resumes = int(numbers["crashes"]), int(numbers["resumes"])
    assert crashes >= 1 and resumes == crashes, out[-2]
    assert numbers["resume_mismatches"].strip() == "0" and numbers["pipelines_alive"].strip() == "0", out[-2]
    assert (RESULTS.read_text() if RESULTS.exists() else None) == before


def _load_benchmark(name):
    """A bench/ module loaded the way ``partime-async bench`` loads it."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", RESULTS.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_hop_overhead_device_cuda_without_cuda(monkeypatch, capsys):
    """``hop_overhead.py --device cuda`` where CUDA is absent (faked absent on a GPU machine):
    under --quick it says so and exits 0; a full run fails with the reason; nothing recorded.
    ``--help`` lists --device (bench/gpu_session.sh runs the CUDA mode only then)."""
    hop = _load_benchmark("hop_overhead")
    with pytest.raises(SystemExit) as exc:
        hop.main(["--help"])
    assert exc.value.code == 0 and "--device {cpu,cuda}" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = RESULTS.read_text() if RESULTS.exists() else None
    assert hop.main(["--device", "cuda", "--quick"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "CUDA is not available" in out[0], out
    with pytest.raises(SystemExit) as exc:
        hop.main(["--device", "cuda"])
    assert exc.value.code not in (0, None) and "CUDA is not available" in str(exc.value.code)
    assert (RESULTS.read_text() if RESULTS.exists() else None) == before


def test_metrics_overhead_valgrind_counts(tmp_path, monkeypatch):
    """``metrics_overhead.py --valgrind``: per-frame counts are the difference of two runs'
    cachegrind totals over the difference of their frame counts, and the modelled cycles add
    10 per first-level and 100 per last-level miss; without valgrind it says what to install."""
    bench = _load_benchmark("metrics_overhead")
    events = " ".join(bench.CACHEGRIND_EVENTS)

    def write(name, values):
        path = tmp_path / name
        path.write_text(f"desc: I1 cache: 32768 B, 64 B, 8-way associative\ncmd: python x\nevents: {events}\n"
                        f"fl=a.c\nfn=f\n1 {' '.join(map(str, values))}\nsummary: {' '.join(map(str, values))}\n")
        return path

    short = bench.cachegrind_summary(write("short", [1000, 10, 1, 500, 20, 2, 300, 5, 1]))
    long = bench.cachegrind_summary(write("long", [3000, 30, 1, 900, 40, 2, 500, 15, 3]))
    assert short["Ir"] == 1000 and long["DLmw"] == 3
    counts = bench.per_frame(short, long, frames=100)
    assert counts["Ir"] == 20.0 and counts["D1mr"] == 0.2 and counts["DLmw"] == 0.02
    assert counts["cycles"] == pytest.approx(20.0 + 10 * (0.2 + 0.2 + 0.1) + 100 * 0.02)
    monkeypatch.setattr(bench.shutil, "which", lambda _: None)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--valgrind", "--no-record"])
    assert "needs valgrind on the PATH" in str(exc.value.code)
    for argv in (["--valgrind", "--quick"], ["--valgrind", "--frames", "0"], ["--capacity", "64"],
                 ["--valgrind", "--ll-cache", "3000000"], ["--valgrind", "--workloads", "conv"],
                 ["--child", "bogus", "on", "3"]):
        with pytest.raises(SystemExit) as exc:
            bench.main(argv)
        assert exc.value.code == 2, argv  # argparse's usage error
