"""core.messages: one record per depth for every exchange, and the node behind a reply."""

import numpy as np
from flwr.app import ConfigRecord, Error, Message, MessageType

from core.messages import by_depth, reply_node
from tests.localgrid import ensure_task_identity

ensure_task_identity()  # Flower stamps a message with the task that builds it

ARRAYS = {f"{kind}.{i}.w": np.full(2, i, np.float32) for kind in ("adapters", "heads") for i in range(3)}


def test_a_node_gets_the_arrays_of_its_depth_and_a_depth_is_converted_once():
    msgs = by_depth(ARRAYS, [5, 6, 7, 8], {5: 1, 6: 2, 7: 1}, ConfigRecord({"x": 1}), MessageType.QUERY)
    records = [m.content.array_records["arrays"] for m in msgs]
    assert [len(r) for r in records] == [2, 4, 2, 6]  # node 8's depth is unknown: all of it
    assert records[0] is records[2] and records[0] is not records[1]
    assert [m.metadata.dst_node_id for m in msgs] == [5, 6, 7, 8]
    assert all(
        m.metadata.message_type == MessageType.QUERY and m.content.config_records["config"]["x"] == 1 for m in msgs
    )


def test_record_keys_follow_the_strategy():
    (msg,) = by_depth(ARRAYS, [1], None, ConfigRecord(), MessageType.TRAIN, arrays_key="a", config_key="c")
    assert set(msg.content.array_records) == {"a"} and set(msg.content.config_records) == {"c"}


def test_an_error_reply_the_superlink_wrote_names_the_node_it_was_sent_to():
    sent = by_depth(ARRAYS, [11, 12], None, ConfigRecord(), MessageType.TRAIN)
    for i, m in enumerate(sent):
        m.metadata.__dict__["_message_id"] = f"id{i}"
    dead = Message(Error(code=0, reason="node gone"), reply_to=sent[1])
    dead.metadata.__dict__["_src_node_id"] = 0  # the SuperLink writes it from itself
    assert dead.metadata.src_node_id == 0
    assert reply_node(dead, sent) == 12
    ok = Message(sent[0].content, reply_to=sent[0])
    assert reply_node(ok, sent) == ok.metadata.src_node_id  # a real reply names its sender itself
