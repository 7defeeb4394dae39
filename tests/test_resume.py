"""Checkpoints and resume: a run cut short by Ctrl-C continues where it stopped and loses nothing.

`server_app.app.run` runs against the fake grid (tests/fakegrid.py), which
calls the real ClientApp handlers in-process.
"""

import json

import numpy as np
import pytest
from flwr.app import MessageType
from safetensors.numpy import load_file

from adapters.state import get_state, set_state
from core.config import validate
from runtime.models import model_and_spec
from server_app import checkpoint, results
from server_app.app import run
from server_app.personalization import FILE as PERSONALIZATION

BASE = {
    "task": "digits",
    "backbone-weights": "",
    "num-server-rounds": 3,
    "local-epochs": 1,
    "batch-size": 32,
    "tiers": "1,2",
    # fedavgm keeps server momentum: resuming must restore it, not start it from zero
    "strategy": "fedavgm",
    # half the nodes each round: the sampling RNG must be restored too
    "fraction-train": 0.5,
    "fraction-evaluate": 0.5,
    "min-nodes": 2,
    "personalize-epochs": 0,
}
NODES = 4


@pytest.fixture
def fresh_adapters():
    """Every run in this process shares one cached model; give each run the same starting adapters."""
    model, _ = model_and_spec(validate(BASE))
    initial = get_state(model)
    return lambda: set_state(model, initial)


def _rows_text(run_dir):
    return (run_dir / results.RESULTS).read_text().splitlines()


def _assert_same_arrays(a, b):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)


def test_resume_after_ctrl_c_ends_at_the_configured_round_and_matches_an_uninterrupted_run(
    fake_grid, tmp_path, fresh_adapters
):
    # Dense updates: top-k's error-feedback residuals live on the nodes, and a resumed run's
    # clients start without them (docs/running.md), so only a dense run resumes bit for bit.
    cfg = {**BASE, "output-dir": str(tmp_path), "checkpoint-every": 2, "topk-fraction": 1.0}

    fresh_adapters()
    full_dir = run(fake_grid(NODES, cfg), {**cfg, "run-name": "full"})

    fresh_adapters()
    with pytest.raises(KeyboardInterrupt):
        run(fake_grid(NODES, cfg, interrupt_at_round=3), {**cfg, "run-name": "cut"})
    cut_dir = tmp_path / "cut"
    assert checkpoint.load(cut_dir)["round"] == 2
    before = _rows_text(cut_dir)
    assert [json.loads(r)["round"] for r in before] == [1, 2]

    grid = fake_grid(NODES, cfg)  # a restarted federation: fresh client contexts
    assert run(grid, {**cfg, "run-name": "cut", "resume": True}) == cut_dir
    assert grid.rounds(MessageType.TRAIN) == [3]
    after = _rows_text(cut_dir)
    assert [json.loads(r)["round"] for r in after] == [1, 2, 3]
    assert after[:2] == before  # nothing before the checkpoint lost or rewritten
    assert checkpoint.load(cut_dir)["round"] == 3

    # Same weights, server momentum and test accuracy as if never interrupted.
    _assert_same_arrays(load_file(str(cut_dir / results.WEIGHTS)), load_file(str(full_dir / results.WEIGHTS)))
    full_state, cut_state = checkpoint.load(full_dir)["strategy"], checkpoint.load(cut_dir)["strategy"]
    assert full_state and all(k.startswith("momentum/") for k in full_state)
    _assert_same_arrays(cut_state, full_state)
    full_rows = results.read_rows(full_dir)
    assert [r["server"]["accuracy"] for r in results.read_rows(cut_dir)] == [r["server"]["accuracy"] for r in full_rows]
    assert (cut_dir / "anytime.json").is_file() and (cut_dir / "accuracy_per_exit.png").is_file()

    # Resuming a finished run trains no more rounds; it can ask for personalisation only.
    grid = fake_grid(NODES, cfg)
    run(grid, {**cfg, "run-name": "cut", "resume": True, "personalize-epochs": 1})
    assert grid.rounds(MessageType.TRAIN) == []
    assert _rows_text(cut_dir) == after
    assert json.loads((cut_dir / PERSONALIZATION).read_text())["clients"] == NODES


