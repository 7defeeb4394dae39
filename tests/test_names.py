"""anytime_fl/names.py: another distribution owning one of our import names is found and named."""

import sys
from pathlib import Path

from anytime_fl import names
from tests.checks import one_line

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_the_names_checked_are_the_packages_the_project_installs():
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert set(names.PACKAGES) == {p.rstrip("*") for p in include}


def test_no_other_distribution_shares_a_name_here():
    assert names.clashes() == {}
    assert names.main([]) == 0


def test_adapterhubs_adapters_beside_ours_is_named(monkeypatch, capsys):
    owners = {"adapters": ["anytime-fl", "adapters"], "core": ["anytime-fl"], "numpy": ["numpy"]}
    monkeypatch.setattr(names, "packages_distributions", lambda: owners)
    assert names.clashes() == {"adapters": ["adapters"]}
    assert names.main([]) == 1
    one_line(capsys.readouterr().err, "'adapters' also from adapters", "virtual environment")
