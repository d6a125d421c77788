"""Every benchmark runs end to end in its --quick mode (numbers are not checked: speed lives in
bench/, and quick runs never write bench/RESULTS.md)."""
from pathlib import Path

import pytest

from partime_async import cli

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "RESULTS.md"
BENCHMARKS = sorted(p.stem for p in RESULTS.parent.glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_quick_mode(name, capsys):
    before = RESULTS.read_text() if RESULTS.exists() else None
    assert cli.main(["bench", name, "--quick"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == f"== {name}" and "not recorded" in out[-2]
    assert (RESULTS.read_text() if RESULTS.exists() else None) == before
