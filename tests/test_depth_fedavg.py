"""Depth-aware FedAvg on hand-made updates from clients of different depth."""

import numpy as np

from core.records import to_numpy, to_record
from strategies.depth_fedavg import DepthAwareFedAvg
from tests.flowerkit import reply

GLOBAL = {
    "adapters.0.w": np.array([1.0, 1.0], np.float32),
    "heads.0.w": np.array([0.0, 0.0], np.float32),
    "adapters.1.w": np.array([5.0, 5.0], np.float32),
    "heads.2.w": np.array([7.0, -7.0], np.float32),  # nobody trains block 3
}


def _strategy():
    s = DepthAwareFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_nodes=1)
    s.global_arrays = {k: v.copy() for k, v in GLOBAL.items()}
    return s


def test_each_parameter_is_averaged_over_the_clients_that_sent_it():
    replies = [
        # depth 1, 10 examples: deltas for block 1 only
        reply(
            {"adapters.0.w": np.array([1.0, 0.0], np.float32), "heads.0.w": np.array([2.0, 2.0], np.float32)}, 10, 1, 11
        ),
        # depth 2, 30 examples: blocks 1 and 2
        reply(
            {
                "adapters.0.w": np.array([-1.0, 4.0], np.float32),
                "heads.0.w": np.array([6.0, 2.0], np.float32),
                "adapters.1.w": np.array([3.0, -3.0], np.float32),
            },
            30,
            2,
            12,
        ),
    ]
    arrays, metrics = _strategy().aggregate_train(1, replies)
    new = to_numpy(arrays)
    # block 1: weights 10 and 30
    np.testing.assert_allclose(
        new["adapters.0.w"], GLOBAL["adapters.0.w"] + (10 * np.array([1, 0]) + 30 * np.array([-1, 4])) / 40
    )
    np.testing.assert_allclose(new["heads.0.w"], (10 * np.array([2, 2]) + 30 * np.array([6, 2])) / 40)
    # block 2: only the depth-2 client sent it, so its delta applies in full
    np.testing.assert_allclose(new["adapters.1.w"], GLOBAL["adapters.1.w"] + np.array([3, -3]))
    # block 3: nobody sent it, it keeps its value, and the full state comes back
    np.testing.assert_array_equal(new["heads.2.w"], GLOBAL["heads.2.w"])
    assert set(new) == set(GLOBAL)
    assert metrics["num-examples"] == 40


def test_an_update_beyond_the_clients_depth_is_dropped():
    bad = reply({"adapters.1.w": np.array([100.0, 100.0], np.float32)}, 10, 1, 13)
    good = reply({"adapters.0.w": np.array([1.0, 1.0], np.float32)}, 10, 1, 14)
    s = _strategy()
    arrays, _ = s.aggregate_train(1, [bad, good])
    new = to_numpy(arrays)
    np.testing.assert_array_equal(new["adapters.1.w"], GLOBAL["adapters.1.w"])
    assert s.round_stats.dropped == 1 and s.round_stats.clients == 1


def test_downlink_is_trimmed_to_a_known_node_depth():
    s = _strategy()
    s.aggregate_train(1, [reply({"adapters.0.w": np.zeros(2, np.float32)}, 5, 1, 21)])

    class G:
        def get_node_ids(self):
            return [21]

    from flwr.app import ConfigRecord

    msgs = list(s.configure_train(2, to_record(GLOBAL), ConfigRecord(), G()))
    assert set(msgs[0].content.array_records["arrays"].keys()) == {"adapters.0.w", "heads.0.w"}


def test_an_error_reply_written_by_the_superlink_names_the_dead_node():
    from flwr.app import ConfigRecord, Error, Message

    s = _strategy()

    class G:
        def get_node_ids(self):
            return [31, 32]

    sent = list(s.configure_train(1, to_record(GLOBAL), ConfigRecord(), G()))
    for i, msg in enumerate(sent):  # what the grid does on push
        msg.metadata.__dict__["_message_id"] = f"m{i}"
    dead = next(m for m in sent if m.metadata.dst_node_id == 32)
    err = Message(Error(code=1, reason="node unavailable"), reply_to=dead)
    err.metadata.__dict__["_src_node_id"] = 1  # the SuperLink's own id, as it sends such replies
    ok = reply({"adapters.0.w": np.ones(2, np.float32)}, 10, 1, 31)
    s.aggregate_train(1, [ok, err])
    assert s.round_stats.dropped_nodes == [32]


def test_records_are_read_whatever_their_names_as_flowers_strategies_read_them():
    # A reply whose one ArrayRecord and one MetricRecord carry other names
    # (the names are the sender's to choose) aggregates like one named as usual.
    delta = {"adapters.0.w": np.array([2.0, 2.0], np.float32), "heads.0.w": np.array([1.0, 1.0], np.float32)}
    usual = reply(delta, 10, 1, 11)
    renamed = reply(delta, 10, 1, 11)
    content = renamed.content
    content["weights"] = content.array_records["arrays"]
    content["stats"] = content.metric_records["metrics"]
    del content["arrays"], content["metrics"]
    a, _ = _strategy().aggregate_train(1, [usual])
    b, _ = _strategy().aggregate_train(1, [renamed])
    assert all(np.array_equal(to_numpy(a)[k], to_numpy(b)[k]) for k in GLOBAL)


def test_a_reply_with_two_array_records_is_dropped_naming_them():
    bad = reply({"adapters.0.w": np.array([2.0, 2.0], np.float32)}, 10, 1, 11)
    bad.content["extra"] = to_record({"x": np.zeros(1, np.float32)})
    s = _strategy()
    arrays, _ = s.aggregate_train(1, [bad])
    assert arrays is None
    assert "expected one array record, found 2" in s.round_stats.dropped_reasons[0]


def test_a_node_whose_depth_grew_is_sent_every_array_after_it_failed():
    from flwr.app import ConfigRecord, Error, Message, MessageType

    arrays = {f"heads.{i}.fc.weight": np.zeros((2, 2), np.float32) for i in range(3)}
    strategy = DepthAwareFedAvg(min_nodes=1)
    strategy.node_depth[5] = 1  # learnt when the node ran one block
    out = strategy._messages(arrays, ConfigRecord(), [5], MessageType.TRAIN)
    assert len(out[0].content.array_records[strategy.arrayrecord_key]) == 1
    failed = Message(Error(code=0, reason="server sent no weights for blocks 2..3"), reply_to=out[0])
    strategy.global_arrays = arrays
    strategy.accept(1, [failed])
    out = strategy._messages(arrays, ConfigRecord(), [5], MessageType.TRAIN)
    assert len(out[0].content.array_records[strategy.arrayrecord_key]) == 3
