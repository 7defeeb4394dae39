"""Config drift on resume (server_app/drift.py): model or data changes are refused, others recorded."""

from __future__ import annotations

import json

import pytest

from core.config import ConfigError, validate
from server_app import drift, results
from server_app.app import run
from tests.checks import TINY, one_line

NODES = 2


def test_resume_refuses_model_or_data_drift_and_records_other_changes(fake_grid, tmp_path):
    cfg = {**TINY, "output-dir": str(tmp_path), "run-name": "r"}
    run_dir = run(fake_grid(NODES, cfg), cfg)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    for change in ({"tiers": "1,3"}, {"backbone-weights": "shipped"}, {"adapter-width": 16}, {"seed": 7}):
        key = next(iter(change))
        with pytest.raises(ConfigError) as err:
            run(fake_grid(NODES, cfg), {**cfg, **change, "resume": True})
        assert err.value.key == key
        one_line(str(err.value), key, "cannot resume")
        assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before  # left as it was
    # A cut last line of results.jsonl (a crash mid-write): reported, the rows before it kept.
    with open(run_dir / results.RESULTS, "a") as fh:
        fh.write('{"round": 2, "ser')
    assert [r["round"] for r in results.read_rows(run_dir)] == [1]
    run(fake_grid(NODES, cfg), {**cfg, "resume": True, "num-server-rounds": 2, "lr": 1e-3})
    assert [r["round"] for r in results.read_rows(run_dir)] == [1, 2]
    assert (run_dir / results.RESULTS).read_text().splitlines()[0] == before[results.RESULTS].decode().splitlines()[0]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["lr"] == 1e-3 and saved["num-server-rounds"] == 2
    assert {(c["key"], c["round"], c["before"], c["after"]) for c in saved["changes"]} == {
        ("lr", 2, 3e-3, 1e-3),
        ("num-server-rounds", 2, 1, 2),
    }


def test_a_run_saved_before_a_model_key_existed_resumes_only_with_its_old_value():
    old = {k: v for k, v in validate({}).items() if k != "exit-patch-mean"}  # an earlier release's config
    with pytest.raises(ConfigError) as err:
        drift.compare(old, validate({}), 3)
    assert err.value.key == "exit-patch-mean" and "False -> True" in str(err.value)
    assert drift.compare(old, validate({"exit-patch-mean": False}), 3) == []


def test_drift_keys_are_run_config_keys():
    names = set(validate({}))
    assert set(drift.FIXED) <= names and set(drift.IDENTITY) <= names
