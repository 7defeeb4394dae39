"""The layers the folders show: each package imports only from those below it."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"core", "adapters", "fedtasks", "runtime", "strategies", "client_app", "server_app", "anytime_fl", "tests"}

# package -> the project packages it may import (anything else of ours is a layering error)
ALLOWED = {
    "core": set(),
    "adapters": {"core"},
    "fedtasks": {"core"},
    "runtime": {"core", "adapters", "fedtasks"},
    "strategies": {"core"},
    "client_app": {"core", "adapters", "fedtasks", "runtime"},
    "server_app": {"core", "adapters", "fedtasks", "runtime", "strategies"},
    "anytime_fl": {"core", "adapters", "fedtasks", "runtime", "strategies", "client_app", "server_app"},
}
# third-party packages a layer must not use
FORBIDDEN = {
    "core": {"torch", "timm", "torchvision"},
    "strategies": {"torch", "timm", "torchvision"},
    "adapters": {"flwr"},
    "fedtasks": {"flwr"},
}


def imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_layers_below_it(package):
    wrong = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = imported_top_levels(path)
        bad = (names & OURS) - ALLOWED[package] - {package}
        bad |= names & FORBIDDEN.get(package, set())
        if bad:
            wrong[str(path.relative_to(ROOT))] = sorted(bad)
    assert not wrong, f"imports across layers: {wrong}"


def test_shipped_packages_hold_no_test_helpers():
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not any(p.startswith("tests") or p.startswith("bench") for p in include)
    assert {p.rstrip("*") for p in include} >= set(ALLOWED)