def _boom_on_call(monkeypatch, n):
    """np.savez that writes a partial file and raises KeyboardInterrupt on its n-th call (Ctrl-C mid-write)."""
    real = np.savez
    calls = []

    def savez(fh, **payload):
        calls.append(1)
        if len(calls) == n:
            fh.write(b"PK\x03\x04 partial")
            raise KeyboardInterrupt("simulated Ctrl-C during the checkpoint write")
        return real(fh, **payload)

    monkeypatch.setattr(np, "savez", savez)


def test_interrupted_checkpoint_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    arrays = {"heads.0.fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    state = {"momentum/heads.0.fc.weight": np.ones((2, 3), np.float32)}
    checkpoint.save(tmp_path, 1, arrays, state, {})
    _boom_on_call(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, {k: v + 1 for k, v in arrays.items()}, state, {})
    loaded = checkpoint.load(tmp_path)
    assert loaded["round"] == 1
    _assert_same_arrays(loaded["arrays"], arrays)
    _assert_same_arrays(loaded["strategy"], state)
    monkeypatch.undo()
    checkpoint.save(tmp_path, 2, arrays, state, {})  # the leftover partial file does not block the next save
    assert checkpoint.load(tmp_path)["round"] == 2


def test_ctrl_c_while_checkpointing_then_resume_reruns_that_round_once(
    fake_grid, tmp_path, monkeypatch, fresh_adapters
):
    cfg = {**BASE, "num-server-rounds": 2, "output-dir": str(tmp_path), "run-name": "r", "checkpoint-every": 1}
    fresh_adapters()
    _boom_on_call(monkeypatch, 2)  # the round-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        run(fake_grid(NODES, cfg), cfg)
    monkeypatch.undo()
    run_dir = tmp_path / "r"
    assert checkpoint.load(run_dir)["round"] == 1
    assert [r["round"] for r in results.read_rows(run_dir)] == [1, 2]  # round 2 was written before the checkpoint
    row1 = _rows_text(run_dir)[0]

    grid = fake_grid(NODES, cfg)
    run(grid, {**cfg, "resume": True})
    assert grid.rounds(MessageType.TRAIN) == [2]
    assert [r["round"] for r in results.read_rows(run_dir)] == [1, 2]
    assert _rows_text(run_dir)[0] == row1
    assert checkpoint.load(run_dir)["round"] == 2


def test_between_refits_the_last_fits_adapters_are_served_and_a_resume_restores_them(
    fake_grid, tmp_path, fresh_adapters
):
    # refits before round 1 and after round 3 (the last): rounds 1 and 2 serve the fit before round 1
    cfg = {**BASE, "output-dir": str(tmp_path), "topk-fraction": 1.0, "num-server-rounds": 3, "head-refit-every": 5}
    fresh_adapters()
    full = results.read_rows(run(fake_grid(NODES, cfg), {**cfg, "run-name": "full"}))
    assert [r["served-round"] for r in full] == [0, 0, 3]
    fit0 = json.loads((tmp_path / "full" / "head_fit.json").read_text())["fits"][0]["server"]["accuracy"]
    assert full[0]["server"]["accuracy"] == full[1]["server"]["accuracy"] == fit0

    fresh_adapters()
    with pytest.raises(KeyboardInterrupt):
        run(fake_grid(NODES, cfg, interrupt_at_round=2), {**cfg, "run-name": "cut"})
    saved = checkpoint.load(tmp_path / "cut")
    assert saved["round"] == 1 and saved["meta"]["served-round"] == 0
    differ = [k for k in saved["arrays"] if not np.array_equal(saved["arrays"][k], saved["served"][k])]
    assert differ and all(not k.startswith("heads.") for k in differ)  # round 1's adapters, the same heads
    run(fake_grid(NODES, cfg), {**cfg, "run-name": "cut", "resume": True})
    cut = results.read_rows(tmp_path / "cut")
    assert [r["server"]["accuracy"] for r in cut] == [r["server"]["accuracy"] for r in full]
    assert [r["served-round"] for r in cut] == [0, 0, 3]

    fresh_adapters()
    latest = results.read_rows(run(fake_grid(NODES, cfg), {**cfg, "run-name": "latest", "serve-last-fit": False}))
    assert [r["served-round"] for r in latest] == [1, 2, 3]
    assert latest[-1]["server"]["accuracy"] == full[-1]["server"]["accuracy"]  # the same training either way
