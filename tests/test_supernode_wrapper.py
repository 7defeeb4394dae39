"""anytime_fl.supernode: a message whose run ends while the SuperNode receives it.

Flower's own receive step (`_pull_and_store_message`) runs against its real
in-memory NodeState; only the SuperLink's side is faked: the message's
content pull is refused as a restarted SuperLink refuses it ("Run is
finished"), after the node's SuperExec has started a ClientApp for the task.
"""

from __future__ import annotations

import time

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.metadata import Metadata
from flwr.common.constant import Status
from flwr.supercore.inflatable.inflatable_object import get_object_tree
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run, RunNotRunningException
from flwr.supernode import start_client_internal as sci
from flwr.supernode.nodestate import NodeStateFactory

from anytime_fl import supernode

NODE, RUN = 7, 1234


@pytest.fixture
def original(monkeypatch):
    """Flower's function; whatever a test patches is undone afterwards."""
    monkeypatch.setattr(sci, "_pull_and_store_message", sci._pull_and_store_message)
    return sci._pull_and_store_message


def _receive_a_message_of_an_ended_run():
    """Run Flower's receive step once; the content pull is refused once the ClientApp
    has taken the task. Returns (return value, node state, the task's id)."""
    state = NodeStateFactory(ObjectStoreFactory()).state()
    state.set_node_id(NODE)
    run = Run.create_empty(RUN)
    state.store_run(run)  # a run this node already knows: no FAB download
    meta = Metadata(RUN, "", 1, NODE, "", "1", time.time(), 600.0, "train")
    msg = Message(metadata=meta, content=RecordDict({"c": ConfigRecord({"x": 1})}))
    msg.metadata.__dict__["_message_id"] = msg.object_id
    taken = {}

    def pull_object(run_id, object_id):
        # What the node's SuperExec and flwr-clientapp have done by now: claimed and started the task.
        (task,) = state.get_tasks(run_ids=[RUN])
        taken["token"] = state.claim_task(task.task_id)
        assert state.activate_task(task.task_id)
        taken["task_id"] = task.task_id
        raise RunNotRunningException  # the restarted SuperLink: "Run is finished"

    out = sci._pull_and_store_message(
        state=state,
        object_store=state.object_store,
        node_config={},
        receive=lambda: (msg, get_object_tree(msg)),
        get_run=lambda run_id: pytest.fail("the run is known"),
        get_fab=lambda fab_hash, run_id: pytest.fail("the run is known"),
        pull_object=pull_object,
        confirm_message_received=lambda run_id, message_id: None,
        trusted_entities=None,
    )
    return out, state, taken["task_id"]


def test_flower_alone_keeps_the_task_of_an_ended_run_open(original):
    # Why the wrapper exists: the ClientApp's heartbeat stays accepted and its message stays
    # pending, so it waits for content that never comes.
    out, state, task_id = _receive_a_message_of_an_ended_run()
    assert out is None
    (task,) = state.get_tasks(task_ids=[task_id])
    assert task.status.status != Status.FINISHED
    assert state.acknowledge_task_heartbeat(task_id)


def test_wrapped_supernode_finishes_the_task_so_its_clientapp_ends(original):
    assert supernode.patch_message_cleanup()
    assert supernode.patch_message_cleanup(), "patching twice is harmless"
    out, state, task_id = _receive_a_message_of_an_ended_run()
    assert out is None
    (task,) = state.get_tasks(task_ids=[task_id])
    assert task.status.status == Status.FINISHED
    assert "no longer running" in task.status.details
    # The ClientApp's next heartbeat is refused: Flower's HeartbeatSender then stops it (SIGINT).
    assert not state.acknowledge_task_heartbeat(task_id)
    assert state.get_messages_legacy(run_ids=[RUN], is_reply=False) == []


def test_other_pull_errors_pass_unchanged():
    calls = []

    def fn(x):
        calls.append(x)
        raise KeyError(x)

    wrapped = supernode._as_error(fn, RunNotRunningException)
    with pytest.raises(KeyError):
        wrapped(3)
    assert calls == [3]


def test_without_flowers_receive_step_the_wrapper_changes_nothing(monkeypatch):
    monkeypatch.delattr(sci, "_pull_and_store_message")
    assert not supernode.patch_message_cleanup()
