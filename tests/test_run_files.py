"""The run folder's file names are spelled once, in core/run_files.py."""

import ast
from pathlib import Path

from core import run_files

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "adapters", "fedtasks", "runtime", "strategies", "client_app", "server_app", "anytime_fl")


def test_no_module_spells_a_run_file_name_itself():
    names = {v for k, v in vars(run_files).items() if k.isupper()}
    assert "checkpoint.npz" in names and "adapters.safetensors" in names
    spelled = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "core" / "run_files.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in names:
                    spelled.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value}")
    assert spelled == []
