"""Pulling replies from a real Flower HttpGrid whose SuperLink is faked: a node that stops
mid-upload costs the round `upload-stall-timeout`, not Flower's 210 s, and the progress
line keeps coming while a call blocks."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.proto.message_pb2 import ConfirmMessageReceivedResponse, PullObjectResponse
from flwr.proto.runtime_pb2 import PullAppMessagesResponse
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError
from flwr.superlink.grid import HttpGrid

from server_app import exchange, pull
from tests.localgrid import ensure_task_identity


class FakeRuntime:
    """The SuperLink's Runtime API as HttpGrid calls it; node 3's upload never completes."""

    def __init__(self):
        self.replies: dict[str, Message] = {}  # sent message id -> reply
        self.stalled_nodes: set[int] = set()
        self.confirmed: list[str] = []

    def PullMessages(self, request):  # noqa: N802 - Flower's RPC name
        from flwr.app.message import remove_content_from_message
        from flwr.common.serde import message_to_proto

        res = PullAppMessagesResponse()
        for mid in request.message_ids:
            reply = self.replies.get(mid)
            if reply is not None:
                res.messages_list.append(message_to_proto(remove_content_from_message(reply)))
                res.message_object_trees.append(get_object_tree(reply))
        return res

    def PullObject(self, request):  # noqa: N802
        for reply in self.replies.values():
            objects = get_all_nested_objects(reply)
            if request.object_id in objects:
                if reply.metadata.src_node_id in self.stalled_nodes and request.object_id != reply.object_id:
                    return PullObjectResponse(object_found=True, object_available=False)
                return PullObjectResponse(
                    object_found=True, object_available=True, object_content=objects[request.object_id].deflate()
                )
        return PullObjectResponse(object_found=False, object_available=False)

    def ConfirmMessageReceived(self, request):  # noqa: N802
        self.confirmed.append(request.message_object_id)
        return ConfirmMessageReceivedResponse()


def _http_grid(runtime: FakeRuntime, nodes=(1, 2, 3), stalled=(3,)):
    from flwr.supercore.run import Run

    ensure_task_identity()
    grid = HttpGrid(token="test")
    grid._client = runtime  # what _connect would create
    grid.set_run(Run.create_empty(run_id=7))
    runtime.stalled_nodes = set(stalled)
    sent = []
    for node in nodes:
        msg = Message(RecordDict({"config": MetricRecord({"x": 1})}), dst_node_id=node, message_type="train")
        msg.metadata.__dict__["_message_id"] = f"mid{node}"
        sent.append(msg)
        reply = Message(
            RecordDict(
                {
                    "arrays": ArrayRecord([np.full(4, float(node), np.float32)]),
                    "metrics": MetricRecord({"partition-id": node - 1, "num-examples": 10}),
                }
            ),
            reply_to=msg,
        )
        reply.metadata.__dict__["_src_node_id"] = node
        reply.metadata.__dict__["_message_id"] = reply.object_id
        runtime.replies[f"mid{node}"] = reply

    def push_messages(messages):
        return [m.metadata.message_id for m in messages]

    grid.push_messages = push_messages
    return grid, sent


def test_a_reply_whose_upload_stops_comes_back_as_an_error_after_the_stall_bound():
    runtime = FakeRuntime()
    grid, _ = _http_grid(runtime)
    t0 = time.monotonic()
    (whole,) = pull.pull_reply(grid, "mid1", stall_s=0.5)
    assert not whole.has_error() and np.allclose(whole.content["arrays"].to_numpy_ndarrays()[0], 1.0)
    assert whole.metadata.reply_to_message_id == "mid1" and runtime.confirmed == [whole.object_id]
    (cut,) = pull.pull_reply(grid, "mid3", stall_s=0.5)
    took = time.monotonic() - t0
    assert cut.has_error() and "upload stopped" in cut.error.reason
    assert cut.metadata.reply_to_message_id == "mid3"
    assert 0.5 <= took < 5, took
    assert pull.pull_reply(grid, "no-such-id", stall_s=0.5) == []


def test_an_upload_that_keeps_arriving_is_waited_for_beyond_the_stall_bound():
    arrived = {"n": 0}

    def fetch(object_id):
        # One object every 0.2 s: slow, but never quiet for 0.5 s.
        if time.monotonic() < start + 0.2 * (int(object_id) + 1):
            raise ObjectUnavailableError(object_id)
        arrived["n"] += 1
        return b"x"

    start = time.monotonic()
    got = pull.pull_objects_while_arriving([str(i) for i in range(6)], fetch, stall_s=0.5)
    assert len(got) == 6 and time.monotonic() - start >= 1.0
    with pytest.raises(ObjectPullError, match="no part of the reply arrived"):
        pull.pull_objects_while_arriving(
            ["a"], lambda oid: (_ for _ in ()).throw(ObjectUnavailableError(oid)), stall_s=0.3
        )


def test_watched_notes_progress_while_a_call_blocks_and_gives_up_after_the_patience():
    notes = []
    release = threading.Event()
    threading.Timer(0.35, release.set).start()
    assert pull.watched(lambda: release.wait() and "done", every=0.1, note=notes.append, patience=10) == "done"
    assert len(notes) >= 2
    with pytest.raises(pull.SuperLinkSilent, match="no answer from the SuperLink"):
        pull.watched(lambda: time.sleep(5), every=0.05, note=lambda s: None, patience=0.2)
    with pytest.raises(ZeroDivisionError):
        pull.watched(lambda: 1 / 0, every=0.05, note=lambda s: None, patience=1)


def test_a_node_stopped_mid_upload_costs_the_round_the_stall_bound_with_progress_lines(monkeypatch, flwr_log):
    monkeypatch.setattr(exchange, "PROGRESS_EVERY_S", 0.1)
    monkeypatch.setattr(exchange, "POLL_S", 0.05)
    runtime = FakeRuntime()
    grid, sent = _http_grid(runtime)
    t0 = time.monotonic()
    replies = exchange.exchange(grid, sent, timeout=60, label="round 2 train", patience=30, stall=0.6)
    took = time.monotonic() - t0
    assert len(replies) == 3 and sum(r.has_error() for r in replies) == 1
    assert 0.6 <= took < 5, took
    lines = [line for line in flwr_log if line.startswith("round 2 train:")]
    assert any("2/3 replies after" in line and "waiting for node 3" in line for line in lines), lines
    assert any("3/3 replies (node 3" in line and "failed (the reply's upload stopped" in line for line in lines), lines


def test_a_superlink_call_that_never_returns_ends_the_round_after_the_patience(monkeypatch):
    monkeypatch.setattr(exchange, "PROGRESS_EVERY_S", 0.05)
    runtime = FakeRuntime()
    grid, sent = _http_grid(runtime, stalled=())
    runtime.PullMessages = lambda request: time.sleep(30)
    with pytest.raises(exchange.SuperLinkUnavailable, match="no answer from the SuperLink"):
        exchange.exchange(grid, sent, timeout=60, label="round 1 train", patience=0.3, stall=1)
