"""Every benchmark runs end to end in its --quick mode (numbers are not checked: speed lives in
bench/, and quick runs never write bench/RESULTS.md)."""
import re
from pathlib import Path

import pytest

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
