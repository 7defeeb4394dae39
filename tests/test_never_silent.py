"""Faults that used to pass without a word: each now stops with one line naming the problem
(and a non-zero exit where the run did not do what was asked)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, MessageType, RecordDict
from PIL import Image
from safetensors.numpy import load_file, save_file

from adapters.backbone import BackboneError, load_backbone
from adapters.build import resolve_weights
from anytime_fl import predict
from core.config import validate
from runtime.models import initial_state
from server_app import app as server_app
from server_app import results
from server_app.nothing_accepted import NothingAccepted, nothing_accepted
from tests.checks import TINY

NODES = 2


def _one_line(text: str, *needles: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _main(grid, cfg):
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg)
    with pytest.raises(server_app.RunFailed) as err:
        server_app.main(grid, ctx)
    return str(err.value)


@pytest.fixture(scope="module")
def nan_weights(tmp_path_factory):
    """The shipped backbone with NaN in one tensor."""
    tensors = load_file(resolve_weights("shipped"))
    name = sorted(tensors)[3]
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = np.nan
    path = tmp_path_factory.mktemp("w") / "nan.safetensors"
    save_file(tensors, str(path))
    return path, name


# -- NaN weights and rounds that accept nothing --------------------------------
def test_nan_backbone_weights_are_refused_when_loaded_naming_file_key_and_tensor(nan_weights):
    path, tensor = nan_weights
    with pytest.raises(BackboneError) as err:
        load_backbone("vit_micro_patch7_28", weights=str(path))
    _one_line(str(err.value), "backbone-weights", str(path), tensor, "NaN")


def test_nan_backbone_weights_stop_the_run_before_round_1(nan_weights, fake_grid, tmp_path):
    path, _ = nan_weights
    cfg = {**TINY, "backbone-weights": str(path), "output-dir": str(tmp_path), "run-name": "nan"}
    grid = fake_grid(NODES, cfg)
    _one_line(_main(grid, cfg), "backbone-weights", str(path))
    assert grid.delivered == [] and not (tmp_path / "nan").exists()


def _failing(grid, kind):
    def broken(msg, context):
        raise RuntimeError("disk full")

    grid.handlers[kind] = broken
    return grid


def test_a_round_in_which_no_update_is_accepted_fails_the_run_naming_why(fake_grid, tmp_path):
    cfg = {**TINY, "heads": "trained", "output-dir": str(tmp_path), "run-name": "r", "num-server-rounds": 2}
    grid = _failing(fake_grid(NODES, cfg, raise_errors=False), MessageType.TRAIN)
    line = _one_line(_main(grid, cfg), "round 1 train", f"all {NODES} replies were dropped", "disk full")
    assert f"{NODES}x" in line  # the same reason is given once, with its count
    assert results.read_rows(tmp_path / "r") == []  # no round that trained nothing is written


def test_a_head_fit_in_which_no_node_sends_statistics_fails_the_run(fake_grid, tmp_path):
    cfg = {**TINY, "heads": "ridge", "output-dir": str(tmp_path), "run-name": "h"}
    grid = _failing(fake_grid(NODES, cfg, raise_errors=False), MessageType.QUERY)
    _one_line(_main(grid, cfg), "head fit", "replies were dropped", "disk full")
    assert grid.rounds(MessageType.TRAIN) == []  # stopped before round 1


def test_a_round_without_any_reply_says_the_round_timeout():
    err = nothing_accepted("round 3 train", 0, [], 600.0)
    assert isinstance(err, NothingAccepted)
    _one_line(str(err), "round 3 train", "no node replied within round-timeout=600s")


def test_many_different_reasons_stay_one_line():
    reasons = [
        f"error reply: Traceback (most recent call last)\n  File x\nOSError: disk {i} full"
        if i % 2
        else f"blocks.{i}.w has non-finite values"
        for i in range(9)
    ]
    line = _one_line(str(nothing_accepted("round 1 train", 9, reasons, 60)), "all 9 replies", "and 6 other reasons")
    assert "Traceback" not in line  # a traceback's last line says what went wrong


# -- predict never prints NaN ---------------------------------------------------
@pytest.fixture
def run_dir(tmp_path):
    cfg = validate({"backbone-weights": "shipped"})
    results.save_weights(tmp_path, initial_state(cfg), {"config": cfg, "num-blocks": 12})
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "img.png")
    return tmp_path


def test_predict_refuses_nan_backbone_weights(run_dir, nan_weights, capsys):
    path, _ = nan_weights
    args = [str(run_dir), str(run_dir / "img.png"), "--json", "--backbone-weights", str(path)]
    assert predict.main(args) == 2
    out = capsys.readouterr()
    assert out.out == ""
    _one_line(out.err, "backbone-weights", str(path))


def test_predict_refuses_nan_adapter_weights_and_prints_json_otherwise(run_dir, capsys):
    assert predict.main([str(run_dir), str(run_dir / "img.png"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)  # strict JSON: no NaN
    assert np.isfinite(row["confidence"])
    arrays = load_file(str(run_dir / results.WEIGHTS))
    arrays["heads.0.fc.weight"][0, 0] = np.nan
    results.save_weights(run_dir, arrays, {"config": validate({"backbone-weights": "shipped"}), "num-blocks": 12})
    assert predict.main([str(run_dir), str(run_dir / "img.png"), "--json"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    _one_line(out.err, "heads.0.fc.weight", "NaN")


# -- strategy arguments: literals, checked before anything runs -----------------
@pytest.mark.parametrize(
    "overrides, key, words",
    [
        ("strategy='flwr:Krum' strategy-args='num_malicious_nodes=one'", "strategy-args", "not a Python literal"),
        ("strategy='flwr:Krum' strategy-args='num_malicious_nodes=1.5'", "strategy-args", "must be int"),
        ("strategy='flwr:Krum' strategy-args='num_malicious_nodes=1 bogus=2'", "strategy-args", "bogus"),
        ("strategy='flwr:NoSuchStrategy'", "strategy", "has no 'NoSuchStrategy'"),
        (
            "strategy-inner='flwr:DifferentialPrivacyServerSideFixedClipping'",
            "strategy-inner",
            "wraps no other strategy",
        ),
        ("strategy='flwr:Krum' strategy-inner-args='q=1'", "strategy-inner-args", "wraps no other strategy"),
    ],
)
def test_check_config_builds_the_strategy_and_names_the_key(overrides, key, words, capsys):
    from anytime_fl.checkconfig import main as check_config

    assert check_config(["--run-config", overrides]) == 2
    _one_line(capsys.readouterr().err, f"run config '{key}'", words)


def test_string_arguments_are_quoted_literals_and_may_hold_spaces():
    from strategies.flower_spec import parse_args

    got = parse_args("a=1 b='x y' c=[1, 2] d=True e=None weighted_by_key='num-examples'", "strategy-args")
    assert got == {"a": 1, "b": "x y", "c": [1, 2], "d": True, "e": None, "weighted_by_key": "num-examples"}


def test_the_server_app_refuses_a_bad_strategy_argument_before_any_message(fake_grid, tmp_path):
    cfg = {
        **TINY,
        "strategy": "flwr:Krum",
        "strategy-args": "num_malicious_nodes=one",
        "output-dir": str(tmp_path),
        "run-name": "k",
    }
    grid = fake_grid(NODES, cfg)
    _one_line(_main(grid, cfg), "strategy-args", "num_malicious_nodes=one")
    assert grid.delivered == [] and not (tmp_path / "k").exists()


# -- a preset among key=value overrides -------------------------------------------
@pytest.mark.parametrize(
    "item, words",
    [
        ("presets/cifar100.toml num-server-rounds=2", "--run-config presets/cifar100.toml --run-config"),
        ("num-server-rounds=2 local-epochs", "every word must be key=value"),
    ],
)
def test_a_word_flower_would_drop_from_an_override_string_is_refused(item, words, capsys):
    from anytime_fl.checkconfig import main as check_config

    assert check_config(["--run-config", item]) == 2
    _one_line(capsys.readouterr().err, "run config '--run-config'", "would be ignored", words)


def test_presets_and_overrides_given_apart_still_merge(capsys):
    from anytime_fl.checkconfig import main as check_config

    preset = str(Path(__file__).resolve().parents[1] / "presets" / "cifar100.toml")
    assert check_config(["--run-config", preset, "--run-config", "num-server-rounds=2 lr=0.1"]) == 0
    assert "keys set" in capsys.readouterr().out


# -- a damaged results row on resume ----------------------------------------------
@pytest.fixture
def finished_run(fake_grid, tmp_path):
    from server_app.app import run

    cfg = {**TINY, "heads": "trained", "num-server-rounds": 3, "output-dir": str(tmp_path), "run-name": "cut"}
    run_dir = run(fake_grid(NODES, cfg), cfg)
    return cfg, run_dir, (run_dir / results.RESULTS).read_text().splitlines()


def test_a_cut_last_row_is_rebuilt_from_the_checkpoint_on_resume(finished_run, fake_grid):
    from server_app.app import run

    cfg, run_dir, lines = finished_run
    (run_dir / results.RESULTS).write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])
    more = {**cfg, "num-server-rounds": 4, "resume": True}
    grid = fake_grid(NODES, more)
    run(grid, more)
    assert grid.rounds(MessageType.TRAIN) == [4]
    rows = results.read_rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert (run_dir / results.RESULTS).read_text().splitlines()[:3] == lines  # round 3 as it was written


def test_an_earlier_row_the_checkpoint_cannot_rebuild_refuses_the_resume_in_one_line(finished_run, fake_grid):
    cfg, run_dir, lines = finished_run
    (run_dir / results.RESULTS).write_text("\n".join([lines[0], "{garbage", lines[2]]) + "\n")
    config_before = (run_dir / "config.json").read_text()
    more = {**cfg, "num-server-rounds": 4, "resume": True}
    grid = fake_grid(NODES, more)
    _one_line(_main(grid, more), "'resume'", str(run_dir / results.RESULTS), "rounds 2", "new run-name")
    assert grid.rounds(MessageType.TRAIN) == [] and (run_dir / "config.json").read_text() == config_before


# -- backbone loading: hub, mismatch ------------------------------------------------
def test_hub_weights_out_of_reach_say_to_set_backbone_weights(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    import adapters.backbone as backbone

    def offline(name, pretrained=False, **kwargs):
        if pretrained and "pretrained_cfg_overlay" not in kwargs:
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub ...")
        raise AssertionError("only hub weights are asked for here")

    monkeypatch.setattr(backbone.timm, "create_model", offline)
    with pytest.raises(BackboneError) as err:
        load_backbone("vit_tiny_patch16_224", pretrained=True)
    _one_line(str(err.value), "pretrained:", "LocalEntryNotFoundError", "set backbone-weights to a local weights file")


def test_a_weights_file_of_another_backbone_is_said_not_to_match_it():
    shipped = resolve_weights("shipped")
    with pytest.raises(BackboneError) as err:
        load_backbone("vit_tiny_patch16_224", weights=shipped)
    line = _one_line(str(err.value), "backbone-weights", shipped, "does not match backbone 'vit_tiny_patch16_224'")
    assert "not a readable" not in line


# -- smaller ones -------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, key", [(["--run-config", "seed=-1"], "seed"), (["--run-config", "seed=4294967296"], "seed")]
)
def test_a_seed_numpy_cannot_take_is_refused_by_check_config(args, key, capsys):
    from anytime_fl.checkconfig import main as check_config

    assert check_config(args) == 2
    _one_line(capsys.readouterr().err, f"run config '{key}'", "0..4294967295")


def test_attack_partitions_beyond_the_federation_are_refused(capsys):
    from anytime_fl.checkconfig import main as check_config
    from server_app import preflight

    assert check_config(["--num-nodes", "20", "--run-config", "attack-partitions='3,99'"]) == 2
    _one_line(capsys.readouterr().err, "'attack-partitions'", "99", "20 partitions")
    assert check_config(["--num-nodes", "20", "--run-config", "attack-partitions='19'"]) == 0
    with pytest.raises(ValueError, match="attack-partitions"):  # the ServerApp, once it knows the nodes
        preflight.partition_document(validate({**TINY, "attack-partitions": "2"}), 2)


def test_a_checkpoint_of_random_bytes_is_not_called_pickled_data(tmp_path):
    from server_app import checkpoint

    (tmp_path / checkpoint.NAME).write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load(tmp_path)
    line = _one_line(str(err.value), str(tmp_path / checkpoint.NAME), "not a readable .npz archive")
    assert "pickle" not in line
