"""The package list in pyproject.toml names every package of the engine: a wheel built from it
(a non-editable install) has every module that an editable checkout imports."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_engine_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "partime_async").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"


def test_the_package_ships_its_type_marker():
    """PEP 561: ``py.typed`` tells its users' type checkers to read the package's annotations;
    it is package data, so it must be named for the wheel."""
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert (ROOT / "partime_async" / "py.typed").is_file()
    assert "py.typed" in package_data.get("partime_async", [])
