"""Personalisation: local fine-tuning on the client, metrics-only replies, the server's summary."""

import json
import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from safetensors.numpy import load_file

import client_app.personalize as personalize_mod
from adapters.state import get_state, set_state
from client_app.app import personalize_exits
from core.config import validate
from core.naming import param_block
from core.records import to_record
from runtime.models import initial_state, model_and_spec
from server_app import checkpoint, results
from server_app.app import run
from server_app.personalization import FILE, PERSONALIZE, summarize
from tests.flowerkit import context

RUN = {"task": "digits", "backbone-weights": "", "batch-size": 32, "personalize-epochs": 2, "personalize-lr": 3e-3}


def _personalize_message(arrays, node_id=1):
    content = RecordDict({"arrays": to_record(arrays), "config": ConfigRecord({"server-round": 9})})
    return Message(content=content, dst_node_id=node_id, message_type=PERSONALIZE)


def test_personalisation_trains_on_the_client_only_and_lowers_its_training_loss(monkeypatch):
    model, _ = model_and_spec(validate(RUN))
    rng = np.random.default_rng(0)
    # global weights near the fresh adapters (whatever earlier tests left in the cached model,
    # fine-tuning must start from the same point) that differ from what the model holds now
    start = initial_state(validate(RUN))
    set_state(model, start)
    sent = {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in start.items()}
    personal = {}
    real_fine_tune = personalize_mod.fine_tune

    def spy(m, depth, train_ds, cfg, seed=0):
        stats = real_fine_tune(m, depth, train_ds, cfg, seed)
        personal.update(get_state(m, depth))
        return stats

    monkeypatch.setattr(personalize_mod, "fine_tune", spy)
    untouched = {k: v for k, v in get_state(model).items() if param_block(k) > 3}
    node = {"partition-id": 1, "num-partitions": 4, "max-depth": 3}
    reply = personalize_exits(_personalize_message(sent), context(node, RUN))

    assert set(personal) and all(param_block(k) <= 3 for k in personal)
    changed = [k for k in personal if not np.allclose(personal[k], sent[k])]
    assert changed, "fine-tuning did not change the adapters"
    # only metrics go back, and the process's model holds the global weights again
    assert len(reply.content.array_records) == 0
    after = get_state(model)
    assert all(np.array_equal(after[k], sent[k]) for k in personal)
    assert all(np.array_equal(after[k], v) for k, v in untouched.items())
    m = reply.content.metric_records["metrics"]
    assert m["train-loss-after"] < m["train-loss-before"]
    assert m["depth"] == 3 and m["partition-id"] == 1
    assert {f"accuracy-{w}-{i}" for w in ("before", "after") for i in (1, 2, 3)} <= set(m)
    assert "accuracy-before-4" not in m


def _reply(depth, before, after, node):
    metrics = {
        "depth": depth,
        "num-examples": 10,
        "partition-id": node,
        "train-loss-before": 2.0,
        "train-loss-after": 1.0,
    }
    for i, (b, a) in enumerate(zip(before, after), start=1):
        metrics[f"accuracy-before-{i}"] = b
        metrics[f"accuracy-after-{i}"] = a
    msg = Message(
        content=RecordDict({"metrics": MetricRecord(metrics)}), dst_node_id=0, message_type=MessageType.EVALUATE
    )
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def test_summary_gives_mean_and_spread_of_the_gain_per_exit():
    replies = [_reply(2, [0.5, 0.5], [0.7, 0.6], 1), _reply(1, [0.4], [0.3], 2), _reply(2, [0.2, 0.3], [0.5, 0.3], 3)]
    s = summarize([(m.metadata.src_node_id, m) for m in replies], validate({}))
    assert s["clients"] == 3 and s["failed"] == 0
    e1, e2 = s["exits"]
    gains1 = np.array([0.2, -0.1, 0.3])
    assert e1["clients"] == 3 and e1["gain-mean"] == pytest.approx(gains1.mean(), abs=1e-4)
    assert e1["gain-std"] == pytest.approx(gains1.std(), abs=1e-4)
    assert (e1["gain-min"], e1["gain-max"]) == pytest.approx((-0.1, 0.3))
    assert e2["clients"] == 2 and e2["gain-mean"] == pytest.approx(0.05)
    assert e2["accuracy-before"] == pytest.approx(0.4) and e2["accuracy-after"] == pytest.approx(0.45)


