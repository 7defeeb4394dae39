"""Failing like a tool people trust: safe checkpoints, one run per folder, config drift on resume,
checks before round 1, one-line errors that name the key or file, and nothing earlier lost."""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adapters.backbone import BackboneError, load_backbone
from anytime_fl import predict, pretrain
from anytime_fl.cli import main as cli
from core.config import ConfigError, validate
from fedtasks.base import DataError
from server_app import checkpoint, drift, lock, preflight, results
from server_app.app import RunFailed, in_partition_order, main, round_row, run
from tests.test_pretrain import fake_fmnist  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "task": "digits",
    "backbone-weights": "",
    "num-server-rounds": 1,
    "local-epochs": 1,
    "batch-size": 32,
    "tiers": "1,2",
    "fraction-evaluate": 0.0,
    "personalize-epochs": 0,
    "min-nodes-timeout": 5,
}
NODES = 2


class Evil:
    """Unpickling this writes a marker file: proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def _one_line(text: str, *needles: str) -> None:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    for n in needles:
        assert n in lines[0], (n, lines[0])


# -- checkpoints: arrays and JSON only ----------------------------------------
def test_a_crafted_pickle_in_a_checkpoint_is_never_unpickled(tmp_path):
    marker = tmp_path / "marker"
    payload = np.frombuffer(pickle.dumps(Evil(marker)), dtype=np.uint8)
    meta = np.frombuffer(json.dumps({"round": 1}).encode(), dtype=np.uint8)  # the old format: a pickled RNG state
    with open(tmp_path / checkpoint.NAME, "wb") as fh:
        np.savez(fh, meta=meta, rng=payload, **{"a/w": np.ones(2, np.float32)})
    with pytest.raises(checkpoint.CheckpointError, match="format"):
        checkpoint.load(tmp_path)
    # Today's format, but an object array (np.savez pickles it) where the RNG state goes.
    meta = {"format": checkpoint.FORMAT, "round": 1, "rng": {}}
    with open(tmp_path / checkpoint.NAME, "wb") as fh:
        np.savez(
            fh,
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            **{"r/python": np.array([Evil(marker)], dtype=object), "r/numpy": np.zeros(1), "r/torch": np.zeros(1)},
        )
    with pytest.raises(checkpoint.CheckpointError, match=str(tmp_path / checkpoint.NAME)):
        checkpoint.load(tmp_path)
    assert not marker.exists()
    source = (ROOT / "server_app" / "checkpoint.py").read_text()
    assert "import pickle" not in source and "allow_pickle=True" not in source


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    import random

    import torch

    random.seed(3), np.random.seed(4), torch.manual_seed(5), np.random.randn()  # a cached gauss too
    checkpoint.save(tmp_path, 1, {"w": np.ones(2, np.float32)}, {}, {})
    first = (random.random(), np.random.randn(), torch.rand(1).item())
    checkpoint.restore_rng(checkpoint.load(tmp_path)["rng"])
    assert (random.random(), np.random.randn(), torch.rand(1).item()) == first


def test_a_truncated_checkpoint_is_one_line_naming_the_file(tmp_path):
    checkpoint.save(tmp_path, 1, {"w": np.ones(1000, np.float32)}, {}, {})
    path = tmp_path / checkpoint.NAME
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load(tmp_path)
    _one_line(str(err.value), str(path), "truncated")


# -- one live run per folder ---------------------------------------------------
def test_a_live_run_owns_its_folder_and_a_crashed_one_does_not(tmp_path):
    fd = lock.acquire(tmp_path)
    with pytest.raises(ConfigError) as err:
        lock.acquire(tmp_path)
    _one_line(str(err.value), str(tmp_path), f"pid {os.getpid()}")
    lock.release(fd)
    lock.release(lock.acquire(tmp_path))
    # A holder killed with SIGKILL cannot clean up; the kernel drops its lock.
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from server_app import lock; "
            "lock.acquire(sys.argv[1]); print('locked', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "locked"
    with pytest.raises(ConfigError):
        lock.acquire(tmp_path)
    child.send_signal(signal.SIGKILL)
    child.wait()
    lock.release(lock.acquire(tmp_path))


# -- the run config, before Flower and before round 1 --------------------------
@pytest.mark.parametrize(
    "user, key",
    [
        ({"tier-assignment": "0.5,0.5"}, "tier-assignment"),  # 2 fractions, 4 tiers
        ({"val-fraction": 1.0}, "val-fraction"),
        ({"num-server-round": 3}, "num-server-round"),
    ],
)
def test_config_mistakes_name_the_key(user, key):
    with pytest.raises(ConfigError) as err:
        validate(user)
    assert err.value.key == key
    _one_line(str(err.value), key)


def test_check_config_gives_the_projects_message_and_merges_presets_with_overrides(tmp_path, capsys):
    assert cli(["check-config", "--run-config", "num-server-round=3"]) == 2
    _one_line(capsys.readouterr().err, "num-server-round", "did you mean 'num-server-rounds'")
    merged = tmp_path / "m.toml"
    # The README's offline recipe: a preset plus an override, later wins.
    assert (
        cli(
            [
                "check-config",
                "--run-config",
                str(ROOT / "presets/cifar100.toml"),
                "--run-config",
                "data-dir='/data/cifar100' num-server-rounds=2",
                "--write",
                str(merged),
            ]
        )
        == 0
    )
    from flwr.common.config import parse_config_args

    got = parse_config_args([str(merged)])
    assert got["task"] == "cifar100" and got["data-dir"] == "/data/cifar100" and got["num-server-rounds"] == 2
    assert got["pretrained"] is True and got["fraction-train"] == 0.1
    assert cli(["check-config", "--run-config", "seed=1", "--write", str(tmp_path / "no" / "such" / "m.toml")]) == 2
    _one_line(capsys.readouterr().err, "--write", str(tmp_path / "no" / "such"))


class Nodes:
    def __init__(self, n):
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


def test_min_nodes_stops_after_the_timeout_saying_how_many_came():
    now = [0.0]
    with pytest.raises(ConfigError) as err:
        preflight.wait_for_nodes(
            Nodes(4),
            validate({"min-nodes": 10, "min-nodes-timeout": 30}),
            clock=lambda: now[0],
            sleep=lambda s: now.__setitem__(0, now[0] + s),
        )
    _one_line(str(err.value), "min-nodes", "only 4 of the 10", "30s")
    assert now[0] == pytest.approx(30, abs=1.5)
    assert preflight.wait_for_nodes(Nodes(4), validate({"min-nodes": 3})) == 4


def test_a_federation_with_more_nodes_than_examples_stops_before_round_1():
    with pytest.raises(DataError) as err:
        preflight.partition_document(validate({}), 5000)
    _one_line(str(err.value), "digits", "5000")


# -- runs: exit status, drift, folders -----------------------------------------
def test_a_failed_run_raises_an_exception_so_flower_marks_it_failed(fake_grid, tmp_path, caplog):
    from flwr.app import Context, RecordDict

    (tmp_path / "afile").write_text("not a folder")
    cfg = {**TINY, "output-dir": str(tmp_path / "afile")}
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg)
    with caplog.at_level(logging.ERROR, logger="flwr"):
        with pytest.raises(RunFailed):  # an Exception: Flower lists a run that raised SystemExit as completed
            main(fake_grid(NODES, cfg), ctx)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    _one_line(errors[0], "anytime-fl stopped", "output-dir", str(tmp_path / "afile"))
    assert not hasattr(sys, "tracebacklimit")  # only Flower's own run processes drop the traceback


@pytest.mark.parametrize("output_dir", ["file", "/proc/anytime-fl-13"])
def test_an_odd_or_unwritable_output_dir_is_one_line(fake_grid, tmp_path, output_dir):
    if output_dir == "file":
        output_dir = str(tmp_path / "file")
        Path(output_dir).write_text("x")
    cfg = {**TINY, "output-dir": output_dir}
    with pytest.raises(ConfigError) as err:
        run(fake_grid(NODES, cfg), cfg)
    assert err.value.key == "output-dir"
    _one_line(str(err.value), output_dir)


def test_resume_refuses_model_or_data_drift_and_records_other_changes(fake_grid, tmp_path):
    cfg = {**TINY, "output-dir": str(tmp_path), "run-name": "r"}
    run_dir = run(fake_grid(NODES, cfg), cfg)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    for change in ({"tiers": "1,3"}, {"backbone-weights": "shipped"}, {"adapter-width": 16}, {"seed": 7}):
        key = next(iter(change))
        with pytest.raises(ConfigError) as err:
            run(fake_grid(NODES, cfg), {**cfg, **change, "resume": True})
        assert err.value.key == key
        _one_line(str(err.value), key, "cannot resume")
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


def test_a_round_counts_the_bytes_of_accepted_updates_only():
    row = round_row(
        1,
        1.0,
        {"accuracy": [0.5]},
        {"bytes-up": 100, "clients": 1, "dropped": 1},
        None,
        None,
        [],
        {"dense-adapter-bytes": 1, "full-finetune-bytes": 2},
    )
    assert row["bytes-up"] == 100


def test_aggregation_does_not_depend_on_the_order_replies_arrive():
    from tests.flowerkit import reply

    msgs = []
    for pid in (2, 0, 1):
        m = reply({"heads.0.fc.weight": np.full((2, 2), pid, np.float32)}, 10, 1, node_id=100 + pid)
        m.content.metric_records["metrics"]["partition-id"] = pid
        msgs.append(m)
    assert [m.content.metric_records["metrics"]["partition-id"] for m in in_partition_order(msgs)] == [0, 1, 2]


# -- the command-line tools ----------------------------------------------------
def test_a_corrupt_backbone_weights_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((ROOT / "anytime_assets" / "vit_micro_patch7_28.fmnist.safetensors").read_bytes()[:100])
    with pytest.raises(BackboneError) as err:
        load_backbone("vit_micro_patch7_28", weights=str(bad))
    _one_line(str(err.value), str(bad), "backbone-weights")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--threshold", "-1"], "--threshold"),
        (["--threshold", "nan"], "--threshold"),
        (["--threshold", "1.5"], "--threshold"),
        (["--max-depth", "0"], "--max-depth"),
    ],
)
def test_predict_refuses_bad_threshold_and_depth(tmp_path, capsys, args, needle):
    assert predict.main([str(tmp_path), str(tmp_path / "x.png"), *args]) == 2
    _one_line(capsys.readouterr().err, needle)


def test_pretrain_exits_0_and_never_overwrites_without_force(tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(SystemExit) as exc:
        pretrain.main(["--out", str(out), "--epochs", "1"])
    assert exc.value.code == 2 and out.read_bytes() == b"keep me"
    _one_line(capsys.readouterr().err, str(out), "--force")
    with pytest.raises(SystemExit) as exc:
        pretrain.main(["--epochs", "1"])  # the default --out is the shipped backbone
    assert exc.value.code == 2
    _one_line(capsys.readouterr().err, "shipped")


def test_pretrain_cli_returns_0_on_success(tmp_path, fake_fmnist):
    out = tmp_path / "w.safetensors"
    args = ["--out", str(out), "--epochs", "1", "--batch-size", "32", "--train-limit", "64"]
    args += ["--data-dir", str(fake_fmnist)]
    assert cli(["pretrain", *args]) == 0 and out.is_file()
    assert cli(["pretrain", *args, "--force"]) == 0


def test_partitions_too_many_or_unwritable_out_is_one_line(tmp_path, capsys):
    assert cli(["partitions", "--num-partitions", "5000", "--out", str(tmp_path / "s")]) == 2
    _one_line(capsys.readouterr().err, "--num-partitions", "5000")
    assert not (tmp_path / "s.json").exists()
    assert cli(["partitions", "--num-partitions", "2", "--out", "/proc/anytime-fl-13/s"]) == 2
    _one_line(capsys.readouterr().err, "--out", "/proc/anytime-fl-13")


def test_a_node_whose_depth_grew_is_sent_every_array_after_it_failed():
    from flwr.app import ConfigRecord, Error, Message, MessageType

    from core.records import to_record
    from strategies.depth_fedavg import DepthAwareFedAvg
    from tests.flowerkit import reply  # noqa: F401  (sets Flower's task identity)

    arrays = {f"heads.{i}.fc.weight": np.zeros((2, 2), np.float32) for i in range(3)}
    strategy = DepthAwareFedAvg(min_nodes=1)
    strategy.node_depth[5] = 1  # learnt when the node ran one block
    out = strategy._messages(to_record(arrays), ConfigRecord(), [5], MessageType.TRAIN)
    assert len(out[0].content.array_records[strategy.arrayrecord_key]) == 1
    failed = Message(Error(code=0, reason="server sent no weights for blocks 2..3"), reply_to=out[0])
    strategy.global_arrays = arrays
    strategy.accept(1, [failed])
    out = strategy._messages(to_record(arrays), ConfigRecord(), [5], MessageType.TRAIN)
    assert len(out[0].content.array_records[strategy.arrayrecord_key]) == 3


def test_fedprox_leaves_the_parameters_beyond_a_clients_depth_alone():
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from adapters.state import get_state
    from adapters.training import TrainSettings, train_local
    from runtime.models import model_and_spec

    model, spec = model_and_spec(validate({"backbone-weights": ""}))
    before = get_state(model)
    data = TensorDataset(torch.randn(8, spec.in_chans, spec.img_size, spec.img_size), torch.randint(0, 10, (8,)))
    try:
        train_local(model, DataLoader(data, batch_size=4), 2, TrainSettings(epochs=1, prox_mu=0.1, weight_decay=0.1))
        after = get_state(model)
        moved = [k for k in before if not np.array_equal(before[k], after[k])]
        assert moved and all(k.startswith(("adapters.0.", "adapters.1.", "heads.0.", "heads.1.")) for k in moved), moved
    finally:
        from adapters.state import set_state

        set_state(model, before)  # the model is cached process-wide


def test_personalisation_sends_a_node_the_arrays_of_its_depth_and_names_a_dead_one(caplog):
    from flwr.app import Error, Message

    from server_app.personalization import request, summarize
    from tests.flowerkit import reply  # noqa: F401  (sets Flower's task identity)

    arrays = {f"heads.{i}.fc.weight": np.zeros((2, 2), np.float32) for i in range(3)}

    class Grid(Nodes):
        def send_and_receive(self, messages, timeout):
            self.sent = list(messages)
            for i, m in enumerate(self.sent):
                m.metadata.__dict__["_message_id"] = f"id{i}"
            # node 2 died: the SuperLink answers for it, from itself (node 0)
            return [Message(Error(code=0, reason="node gone"), reply_to=self.sent[1])]

    grid = Grid(3)
    replies = request(grid, arrays, validate({}), 2, node_depth={1: 1, 2: 2})
    assert [len(m.content.array_records["arrays"]) for m in grid.sent] == [1, 2, 3]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert summarize(replies, validate({}))["failed"] == 1
    assert "node 2 failed: node gone" in caplog.text