def test_server_runs_one_personalisation_round_and_keeps_the_global_weights(fake_grid, tmp_path):
    cfg = {
        **RUN,
        "num-server-rounds": 1,
        "local-epochs": 1,
        "tiers": "1,2",
        "fraction-train": 1.0,
        "fraction-evaluate": 0.0,
        "personalize-epochs": 1,
        "output-dir": str(tmp_path),
        "run-name": "p",
    }
    grid = fake_grid(3, cfg)
    run_dir = run(grid, cfg)
    personalize = [d for d in grid.delivered if d["type"] == PERSONALIZE]
    assert sorted(d["node"] for d in personalize) == [1, 2, 3]
    summary = json.loads((run_dir / FILE).read_text())
    assert summary["clients"] == 3 and summary["epochs"] == 1
    assert [e["exit"] for e in summary["exits"]] == [1, 2]
    assert summary["exits"][0]["clients"] == 3 and summary["exits"][1]["clients"] == 1
    # the final global weights are what training produced, untouched by personalisation
    final = load_file(str(run_dir / results.WEIGHTS))
    saved = checkpoint.load(run_dir)["arrays"]
    assert set(final) == set(saved) and all(np.array_equal(final[k], saved[k]) for k in final)


def test_no_personalisation_round_when_epochs_is_zero(fake_grid, tmp_path):
    cfg = {
        **RUN,
        "num-server-rounds": 1,
        "local-epochs": 1,
        "tiers": "1",
        "fraction-train": 1.0,
        "fraction-evaluate": 0.0,
        "personalize-epochs": 0,
        "output-dir": str(tmp_path),
        "run-name": "q",
    }
    grid = fake_grid(2, cfg)
    run_dir = run(grid, cfg)
    assert not any(d["type"] == PERSONALIZE for d in grid.delivered)
    assert not (run_dir / FILE).exists()


def test_personalisation_sends_a_node_the_arrays_of_its_depth_and_names_a_dead_one(caplog):
    from flwr.app import Error

    from server_app.personalization import request

    arrays = {f"heads.{i}.fc.weight": np.zeros((2, 2), np.float32) for i in range(3)}

    class Grid:
        def get_node_ids(self):
            return [1, 2, 3]

        def send_and_receive(self, messages, timeout):
            self.sent = list(messages)
            for i, m in enumerate(self.sent):
                m.metadata.__dict__["_message_id"] = f"id{i}"
            # node 2 died: the SuperLink answers for it, from itself (node 0)
            return [Message(Error(code=0, reason="node gone"), reply_to=self.sent[1])]

    grid = Grid()
    replies = request(grid, lambda msgs, _label: grid.send_and_receive(msgs, 1), arrays, 2, node_depth={1: 1, 2: 2})
    assert [len(m.content.array_records["arrays"]) for m in grid.sent] == [1, 2, 3]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert summarize(replies, validate({}))["failed"] == 1
    assert "node 2 failed: node gone" in caplog.text


def test_a_node_whose_labels_match_the_federations_keeps_the_federations_heads():
    from client_app.personalize import labels_differ

    rng = np.random.default_rng(0)
    federation = [248] * 62
    # the characters task: 4 images a class per node, 80 % of them for training
    balanced = np.bincount(rng.permutation(np.repeat(np.arange(62), 4))[:198], minlength=62)
    assert not labels_differ(balanced, federation)
    skewed = np.bincount(rng.choice(62, 198, p=rng.dirichlet([0.5] * 62)), minlength=62)
    assert labels_differ(skewed, federation)
    assert not labels_differ(np.zeros(62), federation)
